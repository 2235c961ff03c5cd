"""The coordinate-wise two-layer LSTM of Ravi and Larochelle (2017), as pure functions of a dict.

Every coordinate of the learner's flattened weights is one element of a batch: the first layer is
an ordinary LSTM over that coordinate's preprocessed (loss, gradient) input; the second is the
"meta-learner" cell whose cell state *is* the weight,

    c_t = f_t * c_{t-1} - i_t * grad_t,
    f_t = sigmoid(W_F . [h_t, c_{t-1}, f_{t-1}] + b_F),   i_t = sigmoid(W_I . [h_t, c_{t-1}, i_{t-1}] + b_I),

so with f = 1 and i = a learning rate it is gradient descent. ``MetaLearnerLSTM`` only holds and
initialises the weights (keys ``lstm.*`` of the meta-parameters); ``step`` computes with a dict.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from learners.nets.lstm import lstm_cell, preprocess

PREPROCESS_P = 10.0  # the paper's (Andrychowicz et al. 2016) preprocessing constant p


class MetaLearnerLSTM(nn.Module):
    """Weights of the two layers: an LSTM cell with 4 inputs and ``hidden`` units, and the gates of
    the meta-learner cell (``hidden`` + 2 inputs each)."""

    def __init__(self, hidden: int, *, initial_lr: float):
        super().__init__()
        self.hidden, self.initial_lr = hidden, initial_lr
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden, 4))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden, hidden))
        self.bias_ih = nn.Parameter(torch.empty(4 * hidden))
        self.bias_hh = nn.Parameter(torch.empty(4 * hidden))
        self.forget_weight = nn.Parameter(torch.empty(hidden + 2))
        self.forget_bias = nn.Parameter(torch.empty(()))
        self.input_weight = nn.Parameter(torch.empty(hidden + 2))
        self.input_bias = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.hidden)  # nn.LSTMCell's initialisation
        for weight in (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh):
            nn.init.uniform_(weight, -bound, bound)
        nn.init.uniform_(self.forget_weight, -0.01, 0.01)
        nn.init.uniform_(self.input_weight, -0.01, 0.01)
        # The paper starts as gradient descent: forget gate near 1 (bias in [4, 6]) and a small
        # input gate, the learning rate (bias in [-5, -4], about 0.01; here centred on initial_lr).
        nn.init.uniform_(self.forget_bias, 4.0, 6.0)
        centre = math.log(self.initial_lr / (1 - self.initial_lr))
        nn.init.uniform_(self.input_bias, centre - 0.5, centre + 0.5)


# (h, c) of the first layer, [hidden, coordinates], and the previous f and i gates, [coordinates].
# Coordinates last, so that each gate's block of the first layer is contiguous in memory.
State = tuple[Tensor, Tensor, Tensor, Tensor]


def initial_state(weights: Tensor, hidden: int) -> State:
    """Zero LSTM state and gates for ``weights`` coordinates (the cell state is the weights)."""
    zeros = weights.new_zeros(hidden, weights.shape[0])
    gate = weights.new_zeros(weights.shape[0])
    return zeros, zeros, gate, gate


def step(params: dict[str, Tensor], weights: Tensor, state: State, loss: Tensor,
         gradient: Tensor) -> tuple[Tensor, State]:
    """One update of the flattened learner ``weights`` (the cell state) from its support ``loss``
    and ``gradient``; ``params`` holds the LSTM's weights (the ``lstm.*`` entries, prefix removed).
    Returns (new weights, new state)."""
    h, c, f_prev, i_prev = state
    hidden = h.shape[0]
    w_ih = params["weight_ih"]
    # The loss is the same for every coordinate: its share of the gates is one column, broadcast.
    shared = (w_ih[:, :2] @ preprocess(loss, PREPROCESS_P) + params["bias_ih"]
              + params["bias_hh"])
    gates = (w_ih[:, 2:] @ preprocess(gradient, PREPROCESS_P).T + params["weight_hh"] @ h
             + shared.unsqueeze(-1))
    h, c = lstm_cell(gates, c, dim=0)
    # The meta-learner gates: W . [h, c_{t-1}, previous gate] + b, for W_F and W_I at once.
    w_f, w_i = params["forget_weight"], params["input_weight"]
    both = torch.stack([w_f[:hidden], w_i[:hidden]]) @ h
    f = torch.sigmoid(both[0] + weights * w_f[hidden] + f_prev * w_f[hidden + 1]
                      + params["forget_bias"])
    i = torch.sigmoid(both[1] + weights * w_i[hidden] + i_prev * w_i[hidden + 1]
                      + params["input_bias"])
    return f * weights - i * gradient, (h, c, f, i)
