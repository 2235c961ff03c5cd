"""``orch data``: import few-shot image data sets to Parquet once, offline, and inspect them.

    orch data import omniglot images_background.zip images_evaluation.zip --out data/omniglot
    orch data import image-folder photos/ --out data/photos
    orch data import mini-imagenet mini-imagenet/ --out data/mini-imagenet
    orch data import cifar-fs cifar-100-python.tar.gz --out data/cifar-fs
    orch data import fc100 cifar-100-python.tar.gz --out data/fc100
    orch data import tiered-imagenet tiered-imagenet/ --out data/tiered --allow-pickle
    orch data import cub CUB_200_2011.tgz --out data/cub --crop
    orch data info data/omniglot --verify
    orch data info s3://bucket/omniglot --verify

Errors are one line naming the file and what is wrong; an import refused for its input leaves no
files behind and an existing import in ``--out`` untouched. An import that is interrupted keeps the
classes it finished (in ``--out``/.import.partial): the same command again resumes it.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from pipelines.cifar import import_cifar_fs, import_fc100
from pipelines.cub import import_cub
from pipelines.dataset import GROUPS, DatasetError, locate, read_manifest, summary, verify
from pipelines.importers import import_image_folder, import_mini_imagenet, import_omniglot
from pipelines.tiered import import_tiered_imagenet

data = click.Group("data", help="Import few-shot image data sets (Parquet) and inspect imports.")


@data.group("import")
def import_() -> None:
    """Convert a downloaded data set into an orch import (Parquet + manifest)."""


_out = click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
                    help="Folder to write the import to (created; must be empty or an import).")
_overwrite = click.option("--overwrite", is_flag=True, help="Replace an existing import in --out.")
_seed = click.option("--seed", default=0, show_default=True, help="Seed of the split draw.")


def _ratio(name: str, default: float, what: str) -> Callable[[Any], Any]:
    return click.option(f"--{name}", type=click.FloatRange(0, 1, max_open=True), default=default,
                        show_default=True,
                        help=f"Fraction of the {what} drawn for the {name.split('-')[0]} split.")


def _names(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


@import_.command("omniglot")
@click.argument("sources", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
@_out
@click.option("--size", default=28, show_default=True, type=click.IntRange(4, 512),
              help="Side of the stored square images, in pixels.")
@_seed
@_ratio("val-ratio", 0.15, "alphabets")
@_ratio("test-ratio", 0.15, "alphabets")
@click.option("--val-alphabets", default=None, metavar="A,B,...",
              help="Alphabets of the val split (default: drawn by --val-ratio).")
@click.option("--test-alphabets", default=None, metavar="A,B,...",
              help="Alphabets of the test split (default: those of an images_evaluation source, "
                   "else drawn by --test-ratio).")
@_overwrite
def import_omniglot_command(sources: tuple[Path, ...], out: Path, size: int, seed: int,
                            val_ratio: float, test_ratio: float, val_alphabets: str | None,
                            test_alphabets: str | None, overwrite: bool) -> None:
    """Import Omniglot from its zips or unpacked folders (<root>/<Alphabet>/<character>/<image>.png).

    Give several SOURCES to combine them; identical files given twice are kept once. Splits are
    by alphabet, so no character is in two splits.
    """
    with _reporting() as report:
        manifest = import_omniglot(
            sources, out, size=size, seed=seed, val_ratio=val_ratio, test_ratio=test_ratio,
            val_alphabets=_names(val_alphabets), test_alphabets=_names(test_alphabets),
            overwrite=overwrite, progress=report.progress, log=report.log)
    _print_summary(out, manifest)


@import_.command("image-folder")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_out
@click.option("--size", default=84, show_default=True, type=click.IntRange(4, 1024),
              help="Side of the stored square images, in pixels.")
@click.option("--grayscale", is_flag=True, help="Store one channel instead of RGB.")
@click.option("--invert", is_flag=True, help="Invert values (dark strokes on light -> light on dark).")
@click.option("--no-normalize", is_flag=True,
              help="Keep values in [0, 1] instead of normalising by the train split's mean/std.")
@_seed
@_ratio("val-ratio", 0.16, "classes")
@_ratio("test-ratio", 0.2, "classes")
@_overwrite
def import_image_folder_command(source: Path, out: Path, size: int, grayscale: bool, invert: bool,
                                no_normalize: bool, seed: int, val_ratio: float, test_ratio: float,
                                overwrite: bool) -> None:
    """Import any <class>/<image> tree of PNG/JPEG files; classes are split by a seeded ratio."""
    with _reporting() as report:
        manifest = import_image_folder(
            source, out, size=size, grayscale=grayscale, invert=invert, seed=seed,
            val_ratio=val_ratio, test_ratio=test_ratio, normalize=not no_normalize,
            overwrite=overwrite, progress=report.progress, log=report.log)
    _print_summary(out, manifest)


@import_.command("mini-imagenet")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_out
@click.option("--size", default=84, show_default=True, type=click.IntRange(4, 1024),
              help="Side of the stored square images, in pixels.")
@click.option("--allow-pickle", is_flag=True,
              help="Read mini-imagenet-cache-*.pkl files (only plain data and NumPy arrays are "
                   "loaded from them; anything else is refused). Pass it for files you trust.")
@_overwrite
def import_mini_imagenet_command(source: Path, out: Path, size: int, allow_pickle: bool,
                                 overwrite: bool) -> None:
    """Import mini-ImageNet in Ravi and Larochelle's split: train.csv, val.csv, test.csv
    (filename,label) beside images/, or the mini-imagenet-cache-{train,val,test}.pkl files."""
    with _reporting() as report:
        manifest = import_mini_imagenet(source, out, size=size, allow_pickle=allow_pickle,
                                        overwrite=overwrite, progress=report.progress, log=report.log)
    _print_summary(out, manifest)


_cifar100 = click.argument("cifar100", metavar="CIFAR100",
                           type=click.Path(exists=True, path_type=Path))


@import_.command("cifar-fs", short_help="CIFAR-100 in the CIFAR-FS split (64/16/20 classes).")
@_cifar100
@_out
@click.option("--size", default=32, show_default=True, type=click.IntRange(4, 1024),
              help="Side of the stored square images, in pixels (CIFAR's are 32).")
@_overwrite
def import_cifar_fs_command(cifar100: Path, out: Path, size: int, overwrite: bool) -> None:
    """Import CIFAR-FS (Bertinetto et al. 2019): CIFAR-100's classes in the published 64/16/20
    split. CIFAR100 is cifar-100-python.tar.gz or its unpacked folder (train, test, meta)."""
    with _reporting() as report:
        manifest = import_cifar_fs(cifar100, out, size=size, overwrite=overwrite,
                                   progress=report.progress, log=report.log)
    _print_summary(out, manifest)


@import_.command("fc100", short_help="CIFAR-100 in the FC100 split (12/4/4 superclasses).")
@_cifar100
@_out
@click.option("--size", default=32, show_default=True, type=click.IntRange(4, 1024),
              help="Side of the stored square images, in pixels (CIFAR's are 32).")
@_overwrite
def import_fc100_command(cifar100: Path, out: Path, size: int, overwrite: bool) -> None:
    """Import FC100 (Oreshkin et al. 2018): CIFAR-100's superclasses in the published 12/4/4 split
    (60/20/20 classes). CIFAR100 is cifar-100-python.tar.gz or its unpacked folder."""
    with _reporting() as report:
        manifest = import_fc100(cifar100, out, size=size, overwrite=overwrite,
                                progress=report.progress, log=report.log)
    _print_summary(out, manifest)


@import_.command("tiered-imagenet", short_help="tieredImageNet (351/97/160 classes), folders or caches.")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_out
@click.option("--size", default=84, show_default=True, type=click.IntRange(4, 1024),
              help="Side of the stored square images, in pixels (the pickled caches hold 84).")
@click.option("--allow-pickle", is_flag=True,
              help="Read Ren et al.'s {train,val,test}_images_png.pkl and _labels.pkl caches (only "
                   "plain data and NumPy arrays are loaded; anything else is refused).")
@_overwrite
def import_tiered_imagenet_command(source: Path, out: Path, size: int, allow_pickle: bool,
                                   overwrite: bool) -> None:
    """Import tieredImageNet (Ren et al. 2018) in its published 351/97/160 class split, with its 34
    categories: SOURCE holds train/ val/ test/ with one folder of images per WordNet id, or the
    pickled caches {train,val,test}_images_png.pkl with {train,val,test}_labels.pkl."""
    with _reporting() as report:
        manifest = import_tiered_imagenet(source, out, size=size, allow_pickle=allow_pickle,
                                          overwrite=overwrite, progress=report.progress,
                                          log=report.log)
    _print_summary(out, manifest)


@import_.command("cub", short_help="CUB-200-2011 in the 100/50/50 split, with bounding boxes.")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@_out
@click.option("--size", default=84, show_default=True, type=click.IntRange(4, 1024),
              help="Side of the stored square images, in pixels.")
@click.option("--crop", is_flag=True,
              help="Crop every image to its bounding box (bounding_boxes.txt) before resizing.")
@_overwrite
def import_cub_command(source: Path, out: Path, size: int, crop: bool, overwrite: bool) -> None:
    """Import CUB-200-2011 in the 100/50/50 class split of Chen et al. 2019, bounding boxes kept
    in a bbox column. SOURCE is CUB_200_2011.tgz or its unpacked CUB_200_2011 folder."""
    with _reporting() as report:
        manifest = import_cub(source, out, size=size, crop=crop, overwrite=overwrite,
                              progress=report.progress, log=report.log)
    _print_summary(out, manifest)


@data.command("info")
@click.argument("path", metavar="PATH|URI")
@click.option("--verify", "check", is_flag=True, help="Check every file's sha256 against the manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def info(path: str, check: bool, as_json: bool) -> None:
    """Alphabets, classes and images per split, preprocessing and checksums of an import: a
    folder, or a copy of one behind a pyarrow.fs URI (s3://bucket/prefix, gs://, hdfs://,
    file://; options as pyarrow.fs.FileSystem.from_uri reads them, e.g.
    s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http)."""
    with _reporting(progress_bar=False):
        location = locate(path)
        manifest = read_manifest(location)
        if check:
            verify(location, manifest)
    report = {"path": str(path), **summary(manifest), "verified": True if check else None}
    if as_json:
        click.echo(json.dumps(report, sort_keys=False))
        return
    _print_summary(path, manifest)
    prep = manifest["preprocessing"]
    click.echo(f"preprocessing: {prep['size']}x{prep['size']} {prep['mode']}, {prep['resample']} "
               f"resize, {'inverted, ' if prep['invert'] else ''}normalisation {prep['normalization']} "
               f"(mean {prep['mean']}, std {prep['std']})")
    if manifest.get("crop"):
        click.echo(f"cropped to: {manifest['crop']}")
    click.echo(f"split rule: {json.dumps(manifest['split_rule'])}")
    if manifest.get("extra_columns"):
        click.echo(f"extra columns: {', '.join(manifest['extra_columns'])}")
    for source in manifest.get("sources", []):
        official = {True: ", the official release", False: ", not the official release's digest",
                    None: ""}[source.get("official_release")]
        click.echo(f"source {source['path']}: {source['images']:,} images, "
                   f"sha256 {source['sha256'] or '- (a folder; each image has its own)'}{official}")
    for name, file in manifest["files"].items():
        click.echo(f"{name}: {file['bytes']:,} bytes, {file['rows']:,} rows, sha256 {file['sha256']}")
    if check:
        click.echo("verified: every file matches its sha256 in the manifest")


def _print_summary(path: Path | str, manifest: dict[str, Any]) -> None:
    group = next((g for g in GROUPS if manifest.get(g) is not None), None)
    head = [f"{manifest['classes']:,} classes", f"{manifest['images']:,} images"]
    if group is not None:
        head.insert(0, f"{manifest[group]} {group}")
    channels, height, width = manifest["shape"]
    click.echo(f"{path}: {manifest['kind']}, {', '.join(head)}, {channels}x{height}x{width}"
               + (f", {manifest['duplicates_skipped']:,} duplicates skipped"
                  if manifest.get("duplicates_skipped") else ""))
    rows = [("split", group or "alphabets", "classes", "images")]
    for split, entry in manifest["splits"].items():
        members = entry.get(group) if group else None
        rows.append((split, str(len(members)) if members is not None else "-",
                     f"{entry['classes']:,}", f"{entry['images']:,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        click.echo("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for split, entry in manifest["splits"].items():
        if group is not None and entry.get(group):
            click.echo(f"  {split}: {', '.join(entry[group])}")


@dataclass
class _Report:
    """Where an import reports: a progress bar, and lines printed above it."""

    progress: Callable[[int, int], None] | None
    log: Callable[[str], None] | None


@contextmanager
def _reporting(*, progress_bar: bool = True) -> Iterator[_Report]:
    """Turn ``DatasetError`` into a one-line ``ClickException``; show a progress bar meanwhile."""
    if not progress_bar:
        with _one_line_errors():
            yield _Report(None, None)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    console = Console(stderr=True)
    columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True,
                  disable=not console.is_terminal) as bar:
        task = bar.add_task("importing", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        def log(line: str) -> None:  # above the bar, which redraws below it
            console.print(f"orch: {line}", markup=False, highlight=False, soft_wrap=True)

        with _one_line_errors():
            yield _Report(advance, log)


@contextmanager
def _one_line_errors() -> Iterator[None]:
    try:
        yield
    except DatasetError as error:
        raise click.ClickException(str(error)) from None
    except OSError as error:  # e.g. --out on a read-only disk, or the disk filling up
        where = f"{error.filename}: " if error.filename else ""
        raise click.ClickException(f"{where}{error.strerror or error}") from None
