"""The weights a sweep's trials start from where ``model.init`` names a trained model: which
entries are the backbone's, and how they move into a learner's fresh meta-parameters.

What the backbone entries are: the meta-parameters named ``body.<name>``, one for each parameter
``<name>`` of the ``body`` of the learner's backbone module -- the feature extractor every
learner builds with ``learners.backbones.build_backbone`` and calls with its parameter dict (the
MLP's hidden layers, Conv-4's four blocks, ResNet-12's four residual blocks). Nothing else moves:
not the output layer (``head.*``), nor any learner's own networks and state, which live under
their own key prefixes (Meta-SGD's and MAML++'s rates ``lr.*``, SCA's critic, the LSTM
meta-learner, Matching's FCE, the relation and verification modules, SNAIL's blocks, MetaNet's
embedding copy ``embed.*`` and meta-learners, MetaOptNet's logit scale); these start as the
learner starts them. MAML++ keeps each BatchNorm weight and bias once per inner step
(``[steps + 1, channels]``): as a source it gives row 0, the row its un-adapted network
normalises with; as a target it takes the source's value in every row, as it starts them itself.

Finding and checking the model is ``models.pretrained``'s; this module is plain PyTorch, what the
training loop needs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from learners.base import Learner, Params

BODY = "body."


@dataclass(frozen=True)
class Init:
    """A resolved ``model.init``: where it came from and the backbone entries trials start from."""

    uri: str  # as the sweep file gives it
    origin: str  # what it resolved to: "orch-baselinepp version 3", "run <id>", a folder
    run_id: str | None  # the MLflow run that trained it, where known
    digest: str  # of the backbone entries (``digest``)
    weights: Params  # the backbone entries, in the backbone module's shapes, on the CPU

    def record(self) -> dict[str, str]:
        """What is recorded of it: on the trial's run and the registered version as tags
        ``orch.init.<key>`` (``tracking.init_tags``), in a trained model's spec as ``init``."""
        return {"uri": self.uri, "from": self.origin, "run_id": self.run_id or "",
                "digest": self.digest}


def backbone_shapes(learner: Learner) -> dict[str, torch.Size]:
    """The backbone entries' names and their shapes in the backbone module (see the module
    docstring)."""
    return {BODY + name: p.shape for name, p in learner.backbone.body.named_parameters()}


def backbone_weights(learner: Learner, params: Params) -> Params:
    """The backbone entries of ``params``, in the module's shapes: a per-step stack (MAML++'s
    BatchNorm rows) gives its row 0."""
    weights = {}
    for name, shape in backbone_shapes(learner).items():
        value = params[name]
        weights[name] = (value[0] if value.shape != shape and value.shape[1:] == shape
                         else value).detach().cpu().clone()
    return weights


def transplant(learner: Learner, params: Params, weights: Params) -> Params:
    """``params`` (a learner's fresh meta-parameters) with its backbone entries replaced by
    ``weights``: an entry of the module's shape is copied, a per-step stack takes the value in
    every row. Raises ValueError where an entry's shape fits neither (``resolve`` has refused
    such a model before any trial starts)."""
    out = dict(params)
    for name, shape in backbone_shapes(learner).items():
        value, target = weights[name], params[name]
        if value.shape != shape or target.shape[-len(shape):] != shape:
            raise ValueError(f"the initial backbone's {name} is {list(value.shape)}, this "
                             f"learner's {list(target.shape)}")
        value = value.to(dtype=target.dtype, device=target.device)
        out[name] = value.expand(target.shape).clone()  # a per-step stack: the value in each row
    return out


def digest(weights: Params) -> str:
    """A digest of named tensors: names, shapes, dtypes and values."""
    hasher = hashlib.sha256()
    for name in sorted(weights):
        value = weights[name].detach().cpu().contiguous()
        hasher.update(f"{name}:{list(value.shape)}:{value.dtype};".encode())
        hasher.update(value.numpy().tobytes())
    return hasher.hexdigest()[:16]
