"""Baseline (Chen, Liu, Kira, Wang and Huang, 2019, "A Closer Look at Few-shot Classification").

The meta-parameters are a backbone and a linear classifier over every class of the training
split, trained with cross-entropy on ordinary minibatches (``learners/pretraining.py``). ``adapt``
fits a new linear head to the task's frozen support features -- SGD as in the authors' code,
wyharveychen/CloserLookFewShot ``methods/baselinefinetune.py`` -- and ``predict`` applies it.
"""

from __future__ import annotations

from learners.pretraining import FitsHead, LinearHead


class Baseline(LinearHead, FitsHead):
    """A linear classifier pretrained over all training classes; a new linear head per task."""

    name = "baseline"
