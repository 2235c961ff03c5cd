"""Meta-Dataset's episodes: variable ways, imbalanced shots, balanced queries (Triantafillou et
al. 2020, "Meta-Dataset: A Dataset of Datasets for Learning to Learn from Few Examples", its
appendix, and google-research/meta-dataset ``meta_dataset/data/sampling.py``).

An episode of a split with ``C`` classes (each rotation a class where the split is rotated) is
composed in four draws, with the paper's constants:

1. ways uniform in ``[5, min(50, C)]``, then that many classes uniformly without replacement;
2. queries per class ``min(10, floor(min_c images_c / 2))``: the same for every class;
3. the support set's size ``min(500, sum_c floor(beta * min(100, remaining_c) + 1))`` with one
   ``beta`` uniform in ``[0, 1)``, ``remaining_c`` the class's images left after its queries;
4. shots per class ``min(remaining_c, floor(p_c * (size - ways)) + 1)``, with
   ``p_c`` proportional to ``images_c * exp(u_c)``, ``u_c`` uniform in ``[log 0.5, log 2]``:
   roughly the class's share of the images, perturbed, at least one each.

Episode ``index`` of ``split`` under ``seed`` is a pure function of the three (a NumPy generator
seeded by ``task_seed``), so Ray workers draw the same episodes as the driver. The images of each
class are then drawn without repeats and assembled as ``EpisodeFamily`` assembles its episodes.
Omniglot's bi-level and ImageNet's DAG class hierarchies of Meta-Dataset are not used: classes
are drawn uniformly from the split, as for every other Meta-Dataset source. Episodes of several
imports come whole from one of them (``MixedEpisodes``); which one is drawn uniformly, as
Meta-Dataset's ``make_multisource_episode_pipeline`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pipelines.base import Task, task_seed
from pipelines.dataset import DatasetError
from pipelines.episodes import ROTATIONS, EpisodeFamily

MIN_WAYS = 5
MAX_WAYS = 50
MAX_QUERIES = 10
MAX_SUPPORT = 500
MAX_CONTRIBUTION = 100  # a class's most images counted toward the support set's size
LOG_WEIGHTS = (math.log(0.5), math.log(2.0))


@dataclass(frozen=True)
class Composition:
    """Which classes an episode has (positions in the list it was drawn from), and how many
    support and query images of each."""

    classes: np.ndarray
    support: np.ndarray
    queries: int
    budget: int  # the support set's size drawn in step 3; the shots of step 4 add up to at most it

    @property
    def ways(self) -> int:
        return len(self.classes)


def sample_composition(generator: np.random.Generator, images: np.ndarray) -> Composition:
    """An episode's composition over classes holding ``images[c]`` images each (the module
    docstring's four draws). Needs at least ``MIN_WAYS`` classes of at least 2 images."""
    images = np.asarray(images, dtype=np.int64)
    if len(images) < MIN_WAYS:
        raise ValueError(f"variable-way episodes need at least {MIN_WAYS} classes, got "
                         f"{len(images)}")
    ways = int(generator.integers(MIN_WAYS, min(MAX_WAYS, len(images)) + 1))
    classes = generator.choice(len(images), ways, replace=False)
    chosen = images[classes]
    if chosen.min() < 2:
        raise ValueError("variable-way episodes need at least 2 images per class")
    queries = int(min(MAX_QUERIES, (chosen // 2).min()))
    remaining = chosen - queries
    beta = generator.uniform()
    size = int(min(np.floor(beta * np.minimum(MAX_CONTRIBUTION, remaining) + 1).sum(),
                   MAX_SUPPORT))
    weights = chosen * np.exp(generator.uniform(*LOG_WEIGHTS, size=ways))
    desired = np.floor(weights / weights.sum() * (size - ways)).astype(np.int64) + 1
    return Composition(classes, np.minimum(desired, remaining), queries, size)


class VariableEpisodes(EpisodeFamily):
    """Meta-Dataset-style episodes from the import in ``path``: ways, shots and queries are
    drawn per episode (``sample_composition``), so tasks differ in shape (``fixed_shape``)."""

    def __init__(self, path: str, **options: Any):
        for fixed in ("ways", "shots", "queries"):
            if fixed in options:
                raise TypeError(f"variable-way episodes draw their own {fixed}")
        super().__init__(path, ways=MIN_WAYS, shots=1, queries=1, **options)

    def task(self, split: str, seed: int, index: int, *, shots: int | None = None) -> Task:
        if shots is not None:
            raise ValueError("variable-way episodes draw their own shots; a shots override "
                             "is for fixed N-way K-shot episodes")
        data = self.data
        classes = self._check(split, 1)
        rotations = ROTATIONS if split in self.rotate_splits else 1
        generator = np.random.default_rng(task_seed(seed, f"{split}/variable", index))
        images = np.repeat(data.class_count[classes], rotations)  # virtual class v: v // rotations
        composition = sample_composition(generator, images)
        orders = [generator.choice(int(images[virtual]), int(k) + composition.queries,
                                   replace=False)
                  for virtual, k in zip(composition.classes, composition.support)]
        return self.assemble(split, composition.classes.tolist(), orders,
                             composition.support.tolist())

    def composition(self, split: str, seed: int, index: int) -> Composition:
        """The composition of episode ``index`` (what ``task`` draws first)."""
        classes = self._check(split, 1)
        rotations = ROTATIONS if split in self.rotate_splits else 1
        generator = np.random.default_rng(task_seed(seed, f"{split}/variable", index))
        return sample_composition(generator,
                                  np.repeat(self.data.class_count[classes], rotations))

    def _check(self, split: str, shots: int) -> np.ndarray:
        classes = self._classes(split)
        if (split, 0) in self._ready:
            return classes
        rotations = ROTATIONS if split in self.rotate_splits else 1
        if len(classes) * rotations < MIN_WAYS:
            raise DatasetError(f"{self.where}: split {split!r} has {len(classes) * rotations} "
                               f"classes; variable-way episodes (Meta-Dataset's) need at least "
                               f"{MIN_WAYS}: use data.episodes: fixed or re-import with more "
                               "classes")
        counts = self.data.class_count[classes]
        if counts.min() < 2:
            raise DatasetError(f"{self.where}: a class of split {split!r} (id "
                               f"{int(classes[counts.argmin()])}) has 1 image; variable-way "
                               "episodes need at least 2 per class")
        self._ready.add((split, 0))
        return classes

    def check_splits(self, splits: Sequence[str], shots: int) -> None:
        for split in splits:
            self._check(split, 1)

    @property
    def fixed_shape(self) -> bool:
        return False

    @property
    def ways(self) -> int | None:
        return None

    def output_size(self) -> int:
        return MAX_WAYS

    def fingerprint_spec(self) -> dict[str, Any]:
        spec = super().fingerprint_spec()
        for fixed in ("ways", "shots", "queries"):
            del spec[fixed]
        return {**spec, "episodes": "variable",
                "sampler": {"ways": [MIN_WAYS, MAX_WAYS], "max_queries": MAX_QUERIES,
                            "max_support": MAX_SUPPORT, "max_contribution": MAX_CONTRIBUTION,
                            "log_weights": [round(w, 6) for w in LOG_WEIGHTS]}}
