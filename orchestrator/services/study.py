"""Everything orch asks of Optuna: studies, samplers, pruners, and turning a search space into
suggestions.

One study per algorithm of a sweep, named ``<sweep>/<algorithm>``, in the sweep's storage
(SQLite under the run folder by default, any Optuna storage URL otherwise). The sweep driver asks
for trials and tells their results (ask/tell); each trial's remote driver re-opens the study to
report intermediate validation metrics and ask the pruner, so pruning works the same in-process
and on a cluster.

A database restarts now and then (a failover, an upgrade): every storage call waits it out
(``retry.call``, up to ``services.outage_s``) on a connection pool that checks a connection
before using it. The sweep driver records Optuna's own heartbeat for each trial it runs and a
lease on each study it drives (``DriverLease``), so a trial whose driver vanished is told from
one still running: ``--resume`` takes over only from a driver that is gone.

Each study has one sampler for the driver's life, seeded by the sweep's seed (and, on
``--resume``, by how many trials the study already holds); TPE counts running trials as
worse than any finished one (constant liar), so trials started together are proposed apart.
A study of several objectives (``search.metric`` a list) keeps its Pareto front in
``best_trials``; its trials report no intermediate values (Optuna prunes on one objective
only). ``serve_dashboard`` serves optuna-dashboard on a sweep's studies.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import optuna
import sqlalchemy.exc
from filelock import FileLock
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from orchestrator.services import processes, retry
from orchestrator.config import Choices, ConfigError, Range, Search, Sweep, grid_values

optuna.logging.set_verbosity(optuna.logging.WARNING)

STATES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
          TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}
SERVICE = "Optuna storage"
# Seconds between the heartbeats a sweep driver records (Optuna's per trial, orch's per study).
HEARTBEAT_S = 10
# The study user attribute holding the lease of the driver that runs the study.
LEASE_ATTR = "orch_driver"


def study_name(sweep_name: str, algorithm: str) -> str:
    return f"{sweep_name}/{algorithm}"


def shown(url: str) -> str:
    """``url`` as orch prints it: a password in it is masked."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


def transient(error: BaseException) -> bool:
    """Whether ``error`` says the database was away (connection refused or lost, server
    restarting, a SQLite file locked) rather than that the call was wrong."""
    for cause in _chain(error):
        if isinstance(cause, (retry.StoreUnavailable, sqlalchemy.exc.OperationalError,
                              sqlalchemy.exc.InterfaceError, sqlalchemy.exc.DisconnectionError)):
            return True
        if isinstance(cause, sqlalchemy.exc.DBAPIError) and cause.connection_invalidated:
            return True
    return False


def _chain(error: BaseException | None) -> Iterable[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


class ResilientStorage(RDBStorage):
    """Optuna's ``RDBStorage`` whose every call waits out a database that restarts
    (``retry.call``); its pool checks each connection before use (``pool_pre_ping``), so
    connections a restart broke are replaced rather than failing a call."""

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Any = None) -> bool:
        """As Optuna's, but a repeat of a write whose answer was lost in an outage (the trial
        already ended in ``state``) succeeds instead of raising."""
        attempts = 0

        def attempt() -> bool:
            nonlocal attempts
            attempts += 1
            try:
                return RDBStorage.set_trial_state_values(self, trial_id, state, values)
            except UpdateFinishedTrialError:
                if attempts > 1 and RDBStorage.get_trial(self, trial_id).state == state:
                    return True
                raise

        return retry.call(attempt, service=SERVICE, url=shown(self.url), transient=transient)


def _retrying(name: str) -> Callable[..., Any]:
    method = getattr(RDBStorage, name)

    def retried(self: ResilientStorage, *args: Any, **kwargs: Any) -> Any:
        return retry.call(lambda: method(self, *args, **kwargs), service=SERVICE,
                          url=shown(self.url), transient=transient)

    retried.__name__, retried.__doc__ = name, method.__doc__
    return retried


# Every method of RDBStorage that reads or writes the database.
for _name in ("create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
              "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
              "get_study_user_attrs", "get_study_system_attrs", "get_trial_user_attrs",
              "get_trial_system_attrs", "get_all_studies", "create_new_trial", "set_trial_param",
              "get_trial_param", "set_trial_intermediate_value", "set_trial_user_attr",
              "set_trial_system_attr", "get_trial_id_from_study_id_trial_number", "get_trial",
              "get_all_trials", "get_best_trial", "record_heartbeat"):
    setattr(ResilientStorage, _name, _retrying(_name))


def storage(url: str, *, kind: type[ResilientStorage] = ResilientStorage) -> ResilientStorage:
    """An Optuna storage object for ``url`` (of class ``kind``), recording heartbeats (a trial
    is stale once its driver has been silent for ``services.outage_s`` plus three heartbeats).
    SQLite gets a generous lock timeout: trials on several processes write to it at once."""
    engine: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        engine["connect_args"] = {"connect_timeout": 10}
    options = dict(heartbeat_interval=HEARTBEAT_S, grace_period=grace_s())

    def open_storage() -> ResilientStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat_interval
            return kind(url, engine_kwargs=engine, **options)

    if not url.startswith("sqlite:///"):
        return retry.call(open_storage, service=SERVICE, url=shown(url), transient=transient)
    path = Path(url.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    engine["connect_args"] = {"timeout": 60}
    # Creating the storage creates its tables: serialise that between sweeps starting at once.
    with FileLock(f"{path}.lock"):
        return retry.call(open_storage, service=SERVICE, url=url, transient=transient)


def grace_s() -> int:
    """How long a driver may be silent before its trials count as abandoned: longer than an
    outage it waits out (it cannot record heartbeats meanwhile), plus three heartbeats."""
    return int(retry.outage_s() + 3 * HEARTBEAT_S)


@dataclass(frozen=True)
class DriverLease:
    """Who drives a study: the host and process of its ``orch launch``, and when it last said
    so (it says so every ``HEARTBEAT_S`` seconds while it runs)."""

    host: str
    pid: int
    started: int  # the process's start time (clock ticks since boot), so a reused pid is told apart
    at: float  # time.time() of its last heartbeat

    @classmethod
    def mine(cls) -> "DriverLease":
        return cls(socket.gethostname(), os.getpid(), processes.start_time(os.getpid()), time.time())

    @classmethod
    def read(cls, raw: Any) -> "DriverLease | None":
        try:
            return cls(**raw) if raw else None
        except TypeError:
            return None

    def silent_s(self) -> float:
        return max(0.0, time.time() - self.at)

    def gone(self) -> bool:
        """Whether that driver certainly no longer runs: a process of this host that ended, or
        a driver silent for longer than it could wait out an outage (``grace_s``)."""
        if self.host == socket.gethostname() and not processes.alive(self.pid, self.started):
            return True
        return self.silent_s() > grace_s()

    def describe(self) -> str:
        return f"orch launch (pid {self.pid} on {self.host}, last heard {self.silent_s():.0f} s ago)"


class DriverHeartbeat:
    """While a sweep driver runs a study: its lease on the study and Optuna's heartbeat of each
    trial it has running, every ``HEARTBEAT_S`` seconds, from a thread. A beat the database
    does not take is skipped (the driver's own calls wait out the outage); ``stop`` removes the
    lease, so that a later ``--resume`` need not wait for it to go stale."""

    def __init__(self, store: ResilientStorage, study_id: int, running: Callable[[], list[int]]):
        self.store, self.study_id, self.running = store, study_id, running
        self.lease = DriverLease.mine()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="orch-heartbeat", daemon=True)

    def start(self) -> None:
        self._beat()
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(timeout=2 * HEARTBEAT_S)
        try:
            with retry.single_attempt():
                self.store.set_study_user_attr(self.study_id, LEASE_ATTR, None)
        except Exception:  # noqa: BLE001 -- a lease left behind goes stale by itself
            pass

    def _run(self) -> None:
        with retry.in_background():
            while not self.stopped.wait(HEARTBEAT_S):
                try:
                    with retry.single_attempt():
                        self._beat()
                except Exception:  # noqa: BLE001 -- the next beat tries again
                    continue

    def _beat(self) -> None:
        lease = DriverLease(self.lease.host, self.lease.pid, self.lease.started, time.time())
        self.store.set_study_user_attr(self.study_id, LEASE_ATTR, lease.__dict__)
        for trial_id in self.running():
            self.store.record_heartbeat(trial_id)


def check_no_live_driver(url: str, sweep_name: str) -> None:
    """Refuse to ``--resume`` a sweep another ``orch launch`` still drives: two drivers would
    run the same trials. A driver that is gone (``DriverLease.gone``) is taken over."""
    store = storage(url)
    for name in existing_studies(url, sweep_name):
        lease = DriverLease.read(store.get_study_user_attrs(
            store.get_study_id_from_name(name)).get(LEASE_ATTR))
        if lease is not None and not lease.gone():
            wait = max(1, int(grace_s() - lease.silent_s()) + 1)
            raise ConfigError(f"--resume: sweep {sweep_name!r} is still driven by "
                              f"{lease.describe()}; stop that one first, or, if its machine is "
                              f"gone, run this again in {wait} s")


def check_same_objectives(url: str, sweep: Sweep) -> None:
    """Refuse to ``--resume`` a sweep whose studies search other objectives or directions than
    its file now names: finished trials would be weighed the other way, or told values of
    another length."""
    store = storage(url)
    wanted = list(zip(sweep.search.objectives, sweep.search.directions))
    for name in existing_studies(url, sweep.name):
        study = optuna.load_study(study_name=name, storage=store)
        directions = [direction.name.lower() for direction in study.directions]
        names = study.metric_names or list(sweep.search.objectives)[:len(directions)]
        if list(zip(names, directions)) != wanted:
            searched = ", ".join(f"{n} ({d})" for n, d in zip(names, directions))
            raise ConfigError(f"--resume: study {name} searches {searched}, but search.metric "
                              f"now asks for {', '.join(f'{n} ({d})' for n, d in wanted)}; "
                              "resume with the objectives it started with, or launch a new sweep")


def make_sampler(search: Search, seed: int) -> optuna.samplers.BaseSampler:
    """The sampler ``search.sampler`` names, seeded (a grid is the study's: ``SweepStudy``); the
    sweep file's validation has already refused a space it cannot search (a continuous range
    for grid, choices or several objectives for cmaes)."""
    startup = min(5, max(1, search.trials // 2))
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if search.sampler == "grid":
        raise ValueError("a grid sampler is built from the algorithm's grid: SweepStudy makes it")
    if search.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    if search.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup)
    if search.sampler == "nsgaii":
        # Generations of a quarter of the trials (at least 2, Optuna's minimum; at most its
        # default 50), so that a sweep of a few dozen trials breeds a few generations.
        return optuna.samplers.NSGAIISampler(seed=seed,
                                             population_size=min(50, max(2, search.trials // 4)))
    # Constant liar: a running trial counts as worse than every finished one, so trials asked
    # while others run (search.parallel > 1, trials continued on --resume) are proposed away
    # from them rather than next to the same optimum.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)


def grid(space: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Each searched knob of ``space`` with the values a grid search tries."""
    return {name: grid_values(knob) for name, knob in space.items()
            if isinstance(knob, (Range, Choices))}


class AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's ``GridSampler`` without its stop at the end of the grid: its ``after_trial``
    calls ``study.stop()``, which raises outside ``study.optimize``, and orch asks and tells.
    The sweep driver stops at ``search.trials``, at most the grid's size (checked at load)."""

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: TrialState,
                    values: Any) -> None:
        pass


def make_pruner(search: Search) -> optuna.pruners.BasePruner:
    """The pruner ``search.pruner`` names, with its knobs (validated by the sweep file); steps
    are meta-iterations."""
    pruner = search.pruning()
    if pruner.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=pruner.n_startup_trials,
                                           n_warmup_steps=pruner.n_warmup_steps)
    if pruner.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=pruner.min_resource,
                                              max_resource=pruner.max_resource,
                                              reduction_factor=pruner.reduction_factor)
    if pruner.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=pruner.min_resource, reduction_factor=pruner.reduction_factor,
            min_early_stopping_rate=pruner.min_early_stopping_rate,
            bootstrap_count=pruner.bootstrap_count)
    return optuna.pruners.NopPruner()


def existing_studies(url: str, sweep_name: str) -> list[str]:
    """Names of the studies of ``sweep_name`` already in the storage at ``url``."""
    prefix = study_name(sweep_name, "")
    return [s.study_name for s in optuna.get_all_study_summaries(storage(url), include_best_trial=False)
            if s.study_name.startswith(prefix)]


def sweep_exists(url: str, sweep_name: str) -> bool:
    """Whether the storage at ``url`` holds a study of ``sweep_name``; a local SQLite file that
    does not exist yet holds none (and is not created by asking)."""
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return False
    return bool(existing_studies(url, sweep_name))


def suggest(trial: optuna.Trial, knobs: Mapping[str, Any]) -> dict[str, Any]:
    """Resolve a search space into concrete values: ranges and choices become suggestions."""
    values: dict[str, Any] = {}
    for name, knob in knobs.items():
        if isinstance(knob, Range):
            if knob.int:
                values[name] = trial.suggest_int(name, int(knob.low), int(knob.high), log=knob.log,
                                                 step=int(knob.step or 1))
            else:
                values[name] = trial.suggest_float(name, knob.low, knob.high, log=knob.log,
                                                   step=knob.step)
        elif isinstance(knob, Choices):
            values[name] = trial.suggest_categorical(name, knob.choices)
        else:
            values[name] = knob
    return values


@dataclass(frozen=True)
class TrialRecord:
    """What the sweep driver needs to know of a trial, as plain data."""

    number: int
    trial_id: int  # the storage's id: what a trial's own process reports to
    state: str  # a value of STATES
    params: dict[str, Any]
    user_attrs: dict[str, Any]
    # The trial's objective values, in search.metric's order (complete trials only).
    values: tuple[float, ...] | None = None

    @property
    def value(self) -> float | None:
        """The first objective's value."""
        return self.values[0] if self.values else None


class SweepStudy:
    """One algorithm's study as the sweep driver uses it: ask for trials, record their ends,
    find the best and the Pareto front, draw the study's plots. Trials are handed out as
    ``TrialRecord``s, so the driver never holds an Optuna object."""

    def __init__(self, sweep: Sweep, algorithm: str, *, load_if_exists: bool):
        self.search, self.seed = sweep.search, sweep.training.seed
        self.grid = grid(sweep.space(algorithm)) if sweep.search.sampler == "grid" else None
        self.name = study_name(sweep.name, algorithm)
        self.storage = storage(sweep.storage_url())
        self.study = optuna.create_study(
            study_name=self.name, storage=self.storage, directions=sweep.search.directions,
            pruner=make_pruner(sweep.search), load_if_exists=load_if_exists)
        self.study_id = self.storage.get_study_id_from_name(self.name)
        if self.study.metric_names != sweep.search.objectives:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                self.study.set_metric_names(sweep.search.objectives)  # shown by the dashboard
        # One sampler for the driver's life. A new study's is seeded by the sweep's seed; a
        # resumed one's also by the trials the study holds, so resuming the same stores twice
        # asks the same knobs. (A resumed sweep does not ask what the uninterrupted one would
        # have: the sampler's random state lives in this process, not in the storage.)
        held = len(self.study.get_trials(deepcopy=False))
        self.study.sampler = self._sampler(self.seed + held)
        self.heartbeat: DriverHeartbeat | None = None

    @property
    def several(self) -> bool:
        """Whether the study has several objectives (a Pareto front, no pruning)."""
        return len(self.search.objectives) > 1

    def drive(self, running: Callable[[], list[int]]) -> None:
        """Take the study's lease and keep it, with Optuna's heartbeat of the trials
        ``running()`` names (their storage ids), until ``release``."""
        self.heartbeat = DriverHeartbeat(self.storage, self.study_id, running)
        self.heartbeat.start()

    def release(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None

    def trials(self, *states: str) -> list[TrialRecord]:
        """The trials in the given states (``complete``, ``running``, ...), by number."""
        wanted = tuple(state for state, name in STATES.items() if name in states)
        return [self._record(t) for t in self.study.get_trials(deepcopy=False,
                                                              states=wanted or None)]

    def ask(self, space: Mapping[str, Any]) -> tuple[TrialRecord, dict[str, Any]]:
        """A new trial and its knobs, from the study's sampler."""
        with warnings.catch_warnings():
            # Optuna expects heartbeats from study.optimize; orch's driver records them itself.
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = self.study.ask()
        knobs = suggest(trial, space)
        record = TrialRecord(trial.number, self._id_of(trial.number), "running",
                             dict(trial.params), dict(trial.user_attrs))
        return record, knobs

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        """The study's sampler, seeded ``seed``. A grid instead keeps one order, shuffled by the
        sweep's seed, in which trial n takes point n: a resumed sweep's grid agrees on it, so
        no point is drawn twice."""
        if self.grid is not None:
            return AskTellGridSampler(self.grid, seed=self.seed)
        return make_sampler(self.search, seed)

    def set_user_attr(self, trial: TrialRecord, key: str, value: Any) -> None:
        self.storage.set_trial_user_attr(trial.trial_id, key, value)

    def tell(self, trial: TrialRecord, state: str, values: Sequence[float] | None = None,
             reason: str = "") -> None:
        """Record a trial's end: ``complete`` with its objective values (in search.metric's
        order), ``pruned``, or ``failed`` and why."""
        if state == "complete":
            self.study.tell(trial.number, list(values or ()))
        elif state == "pruned":
            self.study.tell(trial.number, state=TrialState.PRUNED)
        else:
            self.set_user_attr(trial, "fail_reason", reason)
            self.study.tell(trial.number, state=TrialState.FAIL)

    def best(self) -> TrialRecord | None:
        """The best complete trial on the first objective (with several objectives, the member
        of the Pareto front that is best on it), or None before the first."""
        front = self.front()
        if not front:
            return None
        sign = 1 if self.search.directions[0] == "minimize" else -1
        return min(front, key=lambda trial: (sign * trial.values[0], trial.number))

    def front(self) -> list[TrialRecord]:
        """The complete trials no other complete trial beats on every objective (Optuna's
        ``best_trials``; with one objective, the best), by number."""
        return sorted((self._record(t) for t in self.study.best_trials),
                      key=lambda trial: trial.number)

    def requeue_as_new(self, trial: TrialRecord, marker: str) -> None:
        """Record a running trial that cannot be continued as failed (flagged ``marker``, so it
        is not counted) and queue its parameters as a new trial."""
        self.set_user_attr(trial, marker, True)
        self.tell(trial, "failed", reason="interrupted; rerun on resume")
        self.study.enqueue_trial(trial.params, user_attrs={"orch_rerun_of": trial.number},
                                 skip_if_exists=False)

    def plots(self, folder: Path) -> list[Path]:
        return study_plots(self.study, folder, self.search.objectives)

    def _id_of(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def _record(self, frozen: optuna.trial.FrozenTrial) -> TrialRecord:
        return TrialRecord(frozen.number, self._id_of(frozen.number),
                           STATES.get(frozen.state, frozen.state.name.lower()),
                           dict(frozen.params), dict(frozen.user_attrs),
                           tuple(frozen.values) if frozen.values else None)


class TrialReporter:
    """A trial's handle on its study from the process that trains it: report and ask to prune.
    Steps the trial reported before it restarted are not reported again (Optuna would ignore
    them with a warning); the pruner is still asked, and answers as it did.

    While the database is away the trial trains on: its values wait in order (``retry.Outbox``)
    and the pruner is asked again once every value is stored. A study of several objectives
    takes no intermediate values (Optuna's ``Trial.report`` is for one objective): there the
    reporter stores nothing and never prunes; the metric curves are in MLflow."""

    def __init__(self, storage_url: str, name: str, number: int, search: Search):
        self.several = len(search.objectives) > 1
        self.outbox = retry.Outbox()
        if self.several:
            return
        store = storage(storage_url)
        study = optuna.load_study(study_name=name, storage=store, pruner=make_pruner(search))
        trial_id = store.get_trial_id_from_study_id_trial_number(
            store.get_study_id_from_name(name), number)
        self.reported = set(store.get_trial(trial_id).intermediate_values)
        self.trial = optuna.trial.Trial(study, trial_id)

    def record(self, value: float, step: int) -> bool:
        """Store an intermediate metric (once per step); True once nothing waits to be stored."""
        if self.several:
            return True
        if step in self.reported:
            return self.outbox.flush()
        self.reported.add(step)
        return self.outbox.send(lambda: self.trial.report(value, step))

    def report(self, value: float, step: int) -> bool:
        """Record an intermediate metric; True if the pruner says stop (never while a value
        is still waiting for the database, nor with several objectives)."""
        if not self.record(value, step) or self.several:
            return False
        try:
            with retry.single_attempt():
                return self.trial.should_prune()
        except retry.StoreUnavailable:
            return False

    def drain(self) -> None:
        """Wait until every reported value is stored (the trial's end)."""
        self.outbox.drain()


def trial_rows(url: str, sweep_name: str) -> list[dict[str, Any]]:
    """Every trial of every study of a sweep, as plain rows for ``orch runs``: ``value`` is the
    first objective's, ``values`` each objective's by name, ``front`` whether the trial is on
    its study's Pareto front (with one objective: among the best)."""
    rows = []
    store = storage(url)
    for name in existing_studies(url, sweep_name):
        study = optuna.load_study(study_name=name, storage=store)
        lease = DriverLease.read(study.user_attrs.get(LEASE_ATTR))
        driven = lease is not None and not lease.gone()
        names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
        front = {trial.number for trial in study.best_trials}
        for trial in study.get_trials(deepcopy=False):
            state = STATES.get(trial.state, trial.state.name.lower())
            if state == "running" and not driven:
                state = "interrupted"  # its driver is gone: orch launch --resume continues it
            values = dict(zip(names, trial.values)) if trial.values else None
            rows.append({"algorithm": name.split("/", 1)[1], "number": trial.number,
                         "state": state, "value": trial.values[0] if trial.values else None,
                         "values": values, "front": trial.number in front,
                         "params": dict(trial.params),
                         "reason": trial.user_attrs.get("fail_reason", "")})
    return rows


def dashboard_storage(url: str, sweep_name: str) -> "SweepStorageView":
    """The storage ``orch dashboard`` serves: the sweep's studies only, read through the same
    retrying storage as the sweep's own calls; ``ConfigError`` where it holds no study of the
    sweep (nothing is created)."""
    if not sweep_exists(url, sweep_name):
        raise ConfigError(f"no sweep named {sweep_name!r} in {shown(url)} (see: orch runs, or "
                          "pass the --storage the sweep used)")
    return SweepStorageView.of(url, sweep_name)


def serve_dashboard(view: "SweepStorageView", *, host: str, port: int) -> None:
    """Serve optuna-dashboard on ``view`` at ``host:port`` until interrupted (Ctrl-C)."""
    import optuna_dashboard

    optuna_dashboard.run_server(view, host=host, port=port)


class SweepStorageView(ResilientStorage):
    """The storage as ``orch dashboard`` shows it: only the studies of one sweep are listed."""

    prefix = ""

    @classmethod
    def of(cls, url: str, sweep_name: str) -> "SweepStorageView":
        view = storage(url, kind=cls)
        view.prefix = study_name(sweep_name, "")
        return view

    def get_all_studies(self) -> list[optuna.study.FrozenStudy]:
        return [study for study in super().get_all_studies()
                if study.study_name.startswith(self.prefix)]


def study_plots(study: optuna.Study, folder: Path, objectives: Sequence[str] = ()) -> list[Path]:
    """Optuna's optimisation history (of the first objective) and parameter importances, each as
    PNG and HTML, and with several objectives the Pareto front (``pareto_front``: Optuna's plot
    of 2 or 3 objectives; with more, the first against each other one, ``pareto_front_<name>``);
    importances are skipped while fewer than two complete trials vary a parameter."""
    import optuna.visualization.matplotlib

    from orchestrator.plots import save_figure  # sets matplotlib's file-only backend first

    folder.mkdir(parents=True, exist_ok=True)
    names = list(objectives) or [f"objective {i}" for i in range(len(study.directions))]
    first = {} if len(names) == 1 else {"target": lambda t: t.values[0], "target_name": names[0]}
    makers = {"optimization_history": (optuna.visualization.plot_optimization_history,
                                       optuna.visualization.matplotlib.plot_optimization_history,
                                       first),
              "param_importances": (optuna.visualization.plot_param_importances,
                                    optuna.visualization.matplotlib.plot_param_importances,
                                    first)}
    if len(names) in (2, 3):
        makers["pareto_front"] = (optuna.visualization.plot_pareto_front,
                                  optuna.visualization.matplotlib.plot_pareto_front,
                                  {"target_names": names})
    elif len(names) > 3:
        for index in range(1, len(names)):
            makers[f"pareto_front_{names[index]}"] = (
                optuna.visualization.plot_pareto_front,
                optuna.visualization.matplotlib.plot_pareto_front,
                {"targets": lambda t, i=index: (t.values[0], t.values[i]),
                 "target_names": [names[0], names[index]]})
    written = []
    for name, (interactive, static, options) in makers.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
            try:
                interactive(study, **options).write_html(folder / f"{name}.html",
                                                         include_plotlyjs="cdn")
                axes = static(study, **options)
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue  # not enough complete trials, or no parameter varies
        written += [folder / f"{name}.html", save_figure(axes.figure, folder / f"{name}.png")]
    return written
