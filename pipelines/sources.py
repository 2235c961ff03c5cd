"""What importers find in the files users downloaded: image listings, and archives read in place.

An importer turns its source into a ``Listing``: one ``SourceImage`` per image (its class, where it
came from, how to read its bytes) and a description of each source file with its digest. Nothing is
unpacked to disk: zips and tars are read where they are, and a tar is refused whole, in one line,
if any member could escape the archive when unpacked (an absolute path, ``..``) or is not a plain
file or folder (a symbolic or hard link, a device): such an archive is not the one published.
"""

from __future__ import annotations

import lzma
import tarfile
import zipfile
import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator

from PIL import Image

from pipelines.dataset import DatasetError, sha256_file
from pipelines.preprocessing import IMAGE_SUFFIXES

# (images done, images in total), called every few images during the conversion.
Progress = Callable[[int, int], None]
# One line for the user about what the import is doing (resuming, hashing a large source).
Log = Callable[[str], None]


@dataclass
class SourceImage:
    """One image found in a source, not yet read."""

    class_name: str
    # The level above the class: Omniglot's alphabet, the superclass of CIFAR-100 and tieredImageNet.
    alphabet: str | None
    name: str  # where it came from, as shown to users and stored in the ``source`` column
    read: Callable[[], bytes]
    # Raw bytes -> image; the default decodes PNG/JPEG file bytes.
    to_image: Callable[[bytes], Image.Image] | None = None
    order: tuple[Any, ...] = field(default_factory=tuple)
    # Values of the import's extra columns (``pipelines.dataset.EXTRA_COLUMNS``) for this image.
    extra: dict[str, Any] = field(default_factory=dict)
    # (left, top, width, height) in the source image's pixels, cropped before the stored steps.
    crop: tuple[float, float, float, float] | None = None
    # The loose file it is read from, if any: its size and time tell a resumed import it is unchanged.
    path: Path | None = None


@dataclass
class Listing:
    """Everything an importer found, before any image is decoded."""

    images: list[SourceImage]
    sources: list[dict[str, Any]]
    # Yields (image, bytes) for the images asked for, in whatever order the source reads best
    # (a compressed tar only front to back); None: in the order asked, through ``image.read``.
    stream: Callable[[list[SourceImage]], Iterator[tuple[SourceImage, bytes]]] | None = None


def describe_source(path: Path, images: int, *, official_sha256: str | None = None) -> dict[str, Any]:
    """A source as the manifest names it: its path, sha256 (files only) and how many images it gave;
    ``official_sha256``, where the publisher's digest is known, records whether this is that file."""
    checksum = sha256_file(path) if path.is_file() else None
    described: dict[str, Any] = {"path": str(path), "sha256": checksum, "images": images}
    if official_sha256 is not None and checksum is not None:
        described["official_release"] = checksum == official_sha256
    return described


def file_reader(path: Path) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            return path.read_bytes()
        except OSError as error:
            raise DatasetError(f"{path}: cannot read ({error.strerror})") from None
    return read


def zip_reader(archive: zipfile.ZipFile, member: zipfile.ZipInfo, source: Path) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            return archive.read(member)
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise DatasetError(f"{source}:{member.filename}: unreadable zip entry ({error})") from None
    return read


def list_tree(source: Path, stack: ExitStack, position: int, *, depth: int,
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
        entries = [(PurePosixPath(m.filename).parts, zip_reader(archive, m, source),
                    f"{source.name}:{m.filename}", None) for m in members]
    elif source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file())
        entries = [(p.relative_to(source).parts, file_reader(p), str(p), p) for p in files]
    else:
        raise DatasetError(f"{source}: no such file or folder")
    for parts, reader, name, path in entries:
        if any(part.startswith(".") or part == "__MACOSX" for part in parts):
            continue  # hidden files and macOS zip metadata are not data
        if not parts[-1].lower().endswith(IMAGE_SUFFIXES):
            raise DatasetError(f"{name}: not a PNG/JPEG image; expected only {expected} files")
        if len(parts) < depth:
            raise DatasetError(f"{name}: not at {expected}")
        root = parts[-depth - 1] if len(parts) > depth else source.name.removesuffix(".zip")
        found.append((SourceImage("", None, name, reader, order=(parts[-1], position), path=path),
                      parts, root))
    return found


# -- tar archives -------------------------------------------------------------------------------

# What a damaged or truncated .tar, .tar.gz, .tar.bz2 or .tar.xz raises while being read
# (gzip and bz2 raise EOFError or OSError).
_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError, lzma.LZMAError)


class TarArchive:
    """A tar archive (plain or compressed) read in place.

    Opening it reads every member header once -- a whole pass over a compressed file, which is also
    where truncation shows -- and refuses the archive if any member is unsafe. Members are then read
    front to back (``stream``) or, for the few small index files, by name (``read``).
    """

    def __init__(self, path: Path):
        self.path = path
        self.files: dict[str, tarfile.TarInfo] = {}  # normalised member name -> header
        self.folders: set[str] = set()
        with self._open() as tar:
            try:
                for info in tar:
                    name = _member_name(info, path)
                    if info.isdir():
                        self.folders.add(name)
                    elif info.isreg():
                        self.files[name] = info
                    else:
                        kind = ("a symbolic link" if info.issym() else "a hard link" if info.islnk()
                                else "a device or pipe")
                        raise DatasetError(f"{path}: member {info.name!r} is {kind}; refusing an "
                                           "archive with links or special files (not the published one)")
            except _TAR_ERRORS as error:
                raise DatasetError(f"{path}: truncated or damaged archive ({_one_line(error)}); "
                                   "download it again") from None
        for name in self.files:  # folders named only through their files
            self.folders.update(str(p) for p in PurePosixPath(name).parents if str(p) != ".")

    def _open(self) -> tarfile.TarFile:
        try:
            return tarfile.open(self.path, "r:*")
        except tarfile.ReadError:
            raise DatasetError(f"{self.path}: not a tar archive (.tar, .tar.gz, .tgz)") from None
        except _TAR_ERRORS as error:
            raise DatasetError(f"{self.path}: unreadable archive ({_one_line(error)})") from None

    def read(self, names: Iterable[str]) -> dict[str, bytes]:
        """The bytes of a few members, by name (one pass over the archive)."""
        wanted = set(names)
        return {name: data for name, data in self._pass(wanted)}

    def stream(self, names: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        """(name, bytes) of the members asked for, in archive order: one pass, front to back."""
        return self._pass(set(names))

    def _pass(self, wanted: set[str]) -> Iterator[tuple[str, bytes]]:
        missing = sorted(wanted - set(self.files))
        if missing:
            raise DatasetError(f"{self.path}: no member {missing[0]!r}")
        left = set(wanted)
        with self._open() as tar:
            try:
                for info in tar:
                    name = _member_name(info, self.path)
                    if name not in left:
                        continue
                    handle = tar.extractfile(info)
                    data = handle.read() if handle is not None else b""
                    if len(data) != info.size:
                        raise tarfile.ReadError("unexpected end of data")
                    left.discard(name)
                    yield name, data
                    if not left:
                        return  # the rest of a compressed archive need not be decompressed
            except _TAR_ERRORS as error:
                raise DatasetError(f"{self.path}: truncated or damaged archive ({_one_line(error)}); "
                                   "download it again") from None


def _member_name(info: tarfile.TarInfo, path: Path) -> str:
    """The member's path inside the archive, ``./`` dropped; refuses paths that leave it."""
    name = info.name
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise DatasetError(f"{path}: member {name!r} points outside the archive; refusing an "
                           "archive with unsafe paths (not the published one)")
    return str(PurePosixPath(*[p for p in parts if p != "."])) if parts else ""


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
