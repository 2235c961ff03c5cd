"""Trial checkpoints: the outer loop's state, saved where every node can read it, so that a trial
whose process or node dies -- or whose ``orch launch`` is killed -- continues from its last save
instead of iteration 0.

Where: ``training.checkpoint_storage``, a local folder (default ``<run_dir>/checkpoints``) or any
``pyarrow.fs`` URI (``s3://bucket/prefix``, ``gs://...``, ``hdfs://...``); one folder per trial,
``<sweep>/<algorithm>/trial-<number>/ckpt-<iteration>.pt``, of which the newest two are kept.

A checkpoint is one file: a magic line, a JSON header line (the trial's identity, the iteration,
the payload's length and SHA-256), then the payload, ``torch.save`` of the ``LoopState``
(loaded with ``weights_only``, so a foreign file can hold data but never run code). It is written
under a temporary name, fsynced and renamed, and the folder fsynced (one atomic, durable step on
a local disk; an object store publishes an object only once it is complete), and older ones are
pruned only after that; its digest is checked on load: a file torn by a kill mid-write is never
loaded, the previous one is. The identity hashes everything that shapes the
trained weights -- algorithm, resolved knobs, task distribution, model and training settings,
the initial backbone's digest (``model.init``) -- so a checkpoint from another sweep file never
seeds a trial.

An object store may time out or restart: every call to a remote store waits it out
(``retry.call``, up to ``services.outage_s``), and while a trial trains its checkpoints are
written from a thread (``BackgroundWrites``), so training goes on while the store is slow or
away; the last checkpoint of a trial is written before it ends.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pyarrow.fs as pafs
import torch

from orchestrator.services import retry
from orchestrator.config import ConfigError, Sweep, Training
from orchestrator.errors import UserError, first_line
from orchestrator.training.loop import LoopState, Validation

MAGIC = b"orch-checkpoint 1\n"
FILE_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")
# The newest checkpoint and the one before it: if the newest turns out unreadable, the previous
# one is still there.
KEEP = 2
# Settings that change where or how fast a trial runs, not what it computes.
NOT_IDENTITY = {"checkpoint_every", "checkpoint_minutes", "checkpoint_storage", "device",
                "vectorize", "inner_checkpointing"}


class CheckpointError(UserError):
    """A checkpoint that must not be loaded; the message is one line naming the file."""


def identity(sweep: Sweep, algorithm: str, knobs: Mapping[str, Any], *,
             init_digest: str | None = None) -> str:
    """What a checkpoint must match to be loaded into a trial. ``model.init`` counts by the
    digest of the backbone weights it resolved to (``init_digest``), not by its URI: an alias
    that moved names other weights, a pinned version the same ones."""
    spec = {"algorithm": algorithm, "knobs": dict(knobs), "task": sweep.task_fingerprint(),
            "model": sweep.model.model_dump(mode="json", exclude={"init"}),
            "training": sweep.training.model_dump(mode="json", exclude=NOT_IDENTITY)}
    if init_digest is not None:
        spec["init"] = init_digest
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode(state: LoopState, trial_identity: str) -> bytes:
    buffer = io.BytesIO()
    torch.save({"iteration": state.iteration, "params": state.params, "optimizer": state.optimizer,
                "evaluations": [[e.iteration, e.metrics] for e in state.evaluations],
                "rng": state.rng, "extra": state.extra}, buffer)
    payload = buffer.getvalue()
    header = {"identity": trial_identity, "iteration": state.iteration, "bytes": len(payload),
              "sha256": hashlib.sha256(payload).hexdigest()}
    return MAGIC + json.dumps(header).encode() + b"\n" + payload


def verified_payload(data: bytes, name: str, trial_identity: str) -> tuple[int, bytes]:
    """(iteration, payload) of a checkpoint file whose header reads, whose identity is the
    trial's and whose payload is whole (length and digest); else CheckpointError saying why."""
    def refuse(reason: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {name} refused: {reason}")

    if not data.startswith(MAGIC):
        raise refuse("not an orch checkpoint")
    end = data.find(b"\n", len(MAGIC))
    try:
        header = json.loads(data[len(MAGIC):end]) if end > 0 else None
        if not isinstance(header, dict):
            raise ValueError
        payload = data[end + 1:]
        length, digest, iteration = int(header["bytes"]), str(header["sha256"]), int(header["iteration"])
    except (ValueError, KeyError, TypeError):
        raise refuse("its header is unreadable (torn by a kill mid-write?)") from None
    if header.get("identity") != trial_identity:
        raise refuse("it belongs to another sweep file (different algorithm, knobs, data, model, "
                     "initial weights or training settings)")
    if len(payload) != length or hashlib.sha256(payload).hexdigest() != digest:
        raise refuse(f"truncated or corrupt ({len(payload)} of {length} payload bytes, digest "
                     "mismatch)")
    return iteration, payload


def decode(data: bytes, name: str, trial_identity: str) -> LoopState:
    """The state in ``data`` (the file ``name``), or CheckpointError saying why not."""
    iteration, payload = verified_payload(data, name, trial_identity)
    try:
        raw = torch.load(io.BytesIO(payload), weights_only=True)
        state = LoopState(int(raw["iteration"]), dict(raw["params"]), raw["optimizer"],
                          [Validation(int(i), dict(m)) for i, m in raw["evaluations"]],
                          raw["rng"], dict(raw["extra"]))
    except Exception as error:  # noqa: BLE001 -- any unreadable payload is refused alike
        raise CheckpointError(f"checkpoint {name} refused: unreadable payload "
                              f"({type(error).__name__})") from None
    if state.iteration != iteration:
        raise CheckpointError(f"checkpoint {name} refused: its header and payload disagree on "
                              "the iteration")
    return state


SERVICE = "checkpoint store"
# Words of pyarrow's errors for an object store that is away or overloaded (S3's AWS error
# names, curl's and the HTTP client's), as against a missing key or a refused permission.
TRANSIENT_MARKERS = ("NETWORK_CONNECTION", "SERVICE_UNAVAILABLE", "SLOW_DOWN", "THROTTLING",
                     "INTERNAL_FAILURE", "REQUEST_TIMEOUT", "curlCode", "Connection refused",
                     "Connection reset", "timed out", "Timeout", "HTTP status 5")


def transient(error: BaseException) -> bool:
    """Whether ``error`` says the object store was away rather than that the call was wrong."""
    if isinstance(error, retry.StoreUnavailable):
        return True
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError,
                          NotADirectoryError, FileExistsError)) or not isinstance(error, OSError):
        return False
    return any(marker in str(error) for marker in TRANSIENT_MARKERS)


def _never(error: BaseException) -> bool:
    return False


class CheckpointStore:
    """The folder or object-store prefix that holds every trial's checkpoints. Calls to a remote
    store wait out an outage (``retry.call``); a local disk does not blink, and is not retried."""

    def __init__(self, uri: str):
        self.uri = uri
        if "://" in uri:
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(uri)
            except (ValueError, OSError) as error:
                raise ConfigError(f"training.checkpoint_storage {uri}: {first_line(error)}") from None
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(uri).resolve())
        self.root = self.root.rstrip("/")
        self.remote = not isinstance(self.fs, pafs.LocalFileSystem)

    def _call(self, function: Any) -> Any:
        return retry.call(function, service=SERVICE, url=self.uri,
                          transient=transient if self.remote else _never)

    def check(self) -> None:
        """Fail in one line, before any trial runs, where checkpoints cannot be written."""
        probe = f"{self.root}/.orch-probe-{uuid.uuid4().hex}"

        def write_probe() -> None:
            self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(probe) as stream:
                stream.write(b"probe")
            self.fs.delete_file(probe)

        try:
            self._call(write_probe)
        except (OSError, ValueError) as error:
            raise ConfigError(f"cannot write checkpoints to {self.uri} (training.checkpoint_storage): "
                              f"{first_line(error)}") from None

    def trial_folder(self, sweep_name: str, algorithm: str, number: int) -> str:
        return f"{self.root}/{sweep_name}/{algorithm}/trial-{number:05d}"

    def save(self, folder: str, iteration: int, data: bytes) -> str:
        """Write ``data`` as the folder's checkpoint of ``iteration`` so that a reader sees a
        whole file or none, even after a power loss; only then are older ones pruned.

        On a local disk: written under a temporary name and fsynced, renamed into place, and
        the folder fsynced so the rename itself is on disk -- without the two fsyncs a power
        loss can leave the new name pointing at unwritten blocks after the old checkpoints were
        pruned. An object store publishes an object only once its upload completes, and
        makes it durable before it answers; the rename there is a copy, pruning follows it."""
        final = f"{folder}/ckpt-{iteration:08d}.pt"
        staging = f"{folder}/.ckpt-{iteration:08d}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"

        def write() -> str:
            if self.remote:
                self.fs.create_dir(folder, recursive=True)
                with self.fs.open_output_stream(staging) as stream:
                    stream.write(data)
                self.fs.move(staging, final)
            else:
                _write_durably(Path(staging), Path(final), data)
            for _, old in self._listing(folder)[KEEP:]:
                self.fs.delete_file(old)
            return final

        return self._call(write)

    def listing(self, folder: str) -> list[tuple[int, str]]:
        """The folder's checkpoints as (iteration, path), newest first; staging files ignored."""
        return self._call(lambda: self._listing(folder))

    def _listing(self, folder: str) -> list[tuple[int, str]]:
        infos = self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        found = [(int(match.group(1)), info.path) for info in infos
                 if info.type == pafs.FileType.File and (match := FILE_NAME.match(info.base_name))]
        return sorted(found, reverse=True)

    def read(self, path: str) -> bytes:
        def read_all() -> bytes:
            with self.fs.open_input_stream(path) as stream:
                return stream.read()

        return self._call(read_all)

    def remove(self, folder: str) -> None:
        """Delete a finished trial's checkpoints."""
        def delete() -> None:
            if self.fs.get_file_info(folder).type == pafs.FileType.Directory:
                self.fs.delete_dir(folder)

        self._call(delete)


def _write_durably(staging: Path, final: Path, data: bytes) -> None:
    """``data`` at ``final`` on a local disk, whole or not at all, surviving a power loss."""
    staging.parent.mkdir(parents=True, exist_ok=True)
    with open(staging, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(staging, final)
    folder = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


@dataclass
class Resumption:
    """The checkpoint a trial continues from (``path`` None: from scratch) and the refusals met
    on the way, one line each."""

    path: str | None = None
    iteration: int = 0
    refused: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TrialCheckpoints:
    """One trial's checkpoints: where they live and the identity they must carry."""

    store: CheckpointStore
    folder: str
    identity: str

    @classmethod
    def of(cls, sweep: Sweep, algorithm: str, number: int, knobs: Mapping[str, Any], *,
           init_digest: str | None = None) -> "TrialCheckpoints | None":
        """The trial's checkpoints, or None where the sweep saves none; ``init_digest``: of the
        backbone weights ``model.init`` resolved to."""
        if not sweep.training.checkpoints_enabled():
            return None
        store = CheckpointStore(sweep.checkpoint_uri())
        return cls(store, store.trial_folder(sweep.name, algorithm, number),
                   identity(sweep, algorithm, knobs, init_digest=init_digest))

    def latest(self) -> Resumption:
        """The newest checkpoint that is whole and the trial's, skipping (and naming) those
        that are not. Verified by header and digest only: the trial's process unpickles it."""
        found = Resumption()
        for _, path in self.store.listing(self.folder):
            try:
                iteration, _ = verified_payload(self._read(path), path, self.identity)
            except CheckpointError as error:
                found.refused.append(str(error))
                continue
            found.path, found.iteration = path, iteration
            break
        return found

    def load(self, path: str) -> LoopState:
        return decode(self._read(path), path, self.identity)

    def remove(self) -> None:
        """Delete the trial's checkpoints (it has finished)."""
        self.store.remove(self.folder)

    def _read(self, path: str) -> bytes:
        try:
            return self.store.read(path)
        except OSError as error:
            raise CheckpointError(f"checkpoint {path} refused: cannot read it "
                                  f"({first_line(error)})") from None


class BackgroundWrites:
    """A trial's checkpoints written to an object store from a thread, so that training goes on
    while the store is slow or away. Only the newest checkpoint matters: one that arrives while
    another still waits replaces it. A store away for longer than ``services.outage_s`` (or
    any other failure) is raised in the training thread at its next ``check``."""

    def __init__(self, store: CheckpointStore, folder: str):
        self.store, self.folder = store, folder
        self.changed = threading.Condition()
        self.waiting: tuple[int, bytes] | None = None
        self.busy = False
        self.failure: BaseException | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="orch-checkpoints", daemon=True)
        self.thread.start()

    def put(self, iteration: int, data: bytes) -> None:
        self.check()
        with self.changed:
            self.waiting = (iteration, data)
            self.changed.notify_all()

    def check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def wait(self) -> None:
        """Until nothing waits to be written (then ``check``)."""
        with self.changed:
            self.changed.wait_for(lambda: self.failure is not None or
                                  (self.waiting is None and not self.busy))
        self.check()

    def close(self) -> None:
        """Stop writing (the trial ended): a checkpoint still waiting is dropped, one being
        written is finished."""
        with self.changed:
            self.closed, self.waiting = True, None
            self.changed.notify_all()
        self.thread.join()

    def _run(self) -> None:
        with retry.in_background():
            self._write_until_closed()

    def _write_until_closed(self) -> None:
        down_since, attempts = None, 0
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.waiting is not None or self.closed)
                if self.closed:
                    return
                iteration, data = self.waiting
                self.waiting, self.busy = None, True
            try:
                with retry.single_attempt():
                    self.store.save(self.folder, iteration, data)
                down_since, attempts = None, 0
            except retry.StoreUnavailable as unavailable:
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since >= retry.outage_s():
                    self._fail(retry.outage_error(unavailable.service, unavailable.url,
                                                  now - down_since, unavailable.error))
                    return
                attempts += 1
                with self.changed:  # try again after the pause, unless a newer one came
                    if self.waiting is None and not self.closed:
                        self.waiting = (iteration, data)
                    self.busy = False
                    self.changed.notify_all()
                    self.changed.wait_for(lambda: self.closed, timeout=retry.waits(attempts))
                continue
            except Exception as error:  # noqa: BLE001 -- raised in the training thread
                self._fail(error)
                return
            with self.changed:
                self.busy = False
                self.changed.notify_all()

    def _fail(self, error: BaseException) -> None:
        with self.changed:
            self.failure, self.busy = error, False
            self.changed.notify_all()


class TrialCheckpointer:
    """Saves one trial's loop state at the sweep's interval (``training.checkpoint_*``) and
    counts what saving cost the training loop, for the run's record. On an object store the
    saves before the last are written in the background (``BackgroundWrites``); the last one,
    and every save to a local disk, before ``save`` returns."""

    def __init__(self, trial: TrialCheckpoints, training: Training):
        self.trial = trial
        self.every = training.checkpoint_interval()
        self.seconds = None if training.checkpoint_minutes is None else training.checkpoint_minutes * 60
        self.last_save = time.monotonic()
        self.saved, self.cost_s = 0, 0.0
        self.background = (BackgroundWrites(trial.store, trial.folder) if trial.store.remote
                           else None)

    def due(self, iterations_done: int, *, last: bool) -> bool:
        if self.background is not None:
            self.background.check()
        if last:
            return True
        if self.every and iterations_done % self.every == 0:
            return True
        return self.seconds is not None and time.monotonic() - self.last_save >= self.seconds

    def save(self, state: LoopState, *, last: bool = False) -> None:
        started = time.perf_counter()
        data = encode(state, self.trial.identity)
        if self.background is not None and not last:
            self.background.put(state.iteration, data)
        else:
            if self.background is not None:
                self.background.wait()
            self.trial.store.save(self.trial.folder, state.iteration, data)
        self.cost_s += time.perf_counter() - started
        self.saved += 1
        self.last_save = time.monotonic()

    def close(self) -> None:
        """The trial ended (complete, pruned or failed): no more writes from it."""
        if self.background is not None:
            self.background.close()
