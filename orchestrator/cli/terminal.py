"""Where the command line writes: tables on standard output, progress and notices on standard
error (so that ``orch runs --json > rows.json`` stays clean)."""

from __future__ import annotations

import sys

from rich.console import Console

console = Console(stderr=True)


def output_console() -> Console:
    """Tables on stdout; when piped (CI logs), wide enough that no column is cut."""
    return Console() if sys.stdout.isatty() else Console(width=160)
