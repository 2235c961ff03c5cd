"""Algorithm name -> learner class; the only place that lists them."""

from __future__ import annotations

from learners.alpaca import ALPaCA
from learners.anil import ANIL
from learners.base import Learner
from learners.fomaml import FOMAML
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
from learners.snail import SNAIL

LEARNERS: dict[str, type[Learner]] = {cls.name: cls for cls in (
    # gradient-based and learned optimisers
    MAML, FOMAML, Reptile, MetaSGD, ANIL, MAMLPlusPlus, MetaLSTM, SCA,
    # metric-based
    ProtoNet, Matching, Relation, Siamese,
    # closed-form heads
    MetaOptNet, ALPaCA,
    # model-based
    SNAIL, MetaNet,
)}


def learner_class(name: str) -> type[Learner]:
    try:
        return LEARNERS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; allowed: {', '.join(sorted(LEARNERS))}") from None
