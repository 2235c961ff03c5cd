"""The networks that belong to one algorithm, kept out of its learner file so that file reads as the
algorithm: MAML++'s per-step BatchNorm forward pass (``mamlpp``), the LSTM meta-learner's
coordinate-wise LSTM (``meta_lstm``), Meta Networks' layer augmentation and meta-learners
(``metanet``), the metric learners' full context embeddings, relation module and verification head
(``metric``), Self-Critique and Adapt's critic (``sca``) and SNAIL's sequence model (``snail``).
Each is a pure function of a parameter dict, or an ``nn.Module`` that only holds and initialises
weights for one, so it runs under ``torch.func`` transforms; the interface every learner
implements stays in ``learners.base``.
"""
