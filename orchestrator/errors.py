"""The two kinds of failure orch reports, each as one line (``orch --debug`` shows the traceback).

``UserError``: input the user can fix -- a sweep file, a path, a URI, a model reference, an
option. The message names what is wrong and where, and what is allowed.

``MachineryError``: a part orch relies on failed -- a process, the Ray cluster, a store that does
not answer -- while the input was fine. The message names the part and what to check.

Anything else escaping to the command line is a bug in orch and prints its exception type too.
"""

from __future__ import annotations


class UserError(ValueError):
    """Input orch cannot use; the message is one line."""


class MachineryError(RuntimeError):
    """A process, cluster or store that failed orch; the message is one line."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run to many lines), or
    its type's name where it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
