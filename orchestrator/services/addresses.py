"""Ray cluster addresses as users write them, and what Ray needs to reach one on the loopback.

Ray swaps a loopback host (127.0.0.1, localhost, ::1) for this machine's outward IP before it
dials, so a cluster that listens on 127.0.0.1 only (``orch cluster up``) is out of its reach --
unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is in the environment, under which Ray keeps the
loopback address. Ray reads that variable once, when it is imported, so ``orch launch`` calls
``prepare_environment`` before anything imports Ray. This module never imports Ray itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Ray's documented switch (for clusters on Windows and macOS): 0 keeps Ray on the loopback.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
CLIENT_SCHEME = "ray://"
# Joining a cluster that does not answer fails after this long (Ray itself retries for minutes).
CONNECT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Address:
    """``HOST:PORT`` (the GCS) or ``ray://HOST:PORT`` (the Ray client server)."""

    host: str
    port: int
    client: bool = False

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{CLIENT_SCHEME if self.client else ''}{host}:{self.port}"

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS or self.host.startswith("127.")


def parse(text: str | None) -> Address | None:
    """The address in ``text``; None for Ray in this process (None, "local") or "auto"."""
    if text is None or text in ("auto", "local"):
        return None
    client = text.startswith(CLIENT_SCHEME)
    rest = text.removeprefix(CLIENT_SCHEME)
    host, _, port = rest.rpartition(":")
    if not port.isdigit() or not host:
        host, port = rest, str(10001 if client else 6379)
    return Address(host.strip("[]"), int(port), client)


def effective(address: str | None) -> str | None:
    """The address Ray will join: the one given, else ``RAY_ADDRESS`` (Ray reads it too)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def prepare_environment(address: str | None) -> None:
    """Set what Ray needs, before it is imported, to reach ``address`` as written."""
    parsed = parse(effective(address))
    if parsed is not None and parsed.loopback:
        os.environ.update(LOOPBACK_ENV)


def loopback_hosts(nodes: int, *, distinct: bool) -> list[str]:
    """The address of each node of a loopback cluster (``orch cluster up``): all 127.0.0.1, or
    (``distinct``) one loopback address each -- 127.0.0.1 for the head, 127.0.0.2, 127.0.0.3,
    ... for the workers -- so that the nodes present as separate hosts, as on a real cluster
    (Linux routes all of 127.0.0.0/8 to the loopback interface)."""
    return [f"127.0.0.{i + 1 if distinct else 1}" for i in range(nodes)]
