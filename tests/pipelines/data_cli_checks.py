"""What the benchmark importers' tests share: ``orch data`` run in-process, its one-line refusal,
and a bad archive built from a good one's members and refused with nothing written."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Callable

from click.testing import CliRunner

from fake_benchmarks import write_tar
from orchestrator.cli.data import data

# (good members, good archive) -> the bad archive's bytes, its members, or (members, links).
MakeBad = Callable[[dict[str, bytes], Path], object]


def run(*args):
    return CliRunner().invoke(data, [str(a) for a in args], catch_exceptions=False)


def one_line_refusal(result) -> str:
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def members(archive: Path) -> dict[str, bytes]:
    """The regular files of a tar archive, by member name."""
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}


def refuses_bad_archive(make: MakeBad, message: str, *, archive: Path, bad: Path,
                        command: str) -> None:
    """``orch data import COMMAND bad`` fails in one line naming ``bad`` and saying ``message``,
    and leaves no ``--out`` folder behind."""
    made = make(members(archive), archive)
    if isinstance(made, bytes):
        bad.write_bytes(made)
    else:
        files, links = made if isinstance(made, tuple) else (made, None)
        write_tar(bad, files, links=links)
    out = bad.parent / "out"
    line = one_line_refusal(run("import", command, bad, "--out", out))
    assert message in line and str(bad) in line
    assert not out.exists()  # nothing half-written
