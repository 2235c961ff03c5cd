"""One-off converters from the layouts users download to an orch import (see ``pipelines.dataset``).

    import_omniglot(["images_background.zip", "images_evaluation.zip"], "data/omniglot")
    import_image_folder("photos/", "data/photos")          # <class>/<image>.png|jpg
    import_mini_imagenet("mini-imagenet/", "data/mini")    # Ravi split: CSVs + images/, or pickles

The published benchmarks cut from CIFAR-100, tieredImageNet and CUB have their own modules
(``pipelines.cifar``, ``pipelines.tiered``, ``pipelines.cub``). Each importer lists its sources
(``pipelines.sources``), decides the splits from class names alone (Omniglot by alphabet, the
others by class; no class is ever in two splits), then converts every image once, resumably
(``pipelines.staging``). A file that appears twice in the same class with the same bytes (Greek
and Latin are in both small Omniglot zips) is kept once.
"""

from __future__ import annotations

import csv
import random
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from pipelines import safe_pickle
from pipelines.base import SPLITS
from pipelines.dataset import DatasetError
from pipelines.preprocessing import IMAGE_SUFFIXES, make_preprocessing
from pipelines.sources import (Listing, Log, Progress, SourceImage, describe_source, file_reader,
                               list_tree)
from pipelines.staging import write_import

# A held-out alphabet needs this many characters to serve 5-way episodes.
MIN_HELD_OUT_CLASSES = 5
# Why a pickle cache needs --allow-pickle, for the refusal (mini-ImageNet and tieredImageNet).
PICKLE_NEEDS_PERMISSION = ("pickle caches are read only with --allow-pickle; pass it if you trust the "
                           "file (orch builds only plain data and NumPy arrays from a pickle)")


# -- Omniglot -----------------------------------------------------------------------------------


def import_omniglot(sources: Sequence[str | Path], out: str | Path, *, size: int = 28,
                    seed: int = 0, val_ratio: float = 0.15, test_ratio: float = 0.15,
                    val_alphabets: Sequence[str] = (), test_alphabets: Sequence[str] = (),
                    overwrite: bool = False, progress: Progress | None = None,
                    log: Log | None = None) -> dict[str, Any]:
    """Import Omniglot zips or unpacked folders (``<root>/<Alphabet>/<character>/<image>.png``).

    Splits are by alphabet: explicit ``val_alphabets``/``test_alphabets``, else the alphabets of an
    ``images_evaluation`` source are the test split, and the rest are drawn by seeded ratio (held-out
    alphabets are drawn among those with at least 5 characters).
    """
    with ExitStack() as stack:
        listing = Listing([], [])
        roots: dict[str, set[str]] = {}
        for position, source in enumerate(sources):
            found = list_tree(Path(source), stack, position, depth=3,
                              expected="<Alphabet>/<character>/<image>.png")
            for image, parts, root in found:
                alphabet, character = parts[-3], parts[-2]
                image.class_name, image.alphabet = f"{alphabet}/{character}", alphabet
                roots.setdefault(alphabet, set()).add(root)
                listing.images.append(image)
            listing.sources.append(describe_source(Path(source), len(found)))
        if not listing.images:
            raise DatasetError(f"{', '.join(map(str, sources))}: no Omniglot images found "
                               "(expected <Alphabet>/<character>/<image>.png)")
        characters: dict[str, set[str]] = {}
        for image in listing.images:
            characters.setdefault(image.alphabet or "", set()).add(image.class_name)
        evaluation = sorted(a for a, r in roots.items()
                            if all(name.startswith("images_evaluation") for name in r))
        use_evaluation = not test_alphabets and 0 < len(evaluation) < len(roots)
        alphabet_splits = split_groups(
            {a: len(c) for a, c in characters.items()}, seed=seed, val_ratio=val_ratio,
            test_ratio=test_ratio, val=val_alphabets,
            test=evaluation if use_evaluation else test_alphabets,
            min_size=MIN_HELD_OUT_CLASSES, what="alphabet", option="--{split}-alphabets")
        class_splits = {split: sorted(c for a in alphabets for c in characters[a])
                        for split, alphabets in alphabet_splits.items()}
        rule = {"by": "alphabet", "seed": seed, "val_ratio": val_ratio, "test_ratio": test_ratio,
                "val_alphabets": sorted(val_alphabets),
                "test_alphabets": sorted(evaluation if use_evaluation else test_alphabets),
                "evaluation_set_is_test": use_evaluation}
        preprocessing = make_preprocessing(size=size, mode="L", invert=True)
        return write_import(listing, class_splits, Path(out), kind="omniglot",
                            preprocessing=preprocessing, split_rule=rule, overwrite=overwrite,
                            progress=progress, group="alphabets", log=log)


# -- any <class>/<image> tree --------------------------------------------------------------------


def import_image_folder(source: str | Path, out: str | Path, *, size: int = 84,
                        grayscale: bool = False, invert: bool = False, seed: int = 0,
                        val_ratio: float = 0.16, test_ratio: float = 0.2,
                        normalize: bool = True, overwrite: bool = False,
                        progress: Progress | None = None, log: Log | None = None) -> dict[str, Any]:
    """Import a ``<class>/<image>`` tree of PNG/JPEG files; classes split by seeded ratio."""
    with ExitStack() as stack:
        found = list_tree(Path(source), stack, 0, depth=2, expected="<class>/<image>.png|jpg")
        listing = Listing([], [describe_source(Path(source), len(found))])
        for image, parts, _root in found:
            image.class_name = "/".join(parts[:-1])
            listing.images.append(image)
        if not listing.images:
            raise DatasetError(f"{source}: no PNG/JPEG images found (expected <class>/<image>)")
        classes = sorted({image.class_name for image in listing.images})
        splits = split_groups({c: 1 for c in classes}, seed=seed, val_ratio=val_ratio,
                              test_ratio=test_ratio, min_size=1, what="class", option=None)
        rule = {"by": "class", "seed": seed, "val_ratio": val_ratio, "test_ratio": test_ratio}
        preprocessing = make_preprocessing(size=size, mode="L" if grayscale else "RGB",
                                           invert=invert)
        return write_import(listing, splits, Path(out), kind="image-folder",
                            preprocessing=preprocessing, split_rule=rule, overwrite=overwrite,
                            progress=progress, normalize=normalize, log=log)


# -- mini-ImageNet (Ravi and Larochelle's split) ------------------------------------------------


def import_mini_imagenet(source: str | Path, out: str | Path, *, size: int = 84,
                         allow_pickle: bool = False, overwrite: bool = False,
                         progress: Progress | None = None, log: Log | None = None) -> dict[str, Any]:
    """Import mini-ImageNet as users have it: ``train.csv``/``val.csv``/``test.csv`` (``filename,
    label``) beside an ``images/`` folder, or the ``mini-imagenet-cache-<split>.pkl`` files.

    Pickles are only read with ``allow_pickle``, and then through ``pipelines.safe_pickle``.
    """
    source = Path(source)
    if not source.is_dir():
        raise DatasetError(f"{source}: not a folder; pass the folder holding the mini-ImageNet files")
    csvs = {split: source / f"{split}.csv" for split in SPLITS}
    pickles = {split: source / f"mini-imagenet-cache-{split}.pkl" for split in SPLITS}
    if all(path.exists() for path in csvs.values()):
        listing, splits = _list_ravi_csv(source, csvs)
        layout = "csv"
    elif any(path.exists() for path in pickles.values()):
        present = {s: p for s, p in pickles.items() if p.exists()}
        if not allow_pickle:
            first = next(iter(present.values()))
            raise DatasetError(f"{first}: {PICKLE_NEEDS_PERMISSION}, or use the CSV-plus-images layout")
        listing, splits = _list_ravi_pickles(present)
        layout = "pickle"
    else:
        raise DatasetError(f"{source}: found neither train.csv, val.csv, test.csv with images/ nor "
                           "mini-imagenet-cache-{train,val,test}.pkl")
    rule = {"by": "class", "rule": "Ravi and Larochelle (2017) split, from the files", "layout": layout}
    preprocessing = make_preprocessing(size=size, mode="RGB", invert=False)
    return write_import(listing, splits, Path(out), kind="mini-imagenet",
                        preprocessing=preprocessing, split_rule=rule, overwrite=overwrite,
                        progress=progress, normalize=True, log=log)


def _list_ravi_csv(source: Path, csvs: Mapping[str, Path]) -> tuple[Listing, dict[str, list[str]]]:
    images_dir = source / "images"
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir}: missing; the CSV layout keeps every image there")
    listing = Listing([], [])
    splits: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for split, path in csvs.items():
        try:
            with open(path, newline="") as handle:
                rows = list(csv.reader(handle))
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise DatasetError(f"{path}: unreadable CSV ({error})") from None
        if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
            raise DatasetError(f"{path}: first line must be 'filename,label'")
        classes: set[str] = set()
        for line, row in enumerate(rows[1:], start=2):
            if not row:
                continue
            if len(row) != 2:
                raise DatasetError(f"{path}: line {line} has {len(row)} fields, expected filename,label")
            filename, label = row[0].strip(), row[1].strip()
            if owner.setdefault(label, split) != split:
                raise DatasetError(f"{path}: line {line}: class {label!r} is also in the "
                                   f"{owner[label]} split; a class may be in one split only")
            file = images_dir / filename
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                raise DatasetError(f"{path}: line {line}: {filename!r} is not a PNG/JPEG file name")
            classes.add(label)
            listing.images.append(SourceImage(label, None, str(file), file_reader(file),
                                              order=(filename,), path=file))
        splits[split] = sorted(classes)
        listing.sources.append(describe_source(path, len(rows) - 1))
    return listing, splits


def _list_ravi_pickles(pickles: Mapping[str, Path]) -> tuple[Listing, dict[str, list[str]]]:
    listing = Listing([], [])
    splits: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for split, path in pickles.items():
        data = safe_pickle.load(path)
        if not safe_pickle.has_keys(data, "image_data", "class_dict"):
            keys = sorted(map(safe_pickle.text, data)) if isinstance(data, dict) else type(data).__name__
            raise DatasetError(f"{path}: expected a dict with 'image_data' and 'class_dict', got {keys}")
        data = {"image_data": safe_pickle.key(data, "image_data"),
                "class_dict": {safe_pickle.text(k): v
                               for k, v in safe_pickle.key(data, "class_dict").items()}}
        pixels = np.asarray(data["image_data"])
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise DatasetError(f"{path}: 'image_data' must be uint8 [N, H, W, 3], got "
                               f"{pixels.dtype}{list(pixels.shape)}")
        for label, indices in sorted(data["class_dict"].items()):
            if owner.setdefault(label, split) != split:
                raise DatasetError(f"{path}: class {label!r} is also in the {owner[label]} split; "
                                   "a class may be in one split only")
            for i in indices:
                if not 0 <= int(i) < len(pixels):
                    raise DatasetError(f"{path}: class {label!r} lists image {i}, but there are "
                                       f"{len(pixels)}")
                listing.images.append(SourceImage(
                    str(label), None, f"{path}#{int(i)}", _array_reader(pixels, int(i)),
                    to_image=_array_decoder(pixels.shape[1:]), order=(int(i),)))
        splits[split] = sorted(map(str, data["class_dict"]))
        listing.sources.append(describe_source(path, len(pixels)))
    return listing, splits


# -- shared steps -------------------------------------------------------------------------------


def split_groups(sizes: Mapping[str, int], *, seed: int, val_ratio: float, test_ratio: float,
                 val: Iterable[str] = (), test: Iterable[str] = (), min_size: int,
                 what: str, option: str | None) -> dict[str, list[str]]:
    """Assign groups (alphabets, or classes) to train/val/test: explicit lists first, then each
    split without one gets ``ratio`` of the other groups (at least one), drawn by a seeded shuffle
    among groups with at least ``min_size`` classes; the rest train."""
    val, test = sorted(set(val)), sorted(set(test))
    for split, chosen in (("val", val), ("test", test)):
        unknown = [g for g in chosen if g not in sizes]
        if unknown:
            flag = f" ({option.format(split=split)})" if option else ""
            raise DatasetError(f"unknown {what} {unknown[0]!r}{flag}; found: {', '.join(sorted(sizes))}")
    if set(val) & set(test):
        raise DatasetError(f"{what} {sorted(set(val) & set(test))[0]!r} is in both val and test")
    for name, ratio in (("val_ratio", val_ratio), ("test_ratio", test_ratio)):
        if not 0 <= ratio < 1:
            raise DatasetError(f"{name} must be in [0, 1), got {ratio}")
    remaining = sorted(set(sizes) - set(val) - set(test))
    random.Random(seed).shuffle(remaining)
    pool = len(remaining)  # ratios are of the groups not assigned explicitly
    chosen = {"val": val, "test": test}
    for split, ratio in (("test", test_ratio), ("val", val_ratio)):
        if chosen[split] or ratio == 0:
            continue
        wanted = max(1, round(ratio * pool))
        picked = [g for g in remaining if sizes[g] >= min_size][:wanted]
        if not picked:
            raise DatasetError(f"no {what} with at least {min_size} classes is left for the {split} "
                               f"split; name one explicitly" + (f" with {option.format(split=split)}"
                                                                if option else ""))
        chosen[split] = sorted(picked)
        remaining = [g for g in remaining if g not in picked]
    if not remaining:
        raise DatasetError(f"every {what} went to val or test; nothing is left to train on "
                           f"({len(sizes)} {what}s found)")
    return {"train": sorted(remaining), "val": chosen["val"], "test": chosen["test"]}


def _array_reader(pixels: np.ndarray, index: int) -> Callable[[], bytes]:
    return lambda: pixels[index].tobytes()


def _array_decoder(shape: tuple[int, ...]) -> Callable[[bytes], Image.Image]:
    return lambda raw: Image.fromarray(np.frombuffer(raw, np.uint8).reshape(shape), "RGB")
