"""Prototypical Networks (Snell, Swersky and Zemel, 2017).

The meta-parameters are an embedding network's weights (a backbone without a head). ``adapt``
embeds the support set and averages each class's embeddings into a prototype; ``predict`` scores a
query by its negative squared Euclidean distance to every prototype, so a softmax over the logits is
the paper's distribution over classes. There is no inner loop: adaptation is one forward pass.
"""

from __future__ import annotations

from torch import Tensor

from learners.backbones import call
from learners.base import Adapted, Learner, Params
from learners.functional import one_hot


class ProtoNet(Learner):
    """Prototypical Networks with squared Euclidean distance."""

    name = "protonet"
    family = "metric"
    needs_head = False
    task_kinds = ("classification",)
    embeds = True

    def embed(self, params: Params, x: Tensor) -> Tensor:
        return call(self.backbone, params, x).flatten(start_dim=1)

    def embedding(self, params: Params, x: Tensor) -> Tensor:
        return self.embed(params, x)

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, *,
              ways: int | None = None, steps: int | None = None) -> Adapted:
        ways = self.ways_of(support_y, ways)
        embeddings = self.embed(params, support_x)
        members = one_hot(support_y, ways).to(embeddings.dtype)
        prototypes = members.transpose(0, 1) @ embeddings / members.sum(dim=0).unsqueeze(-1)
        return {"prototypes": prototypes}

    def predict(self, params: Params, adapted: Adapted, query_x: Tensor) -> Tensor:
        queries = self.embed(params, query_x)
        differences = queries.unsqueeze(1) - adapted["prototypes"].unsqueeze(0)
        return -(differences * differences).sum(dim=-1)
