"""One-off converters from the layouts users download to an orch import (see ``pipelines.dataset``).

    import_omniglot(["images_background.zip", "images_evaluation.zip"], "data/omniglot")
    import_image_folder("photos/", "data/photos")          # <class>/<image>.png|jpg
    import_mini_imagenet("mini-imagenet/", "data/mini")    # Ravi split: CSVs + images/, or pickles

Each importer lists its sources, decides the splits from class names alone (Omniglot by
alphabet, the others by class; no class is ever in two splits), then streams every image once
through the recorded preprocessing into the writer. A file that appears twice in the same class
with the same bytes (Greek and Latin are in both small Omniglot zips) is kept once.
"""

from __future__ import annotations

import csv
import hashlib
import pickle
import random
import zipfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from pipelines.base import SPLITS
from pipelines.dataset import DatasetError, DatasetWriter, sha256_file
from pipelines.preprocessing import IMAGE_SUFFIXES, decode, make_preprocessing, to_pixels

# (images done, images in total), called every few images during the conversion.
Progress = Callable[[int, int], None]
# A held-out alphabet needs this many characters to serve 5-way episodes.
MIN_HELD_OUT_CLASSES = 5


@dataclass
class SourceImage:
    """One image found in a source, not yet read."""

    class_name: str
    alphabet: str | None
    name: str  # where it came from, as shown to users and stored in the ``source`` column
    read: Callable[[], bytes]
    # Raw bytes -> image; the default decodes PNG/JPEG file bytes.
    to_image: Callable[[bytes], Image.Image] | None = None
    order: tuple[Any, ...] = field(default_factory=tuple)


@dataclass
class Listing:
    """Everything an importer found, before any image is decoded."""

    images: list[SourceImage]
    sources: list[dict[str, Any]]


# -- Omniglot -----------------------------------------------------------------------------------


def import_omniglot(sources: Sequence[str | Path], out: str | Path, *, size: int = 28,
                    seed: int = 0, val_ratio: float = 0.15, test_ratio: float = 0.15,
                    val_alphabets: Sequence[str] = (), test_alphabets: Sequence[str] = (),
                    overwrite: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Import Omniglot zips or unpacked folders (``<root>/<Alphabet>/<character>/<image>.png``).

    Splits are by alphabet: explicit ``val_alphabets``/``test_alphabets``, else the alphabets of an
    ``images_evaluation`` source are the test split, and the rest are drawn by seeded ratio (held-out
    alphabets are drawn among those with at least 5 characters).
    """
    with ExitStack() as stack:
        listing = Listing([], [])
        roots: dict[str, set[str]] = {}
        for position, source in enumerate(sources):
            found = _list_tree(Path(source), stack, position, depth=3,
                               expected="<Alphabet>/<character>/<image>.png")
            for image, parts, root in found:
                alphabet, character = parts[-3], parts[-2]
                image.class_name, image.alphabet = f"{alphabet}/{character}", alphabet
                roots.setdefault(alphabet, set()).add(root)
                listing.images.append(image)
            listing.sources.append(_describe_source(Path(source), len(found)))
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
                            progress=progress)


# -- any <class>/<image> tree --------------------------------------------------------------------


def import_image_folder(source: str | Path, out: str | Path, *, size: int = 84,
                        grayscale: bool = False, invert: bool = False, seed: int = 0,
                        val_ratio: float = 0.16, test_ratio: float = 0.2,
                        normalize: bool = True, overwrite: bool = False,
                        progress: Progress | None = None) -> dict[str, Any]:
    """Import a ``<class>/<image>`` tree of PNG/JPEG files; classes split by seeded ratio."""
    with ExitStack() as stack:
        found = _list_tree(Path(source), stack, 0, depth=2, expected="<class>/<image>.png|jpg")
        listing = Listing([], [_describe_source(Path(source), len(found))])
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
                            progress=progress, normalize=normalize)


# -- mini-ImageNet (Ravi and Larochelle's split) ------------------------------------------------


def import_mini_imagenet(source: str | Path, out: str | Path, *, size: int = 84,
                         allow_pickle: bool = False, overwrite: bool = False,
                         progress: Progress | None = None) -> dict[str, Any]:
    """Import mini-ImageNet as users have it: ``train.csv``/``val.csv``/``test.csv`` (``filename,
    label``) beside an ``images/`` folder, or the ``mini-imagenet-cache-<split>.pkl`` files.

    Pickles can run arbitrary code when loaded, so they are only read with ``allow_pickle``.
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
            raise DatasetError(f"{first}: pickle files can run arbitrary code when loaded; pass "
                               "--allow-pickle if you trust them, or use the CSV-plus-images layout")
        listing, splits = _list_ravi_pickles(present)
        layout = "pickle"
    else:
        raise DatasetError(f"{source}: found neither train.csv, val.csv, test.csv with images/ nor "
                           "mini-imagenet-cache-{train,val,test}.pkl")
    rule = {"by": "class", "rule": "Ravi and Larochelle (2017) split, from the files", "layout": layout}
    preprocessing = make_preprocessing(size=size, mode="RGB", invert=False)
    return write_import(listing, splits, Path(out), kind="mini-imagenet",
                        preprocessing=preprocessing, split_rule=rule, overwrite=overwrite,
                        progress=progress, normalize=True)


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
            listing.images.append(SourceImage(label, None, str(file), _file_reader(file),
                                              order=(filename,)))
        splits[split] = sorted(classes)
        listing.sources.append(_describe_source(path, len(rows) - 1))
    return listing, splits


def _list_ravi_pickles(pickles: Mapping[str, Path]) -> tuple[Listing, dict[str, list[str]]]:
    listing = Listing([], [])
    splits: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for split, path in pickles.items():
        try:
            with open(path, "rb") as handle:
                data = pickle.load(handle)  # noqa: S301 -- only after --allow-pickle
        except Exception as error:  # a damaged pickle can raise almost anything
            raise DatasetError(f"{path}: unreadable pickle ({type(error).__name__}: {error})") from None
        if not isinstance(data, dict) or not {"image_data", "class_dict"} <= set(data):
            keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
            raise DatasetError(f"{path}: expected a dict with 'image_data' and 'class_dict', got {keys}")
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
        listing.sources.append(_describe_source(path, len(pixels)))
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


def write_import(listing: Listing, class_splits: Mapping[str, Sequence[str]], out: Path, *,
                 kind: str, preprocessing: dict[str, Any], split_rule: dict[str, Any],
                 overwrite: bool, progress: Progress | None, normalize: bool = False) -> dict[str, Any]:
    """Decode, preprocess and write every listed image, then the manifest; returns the manifest."""
    split_of = {c: s for s, classes in class_splits.items() for c in classes}
    order = [s for s in SPLITS if class_splits.get(s)]
    class_names = [c for s in order for c in sorted(class_splits[s])]
    class_ids = {c: i for i, c in enumerate(class_names)}
    by_class: dict[str, list[SourceImage]] = {c: [] for c in class_names}
    for image in listing.images:
        by_class[image.class_name].append(image)
    for images in by_class.values():
        images.sort(key=lambda im: im.order)
    total = len(listing.images)
    channels, size = preprocessing["channels"], preprocessing["size"]
    seen: set[tuple[str, str]] = set()
    duplicates = done = 0
    per_split = {s: {"images": 0, "alphabets": set()} for s in order}
    sums = np.zeros(channels, np.float64)
    squares = np.zeros(channels, np.float64)
    train_pixels = 0
    with DatasetWriter(out, channels=channels, size=size, overwrite=overwrite) as writer:
        for name in class_names:
            split = split_of[name]
            for image in by_class[name]:
                done += 1
                if progress is not None and (done % 64 == 0 or done == total):
                    progress(done, total)
                raw = image.read()
                digest = hashlib.sha256(raw).hexdigest()
                if (name, digest) in seen:
                    duplicates += 1
                    continue
                seen.add((name, digest))
                picture = image.to_image(raw) if image.to_image else decode(raw, name=image.name)
                pixels = to_pixels(picture, preprocessing)
                writer.add(pixels, class_id=class_ids[name], class_name=name,
                           alphabet=image.alphabet, split=split, source=image.name, sha256=digest)
                per_split[split]["images"] += 1
                if image.alphabet is not None:
                    per_split[split]["alphabets"].add(image.alphabet)
                if normalize and split == "train":
                    flat = pixels.reshape(channels, -1).astype(np.float64) / 255.0
                    sums += flat.sum(axis=1)
                    squares += (flat * flat).sum(axis=1)
                    train_pixels += flat.shape[1]
        if normalize and train_pixels:
            mean = sums / train_pixels
            std = np.sqrt(np.maximum(squares / train_pixels - mean * mean, 1e-12))
            preprocessing = {**preprocessing, "normalization": "train split mean/std",
                             "mean": [round(float(m), 6) for m in mean],
                             "std": [round(float(s), 6) for s in std]}
        splits: dict[str, Any] = {}
        for split in order:
            ids = [class_ids[c] for c in class_splits[split]]
            alphabets = sorted(per_split[split]["alphabets"])
            splits[split] = {"classes": len(ids), "images": per_split[split]["images"],
                             "class_ids": [min(ids), max(ids) + 1],
                             "alphabets": alphabets if kind == "omniglot" else None}
        all_alphabets = {a for s in per_split.values() for a in s["alphabets"]}
        manifest = {
            "kind": kind,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "alphabets": len(all_alphabets) if kind == "omniglot" else None,
            "classes": len(class_names),
            "images": sum(s["images"] for s in splits.values()),
            "duplicates_skipped": duplicates,
            "splits": splits,
            "split_rule": split_rule,
            "preprocessing": preprocessing,
            "sources": listing.sources,
        }
        return writer.finish(manifest)


def _list_tree(source: Path, stack: ExitStack, position: int, *, depth: int,
               expected: str) -> list[tuple[SourceImage, tuple[str, ...], str]]:
    """Image files in a folder or zip, with their path parts (relative to ``source``) and the
    folder above the last ``depth`` parts (``images_background`` for Omniglot)."""
    found: list[tuple[SourceImage, tuple[str, ...], str]] = []
    if source.is_file():
        if not zipfile.is_zipfile(source):
            raise DatasetError(f"{source}: not a zip file or a folder")
        try:
            archive = stack.enter_context(zipfile.ZipFile(source))
            members = [m for m in archive.infolist() if not m.is_dir()]
        except (zipfile.BadZipFile, OSError) as error:
            raise DatasetError(f"{source}: unreadable zip file ({error})") from None
        entries = [(PurePosixPath(m.filename).parts, _zip_reader(archive, m, source),
                    f"{source.name}:{m.filename}") for m in members]
    elif source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file())
        entries = [(p.relative_to(source).parts, _file_reader(p), str(p)) for p in files]
    else:
        raise DatasetError(f"{source}: no such file or folder")
    for parts, reader, name in entries:
        if any(part.startswith(".") or part == "__MACOSX" for part in parts):
            continue  # hidden files and macOS zip metadata are not data
        if not parts[-1].lower().endswith(IMAGE_SUFFIXES):
            raise DatasetError(f"{name}: not a PNG/JPEG image; expected only {expected} files")
        if len(parts) < depth:
            raise DatasetError(f"{name}: not at {expected}")
        root = parts[-depth - 1] if len(parts) > depth else source.name.removesuffix(".zip")
        found.append((SourceImage("", None, name, reader, order=(parts[-1], position)), parts, root))
    return found


def _describe_source(path: Path, images: int) -> dict[str, Any]:
    checksum = sha256_file(path) if path.is_file() else None
    return {"path": str(path), "sha256": checksum, "images": images}


def _file_reader(path: Path) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            return path.read_bytes()
        except OSError as error:
            raise DatasetError(f"{path}: cannot read ({error.strerror})") from None
    return read


def _zip_reader(archive: zipfile.ZipFile, member: zipfile.ZipInfo, source: Path) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            return archive.read(member)
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise DatasetError(f"{source}:{member.filename}: unreadable zip entry ({error})") from None
    return read


def _array_reader(pixels: np.ndarray, index: int) -> Callable[[], bytes]:
    return lambda: pixels[index].tobytes()


def _array_decoder(shape: tuple[int, ...]) -> Callable[[bytes], Image.Image]:
    return lambda raw: Image.fromarray(np.frombuffer(raw, np.uint8).reshape(shape), "RGB")
