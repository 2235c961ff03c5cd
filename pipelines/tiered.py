"""tieredImageNet: 608 ImageNet classes in 34 categories, split 351/97/160 by category (Ren et al. 2018).

    import_tiered_imagenet("tiered/", "data/tiered")                               # class folders
    import_tiered_imagenet("tiered-imagenet/", "data/tiered", allow_pickle=True)   # Ren et al.'s caches

The two layouts users have:

- class folders: ``SOURCE/{train,val,test}/<WordNet id>/<image>`` (PNG or JPEG, e.g. ILSVRC-12's
  ``n01530575_10018.JPEG``); each split folder must hold exactly the published split's classes.
- the caches of Ren et al.'s ``tiered-imagenet.tar``: ``{split}_images_png.pkl``, a list of 84x84
  PNG images (uint8 NumPy arrays, as ``cv2.imencode`` returned them), and ``{split}_labels.pkl``, a
  dict whose ``label_specific`` gives each image's class index and ``label_specific_str`` the class
  names (with ``label_general`` and ``label_general_str`` for the categories), beside
  ``class_names.txt`` and ``synsets.txt`` (ImageNet's class names and their WordNet ids, line by
  line). Pickles are read only with ``allow_pickle``, through ``pipelines.safe_pickle``; a cache is
  loaded whole, one split at a time (the train cache is several GB).

Classes are named by WordNet id; the names in the caches (ImageNet's words, "house finch, linnet,
Carpodacus mexicanus") are mapped through class_names.txt and synsets.txt, or where those are absent
through the words of the split's data file. The split and each class's category (a WordNet id, kept
in the ``alphabet`` column) come from ``pipelines/splits/tiered_imagenet.json``.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipelines import safe_pickle
from pipelines.base import SPLITS
from pipelines.dataset import DatasetError
from pipelines.importers import PICKLE_NEEDS_PERMISSION
from pipelines.preprocessing import make_preprocessing
from pipelines.published import Published, published
from pipelines.sources import Listing, Log, Progress, SourceImage, describe_source, list_tree
from pipelines.staging import write_import


def import_tiered_imagenet(source: str | Path, out: str | Path, *, size: int = 84,
                           allow_pickle: bool = False, overwrite: bool = False,
                           progress: Progress | None = None, log: Log | None = None) -> dict[str, Any]:
    """Import tieredImageNet from class folders or Ren et al.'s pickled caches (see the module)."""
    source = Path(source)
    split = published("tiered_imagenet")
    if not source.is_dir():
        raise DatasetError(f"{source}: not a folder; pass the folder holding train/ val/ test/ or "
                           "the *_images_png.pkl caches")
    caches = sorted(source.glob("*_images_png.pkl")) + sorted(source.glob("*_labels.pkl"))
    if caches:
        if not allow_pickle:
            raise DatasetError(f"{caches[0]}: {PICKLE_NEEDS_PERMISSION}, or use the class-folder layout")
        cache_bytes = sum(path.stat().st_size for path in caches)
        if log is not None and cache_bytes > 1 << 30:  # the real ones: about 13 GB, a minute or more
            log(f"hashing {cache_bytes / (1 << 30):.1f} GB of caches in {source} (the manifest names "
                "their digests)")
        listing = _list_caches(source, split)
        layout = "pickle"
    elif all((source / s).is_dir() for s in SPLITS):
        listing = _list_folders(source, split)
        layout = "folders"
    else:
        raise DatasetError(f"{source}: found neither train/ val/ test/ class folders nor "
                           "{train,val,test}_images_png.pkl with {train,val,test}_labels.pkl")
    for image in listing.images:
        image.alphabet = split.superclass[image.class_name]
    rule = {"by": "class", "rule": f"published {split.data['name']} split", "layout": layout,
            "definition": split.definition(),
            "categories": "the alphabet column holds each class's category (a WordNet id)"}
    preprocessing = make_preprocessing(size=size, mode="RGB", invert=False)
    return write_import(listing, split.splits, Path(out), kind="tiered-imagenet",
                        preprocessing=preprocessing, split_rule=rule, overwrite=overwrite,
                        progress=progress, normalize=True, dedupe=False, group="superclasses",
                        log=log)


def _list_folders(source: Path, split: Published) -> Listing:
    listing = Listing([], [])
    home = split.split_of()
    with ExitStack() as stack:  # folders only: nothing to close
        for position, name in enumerate(SPLITS):
            folder = source / name
            found = list_tree(folder, stack, position, depth=2, expected="<WordNet id>/<image>")
            classes = set()
            for image, parts, _root in found:
                if len(parts) != 2:
                    raise DatasetError(f"{image.name}: not at {name}/<WordNet id>/<image>")
                wnid = parts[0]
                if home.get(wnid) != name:
                    where = (f"the published split puts it in {home[wnid]}" if wnid in home
                             else "not a tieredImageNet class")
                    raise DatasetError(f"{folder / wnid}: not a class of the published {name} split "
                                       f"({where})")
                image.class_name = wnid
                classes.add(wnid)
                listing.images.append(image)
            _check_complete(classes, split.splits[name], f"{folder}", name)
            listing.sources.append(describe_source(folder, len(found)))
    return listing


def _list_caches(source: Path, split: Published) -> Listing:
    listing = Listing([], [])
    to_wnid = _name_map(source, split)
    home = split.split_of()
    caches = _Cache()
    for name in SPLITS:
        images_path, labels_path = source / f"{name}_images_png.pkl", source / f"{name}_labels.pkl"
        for path in (images_path, labels_path):
            if not path.is_file():
                raise DatasetError(f"{path}: missing; the caches are {{train,val,test}}_images_png.pkl "
                                   "and {train,val,test}_labels.pkl")
        labels = safe_pickle.load(labels_path)
        if not safe_pickle.has_keys(labels, "label_specific", "label_specific_str"):
            raise DatasetError(f"{labels_path}: expected a dict with label_specific and "
                               "label_specific_str")
        specific = np.asarray(safe_pickle.key(labels, "label_specific"))
        names = [safe_pickle.text(n) for n in safe_pickle.key(labels, "label_specific_str")]
        if specific.ndim != 1 or specific.dtype.kind not in "iu":
            raise DatasetError(f"{labels_path}: label_specific must be integers, one per image")
        if len(specific) and not (0 <= specific.min() and specific.max() < len(names)):
            raise DatasetError(f"{labels_path}: label_specific holds {specific.max()}, but "
                               f"label_specific_str names {len(names)} classes")
        wnids = []
        for label in names:
            wnid = to_wnid.get(label)
            if wnid is None or home.get(wnid) != name:
                raise DatasetError(f"{labels_path}: class {label!r} is not a class of the published "
                                   f"{name} split")
            wnids.append(wnid)
        _check_complete(set(wnids), split.splits[name], str(labels_path), name)
        for i, label in enumerate(specific.tolist()):
            listing.images.append(SourceImage(
                wnids[label], None, f"{images_path}#{i}", caches.reader(images_path, i, len(specific)),
                order=(i,)))
        listing.sources += [describe_source(images_path, len(specific)), describe_source(labels_path, 0)]
    return listing


def _check_complete(found: set[str], expected: list[str], where: str, name: str) -> None:
    missing = [c for c in expected if c not in found]
    if missing:
        raise DatasetError(f"{where}: class {missing[0]} of the published {name} split is missing "
                           f"({len(missing)} of {len(expected)} missing)")


def _name_map(source: Path, split: Published) -> dict[str, str]:
    """Class name as the caches write it -> WordNet id, for the 608 classes: the ids themselves,
    the names of class_names.txt/synsets.txt where both are present, else the data file's words."""
    classes = set(split.split_of())
    mapping = {wnid: wnid for wnid in classes}
    names, synsets = source / "class_names.txt", source / "synsets.txt"
    if names.is_file() and synsets.is_file():
        try:
            pairs = zip(names.read_text().splitlines(), synsets.read_text().splitlines())
        except (OSError, UnicodeDecodeError) as error:
            raise DatasetError(f"{names}: unreadable ({error})") from None
        mapping.update({n.strip(): s.strip() for n, s in pairs if s.strip() in classes})
    else:
        mapping.update({words: wnid for wnid, words in split.data["words"].items() if wnid in classes})
    return mapping


class _Cache:
    """The images of one cache file in memory at a time: train, then val, then test."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._images: list[Any] = []

    def reader(self, path: Path, index: int, expected: int) -> Callable[[], bytes]:
        def read() -> bytes:
            if self._path != path:
                self._images, self._path = [], None  # let the previous split go first
                images = safe_pickle.load(path)
                if not isinstance(images, (list, tuple)) or len(images) != expected:
                    found = len(images) if isinstance(images, (list, tuple)) else type(images).__name__
                    raise DatasetError(f"{path}: expected a list of {expected} PNG images (one per "
                                       f"label), found {found}")
                self._images, self._path = images, path
            image = self._images[index]
            if isinstance(image, np.ndarray) and image.dtype == np.uint8:
                return image.tobytes()
            if isinstance(image, bytes):
                return image
            raise DatasetError(f"{path}#{index}: expected PNG bytes, found {type(image).__name__}")
        return read
