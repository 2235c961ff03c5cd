"""CIFAR-FS and FC100: few-shot benchmarks cut from CIFAR-100 by published class splits.

    import_cifar_fs("cifar-100-python.tar.gz", "data/cifar-fs")  # 64/16/20 classes, Bertinetto et al. 2019
    import_fc100("cifar-100-python/", "data/fc100")              # 12/4/4 superclasses, Oreshkin et al. 2018

Both read the official python version of CIFAR-100, the archive ``cifar-100-python.tar.gz`` or its
unpacked folder: ``cifar-100-python/train``, ``test`` and ``meta``, pickles written by Python 2's
cPickle (read with ``pipelines.safe_pickle``). ``train`` (50,000 images) and ``test`` (10,000) hold
``data``, uint8 ``[N, 3072]`` rows of the red, green and blue planes of a 32x32 image, with
``fine_labels``, ``coarse_labels`` and ``filenames``; ``meta`` holds ``fine_label_names`` (100)
and ``coarse_label_names`` (20). A few-shot split ignores CIFAR-100's own train/test division: all
600 images of a class go to the class's split. Classes are named as ``fine_label_names`` names them;
the ``alphabet`` column holds the CIFAR-100 superclass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from pipelines import safe_pickle
from pipelines.dataset import DatasetError
from pipelines.preprocessing import make_preprocessing
from pipelines.published import Published, published
from pipelines.sources import Listing, Log, Progress, SourceImage, TarArchive, describe_source
from pipelines.staging import write_import

FOLDER = "cifar-100-python"
MEMBERS = ("train", "test", "meta")
SIDE = 32


def import_cifar_fs(source: str | Path, out: str | Path, *, size: int = 32, overwrite: bool = False,
                    progress: Progress | None = None, log: Log | None = None) -> dict[str, Any]:
    """Import CIFAR-FS: Bertinetto et al.'s 64/16/20 split of CIFAR-100's classes."""
    return _import(source, out, split=published("cifar_fs"), kind="cifar-fs", size=size,
                   overwrite=overwrite, progress=progress, log=log)


def import_fc100(source: str | Path, out: str | Path, *, size: int = 32, overwrite: bool = False,
                 progress: Progress | None = None, log: Log | None = None) -> dict[str, Any]:
    """Import FC100: Oreshkin et al.'s 12/4/4 split of CIFAR-100's superclasses (60/20/20 classes)."""
    return _import(source, out, split=published("fc100"), kind="fc100", size=size,
                   overwrite=overwrite, progress=progress, log=log)


@dataclass
class _Cifar100:
    """The three pickles of the official archive, loaded."""

    parts: dict[str, dict[str, Any]]  # "train"/"test" -> {"data", "fine", "coarse"}
    fine_names: list[str]
    coarse_names: list[str]
    names: dict[str, str]  # member -> the rows' source ("cifar-100-python.tar.gz:cifar-100-python/train")
    where: dict[str, str]  # member -> its full path, for messages
    sources: list[dict[str, Any]]


def _import(source: str | Path, out: str | Path, *, split: Published, kind: str, size: int,
            overwrite: bool, progress: Progress | None, log: Log | None) -> dict[str, Any]:
    cifar = _read(Path(source))
    superclass_of = _superclasses(cifar)
    class_splits = _class_splits(cifar, superclass_of, split)
    listing = Listing([], cifar.sources)
    decoder = _plane_decoder()
    for order, member in enumerate(("train", "test")):
        part = cifar.parts[member]
        for i, (fine, coarse) in enumerate(zip(part["fine"], part["coarse"])):
            listing.images.append(SourceImage(
                cifar.fine_names[fine], cifar.coarse_names[coarse], f"{cifar.names[member]}#{i}",
                _row_reader(part["data"], i), to_image=decoder, order=(order, i)))
    rule = {"by": split.data["by"], "rule": f"published {split.data['name']} split",
            "definition": split.definition(),
            "cifar100_train_and_test": "both: every image of a class is in the class's split"}
    preprocessing = make_preprocessing(size=size, mode="RGB", invert=False)
    return write_import(listing, class_splits, Path(out), kind=kind, preprocessing=preprocessing,
                        split_rule=rule, overwrite=overwrite, progress=progress, normalize=True,
                        dedupe=False, group="superclasses", log=log)


def _read(source: Path) -> _Cifar100:
    """The pickles of the archive or folder ``source``, checked for the official keys and shapes."""
    official = published("cifar100").data["archive"]
    if source.is_file():
        archive = TarArchive(source)
        prefix = _prefix(archive.files, source)
        raw = archive.read(f"{prefix}{m}" for m in MEMBERS)
        names = {m: f"{source.name}:{prefix}{m}" for m in MEMBERS}
        where = {m: f"{source}:{prefix}{m}" for m in MEMBERS}
        loaded = {m: safe_pickle.load(raw[f"{prefix}{m}"], name=where[m]) for m in MEMBERS}
        sources = [describe_source(source, 0, official_sha256=official["sha256"])]
    elif source.is_dir():
        folder = source / FOLDER if (source / FOLDER).is_dir() else source
        missing = [m for m in MEMBERS if not (folder / m).is_file()]
        if missing:
            raise DatasetError(f"{source}: not the unpacked CIFAR-100 python archive: no {FOLDER}/"
                               f"{missing[0]} (expected {', '.join(MEMBERS)} from cifar-100-python.tar.gz)")
        names = where = {m: str(folder / m) for m in MEMBERS}
        loaded = {m: safe_pickle.load(folder / m) for m in MEMBERS}
        sources = [describe_source(folder / m, 0) for m in MEMBERS]
    else:
        raise DatasetError(f"{source}: no such file or folder")
    meta = loaded["meta"]
    if not safe_pickle.has_keys(meta, "fine_label_names", "coarse_label_names"):
        raise DatasetError(f"{where['meta']}: expected a dict with fine_label_names and "
                           f"coarse_label_names ({_keys(meta)})")
    fine_names = [safe_pickle.text(n) for n in safe_pickle.key(meta, "fine_label_names")]
    coarse_names = [safe_pickle.text(n) for n in safe_pickle.key(meta, "coarse_label_names")]
    parts = {m: _batch(loaded[m], where[m], len(fine_names), len(coarse_names)) for m in ("train", "test")}
    counts = {m: len(parts[m]["fine"]) if m in parts else 0 for m in MEMBERS}
    for described, member in zip(sources, MEMBERS):  # the archive: one source for all three
        described["images"] = counts[member] if source.is_dir() else sum(counts.values())
    return _Cifar100(parts, fine_names, coarse_names, names, where, sources)


def _prefix(files: dict[str, Any], source: Path) -> str:
    """The folder of train/test/meta inside the archive (``cifar-100-python/`` in the official one)."""
    for prefix in (f"{FOLDER}/", ""):
        if all(f"{prefix}{m}" in files for m in MEMBERS):
            return prefix
    found = ", ".join(sorted(files)[:4]) or "no files"
    raise DatasetError(f"{source}: not the CIFAR-100 python archive: no {FOLDER}/train, test and meta "
                       f"(it holds {found}{', ...' if len(files) > 4 else ''})")


def _batch(data: Any, name: str, fine_classes: int, coarse_classes: int) -> dict[str, np.ndarray]:
    if not safe_pickle.has_keys(data, "data", "fine_labels", "coarse_labels"):
        raise DatasetError(f"{name}: expected a dict with data, fine_labels and coarse_labels "
                           f"({_keys(data)})")
    pixels = safe_pickle.key(data, "data")
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2 \
            or pixels.shape[1] != 3 * SIDE * SIDE:
        shape = f"{pixels.dtype}{list(pixels.shape)}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise DatasetError(f"{name}: 'data' must be uint8 [N, 3072], got {shape}")
    labels = {}
    for key, classes in (("fine_labels", fine_classes), ("coarse_labels", coarse_classes)):
        values = np.asarray(safe_pickle.key(data, key))
        if values.shape != (len(pixels),) or values.dtype.kind not in "iu":
            raise DatasetError(f"{name}: '{key}' must be {len(pixels)} integers, got "
                               f"{values.dtype}{list(values.shape)}")
        if len(values) and not (0 <= values.min() and values.max() < classes):
            raise DatasetError(f"{name}: '{key}' holds {values.max()}, but meta names {classes} classes")
        labels[key] = values
    return {"data": pixels, "fine": labels["fine_labels"], "coarse": labels["coarse_labels"]}


def _superclasses(cifar: _Cifar100) -> dict[str, str]:
    """Each class's superclass, as the archive's labels pair them (one each, or the file is refused)."""
    pairs: dict[str, str] = {}
    for member in ("train", "test"):
        part = cifar.parts[member]
        for fine, coarse in set(zip(part["fine"].tolist(), part["coarse"].tolist())):
            name, group = cifar.fine_names[fine], cifar.coarse_names[coarse]
            if pairs.setdefault(name, group) != group:
                raise DatasetError(f"{cifar.where[member]}: class {name!r} is labelled with two "
                                   f"superclasses, {pairs[name]!r} and {group!r}")
    return pairs


def _class_splits(cifar: _Cifar100, superclass_of: dict[str, str],
                  split: Published) -> dict[str, list[str]]:
    """The published split as class lists, refused if the archive lacks a class it names, has a
    class it does not place, or puts a class in another superclass than the split's file says."""
    name = split.data["name"]
    if split.data["by"] == "superclass":
        members = set(cifar.coarse_names)
        where = "coarse_label_names"
    else:
        members = set(cifar.fine_names)
        where = "fine_label_names"
    placed = split.split_of()
    missing = sorted(set(placed) - members)
    if missing:
        raise DatasetError(f"{cifar.where['meta']}: {split.data['by']} {missing[0]!r} of the published "
                           f"{name} split is not in the archive's {where} ({len(missing)} missing); "
                           "is this CIFAR-100?")
    unplaced = sorted(members - set(placed))
    if unplaced:
        raise DatasetError(f"{cifar.where['meta']}: {split.data['by']} {unplaced[0]!r} of the archive "
                           f"is in no split of {name}")
    for fine, expected in split.superclass.items():
        if superclass_of.get(fine, expected) != expected:
            raise DatasetError(f"{cifar.where['train']}: class {fine!r} is in superclass "
                               f"{superclass_of[fine]!r}, the published {name} split says {expected!r}")
    seen = sorted(superclass_of)
    absent = sorted(set(cifar.fine_names) - set(seen))
    if absent:
        raise DatasetError(f"{cifar.where['train']}: class {absent[0]!r} has no images")
    if split.data["by"] == "superclass":
        return {s: sorted(c for c in seen if placed[superclass_of[c]] == s) for s in split.splits}
    return {s: sorted(classes) for s, classes in split.splits.items()}


def _row_reader(pixels: np.ndarray, index: int) -> Callable[[], bytes]:
    return lambda: pixels[index].tobytes()


def _plane_decoder() -> Callable[[bytes], Image.Image]:
    """A 3072-byte row (R, G, B planes of 32x32) -> the RGB image."""
    def decode(raw: bytes) -> Image.Image:
        return Image.fromarray(np.frombuffer(raw, np.uint8).reshape(3, SIDE, SIDE).transpose(1, 2, 0), "RGB")
    return decode


def _keys(data: Any) -> str:
    if isinstance(data, dict):
        return "found keys " + ", ".join(sorted(map(safe_pickle.text, data))[:6])
    return f"found {type(data).__name__}"

