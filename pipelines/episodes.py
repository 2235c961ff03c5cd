"""N-way K-shot episodes drawn from an imported image data set (``orch data import ...``).

Episode ``index`` of ``split`` under ``seed`` is a pure function of those three values (through
``task_seed``), so a Ray worker samples its own shard of a meta-batch from integers alone. An episode
picks N classes of the split in random order -- the order is the label remapping, class i of the
pick gets label i -- then K support and Q query images of each, without repeats. Pixels are read
from the memory-mapped Arrow file and converted to float only for the episode's own images.

With rotations on (``augment_rotations``), each class of the meta-training split also appears
rotated by 90, 180 and 270 degrees as three further classes; held-out splits keep only the real
classes, so validation accuracy means the same with or without augmentation.

The same import also serves ordinary minibatches for learners that pretrain a classifier over
every class of a split (``minibatches``): epoch after epoch, each a fresh seeded order of every
image of the split (and each rotation of it, a class of its own), cut into shards of ``size``;
shard ``index`` is again a pure function of (split, seed, index). Colour images are also
randomly cropped, resized back and flipped (``pipelines.augment``), as the pretraining papers
did; single-channel images (Omniglot's characters, where a flip or crop can make another
character) are not, as Chen et al. (2019) did not for Omniglot.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np
import torch

from pipelines.augment import crop_and_flip
from pipelines.base import Minibatches, Task, TaskFamily, task_seed
from pipelines.dataset import DatasetError, ImageDataset, open_dataset
from pipelines.preprocessing import normalise

ROTATIONS = 4


class EpisodeFamily(TaskFamily):
    """Few-shot classification episodes from the import in ``path``."""

    kind = "classification"

    def __init__(self, path: str | os.PathLike[str], *, ways: int = 5, shots: int = 1,
                 queries: int = 15, image_size: int | None = None,
                 rotate_splits: Collection[str] = (), verify: bool = False):
        if ways < 2 or shots < 1 or queries < 1:
            raise ValueError(f"episodes need ways >= 2, shots >= 1, queries >= 1; got "
                             f"{ways}, {shots}, {queries}")
        self.path = Path(path)
        self._ways, self.shots, self.queries = ways, shots, queries
        self.rotate_splits = frozenset(rotate_splits)
        self._data: ImageDataset | None = open_dataset(self.path, verify_checksums=verify)
        stored = self._data.shape[-1]
        if image_size is not None and image_size != stored:
            raise DatasetError(f"{self.path}: imported at {stored}x{stored} pixels but data.image_size "
                               f"is {image_size}; re-import with --size {image_size} or drop image_size")
        self._ready: set[tuple[str, int]] = set()
        # The latest epoch orders of ``minibatches``, by (split, seed, epoch).
        self._orders: dict[tuple[str, int, int], np.ndarray] = {}
        for split in self.rotate_splits:
            self._classes(split)

    def check_splits(self, splits: Sequence[str], shots: int) -> None:
        """Fail now, naming the import and split, if a split cannot fill an episode."""
        for split in splits:
            self._check(split, shots)

    # -- TaskFamily -------------------------------------------------------------------------

    def task(self, split: str, seed: int, index: int, *, shots: int | None = None) -> Task:
        k = self.shots if shots is None else shots
        q, ways = self.queries, self._ways
        data = self.data
        classes = self._check(split, k)
        rotations = ROTATIONS if split in self.rotate_splits else 1
        generator = torch.Generator().manual_seed(task_seed(seed, split, index))
        picked = torch.randperm(len(classes) * rotations, generator=generator)[:ways].tolist()
        rows = np.empty((ways, k + q), dtype=np.int64)
        for label, virtual in enumerate(picked):
            class_id = classes[virtual // rotations]
            order = torch.randperm(int(data.class_count[class_id]), generator=generator)[:k + q]
            rows[label] = data.class_start[class_id] + order.numpy()
        pixels = data.pixels(rows.reshape(-1)).reshape(ways, k + q, *data.shape)
        for label, virtual in enumerate(picked):
            if virtual % rotations:
                pixels[label] = np.rot90(pixels[label], virtual % rotations, axes=(-2, -1))
        x = normalise(pixels, data.preprocessing)
        labels = torch.arange(ways)
        return Task(torch.from_numpy(x[:, :k].reshape(ways * k, *data.shape)),
                    labels.repeat_interleave(k),
                    torch.from_numpy(x[:, k:].reshape(ways * q, *data.shape)),
                    labels.repeat_interleave(q))

    def class_count(self, split: str) -> int:
        return len(self._classes(split)) * (ROTATIONS if split in self.rotate_splits else 1)

    def minibatches(self, split: str, seed: int, indices: Sequence[int], *,
                    size: int) -> Minibatches:
        """Shards ``indices`` of ``size`` examples: shard i holds positions ``i * size`` to
        ``(i + 1) * size - 1`` of the sequence of epochs of ``split``. An example is an image
        and a quarter turn (0 unless the split is rotated); its label is its class's place in
        the split times the number of turns, plus the turn."""
        if size < 1:
            raise ValueError(f"minibatch shards need size >= 1, got {size}")
        data = self.data
        classes = self._classes(split)
        rotations = ROTATIONS if split in self.rotate_splits else 1
        first = int(data.class_start[classes[0]])
        images = int(data.class_start[classes[-1]] + data.class_count[classes[-1]]) - first
        examples = images * rotations
        positions = (np.asarray(indices, dtype=np.int64)[:, None] * size
                     + np.arange(size, dtype=np.int64)).reshape(-1)
        picked = np.empty_like(positions)
        epochs = positions // examples
        for epoch in np.unique(epochs):
            here = epochs == epoch
            picked[here] = self._epoch_order(split, seed, int(epoch), examples)[
                positions[here] % examples]
        rows, turns = first + picked // rotations, picked % rotations
        class_ids = np.searchsorted(data.class_start, rows, side="right") - 1
        labels = (class_ids - classes[0]) * rotations + turns
        pixels = data.pixels(rows)
        for turn in range(1, rotations):
            pixels[turns == turn] = np.rot90(pixels[turns == turn], turn, axes=(-2, -1))
        x = torch.from_numpy(normalise(pixels, data.preprocessing))
        x = x.reshape(len(indices), size, *data.shape)
        if data.shape[0] == 3:
            x = torch.stack([crop_and_flip(shard, torch.Generator().manual_seed(
                task_seed(seed, f"{split}/augment", index))) for shard, index in zip(x, indices)])
        return Minibatches(x, torch.from_numpy(labels).reshape(len(indices), size))

    def _epoch_order(self, split: str, seed: int, epoch: int, examples: int) -> np.ndarray:
        """Epoch ``epoch``'s order of the split's examples, seeded by (split, seed, epoch)."""
        key = (split, seed, epoch)
        if key not in self._orders:
            if len(self._orders) >= 4:  # consecutive shards share one or two epochs
                self._orders.pop(next(iter(self._orders)))
            generator = torch.Generator().manual_seed(task_seed(seed, f"{split}/epochs", epoch))
            self._orders[key] = torch.randperm(examples, generator=generator).numpy()
        return self._orders[key]

    @property
    def ways(self) -> int:
        return self._ways

    def input_shape(self) -> tuple[int, ...]:
        return self.data.shape

    def output_size(self) -> int:
        return self._ways

    def fingerprint_spec(self) -> dict[str, Any]:
        manifest = self.data.manifest
        return {"family": "images", "kind": manifest["kind"],
                "dataset": manifest["files"]["images.parquet"]["sha256"],
                "ways": self._ways, "shots": self.shots, "queries": self.queries,
                "rotate_splits": sorted(self.rotate_splits), "preprocessing": self.preprocessing()}

    def preprocessing(self) -> dict[str, Any]:
        return self.data.preprocessing

    # -- helpers ----------------------------------------------------------------------------

    @property
    def data(self) -> ImageDataset:
        if self._data is None:  # reopened lazily after unpickling: a mapping cannot travel
            self._data = open_dataset(self.path)
        return self._data

    def splits(self) -> list[str]:
        return list(self.data.split_classes)

    def classes(self, split: str) -> np.ndarray:
        """Class ids of ``split`` (without rotations)."""
        return self._classes(split)

    def _classes(self, split: str) -> np.ndarray:
        try:
            return self.data.split_classes[split]
        except KeyError:
            raise DatasetError(f"{self.path}: no split {split!r}; this import has "
                               f"{', '.join(self.data.split_classes)}") from None

    def _check(self, split: str, shots: int) -> np.ndarray:
        """The split's classes, after checking once that they can fill an episode."""
        classes = self._classes(split)
        if (split, shots) in self._ready:
            return classes
        rotations = ROTATIONS if split in self.rotate_splits else 1
        if len(classes) * rotations < self._ways:
            raise DatasetError(f"{self.path}: split {split!r} has {len(classes)} classes, fewer than "
                               f"ways={self._ways}; lower data.ways or re-import with more "
                               "held-out classes")
        counts = self.data.class_count[classes]
        need = shots + self.queries
        if counts.min() < need:
            worst = int(classes[counts.argmin()])
            raise DatasetError(f"{self.path}: a class of split {split!r} (id {worst}) has "
                               f"{int(counts.min())} images, fewer than shots + queries = {need}; "
                               "lower data.queries")
        self._ready.add((split, shots))
        return classes

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_data": None, "_orders": {}}
