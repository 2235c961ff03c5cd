"""N-way K-shot episodes drawn from an imported image data set (``orch data import ...``).

Episode ``index`` of ``split`` under ``seed`` is a pure function of those three values (through
``task_seed``), so a Ray worker samples its own shard of a meta-batch from integers alone. An episode
picks N classes of the split in random order -- the order is the label remapping, class i of the
pick gets label i -- then K support and Q query images of each, without repeats. Pixels are read
from the memory-mapped Arrow file and converted to float only for the episode's own images.

With rotations on (``augment_rotations``), each class of the meta-training split also appears
rotated by 90, 180 and 270 degrees as three further classes; held-out splits keep only the real
classes, so validation accuracy means the same with or without augmentation.

Several imports (``MixedEpisodes``, Meta-Dataset's multi-source training): each episode comes
whole from one of them, and is that import's own episode of the same address. Which one is a pure
function of the address too: on the meta-training split a seeded draw weighted by the sources'
weights, on every other split the sources in turn (episode i from source i mod S), so that
validation and test scores weigh every source equally.

An import whose images differ from what a model was trained on (another size, grey beside RGB)
can be *converted* (``convert_to``): its stored images are treated as raw images and given the
model's treatment, exactly as ``orch predict`` treats an image file (``convert_pixels``).

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
from typing import Any, Collection, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from pipelines.augment import crop_and_flip
from pipelines.base import Minibatches, Task, TaskFamily, task_seed
from pipelines.dataset import DatasetError, ImageDataset, open_dataset
from pipelines.preprocessing import normalise, to_pixels

ROTATIONS = 4


class EpisodeFamily(TaskFamily):
    """Few-shot classification episodes from the import in ``path``."""

    kind = "classification"

    def __init__(self, path: str | os.PathLike[str], *, ways: int = 5, shots: int = 1,
                 queries: int = 15, image_size: int | None = None,
                 rotate_splits: Collection[str] = (), verify: bool = False,
                 convert_to: Mapping[str, Any] | None = None):
        if ways < 2 or shots < 1 or queries < 1:
            raise ValueError(f"episodes need ways >= 2, shots >= 1, queries >= 1; got "
                             f"{ways}, {shots}, {queries}")
        self.path = str(path)  # a folder or a pyarrow.fs URI, as given
        self._ways, self.shots, self.queries = ways, shots, queries
        self.rotate_splits = frozenset(rotate_splits)
        self._data: ImageDataset | None = open_dataset(self.path, verify_checksums=verify)
        self.where = self._data.location.show()  # for messages: a URI without its options
        stored = self._data.shape[-1]
        if image_size is not None and image_size != stored:
            raise DatasetError(f"{self.where}: imported at {stored}x{stored} pixels but data.image_size "
                               f"is {image_size}; re-import with --size {image_size} or drop image_size")
        # The treatment episodes get instead of the import's own; None where they are the same.
        self.convert_to = (dict(convert_to) if convert_to is not None
                           and dict(convert_to) != self._data.preprocessing else None)
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
        orders = [torch.randperm(int(data.class_count[classes[virtual // rotations]]),
                                 generator=generator)[:k + q].numpy() for virtual in picked]
        return self.assemble(split, picked, orders, [k] * ways)

    def assemble(self, split: str, picked: Sequence[int], orders: Sequence[np.ndarray],
                 support: Sequence[int]) -> Task:
        """The episode of the split's (virtual, rotation-counting) classes ``picked`` -- class i
        of the pick gets label i -- from the images at positions ``orders[i]`` of each class,
        the first ``support[i]`` of them for the support set and the rest for the queries."""
        data = self.data
        classes = self._classes(split)
        rotations = ROTATIONS if split in self.rotate_splits else 1
        rows = np.concatenate([data.class_start[classes[virtual // rotations]] + order
                               for virtual, order in zip(picked, orders)])
        pixels = data.pixels(rows)
        start = 0
        for virtual, order in zip(picked, orders):
            if virtual % rotations:
                pixels[start:start + len(order)] = np.rot90(
                    pixels[start:start + len(order)], virtual % rotations, axes=(-2, -1))
            start += len(order)
        shape = self.input_shape()
        if self.convert_to is not None:
            pixels = convert_pixels(pixels, data.preprocessing, self.convert_to)
        x = torch.from_numpy(normalise(pixels, self.preprocessing()).reshape(len(rows), *shape))
        ends = np.cumsum([len(order) for order in orders])
        starts = ends - [len(order) for order in orders]
        in_support = np.concatenate([np.arange(len(order)) < k
                                     for order, k in zip(orders, support)])
        labels = torch.from_numpy(np.concatenate(
            [np.full(end - begin, label) for label, (begin, end) in enumerate(zip(starts, ends))]))
        mask = torch.from_numpy(in_support)
        return Task(x[mask], labels[mask], x[~mask], labels[~mask])

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
        if self.convert_to is not None:
            size = int(self.convert_to["size"])
            return (int(self.convert_to["channels"]), size, size)
        return self.data.shape

    def output_size(self) -> int:
        return self._ways

    def fingerprint_spec(self) -> dict[str, Any]:
        manifest = self.data.manifest
        spec = {"family": "images", "kind": manifest["kind"],
                "dataset": manifest["files"]["images.parquet"]["sha256"],
                "ways": self._ways, "shots": self.shots, "queries": self.queries,
                "rotate_splits": sorted(self.rotate_splits), "preprocessing": self.preprocessing()}
        if self.convert_to is not None:
            spec["converted_from"] = self.data.preprocessing
        return spec

    def preprocessing(self) -> dict[str, Any]:
        """The treatment of the episodes' images: the import's, or the one converted to."""
        return dict(self.convert_to) if self.convert_to is not None else self.data.preprocessing

    @property
    def converted(self) -> bool:
        return self.convert_to is not None

    def sources(self) -> list["EpisodeFamily"]:
        """The imports episodes are drawn from: this one."""
        return [self]

    def source_record(self) -> dict[str, Any]:
        """What a model records of each import it was trained on (``MetaModel`` spec)."""
        return {"path": self.path, "dataset": self.data.manifest["files"]["images.parquet"]["sha256"],
                "shape": list(self.data.shape), "preprocessing": self.data.preprocessing}

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
            raise DatasetError(f"{self.where}: no split {split!r}; this import has "
                               f"{', '.join(self.data.split_classes)}") from None

    def _check(self, split: str, shots: int) -> np.ndarray:
        """The split's classes, after checking once that they can fill an episode."""
        classes = self._classes(split)
        if (split, shots) in self._ready:
            return classes
        rotations = ROTATIONS if split in self.rotate_splits else 1
        if len(classes) * rotations < self._ways:
            raise DatasetError(f"{self.where}: split {split!r} has {len(classes)} classes, fewer than "
                               f"ways={self._ways}; lower data.ways or re-import with more "
                               "held-out classes")
        counts = self.data.class_count[classes]
        need = shots + self.queries
        if counts.min() < need:
            worst = int(classes[counts.argmin()])
            raise DatasetError(f"{self.where}: a class of split {split!r} (id {worst}) has "
                               f"{int(counts.min())} images, fewer than shots + queries = {need}; "
                               "lower data.queries")
        self._ready.add((split, shots))
        return classes

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_data": None, "_orders": {}}


class MixedEpisodes(TaskFamily):
    """Episodes from several imports of one image shape, each episode whole from one of them
    (the multi-source training of Meta-Dataset, Triantafillou et al. 2020).

    Episode ``index`` of ``split`` is source ``s``'s own episode ``index``, where ``s`` is, on a
    split in ``draw_splits`` (meta-training), drawn by ``weights`` from the episode's address,
    and on any other split ``index mod S``: validation and test take the sources in turn."""

    kind = "classification"

    def __init__(self, sources: Sequence[EpisodeFamily], *, weights: Sequence[float] | None = None,
                 draw_splits: Collection[str] = ()):
        if len(sources) < 2:
            raise ValueError("a mix needs at least 2 sources")
        first = sources[0]
        for source in sources[1:]:
            if source.input_shape() != first.input_shape():
                raise DatasetError(
                    f"{source.where} holds {describe_shape(source.input_shape())} images but "
                    f"{first.where} holds {describe_shape(first.input_shape())}: every import of "
                    "a multi-source data.path must share image size and channels; re-import one "
                    "at the other's --size (and --grayscale)")
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if len(weights) != len(sources) or min(weights) <= 0:
            raise ValueError(f"weights must be {len(sources)} positive numbers, got {weights}")
        self._sources = list(sources)
        self.weights = [w / sum(weights) for w in weights]
        self._cumulative = np.cumsum(self.weights)
        self.draw_splits = frozenset(draw_splits)

    def source_of(self, split: str, seed: int, index: int) -> int:
        """Which source episode ``index`` of ``split`` comes from."""
        if split not in self.draw_splits:
            return index % len(self._sources)
        # A uniform number in [0, 1) from the address's own 53 bits: the same in every process,
        # with no generator whose stream could change between library versions.
        uniform = (task_seed(seed, f"{split}/source", index) >> 10) / float(1 << 53)
        return min(int(np.searchsorted(self._cumulative, uniform, side="right")),
                   len(self._sources) - 1)

    def task(self, split: str, seed: int, index: int, *, shots: int | None = None) -> Task:
        return self._sources[self.source_of(split, seed, index)].task(split, seed, index,
                                                                       shots=shots)

    def check_splits(self, splits: Sequence[str], shots: int) -> None:
        for source in self._sources:
            source.check_splits(splits, shots)

    @property
    def ways(self) -> int | None:
        return self._sources[0].ways

    @property
    def fixed_shape(self) -> bool:
        return self._sources[0].fixed_shape

    def input_shape(self) -> tuple[int, ...]:
        return self._sources[0].input_shape()

    def output_size(self) -> int:
        return self._sources[0].output_size()

    def fingerprint_spec(self) -> dict[str, Any]:
        return {"family": "images-mix", "sources": [s.fingerprint_spec() for s in self._sources],
                "weights": self.weights, "draw_splits": sorted(self.draw_splits)}

    def preprocessing(self) -> dict[str, Any]:
        """The first source's: what a model trained on the mix applies to a raw image file."""
        return self._sources[0].preprocessing()

    @property
    def converted(self) -> bool:
        return any(source.converted for source in self._sources)

    def sources(self) -> list[EpisodeFamily]:
        return list(self._sources)


def episode_family(path: str | os.PathLike[str] | Sequence[str], *,
                   weights: Sequence[float] | str | None = None, draw_splits: Collection[str] = (),
                   kind: type[EpisodeFamily] = EpisodeFamily,
                   **options: Any) -> EpisodeFamily | MixedEpisodes:
    """Episodes from one import (a folder or URI), or from several (a list: ``MixedEpisodes``);
    ``options`` are ``kind``'s, given to every source (``kind``: ``EpisodeFamily``, or
    ``VariableEpisodes`` for Meta-Dataset's variable-way episodes, which take no ways, shots or
    queries). ``weights``: each import's share of the episodes of ``draw_splits``, or
    ``"classes"``: in proportion to each import's classes in the first of them (default:
    equal)."""
    if isinstance(path, (str, os.PathLike)):
        if weights is not None:
            raise ValueError("weights are for several imports; one was given")
        return kind(path, **options)
    sources = [kind(p, **options) for p in path]
    if weights == "classes":
        split = next(iter(draw_splits))
        weights = [float(source.class_count(split)) for source in sources]
    return MixedEpisodes(sources, weights=weights, draw_splits=draw_splits)


def describe_shape(shape: Sequence[int]) -> str:
    """``3x32x32 (RGB)`` for a ``[C, H, W]`` image shape."""
    channels = int(shape[0])
    kind = {1: "grey", 3: "RGB"}.get(channels, f"{channels} channels")
    return f"{'x'.join(str(int(n)) for n in shape)} ({kind})"


def convert_pixels(pixels: np.ndarray, stored: Mapping[str, Any],
                   target: Mapping[str, Any]) -> np.ndarray:
    """uint8 ``[N, C, H, W]`` images stored with the treatment ``stored`` as an import with the
    treatment ``target`` would have stored the same raw images: ``stored``'s inversion undone,
    then ``target``'s stored steps (``preprocessing.to_pixels``): grey to RGB by repeating the
    channel, RGB to grey by luminance (ITU-R 601-2, PIL's ``convert("L")``), the square resize
    with ``target``'s resampling (the importers' own), ``target``'s inversion. Normalisation is
    the caller's, with ``target``'s statistics: a model sees a converted image exactly as
    ``orch predict`` would show it the raw file."""
    channels, size = int(target["channels"]), int(target["size"])
    out = np.empty((len(pixels), channels, size, size), dtype=np.uint8)
    for i, image in enumerate(pixels):
        raw = 255 - image if stored["invert"] else image
        picture = Image.fromarray(raw[0] if raw.shape[0] == 1
                                  else np.ascontiguousarray(raw.transpose(1, 2, 0)))
        out[i] = to_pixels(picture, target)
    return out
