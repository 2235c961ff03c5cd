"""The ``orch`` command line: arguments in, one-line errors and tables out.

- ``main``: the ``orch`` group, ``launch``, ``runs``, ``models``, ``promote``, ``ui``,
  ``dashboard``, ``config``;
- ``data``: ``orch data`` (import, info); ``predict``: ``orch predict`` and ``orch evaluate``;
  ``compare``: ``orch compare``; ``cluster``: ``orch cluster`` (a loopback Ray cluster);
- ``terminal``: where the commands write (stdout for results, stderr for progress).

May import anything of orch; nothing imports it.
"""
