"""Meta-training and what it produces, in plain PyTorch: no outside system.

- ``loop``: the outer loop of one trial (``MetaTrainer``), its state (``LoopState``, what a
  checkpoint holds) and the shard workers that compute a meta-batch's gradient (``ShardWorker``,
  ``LocalFarm``; ``services.cluster`` farms them over Ray actors);
- ``factory``: learners and task families built from a sweep's sections;
- ``meta_model``: a trained model as a folder (weights and spec), loaded, adapted and predicting;
- ``initial``: the backbone weights a sweep's trials start from (``model.init``).

May import: ``orchestrator.config``, ``orchestrator.errors``, ``orchestrator.plots``, and
``learners`` and ``pipelines``; nothing of the other sub-packages (checked by
tests/test_layout.py), so that training, serving and the benchmarks share this code without
touching Ray, MLflow or Optuna.
"""
