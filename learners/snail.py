"""SNAIL, a Simple Neural Attentive Meta-Learner (Mishra, Rohaninejad, Chen and Abbeel, 2018).

The meta-parameters are an embedding network's weights (a backbone without a head) and a causal
sequence model's (``learners.nets.snail``: TC blocks and key-value attention, ``snail.*``). An
episode is a sequence: each support example as (embedding, one-hot label), then the query with a
zero label; the query's class is read at its position. There is no inner loop: ``adapt`` embeds
the support set and returns it with its one-hot labels; ``predict`` runs the sequence model.

Several queries share one pass: every query sits right after the whole support set and sees the
support (and, with ``query_sees_itself``, itself), never another query (the same as one sequence
per query). The label width (``max_ways``) and the sequence length the TC blocks cover
(``max_support``) are fixed when the model is built; a task beyond either is refused
(``check_task_shape``). As in the paper, the support order is the episode's and the loss is the
query's cross-entropy.

Where this departs from a literal reading of the paper (each a knob; defaults measured on
Omniglot, see benchmarks/omniglot.py): attention blocks start with their key projection equal to
their query projection (``tied_init``; the paper does not say how it initialises). With
independent random projections, attention starts uniform and on a CPU budget never learns to
match a query with its support example: the model instead learned slow position-by-position
comparisons (these episodes list the support in label order) and reached 67% 5-way after 2 CPU
minutes; tied, attention starts as a similarity and matches from the first iterations (89%). A
query's attention covers the support only (``query_sees_itself: false``; the paper's causal mask
includes the current step, but at the query that is its own zero label, and leaving it out gained
about 3 points). The embedding's BatchNorm normalises the support set and the queries as separate
batches (embedding both as one batch, as the SNAIL code we read does, scored the same 92% in
benchmarks/omniglot.py's 2-minute runs); the queries of an episode share their batch statistics,
so a query influences the other queries' embeddings (not their sequence-model outputs).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor
from torch.func import functional_call

from learners.backbones import call
from learners.base import Adapted, Hyperparameters, Learner, Objective, Params
from learners.functional import entries, fresh_params, one_hot, without
from learners.nets.snail import AttentionBlock, SequenceModel

PREFIX = "snail."


class SNAILHyperparameters(Hyperparameters):
    max_ways: int = Field(5, ge=2, le=1000, description="most classes a task may have: the width "
                          "of the one-hot label input and of the output layer")
    max_support: int = Field(25, ge=1, le=10000, description="longest support set served: the TC "
                             "blocks get ceil(log2(max_support + 1)) dense layers to cover it")
    filters: int = Field(128, ge=1, description="filters of each dense layer of the TC blocks "
                         "(paper: 128)")
    key_size: int = Field(64, ge=1, description="key and query width of every attention block "
                          "(paper, Omniglot: 64, 256 and 512 for the three blocks; those did worse "
                          "on a CPU budget)")
    value_size: int = Field(32, ge=1, description="value width of every attention block (paper, "
                            "Omniglot: 32, 128 and 256)")
    query_sees_itself: bool = Field(False, description="a query's attention covers its own "
                                    "position as well as the support (the paper's causal mask "
                                    "includes the current step); false: the support only")
    tied_init: bool = Field(True, description="initialise each attention block's key "
                            "projection as a copy of its query projection, so attention starts "
                            "as a similarity between elements (trained apart afterwards); "
                            "false: independent random projections, attention starts uniform")


class SNAIL(Learner):
    """SNAIL with the paper's attention/TC/attention/TC/attention stack over embeddings."""

    name = "snail"
    family = "model-based"
    Hyperparameters = SNAILHyperparameters
    needs_head = False
    task_kinds = ("classification",)
    search_space = {"outer_lr": {"low": 0.0003, "high": 0.003, "log": True}}

    def __init__(self, backbone, objective: Objective, hparams: SNAILHyperparameters):
        super().__init__(backbone, objective, hparams)
        self.sequence = SequenceModel(backbone.feature_size + hparams.max_ways, hparams.max_ways,
                                      length=hparams.max_support + 1, filters=hparams.filters,
                                      key_size=hparams.key_size, value_size=hparams.value_size,
                                      query_sees_itself=hparams.query_sees_itself)

    def initial_params(self, generator: torch.Generator) -> Params:
        params = {**super().initial_params(generator),
                  **fresh_params(self.sequence, generator, PREFIX)}
        if self.hparams.tied_init:
            for name, module in self.sequence.named_modules():
                if isinstance(module, AttentionBlock):
                    for kind in ("weight", "bias"):
                        query = params[f"{PREFIX}{name}.query.{kind}"]
                        params[f"{PREFIX}{name}.key.{kind}"] = query.clone()
        return params

    @classmethod
    def check_task_shape(cls, hparams: SNAILHyperparameters, *, ways: int, support: int) -> None:
        if ways > hparams.max_ways:
            raise ValueError(f"snail with max_ways {hparams.max_ways} cannot serve {ways}-way "
                             f"tasks: its one-hot label input is {hparams.max_ways} wide; set "
                             f"max_ways to at least {ways}")
        if support > hparams.max_support:
            raise ValueError(f"snail with max_support {hparams.max_support} cannot serve a "
                             f"support set of {support} examples: its temporal convolutions "
                             f"cover {hparams.max_support}; set max_support to at least {support}")

    def servable_ways(self, params: Params) -> int | None:
        return self.hparams.max_ways

    def check_ways(self, params: Params, ways: int) -> None:
        self.check_task_shape(self.hparams, ways=ways, support=0)

    def embed(self, params: Params, x: Tensor) -> Tensor:
        return call(self.backbone, without(params, PREFIX), x).flatten(start_dim=1)

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, *,
              ways: int | None = None, steps: int | None = None) -> Adapted:
        ways = self.ways_of(support_y, ways)
        self.check_task_shape(self.hparams, ways=ways, support=support_x.shape[0])
        embeddings = self.embed(params, support_x)
        # One-hot over the task's classes; predict pads it to max_ways.
        return {"support": embeddings, "labels": one_hot(support_y, ways).to(embeddings.dtype)}

    def predict(self, params: Params, adapted: Adapted, query_x: Tensor) -> Tensor:
        labels = adapted["labels"]
        ways, width = labels.shape[-1], self.hparams.max_ways
        support, queries = adapted["support"], self.embed(params, query_x)
        sequence = torch.cat([support, torch.nn.functional.pad(labels, (0, width - ways))], dim=-1)
        queries = torch.cat([queries, queries.new_zeros(queries.shape[0], width)], dim=-1)
        _, logits = functional_call(self.sequence, entries(params, PREFIX), (sequence, queries))
        return logits[:, :ways]  # the task's classes only
