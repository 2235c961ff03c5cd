"""The LSTM meta-learner: "Optimization as a Model for Few-Shot Learning" (Ravi and Larochelle, 2017).

The meta-parameters are the learner network's initial weights -- the LSTM's initial cell state --
and the weights of a coordinate-wise two-layer LSTM (``lstm.*``, see ``learners.nets.meta_lstm``).
``adapt`` flattens the learner's weights into one vector and lets the LSTM update every coordinate
``inner_steps`` (T) times from the preprocessed support loss and gradient; it returns the final
cell state, unflattened: the task's weights. As in the paper, the learner's loss and gradients are
constants of the outer gradient (``first_order``) and BatchNorm uses batch statistics at test time.
Unlike the paper, each update sees the whole support set (no mini-batches), and the input gate
starts at ``initial_lr`` (default 0.1; the paper about 0.01) so that few updates suffice.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor
from torch.func import grad

from learners.base import Adapted, Objective, Params
from learners.functional import entries, fresh_params, without
from learners.maml import MAML, HeadKnob
from learners.nets.meta_lstm import MetaLearnerLSTM, initial_state, step

PREFIX = "lstm."


class MetaLSTMHyperparameters(HeadKnob):
    inner_steps: int = Field(3, ge=1, le=100, description="T: LSTM updates of the learner's "
                             "weights on the support set (each on the whole support set)")
    hidden_size: int = Field(20, ge=1, le=256, description="units of the first, coordinate-wise "
                             "LSTM layer (the paper's 20)")
    first_order: bool = Field(True, description="treat the learner's support loss and gradients "
                              "as constants of the outer gradient (the paper's approximation: no "
                              "second derivatives); false differentiates through them too")
    initial_lr: float = Field(0.1, gt=0, lt=1, description="the input gate's value at "
                              "initialisation: the learning rate the LSTM starts from as gradient "
                              "descent (the paper's bias in [-5, -4] is about 0.01; Omniglot on a "
                              "CPU budget needs a larger start)")


class MetaLSTM(MAML):
    """Ravi and Larochelle's meta-learner LSTM, vectorised over all coordinates at once."""

    name = "meta_lstm"
    Hyperparameters = MetaLSTMHyperparameters
    search_space = {"initial_lr": {"low": 0.01, "high": 0.5, "log": True},
                    "outer_lr": {"low": 0.0003, "high": 0.003, "log": True}}

    def __init__(self, backbone, objective: Objective, hparams: MetaLSTMHyperparameters):
        super().__init__(backbone, objective, hparams)
        self.meta_learner = MetaLearnerLSTM(hparams.hidden_size, initial_lr=hparams.initial_lr)

    def initial_params(self, generator: torch.Generator) -> Params:
        learner = super().initial_params(generator)  # draws the backbone first
        return {**learner, **fresh_params(self.meta_learner, generator, PREFIX)}

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, *,
              ways: int | None = None, steps: int | None = None) -> Adapted:
        lstm = entries(params, PREFIX)
        start = self.task_params(without(params, PREFIX), self.ways_of(support_y, ways))
        shapes = {k: v.shape for k, v in start.items()}
        sizes = [math.prod(shape) for shape in shapes.values()]

        def unflatten(flat: Tensor) -> Params:
            return {k: part.reshape(shapes[k]) for k, part in zip(shapes, flat.split(sizes))}

        def support_loss(flat: Tensor) -> tuple[Tensor, Tensor]:
            loss = self.support_loss(unflatten(flat), support_x, support_y)
            return loss, loss

        weights = torch.cat([v.reshape(-1) for v in start.values()])
        state = initial_state(weights, self.hparams.hidden_size)
        for _ in range(self.hparams.inner_steps if steps is None else steps):
            gradient, loss = grad(support_loss, has_aux=True)(weights)
            if self.hparams.first_order:
                gradient, loss = gradient.detach(), loss.detach()
            weights, state = step(lstm, weights, state, loss, gradient)
        return unflatten(weights)
