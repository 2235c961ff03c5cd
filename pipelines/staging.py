"""Converting a listing into an import, once per image, resumably.

Images are decoded and preprocessed into staged parts, each a set of complete classes (a record
batch per class, about ``PART_ROWS`` rows per part, ``OUT/.import.partial/part-NNNNN.arrow``)
written under a temporary name and renamed when done. A run that stops half way
(Ctrl-C, a killed process, a full disk) leaves its finished parts; running the same import again
(same sources, digests and options: the plan digest in ``plan.json``) converts only the classes
still missing, and the last step assembles all parts into the import (``DatasetWriter``, manifest
last) and removes them. Input that is wrong (an unreadable image, a class without images) removes
the parts as well, so nothing is left half-written; an import made from other sources or options
discards the parts of the earlier one.

Parts are assembled in class order and rows within a class are sorted by the listing's ``order``,
so the import's files are the same whether it ran in one go or resumed, and whatever order a source
is read in (a compressed tar only front to back).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa

from pipelines.base import SPLITS
from pipelines.dataset import DatasetError, DatasetWriter, check_target, schema
from pipelines.preprocessing import decode, to_pixels
from pipelines.sources import Listing, Log, Progress, SourceImage

STAGING = ".import.partial"
# Rows per staged part: a part per class would cost a file per Omniglot character.
PART_ROWS = 4096
_PLAN = "plan.json"
_PART_METADATA = b"orch.part"


def write_import(listing: Listing, class_splits: Mapping[str, Sequence[str]], out: Path, *,
                 kind: str, preprocessing: dict[str, Any], split_rule: dict[str, Any],
                 overwrite: bool, progress: Progress | None, normalize: bool = False,
                 dedupe: bool = True, group: str | None = None, extra_columns: Sequence[str] = (),
                 manifest_extra: Mapping[str, Any] | None = None,
                 log: Log | None = None) -> dict[str, Any]:
    """Decode, preprocess and write every listed image, then the manifest; returns the manifest.

    ``dedupe`` keeps one of identical files within a class (Omniglot's small zips overlap);
    benchmarks defined by their archive keep every image. ``group`` names what the ``alphabet``
    column holds for the manifest's counts ("alphabets", "superclasses" or None).
    """
    out = Path(out)
    order = [s for s in SPLITS if class_splits.get(s)]
    class_names = [c for s in order for c in sorted(class_splits[s])]
    split_of = {c: s for s, classes in class_splits.items() for c in classes}
    by_class: dict[str, list[SourceImage]] = {c: [] for c in class_names}
    for image in listing.images:
        by_class[image.class_name].append(image)
    for name, images in by_class.items():
        if not images:
            raise DatasetError(f"class {name!r} ({split_of[name]} split) has no images in the source")
        images.sort(key=lambda im: im.order)
    part_schema = schema(preprocessing["channels"] * preprocessing["size"] ** 2, extra_columns)
    digest = _plan_digest(listing, class_names, split_of, by_class, kind=kind,
                          preprocessing=preprocessing, split_rule=split_rule, dedupe=dedupe,
                          extra_columns=extra_columns, manifest_extra=manifest_extra)
    staging = _Staging(out, overwrite=overwrite, digest=digest, log=log)
    try:
        done = staging.completed()
        todo = [c for i, c in enumerate(class_names) if i not in done]
        converted = sum(len(by_class[c]) for i, c in enumerate(class_names) if i in done)
        if done and log is not None:
            log(f"resuming: {len(done):,} of {len(class_names):,} classes ({converted:,} images) "
                f"already converted in {staging.path}")
        _convert(listing, todo, by_class, class_ids={c: i for i, c in enumerate(class_names)},
                 split_of=split_of, preprocessing=preprocessing, schema=part_schema, dedupe=dedupe,
                 normalize=normalize, staging=staging, progress=progress, done=converted,
                 total=len(listing.images))
        manifest = _assemble(staging, class_names, class_splits, split_of, out, kind=kind,
                             preprocessing=preprocessing, split_rule=split_rule, order=order,
                             listing=listing, overwrite=overwrite, normalize=normalize,
                             dedupe=dedupe, group=group, extra_columns=extra_columns,
                             manifest_extra=manifest_extra or {})
    except DatasetError:
        staging.discard()
        raise
    except BaseException:
        staging.interrupted()
        raise
    staging.remove()
    return manifest


@dataclass
class _Row:
    """One converted image."""

    image: SourceImage
    sha256: str
    pixels: np.ndarray  # uint8 [C, H, W], after the stored steps
    size: tuple[int, int]  # width, height of the source image as decoded
    class_id: int = -1
    split: str = ""


def _finish_class(rows: list[_Row], *, class_id: int, split: str, dedupe: bool,
                  normalize: bool) -> tuple[list[_Row], dict[str, Any]]:
    """A complete class's rows in listing order (one of identical files if ``dedupe``), and the
    statistics the manifest needs."""
    rows = sorted(rows, key=lambda row: row.image.order)
    kept, seen, duplicates = [], set(), 0
    for row in rows:
        if row.sha256 in seen:
            duplicates += 1
            if dedupe:
                continue
        seen.add(row.sha256)
        row.class_id, row.split = class_id, split
        kept.append(row)
    stats: dict[str, Any] = {"rows": len(kept), "duplicates": duplicates,
                             "groups": sorted({r.image.alphabet for r in kept if r.image.alphabet})}
    if normalize and split == "train":
        pixels = np.stack([row.pixels for row in kept])
        flat = pixels.reshape(len(kept), pixels.shape[1], -1).astype(np.float64) / 255.0
        stats.update(sums=flat.sum(axis=(0, 2)).tolist(),
                     squares=(flat * flat).sum(axis=(0, 2)).tolist(),
                     pixels=int(flat.shape[0] * flat.shape[2]))
    return kept, stats


def _table(rows: list[_Row], schema: pa.Schema) -> pa.Table:
    """Rows in the import's schema."""
    pixels = np.stack([row.pixels for row in rows])
    values = int(np.prod(pixels.shape[1:]))
    columns: dict[str, pa.Array] = {
        "pixels": pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1), pa.uint8()), values),
        "class_id": pa.array([r.class_id for r in rows], pa.int32()),
        "class_name": pa.array([r.image.class_name for r in rows], pa.string()),
        "alphabet": pa.array([r.image.alphabet for r in rows], pa.string()),
        "split": pa.array([r.split for r in rows], pa.string()),
        "source": pa.array([r.image.name for r in rows], pa.string()),
        "sha256": pa.array([r.sha256 for r in rows], pa.string()),
    }
    for extra in schema.names[len(columns):]:
        values_of = ([list(r.size) for r in rows] if extra == "source_size"
                     else [r.image.extra[extra] for r in rows])
        columns[extra] = pa.array(values_of, schema.field(extra).type)
    return pa.table(columns, schema=schema)


def _convert(listing: Listing, todo: list[str], by_class: Mapping[str, list[SourceImage]], *,
             class_ids: Mapping[str, int], split_of: Mapping[str, str], preprocessing: dict[str, Any],
             schema: pa.Schema, dedupe: bool, normalize: bool, staging: "_Staging",
             progress: Progress | None, done: int, total: int) -> None:
    """Convert the images of the classes in ``todo``, staging complete classes as parts."""
    images = [image for name in todo for image in by_class[name]]
    remaining = {name: len(by_class[name]) for name in todo}
    pending: dict[str, list[_Row]] = {}
    ready: list[tuple[int, list[_Row], dict[str, Any]]] = []  # complete classes, not yet staged
    ready_rows = 0

    def stage() -> None:
        nonlocal ready_rows
        if ready:
            staging.write_part(ready, schema)
            ready.clear()
            ready_rows = 0

    if progress is not None:
        progress(done, total)
    stream = listing.stream(images) if listing.stream else ((im, im.read()) for im in images)
    for image, raw in stream:
        name = image.class_name
        picture = image.to_image(raw) if image.to_image else decode(raw, name=image.name)
        size = picture.size
        if image.crop is not None:
            picture = _crop(picture, image.crop, name=image.name)
        row = _Row(image, hashlib.sha256(raw).hexdigest(), to_pixels(picture, preprocessing), size)
        pending.setdefault(name, []).append(row)
        remaining[name] -= 1
        if remaining[name] == 0:
            class_id = class_ids[name]
            rows, stats = _finish_class(pending.pop(name), class_id=class_id, split=split_of[name],
                                        dedupe=dedupe, normalize=normalize)
            ready.append((class_id, rows, stats))
            ready_rows += len(rows)
            if ready_rows >= PART_ROWS:
                stage()
        done += 1
        if progress is not None and (done % 64 == 0 or done == total):
            progress(done, total)
    stage()
    unfinished = sorted(name for name, left in remaining.items() if left)
    if unfinished:  # a source stream that ended early: a bug in its importer, not the user's input
        raise RuntimeError(f"the source gave no bytes for {remaining[unfinished[0]]} images of "
                           f"class {unfinished[0]!r}")


def _crop(picture: Any, box: tuple[float, float, float, float], *, name: str) -> Any:
    """The part of ``picture`` inside ``box`` (left, top, width, height), clipped to the image."""
    width, height = picture.size
    left, top = max(0, round(box[0])), max(0, round(box[1]))
    right, bottom = min(width, round(box[0] + box[2])), min(height, round(box[1] + box[3]))
    if right - left < 1 or bottom - top < 1:
        raise DatasetError(f"{name}: bounding box {list(box)} lies outside the {width}x{height} image")
    return picture.crop((left, top, right, bottom))


def _assemble(staging: "_Staging", class_names: list[str], class_splits: Mapping[str, Sequence[str]],
              split_of: Mapping[str, str], out: Path, *, kind: str, preprocessing: dict[str, Any],
              split_rule: dict[str, Any], order: list[str], listing: Listing, overwrite: bool,
              normalize: bool, dedupe: bool, group: str | None, extra_columns: Sequence[str],
              manifest_extra: Mapping[str, Any]) -> dict[str, Any]:
    """Write the staged parts, in class order, into the import; the manifest last."""
    channels, size = preprocessing["channels"], preprocessing["size"]
    per_split = {s: {"images": 0, "groups": set()} for s in order}
    sums, squares, train_pixels, duplicates = np.zeros(channels), np.zeros(channels), 0, 0
    with DatasetWriter(out, channels=channels, size=size, overwrite=overwrite,
                       extra_columns=extra_columns) as writer:
        for class_id, rows, stats in staging.classes(len(class_names)):
            writer.add_rows(rows)
            split = split_of[class_names[class_id]]
            per_split[split]["images"] += stats["rows"]
            per_split[split]["groups"].update(stats["groups"])
            duplicates += stats["duplicates"]
            if "pixels" in stats:
                sums += stats["sums"]
                squares += stats["squares"]
                train_pixels += stats["pixels"]
        if normalize and train_pixels:
            mean = sums / train_pixels
            std = np.sqrt(np.maximum(squares / train_pixels - mean * mean, 1e-12))
            preprocessing = {**preprocessing, "normalization": "train split mean/std",
                             "mean": [round(float(m), 6) for m in mean],
                             "std": [round(float(s), 6) for s in std]}
        class_ids = {c: i for i, c in enumerate(class_names)}
        splits: dict[str, Any] = {}
        for split in order:
            ids = [class_ids[c] for c in class_splits[split]]
            groups = sorted(per_split[split]["groups"])
            splits[split] = {"classes": len(ids), "images": per_split[split]["images"],
                             "class_ids": [min(ids), max(ids) + 1],
                             "alphabets": groups if group == "alphabets" else None}
            if group == "superclasses":
                splits[split]["superclasses"] = groups
        all_groups = {g for s in per_split.values() for g in s["groups"]}
        manifest: dict[str, Any] = {
            "kind": kind,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "alphabets": len(all_groups) if group == "alphabets" else None,
        }
        if group == "superclasses":
            manifest["superclasses"] = len(all_groups)
        manifest.update({
            "classes": len(class_names),
            "images": sum(s["images"] for s in splits.values()),
            "duplicates_skipped" if dedupe else "duplicates_kept": duplicates,
            "splits": splits,
            "split_rule": split_rule,
            "preprocessing": preprocessing,
            "sources": listing.sources,
            **({"extra_columns": list(extra_columns)} if extra_columns else {}),
            **manifest_extra,
        })
        return writer.finish(manifest)


def _plan_digest(listing: Listing, class_names: list[str], split_of: Mapping[str, str],
                 by_class: Mapping[str, list[SourceImage]], **options: Any) -> str:
    """What the staged parts depend on: sources (digests, or size and time of loose files), the
    images of each class in order, the split and every option. Equal digests: reusable parts."""
    digest = hashlib.sha256()
    head = {"sources": listing.sources, "classes": [(c, split_of[c]) for c in class_names], **options}
    digest.update(json.dumps(head, sort_keys=True, default=str).encode())
    for name in class_names:
        for image in by_class[name]:
            stamp = _file_stamp(image.path) if image.path is not None else None
            digest.update(json.dumps([image.name, image.alphabet, list(image.order), image.crop,
                                      image.extra, stamp], default=str).encode())
    return digest.hexdigest()


def _file_stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None  # reading it will fail with the file named
    return stat.st_size, stat.st_mtime_ns


class _Staging:
    """The parts folder of an import in progress, ``OUT/.import.partial``."""

    def __init__(self, out: Path, *, overwrite: bool, digest: str, log: Log | None):
        check_target(out, overwrite=overwrite)
        self.out = out
        self.path = out / STAGING
        self._created = not out.exists()
        plan = self.path / _PLAN
        if self.path.exists():
            try:
                same = json.loads(plan.read_text()).get("digest") == digest
            except (OSError, ValueError):
                same = False
            if not same:
                if log is not None:
                    log(f"discarding the unfinished import in {self.path}: it was started from other "
                        "sources or options")
                shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        if not plan.exists():
            plan.write_text(json.dumps({"digest": digest}) + "\n")
        for leftover in self.path.glob("*.tmp"):  # a part a killed run was writing
            leftover.unlink()

    def _parts(self) -> list[Path]:
        return sorted(self.path.glob("part-*.arrow"))

    @staticmethod
    def _contents(reader: pa.ipc.RecordBatchFileReader) -> list[tuple[int, dict[str, Any]]]:
        """(class id, statistics) of each record batch of a part, in batch order."""
        return [(int(i), stats) for i, stats in json.loads(reader.schema.metadata[_PART_METADATA])]

    def _open(self, part: Path) -> pa.ipc.RecordBatchFileReader:
        try:
            return pa.ipc.open_file(pa.memory_map(str(part), "r"))
        except (pa.ArrowException, OSError) as error:
            raise DatasetError(f"{part}: unreadable staged part ({error}); run the import again "
                               "(it starts over)") from None

    def completed(self) -> set[int]:
        return {class_id for part in self._parts() for class_id, _ in self._contents(self._open(part))}

    def write_part(self, classes: list[tuple[int, list[Any], dict[str, Any]]], schema: pa.Schema) -> None:
        """Stage complete classes as one part: a record batch per class, in one Arrow file."""
        part = self.path / f"part-{len(self._parts()):05d}.arrow"
        staged = part.with_name(part.name + ".tmp")
        table = _table([row for _, rows, _ in classes for row in rows], schema).combine_chunks()
        tagged = schema.with_metadata(
            {_PART_METADATA: json.dumps([[class_id, stats] for class_id, _, stats in classes]).encode()})
        # One thread: on a busy machine the codec's pool costs more than it saves on small parts.
        options = pa.ipc.IpcWriteOptions(compression="zstd", use_threads=False)
        with pa.OSFile(str(staged), "wb") as sink, pa.ipc.new_file(sink, tagged, options=options) as writer:
            offset = 0
            for _, rows, _ in classes:
                for batch in table.slice(offset, len(rows)).to_batches():
                    writer.write_batch(batch)
                offset += len(rows)
        os.replace(staged, part)

    def classes(self, classes: int) -> Iterator[tuple[int, pa.Table, dict[str, Any]]]:
        """(class id, rows, statistics) of every class, in class order, from whichever part holds it."""
        where: dict[int, tuple[pa.ipc.RecordBatchFileReader, int, dict[str, Any]]] = {}
        for part in self._parts():
            reader = self._open(part)
            for batch, (class_id, stats) in enumerate(self._contents(reader)):
                if class_id in where:
                    raise DatasetError(f"{self.path}: class {class_id} is staged twice; run the "
                                       "import again (it starts over)")
                where[class_id] = (reader, batch, stats)
        if sorted(where) != list(range(classes)):
            raise DatasetError(f"{self.path}: staged parts do not cover every class; run the import "
                               "again (it starts over)")
        for class_id in range(classes):
            reader, batch, stats = where[class_id]
            rows = pa.Table.from_batches([reader.get_batch(batch)]).replace_schema_metadata(None)
            yield class_id, rows, stats

    def discard(self) -> None:
        """Bad input: no part is worth keeping."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._created and self.out.exists() and not any(self.out.iterdir()):
            self.out.rmdir()

    def interrupted(self) -> None:
        """Stopped, not refused: keep the finished parts for the next run."""
        for leftover in self.path.glob("*.tmp"):
            leftover.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
