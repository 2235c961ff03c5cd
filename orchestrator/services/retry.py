"""Waiting out a store that blinks: bounded exponential backoff, and writes that wait for it.

orch talks to three outside stores -- the Optuna storage (a database), the MLflow tracking server
and the checkpoint store (object storage) -- and on a cluster each of them restarts now and then:
a database failover, a server upgrade, an object store timing out. Each adapter (``study``,
``tracking``, ``checkpoints``) routes its calls through ``call`` with its own test of what is
transient; this module knows nothing of any of them and imports no outside system.

- ``call``: retry with exponential backoff until the store answers or ``services.outage_s`` has
  passed since the first failure; then ``ServiceOutage``, one line naming the store and its URL.
  What the sweep driver asks of a store waits like this, and so do a trial's final writes.
- ``Outbox``: writes a trial makes while it trains (metric steps, intermediate values,
  checkpoints). A write the store cannot take is kept, in order, and sent once the store is
  back, while training goes on; only an outage longer than the bound ends the trial.

Inside ``single_attempt()`` a call makes one attempt and raises ``StoreUnavailable`` at once:
how an ``Outbox`` tries a write without waiting.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

from orchestrator.errors import MachineryError, first_line

T = TypeVar("T")

# services.outage_s's default: a database restart or failover takes seconds to a minute; a
# minor-version upgrade a few minutes.
DEFAULT_OUTAGE_S = 300.0
FIRST_WAIT_S = 0.5
LONGEST_WAIT_S = 15.0


class ServiceOutage(MachineryError):
    """A store did not answer for longer than ``services.outage_s``; the message is one line
    naming it and its URL. Nothing was marked failed for it: the sweep is resumable."""


class StoreUnavailable(Exception):
    """Raised inside ``single_attempt()``: the store did not take this call now."""

    def __init__(self, service: str, url: str, error: BaseException):
        super().__init__(f"{service} at {url}: {first_line(error)}")
        self.service, self.url, self.error = service, url, error


@dataclass
class Policy:
    """How long a store may be away (``services.outage_s``) and who hears about it."""

    outage_s: float = DEFAULT_OUTAGE_S
    notice: Callable[[str], None] | None = None


_policy = Policy()
_SINGLE_ATTEMPT: ContextVar[bool] = ContextVar("orch_single_attempt", default=False)
# Seconds this process has spent in calls to each store (waits included): what the stores cost
# a trial or a sweep driver (benchmarks/stores.py).
_spent: dict[str, float] = {}
_nesting = threading.local()


def spent_s() -> dict[str, float]:
    """Seconds spent in calls to each store by this process since ``reset_spent``; calls from a
    thread inside ``in_background()`` are counted apart, as "<store> (background)"."""
    return dict(_spent)


@contextmanager
def in_background() -> Iterator[None]:
    """Store calls of this thread overlap the work they serve (checkpoints written while
    training goes on, heartbeats): count them apart."""
    _nesting.background = True
    try:
        yield
    finally:
        _nesting.background = False


def reset_spent() -> None:
    _spent.clear()


def configure(*, outage_s: float | None = None, notice: Callable[[str], None] | None = None) -> None:
    """Set this process's bound (the sweep's ``services.outage_s``) and where the line saying
    that a store went away, and came back, is printed (the sweep driver's notices)."""
    if outage_s is not None:
        _policy.outage_s = outage_s
    if notice is not None:
        _policy.notice = notice


def outage_s() -> float:
    return _policy.outage_s


@contextmanager
def single_attempt() -> Iterator[None]:
    """Calls made inside try once: a transient failure raises ``StoreUnavailable``."""
    token = _SINGLE_ATTEMPT.set(True)
    try:
        yield
    finally:
        _SINGLE_ATTEMPT.reset(token)


def waits(attempt: int) -> float:
    """The pause before retry ``attempt`` (1, 2, ...): doubling from half a second up to 15 s,
    with jitter so that many trials do not knock on a restarted store at the same instant."""
    base = min(LONGEST_WAIT_S, FIRST_WAIT_S * 2 ** (attempt - 1))
    return base * random.uniform(0.75, 1.25)


def root_cause(error: BaseException) -> str:
    """The innermost exception behind ``error``, as "Type: first line": the refused connection
    rather than the library's wrapper around it ("An exception is raised during the commit")."""
    seen = set()
    while id(error) not in seen and (error.__cause__ or error.__context__) is not None:
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {first_line(error)}"


def outage_error(service: str, url: str, seconds: float, error: BaseException) -> ServiceOutage:
    return ServiceOutage(f"the {service} at {url} did not answer for {seconds:.0f} s "
                         f"(services.outage_s {_policy.outage_s:g}): {root_cause(error)}")


def call(function: Callable[[], T], *, service: str, url: str,
         transient: Callable[[BaseException], bool]) -> T:
    """``function()``, retried with backoff while it fails transiently, for at most
    ``services.outage_s`` from the first failure; then ``ServiceOutage``. Errors that are not
    transient (``transient`` says) propagate at once."""
    depth = getattr(_nesting, "depth", 0)
    entered, _nesting.depth = time.perf_counter(), depth + 1
    try:
        return _call(function, service, url, transient)
    finally:
        _nesting.depth = depth
        if depth == 0:  # a store call inside another is counted in the outer one
            key = f"{service} (background)" if getattr(_nesting, "background", False) else service
            _spent[key] = _spent.get(key, 0.0) + time.perf_counter() - entered


def _call(function: Callable[[], T], service: str, url: str,
          transient: Callable[[BaseException], bool]) -> T:
    started, attempt = None, 0
    while True:
        try:
            result = function()
        except Exception as error:  # noqa: BLE001 -- sorted by ``transient`` just below
            if not transient(error):
                raise
            if _SINGLE_ATTEMPT.get():
                raise StoreUnavailable(service, url, error) from error
            now = time.monotonic()
            if started is None:
                started = now
                _say(f"the {service} at {url} does not answer ({root_cause(error)}); retrying "
                     f"for up to {_policy.outage_s:g} s (services.outage_s)")
            if now - started >= _policy.outage_s:
                raise outage_error(service, url, now - started, error) from None
            attempt += 1
            time.sleep(min(waits(attempt), max(0.0, started + _policy.outage_s - now)))
            continue
        if started is not None:
            _say(f"the {service} at {url} answers again after {time.monotonic() - started:.0f} s")
        return result


def _say(line: str) -> None:
    if _policy.notice is not None:
        _policy.notice(line)


class Outbox:
    """Writes to stores that may be away, sent in order; training does not wait for them.

    ``send`` queues a write and sends what the stores take now (one attempt each, inside
    ``single_attempt``); a write a store refuses stays queued with everything behind it, and
    the next ``send`` or ``flush`` tries again once its backoff has passed. A store away for
    longer than ``services.outage_s`` raises ``ServiceOutage``. ``drain`` waits for every
    queued write (a trial's end). Each write must be safe to repeat: a write whose answer was
    lost is sent again (MLflow keeps one copy of an identical metric, Optuna one value per step).
    """

    def __init__(self) -> None:
        self.queue: deque[Callable[[], None]] = deque()
        self.down_since: float | None = None
        self.attempts = 0
        self.next_try = 0.0

    def send(self, write: Callable[[], None]) -> bool:
        """Queue ``write`` and send what can be sent now; True if nothing is left queued."""
        self.queue.append(write)
        return self.flush()

    def flush(self) -> bool:
        """Send queued writes, oldest first, until one is refused; True if none is left."""
        if self.queue and time.monotonic() < self.next_try:
            return False
        while self.queue:
            try:
                with single_attempt():
                    self.queue[0]()
            except StoreUnavailable as unavailable:
                self._refused(unavailable)
                return False
            self.queue.popleft()
        if self.down_since is not None:
            self.down_since, self.attempts = None, 0
        return True

    @property
    def pending(self) -> int:
        return len(self.queue)

    def drain(self) -> None:
        """Wait until every queued write is sent (or the outage passes the bound)."""
        while not self.flush():
            time.sleep(max(0.0, self.next_try - time.monotonic()))

    def _refused(self, unavailable: StoreUnavailable) -> None:
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
        if now - self.down_since >= _policy.outage_s:
            raise outage_error(unavailable.service, unavailable.url, now - self.down_since,
                               unavailable.error) from None
        self.attempts += 1
        self.next_try = now + waits(self.attempts)
