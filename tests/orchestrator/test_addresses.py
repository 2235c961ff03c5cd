"""Addresses as users write them, and the environment orch gives Ray for a loopback one."""

from __future__ import annotations

import os

import pytest

from orchestrator.services import addresses
from orchestrator.services.addresses import Address


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:6390", Address("127.0.0.1", 6390)),
    ("localhost", Address("localhost", 6379)),
    ("ray://127.0.0.1:10001", Address("127.0.0.1", 10001, client=True)),
    ("ray://head", Address("head", 10001, client=True)),
    ("[::1]:6390", Address("::1", 6390)),
    ("10.0.0.5:6379", Address("10.0.0.5", 6379)),
    ("auto", None), ("local", None), (None, None),
])
def test_parse(text, expected):
    assert addresses.parse(text) == expected


def test_loopback_and_printing():
    assert Address("127.0.0.1", 1).loopback and Address("::1", 1).loopback
    assert not Address("10.0.0.5", 1).loopback
    assert str(Address("::1", 6390)) == "[::1]:6390"
    assert str(Address("h", 10001, client=True)) == "ray://h:10001"


@pytest.mark.parametrize("address, env_address, set_", [
    ("127.0.0.1:6390", None, True), (None, "localhost:6390", True),
    ("10.0.0.5:6379", None, False), (None, None, False), ("auto", None, False),
])
def test_prepare_environment_only_for_loopback(address, env_address, set_, monkeypatch):
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    if env_address:
        monkeypatch.setenv("RAY_ADDRESS", env_address)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    addresses.prepare_environment(address)
    assert (os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0") is set_
