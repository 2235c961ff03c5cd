"""Algorithm name -> learner class; the only place that lists them."""

from __future__ import annotations

from learners.base import Learner
from learners.fomaml import FOMAML
from learners.maml import MAML
from learners.metanet import MetaNet
from learners.protonet import ProtoNet
from learners.reptile import Reptile
from learners.snail import SNAIL

LEARNERS: dict[str, type[Learner]] = {cls.name: cls for cls in (MAML, FOMAML, Reptile, ProtoNet, SNAIL, MetaNet)}


def learner_class(name: str) -> type[Learner]:
    try:
        return LEARNERS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; allowed: {', '.join(sorted(LEARNERS))}") from None
