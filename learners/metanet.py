"""Meta Networks (Munkhdalai and Yu, 2017).

The meta-parameters are the slow weights of a base learner (the backbone with its N-way output
layer), of an embedding function (a copy of the backbone's body, ``embed.*``) and of two
meta-learners that turn loss gradients into fast weights (``learners.nets.metanet``): d
(``d.*``, a coordinate-wise LSTM) and m (``m.*``, a coordinate-wise MLP). ``adapt`` makes
task-level fast weights for the embedding -- d reads the gradients of a contrastive
representation loss on support pairs, one step per group of support examples -- embeds the support set
with them into the memory keys R, and makes example-level fast weights for the base learner --
m maps each support example's own classification-loss gradient (``vmap`` over examples) -- into
the memory M. ``predict`` embeds each query, reads its fast weights by softmax attention over the
cosine similarities to R, and runs the base learner with slow plus fast weights (layer
augmentation). Slow weights, d and m are trained on the query loss.

As in the authors' code: the meta-learners' input gradients are constants (no second order),
every convolution and linear weight gets fast weights (biases and BatchNorm do not), and each
query and each support example's gradient runs through the base learner on its own (batch of
one). Simplified: one d and one m for all layers (the authors keep one pair for convolutions,
one for linear layers), and the representation loss is the contrastive loss over all support
pairs (the paper's pair variant) rather than a classifier on the embedding.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from learners.base import Adapted, Hyperparameters, Learner, Objective, Params
from learners.functional import entries, fresh_params, one_hot, without
from learners.nets.metanet import CoordinateLSTM, CoordinateMLP, augmented, fast_names

NETS = ("embed.", "d.", "m.")


class MetaNetHyperparameters(Hyperparameters):
    meta_hidden: int = Field(10, ge=1, description="hidden units of the meta-learners d and m "
                             "(paper: 20; their cost is per weight, so half is faster on a CPU)")
    d_steps: int = Field(5, ge=1, description="steps of d: the support set is read in this many "
                         "groups (the authors' code: 5)")
    margin: float = Field(1.0, gt=0, description="margin of the contrastive representation loss, "
                          "on unit-length embeddings")


class MetaNet(Learner):
    """Meta Networks with fast-parameterised, layer-augmented embedding and base learner."""

    name = "metanet"
    family = "model-based"
    Hyperparameters = MetaNetHyperparameters
    task_kinds = ("classification",)
    unsupported_backbones = {"resnet12": "its layer-augmented fast weights follow a plain chain "
                                         "of layers, which ResNet-12's skip connections are not; "
                                         "use conv4"}
    search_space = {"outer_lr": {"low": 0.0003, "high": 0.003, "log": True}}
    # Its per-example fast weights normalise one image at a time, where BatchNorm at 1x1 maps
    # divides rounding error by sqrt(eps): channels-last convolutions round differently and a
    # 40-iteration run then ends elsewhere (0.28 against 0.36 accuracy), so MetaNet keeps the
    # NCHW order its benchmark figures were measured with.
    channels_last_images = False

    def __init__(self, backbone, objective: Objective, hparams: MetaNetHyperparameters):
        super().__init__(backbone, objective, hparams)
        self.embedding = copy.deepcopy(backbone)
        self.embedding.head = nn.Identity()
        self.d = CoordinateLSTM(hparams.meta_hidden)
        self.m = CoordinateMLP(hparams.meta_hidden)
        self.base_fast = fast_names(backbone)
        self.embed_fast = fast_names(self.embedding)

    def initial_params(self, generator: torch.Generator) -> Params:
        params = super().initial_params(generator)
        for prefix, net in zip(NETS, (self.embedding, self.d, self.m)):
            params.update(fresh_params(net, generator, prefix))
        return params

    def check_ways(self, params: Params, ways: int) -> None:
        most = self.servable_ways(params)
        if most is not None and ways > most:
            raise ValueError(f"this metanet model's base learner has a {most}-way output layer; "
                             f"it cannot tell {ways} classes apart (train it on {ways}-way tasks)")

    @staticmethod
    def base(params: Params) -> Params:
        """The base learner's slow weights: the meta-parameters less the embedding, d and m."""
        return without(params, *NETS)

    # -- the two kinds of fast weights ---------------------------------------------------------

    def representation_loss(self, embed: Params, x: Tensor, y: Tensor, anchor: Tensor) -> Tensor:
        """Contrastive loss of the support pairs (i, j), j != i, for i in ``anchor`` (a 0/1
        mask over the support set)."""
        r = F.normalize(functional_call(self.embedding, embed, (x,)).flatten(1), dim=-1)
        squared = (2 - 2 * r @ r.T).clamp_min(0)  # squared distance of unit vectors
        distance = squared.clamp_min(1e-12).sqrt()  # finite gradient at zero distance
        same = (y.unsqueeze(0) == y.unsqueeze(1)).to(r.dtype)
        losses = same * squared + (1 - same) * F.relu(self.hparams.margin - distance) ** 2
        others = 1 - torch.eye(len(y), dtype=r.dtype, device=r.device)
        pairs = anchor.unsqueeze(1) * others
        return (losses * pairs).sum() / pairs.sum()

    def task_fast_weights(self, params: Params, x: Tensor, y: Tensor) -> Params:
        """d over the representation-loss gradients of ``d_steps`` groups of support examples
        (example i in group i mod d_steps), one step per group."""
        slow = {k: v.detach() for k, v in entries(params, "embed.").items()}

        def loss(fast: Params, anchor: Tensor) -> Tensor:
            return self.representation_loss({**slow, **fast}, x, y, anchor)

        steps = min(self.hparams.d_steps, len(y))
        anchors = one_hot(torch.arange(len(y), device=x.device) % steps, steps).T.to(x.dtype)
        grads = vmap(grad(loss), in_dims=(None, 0))({k: slow[k] for k in self.embed_fast}, anchors)
        flat = torch.cat([grads[k].flatten(1) for k in self.embed_fast], dim=1)
        return self.split(self.call_net(self.d, "d.", params, flat), self.embedding,
                          self.embed_fast)

    def example_fast_weights(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """m over each support example's own classification-loss gradient: ``[examples, P]``."""
        slow = {k: v.detach() for k, v in self.base(params).items()}

        def loss(fast: Params, xi: Tensor, yi: Tensor) -> Tensor:
            logits = functional_call(self.backbone, {**slow, **fast}, (xi.unsqueeze(0),))
            return self.objective.loss(logits, yi.unsqueeze(0))

        grads = vmap(grad(loss), in_dims=(None, 0, 0))({k: slow[k] for k in self.base_fast}, x, y)
        flat = torch.cat([grads[k].flatten(1) for k in self.base_fast], dim=1)
        return self.call_net(self.m, "m.", params, flat)

    def call_net(self, net: nn.Module, prefix: str, params: Params, gradients: Tensor) -> Tensor:
        return functional_call(net, entries(params, prefix), (gradients.detach(),))

    @staticmethod
    def split(flat: Tensor, net: nn.Module, names: list[str]) -> Params:
        """A flat vector (leading dimensions kept) back into ``net``'s weight shapes."""
        shapes = {k: v.shape for k, v in net.named_parameters() if k in names}
        sizes = [shapes[k].numel() for k in names]
        lead = flat.shape[:-1]
        return {k: v.reshape(*lead, *shapes[k]) for k, v in zip(names, flat.split(sizes, dim=-1))}

    # -- the learner verbs ---------------------------------------------------------------------

    def keys(self, params: Params, embed_fast: Params, x: Tensor) -> Tensor:
        return augmented(self.embedding, entries(params, "embed."), embed_fast, x).flatten(1)

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, *,
              ways: int | None = None, steps: int | None = None) -> Adapted:
        embed_fast = self.task_fast_weights(params, support_x, support_y)
        memory = self.example_fast_weights(params, support_x, support_y)
        return {"keys": self.keys(params, embed_fast, support_x), "memory": memory,
                **{f"embed_fast.{k}": v for k, v in embed_fast.items()}}

    def predict(self, params: Params, adapted: Adapted, query_x: Tensor) -> Tensor:
        embed_fast = entries(adapted, "embed_fast.")
        queries = self.keys(params, embed_fast, query_x)
        similarity = F.normalize(queries, dim=-1) @ F.normalize(adapted["keys"], dim=-1).T
        fast = self.split(torch.softmax(similarity, dim=-1) @ adapted["memory"], self.backbone,
                          self.base_fast)
        slow = self.base(params)
        return vmap(lambda f, x: augmented(self.backbone, slow, f, x.unsqueeze(0))[0])(
            fast, query_x)
