"""Meta-learning algorithms behind one interface (``learners.base.Learner``)."""

from learners.base import Hyperparameters, Learner, Objective
from learners.registry import LEARNERS, learner_class

__all__ = ["Hyperparameters", "Learner", "Objective", "LEARNERS", "learner_class"]
