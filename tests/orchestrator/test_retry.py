"""Waiting out stores that blink (orchestrator/services/retry.py) and telling a live sweep driver from a
vanished one (study.DriverLease). The stores here are real: a SQLite Optuna storage, a local
folder; what blinks is a function that fails a given number of times, as a restarting server
answers."""

from __future__ import annotations

import socket
import subprocess
import time

import optuna
import pytest

from orchestrator.services import processes, retry, study as studies
from orchestrator.config import ConfigError
from orchestrator.errors import MachineryError


class Blinking:
    """A store call that fails transiently ``failures`` times, then answers."""

    def __init__(self, failures: int):
        self.failures, self.calls = failures, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("connection refused")
        return "answer"


def transient(error: BaseException) -> bool:
    return isinstance(error, (ConnectionError, retry.StoreUnavailable))


@pytest.fixture
def short_bound():
    retry.configure(outage_s=1.5)
    yield
    retry.configure(outage_s=retry.DEFAULT_OUTAGE_S)


def test_a_call_waits_out_a_store_that_comes_back(short_bound, monkeypatch):
    monkeypatch.setattr(retry, "FIRST_WAIT_S", 0.01)
    said: list[str] = []
    retry.configure(notice=said.append)
    call = Blinking(3)
    assert retry.call(call, service="Optuna storage", url="db://x", transient=transient) == "answer"
    assert call.calls == 4
    assert said[0].startswith("the Optuna storage at db://x does not answer (ConnectionError")
    assert said[1].startswith("the Optuna storage at db://x answers again after")


def test_an_outage_past_the_bound_is_one_line_naming_the_store(short_bound):
    started = time.monotonic()
    with pytest.raises(retry.ServiceOutage) as error:
        retry.call(Blinking(10**6), service="MLflow tracking server", url="http://h:5000",
                   transient=transient)
    assert 1.5 <= time.monotonic() - started < 10
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, MachineryError)
    assert message.startswith("the MLflow tracking server at http://h:5000 did not answer for")
    assert "(services.outage_s 1.5): ConnectionError: connection refused" in message


def test_an_error_that_is_not_transient_is_raised_at_once(short_bound):
    def wrong() -> None:
        raise ValueError("no such study")

    with pytest.raises(ValueError, match="no such study"):
        retry.call(wrong, service="Optuna storage", url="db://x", transient=transient)


def test_the_outbox_keeps_order_while_the_store_is_away_and_sends_each_write_once(short_bound):
    stored: list[int] = []
    away = {"now": True}

    def write(value: int):
        def send() -> None:
            retry.call(lambda: _store(stored, value, away["now"]), service="store", url="u",
                       transient=transient)
        return send

    outbox = retry.Outbox()
    assert not outbox.send(write(1)) and not outbox.send(write(2))  # training goes on
    assert stored == [] and outbox.pending == 2
    away["now"] = False
    outbox.next_try = 0.0  # the backoff has passed
    assert outbox.send(write(3))
    assert stored == [1, 2, 3] and outbox.pending == 0


def _store(stored: list[int], value: int, away: bool) -> None:
    if away:
        raise ConnectionError("connection refused")
    stored.append(value)


def test_the_outbox_gives_up_after_the_bound(short_bound):
    outbox = retry.Outbox()
    outbox.send(lambda: retry.call(Blinking(10**6), service="checkpoint store", url="s3://b",
                                   transient=transient))
    with pytest.raises(retry.ServiceOutage, match="the checkpoint store at s3://b did not answer"):
        outbox.drain()


def test_a_resume_refuses_a_live_driver_and_takes_over_from_a_gone_one(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    store = studies.storage(url)
    study_id = store.get_study_id_from_name(
        optuna.create_study(study_name="s/maml", storage=store).study_name)
    studies.check_no_live_driver(url, "s")  # no lease: nothing to wait for

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        here = studies.DriverLease(socket.gethostname(), sleeper.pid,
                                   processes.start_time(sleeper.pid), time.time())
        store.set_study_user_attr(study_id, studies.LEASE_ATTR, here.__dict__)
        with pytest.raises(ConfigError) as refused:
            studies.check_no_live_driver(url, "s")
        assert f"still driven by orch launch (pid {sleeper.pid} on {socket.gethostname()}" in \
            str(refused.value) and "\n" not in str(refused.value)
    finally:
        sleeper.kill()
        sleeper.wait()
    studies.check_no_live_driver(url, "s")  # that process ended: taken over at once

    # Another host's driver is gone only once it has been silent for longer than the grace.
    elsewhere = studies.DriverLease("another-host", 1, 1, time.time())
    store.set_study_user_attr(study_id, studies.LEASE_ATTR, elsewhere.__dict__)
    with pytest.raises(ConfigError, match="run this again in"):
        studies.check_no_live_driver(url, "s")
    silent = studies.DriverLease("another-host", 1, 1, time.time() - studies.grace_s() - 1)
    store.set_study_user_attr(study_id, studies.LEASE_ATTR, silent.__dict__)
    studies.check_no_live_driver(url, "s")
