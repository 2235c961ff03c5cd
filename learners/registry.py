"""Algorithm name -> learner class; the only place that lists them."""

from __future__ import annotations

from learners.alpaca import ALPaCA
from learners.anil import ANIL
from learners.base import FAMILIES, Learner
from learners.baseline import Baseline
from learners.baselinepp import BaselinePlusPlus
from learners.fomaml import FOMAML
from learners.imaml import IMAML
from learners.maml import MAML
from learners.mamlpp import MAMLPlusPlus
from learners.matching import Matching
from learners.meta_lstm import MetaLSTM
from learners.metanet import MetaNet
from learners.metaoptnet import MetaOptNet
from learners.metasgd import MetaSGD
from learners.protonet import ProtoNet
from learners.relation import Relation
from learners.reptile import Reptile
from learners.sca import SCA
from learners.siamese import Siamese
from learners.simpleshot import SimpleShot
from learners.snail import SNAIL

# Within a family, in the order the README's algorithm table lists them.
_CLASSES: tuple[type[Learner], ...] = (
    MAML, FOMAML, Reptile, IMAML, MetaSGD, ANIL, MAMLPlusPlus, MetaLSTM, SCA,
    ProtoNet, Matching, Relation, Siamese,
    MetaOptNet, ALPaCA,
    SNAIL, MetaNet,
    Baseline, BaselinePlusPlus, SimpleShot,
)


def _family_rank(cls: type[Learner]) -> int:
    """Where ``cls``'s family comes in ``FAMILIES``; a learner declaring none of them is refused."""
    family = getattr(cls, "family", None)
    if family not in FAMILIES:
        raise TypeError(f"{cls.__name__}.family is {family!r}; allowed: {', '.join(FAMILIES)}")
    return FAMILIES.index(family)


# Grouped by family, in ``FAMILIES``' order; within a family, in ``_CLASSES``' order.
LEARNERS: dict[str, type[Learner]] = {cls.name: cls for cls in sorted(_CLASSES, key=_family_rank)}


def learner_class(name: str) -> type[Learner]:
    try:
        return LEARNERS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; allowed: {', '.join(sorted(LEARNERS))}") from None
