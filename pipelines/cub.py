"""CUB-200-2011 in the few-shot class split of Chen et al. 2019, with its bounding boxes.

    import_cub("CUB_200_2011.tgz", "data/cub")                 # the official archive, read in place
    import_cub("CUB_200_2011/", "data/cub-crop", crop=True)    # or its folder; crop to the boxes

Reads, from the official ``CUB_200_2011.tgz`` or its unpacked ``CUB_200_2011`` folder:

    CUB_200_2011/classes.txt             <class id> <class folder>   (1 001.Black_footed_Albatross)
    CUB_200_2011/images.txt              <image id> <class folder>/<file>.jpg
    CUB_200_2011/image_class_labels.txt  <image id> <class id>
    CUB_200_2011/bounding_boxes.txt      <image id> <x> <y> <width> <height>   (pixels)
    CUB_200_2011/images/<class folder>/<file>.jpg

and nothing else (``train_test_split.txt``, ``attributes/``, ``parts/``: a few-shot split ignores
CUB's own train/test division). The split is Chen et al.'s, from ``pipelines/splits/cub.json``:
class folders in sorted order, 0-based index i, i % 2 == 0 train, i % 4 == 1 val, i % 4 == 3 test
(100/50/50). Every image's box goes into the ``bbox`` column (x, y, width, height in the source
image's pixels) with ``source_size`` (its width and height); ``crop`` crops each image to its box
before the resize, and the manifest says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from pipelines.dataset import DatasetError
from pipelines.preprocessing import make_preprocessing
from pipelines.published import published
from pipelines.sources import (Listing, Log, Progress, SourceImage, TarArchive, describe_source,
                               file_reader)
from pipelines.staging import write_import

FOLDER = "CUB_200_2011"
# The index files read, with their number of fields per line.
INDEX = {"classes.txt": 2, "images.txt": 2, "image_class_labels.txt": 2, "bounding_boxes.txt": 5}


def import_cub(source: str | Path, out: str | Path, *, size: int = 84, crop: bool = False,
               overwrite: bool = False, progress: Progress | None = None,
               log: Log | None = None) -> dict[str, Any]:
    """Import CUB-200-2011 (archive or folder) in Chen et al.'s 100/50/50 split."""
    split = published("cub")
    cub = _Archive(Path(source)) if Path(source).is_file() else _Folder(Path(source))
    index = {name: _rows(cub.text(name), name, fields) for name, fields in INDEX.items()}
    classes = dict(index["classes.txt"])
    missing = sorted(set(split.split_of()) - set(classes.values()))
    if missing:
        raise DatasetError(f"{cub.where('classes.txt')}: class {missing[0]} of the published split is "
                           f"missing ({len(missing)} of 200 missing)")
    unplaced = sorted(set(classes.values()) - set(split.split_of()))
    if unplaced:
        raise DatasetError(f"{cub.where('classes.txt')}: class {unplaced[0]!r} is in no split of "
                           "CUB-200-2011")
    labels = dict(index["image_class_labels.txt"])
    boxes = {image_id: box for image_id, *box in index["bounding_boxes.txt"]}
    images = []
    for line, (image_id, path) in enumerate(index["images.txt"], start=1):
        folder = path.split("/")[0]
        labelled = classes.get(labels.get(image_id, ""))
        if labelled != folder:
            raise DatasetError(f"{cub.where('images.txt')}: line {line}: {path} is in folder "
                               f"{folder!r}, but image_class_labels.txt gives image {image_id} "
                               f"class {labelled!r}")
        box = _box(boxes.get(image_id), image_id, cub.where("bounding_boxes.txt"))
        images.append(SourceImage(folder, None, cub.image_name(path), _unread, order=(path,),
                                  extra={"bbox": box}, crop=tuple(box) if crop else None))
    listing = cub.listing(images)
    rule = {"by": "class", "rule": split.data["rule"], "definition": split.definition()}
    preprocessing = make_preprocessing(size=size, mode="RGB", invert=False)
    return write_import(listing, split.splits, Path(out), kind="cub", preprocessing=preprocessing,
                        split_rule=rule, overwrite=overwrite, progress=progress, normalize=True,
                        dedupe=False, extra_columns=("bbox", "source_size"),
                        manifest_extra={"crop": "bounding boxes (bounding_boxes.txt)" if crop else None},
                        log=log)


class _Archive:
    """``CUB_200_2011.tgz``, read in place: index files by name, images in one front-to-back pass."""

    def __init__(self, path: Path):
        self.path = path
        self.archive = TarArchive(path)
        files = self.archive.files
        self.prefix = next((p for p in (f"{FOLDER}/", "") if f"{p}images.txt" in files), None)
        if self.prefix is None:
            found = ", ".join(sorted(files)[:4]) or "no files"
            raise DatasetError(f"{path}: not the CUB-200-2011 archive: no {FOLDER}/images.txt (it "
                               f"holds {found}{', ...' if len(files) > 4 else ''})")
        missing = [n for n in INDEX if f"{self.prefix}{n}" not in files]
        if missing:
            raise DatasetError(f"{path}: no {self.prefix}{missing[0]}; is this CUB_200_2011.tgz?")
        raw = self.archive.read(f"{self.prefix}{n}" for n in INDEX)
        self._texts = {n: _decode(raw[f"{self.prefix}{n}"], self.where(n)) for n in INDEX}

    def where(self, name: str) -> str:
        return f"{self.path}:{self.prefix}{name}"

    def text(self, name: str) -> str:
        return self._texts[name]

    def image_name(self, path: str) -> str:
        return f"{self.path.name}:{self.prefix}images/{path}"

    def listing(self, images: list[SourceImage]) -> Listing:
        member = {image.name.split(":", 1)[1]: image for image in images}
        absent = sorted(set(member) - set(self.archive.files))
        if absent:
            raise DatasetError(f"{self.path}: no member {absent[0]} (listed in images.txt)")

        def stream(wanted: list[SourceImage]) -> Iterator[tuple[SourceImage, bytes]]:
            names = {image.name.split(":", 1)[1] for image in wanted}
            for name, data in self.archive.stream(names):
                yield member[name], data

        official = published("cub").data["archive"]["sha256"]
        return Listing(images, [describe_source(self.path, len(images), official_sha256=official)],
                       stream=stream)


class _Folder:
    """The unpacked ``CUB_200_2011`` folder (or the folder holding it)."""

    def __init__(self, path: Path):
        if not path.is_dir():
            raise DatasetError(f"{path}: no such file or folder")
        self.folder = path / FOLDER if (path / FOLDER).is_dir() else path
        missing = [n for n in INDEX if not (self.folder / n).is_file()]
        if missing:
            raise DatasetError(f"{self.folder}: no {missing[0]}; expected the unpacked {FOLDER} "
                               f"folder ({', '.join(INDEX)}, images/)")

    def where(self, name: str) -> str:
        return str(self.folder / name)

    def text(self, name: str) -> str:
        try:
            return _decode((self.folder / name).read_bytes(), self.where(name))
        except OSError as error:
            raise DatasetError(f"{self.where(name)}: cannot read ({error.strerror})") from None

    def image_name(self, path: str) -> str:
        return str(self.folder / "images" / path)

    def listing(self, images: list[SourceImage]) -> Listing:
        for image in images:
            path = Path(image.name)
            if not path.is_file():
                raise DatasetError(f"{path}: missing (listed in images.txt)")
            image.read, image.path = file_reader(path), path
        sources = [describe_source(self.folder / "images", len(images))]
        sources += [describe_source(self.folder / n, 0) for n in INDEX]
        return Listing(images, sources)


def _box(values: list[str] | None, image_id: str, where: str) -> list[float]:
    if values is None:
        raise DatasetError(f"{where}: no box for image {image_id}")
    try:
        box = [float(v) for v in values]
    except ValueError:
        raise DatasetError(f"{where}: image {image_id}: box {values} is not four numbers") from None
    if box[2] <= 0 or box[3] <= 0:
        raise DatasetError(f"{where}: image {image_id}: box {values} has no area")
    return box


def _rows(text: str, name: str, fields: int) -> list[list[str]]:
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        values = raw.split()
        if not values:
            continue
        if len(values) != fields:
            raise DatasetError(f"{FOLDER}/{name}: line {line} has {len(values)} fields, expected {fields}")
        rows.append(values)
    if not rows:
        raise DatasetError(f"{FOLDER}/{name}: empty")
    return rows


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise DatasetError(f"{where}: not a text file") from None


def _unread() -> bytes:
    raise RuntimeError("a CUB image is read through its source's listing")  # replaced in listing()
