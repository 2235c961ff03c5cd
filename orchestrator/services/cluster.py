"""Everything orch asks of Ray: connecting, placement groups, trial tasks and shard actors.

A trial reserves one placement group: one bundle per shard worker, then one for its driver (the
remote trial task) -- workers first, so that SPREAD lays the workers over nodes before the
driver. The driver farms each meta-batch over ``ShardActor``s placed in the other bundles; the
weights travel once per iteration (inside the call, or once through the object store when
several actors share sizeable ones), and each actor samples its tasks from integers -- the next
iteration's while it would otherwise wait. Actors are restartable and their calls retried, so a
worker killed mid-iteration is replaced and its shard recomputed with the same inputs -- the
iteration's result does not change.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import threading
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from learners.base import Params
from orchestrator.services import addresses
from orchestrator.config import ConfigError, Workers
from orchestrator.errors import MachineryError
from orchestrator.training.loop import ShardWorker, pick_device

CONNECT_TIMEOUT_S = addresses.CONNECT_TIMEOUT_S
# A TCP connection to the address must open this fast; nothing listening fails at once.
REACH_TIMEOUT_S = 5.0
# A worker process that dies is restarted this many times per trial, and each shard call retried.
ACTOR_RESTARTS = 3
# At shutdown, an actor's queued work (sampling ahead) gets this long to finish before the kill.
ACTOR_CALL_GRACE_S = 10.0


# Errors that say the machine failed the trial -- its node died, its worker process was killed
# or ran out of memory, an actor or object it needed was lost -- as opposed to its code raising.
MACHINE_FAILURES = (ray.exceptions.NodeDiedError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.LocalRayletDiedError, ray.exceptions.RayActorError,
                    ray.exceptions.OutOfMemoryError, ray.exceptions.ObjectLostError,
                    ray.exceptions.TaskPlacementGroupRemoved,
                    ray.exceptions.ActorPlacementGroupRemoved)


def is_machine_failure(error: BaseException) -> bool:
    """True for a failure of the machine, including one the trial's own process met (a shard
    actor lost beyond its restarts reaches the trial's driver as an ``ActorDiedError``, which
    Ray then wraps in the trial task's ``RayTaskError``)."""
    if isinstance(error, ray.exceptions.RayTaskError):
        return isinstance(error.cause, MACHINE_FAILURES)
    return isinstance(error, MACHINE_FAILURES)


def lost_local_node(error: BaseException) -> bool:
    """True where the Ray this process drives lost this machine's node (its raylet died): every
    task started from here would fail the same way, so restarting trials is pointless."""
    cause = error.cause if isinstance(error, ray.exceptions.RayTaskError) else error
    return isinstance(cause, ray.exceptions.LocalRayletDiedError)


def connect(address: str | None, *, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Start Ray in this process (``address`` None) or join a cluster by address.

    A cluster is joined in a helper thread while this one waits, so that joining is bounded by
    ``timeout_s`` and SIGINT/SIGTERM still reach Python while Ray retries in C++ (which keeps
    the thread that calls it, and its signal handlers, blocked for minutes)."""
    if ray.is_initialized():
        return
    address = addresses.effective(address)
    options: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False,
                                   configure_logging=True, logging_level="ERROR")
    if address is None:
        # Here, not in a helper thread: Ray ties its processes' lives to the thread that starts
        # them (PR_SET_PDEATHSIG). "local": a new Ray, never one some `ray start` recorded.
        handler = signal.getsignal(signal.SIGTERM)
        ray.init(address="local", **options)
        _restore_sigterm(handler)
        return
    target = addresses.parse(address)
    resolved = _resolved(target) if target is not None else None
    seen_as = f" (Ray resolves it to {resolved})" if resolved and str(resolved) != address else ""
    if resolved is not None:
        check_reachable(address, resolved, seen_as)
    _init_in_thread(dict(address=address, **options), timeout_s,
                    f"cannot join the Ray cluster at {address}{seen_as} within {timeout_s:g} s; "
                    f"check that it runs Ray {ray.__version__} and is reachable from here, or "
                    "raise --connect-timeout")


def _resolved(target: addresses.Address) -> addresses.Address:
    """The address Ray will dial: a loopback host becomes the machine's outward IP unless Ray
    was imported under ``addresses.LOOPBACK_ENV`` (the Ray client keeps the host as given)."""
    if target.client or not target.loopback:
        return target
    return addresses.Address(ray.util.get_node_ip_address(), target.port)


def _init_in_thread(options: dict[str, Any], timeout_s: float | None, timeout_message: str) -> None:
    """``ray.init(**options)``; raises MachineryError(timeout_message) after ``timeout_s``."""
    done = threading.Event()
    failure: list[BaseException] = []

    def init() -> None:
        try:
            ray.init(**options)
        except BaseException as error:  # noqa: BLE001 -- handed to the waiting thread
            failure.append(error)
        finally:
            done.set()

    threading.Thread(target=init, name="orch-ray-init", daemon=True).start()
    # Waiting on an Event keeps this thread in Python: a SIGINT/SIGTERM handler runs at once.
    if not done.wait(timeout_s):
        raise MachineryError(timeout_message)
    if failure:
        raise failure[0]
    _restore_sigterm(signal.getsignal(signal.SIGTERM))


def _restore_sigterm(handler: Any) -> None:
    """Ray replaces the SIGTERM handler (in C++: a stack dump, then an abort in its teardown;
    in Python: ``sys.exit``); give SIGTERM back to the handler the caller had set."""
    if threading.current_thread() is threading.main_thread() and handler is not None:
        signal.signal(signal.SIGTERM, handler)


def check_reachable(address: str, resolved: addresses.Address | None = None, seen_as: str = "") -> None:
    """Fail at once, in one line, where nothing listens at the address Ray will dial."""
    target = resolved or addresses.parse(address)
    if target is None:
        return
    try:
        with socket.create_connection((target.host, target.port), timeout=REACH_TIMEOUT_S):
            pass
    except OSError as error:
        hint = ("; the cluster listens on the loopback only: set "
                + " ".join(f"{k}={v}" for k, v in addresses.LOOPBACK_ENV.items())
                + " before Ray is imported (orch launch does)") if seen_as else ""
        raise MachineryError(f"cannot reach the Ray cluster at {address}{seen_as}: "
                          f"{error.strerror or error}; check ray.address / --address and that the "
                          f"cluster runs, or leave it unset for Ray in this process{hint}") from None


def alive_nodes() -> list[dict[str, Any]]:
    return [node for node in ray.nodes() if node.get("Alive")]


def cluster_resources() -> dict[str, float]:
    return dict(ray.cluster_resources())


def trial_bundles(workers: Workers) -> list[dict[str, float]]:
    """One bundle per shard worker (indices 0..count-1), then the trial driver's (index count)."""
    worker_bundle = {"CPU": workers.cpus}
    if workers.gpus:
        worker_bundle["GPU"] = workers.gpus
    worker_bundle = {k: v for k, v in worker_bundle.items() if v > 0} or {"CPU": 0.001}
    return [dict(worker_bundle) for _ in range(workers.count)] + [{"CPU": workers.driver_cpus or 0.001}]


def check_fits(workers: Workers) -> None:
    """Refuse a trial that could never be placed, instead of waiting forever for it."""
    available = cluster_resources()
    needed: dict[str, float] = {}
    for bundle in trial_bundles(workers):
        for key, value in bundle.items():
            needed[key] = needed.get(key, 0.0) + value
    for key, value in needed.items():
        if value > available.get(key, 0.0) + 1e-9:
            raise ConfigError(
                f"workers: one trial needs {value:g} {key} (driver_cpus + count x {key.lower()}s) but "
                f"the Ray cluster has {available.get(key, 0.0):g}; lower workers.count/cpus/gpus")


def reserve(workers: Workers, strategy: str) -> PlacementGroup:
    """Ask for a trial's placement group; ``ready()`` resolves once every bundle is placed."""
    return placement_group(trial_bundles(workers), strategy=strategy)


def release(group: PlacementGroup) -> None:
    remove_placement_group(group)


def in_bundle(group: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=index,
                                            placement_group_capture_child_tasks=False)


def submit_trial(function: Callable[..., Any], group: PlacementGroup, workers: Workers,
                 *args: Any) -> ray.ObjectRef:
    """Run ``function(*args)`` as the trial's driver in the last bundle of its placement group."""
    remote = ray.remote(max_retries=0)(function)
    return remote.options(num_cpus=workers.driver_cpus or 0.001, num_gpus=0,
                          scheduling_strategy=in_bundle(group, workers.count)).remote(*args)


def first_done(pending: Sequence[ray.ObjectRef]) -> ray.ObjectRef:
    """Block until one of the ``pending`` trial tasks has ended; return it."""
    done, _ = ray.wait(list(pending), num_returns=1)
    return done[0]


def result(ref: ray.ObjectRef) -> Any:
    """A finished task's return value; raises what it raised (``is_machine_failure`` tells a
    machine's failure from the trial's own)."""
    return ray.get(ref)


def current_placement_group() -> PlacementGroup | None:
    return ray.util.get_current_placement_group()


def current_node_id() -> str:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


class _ShardActor:
    """A ``ShardWorker`` in its own process, on the device and thread count Ray gave it."""

    def __init__(self, sweep: dict[str, Any], algorithm: str, knobs: Mapping[str, Any],
                 cpus: float, device_preference: str):
        import torch

        torch.set_num_threads(max(1, int(cpus)))  # workers sharing a node must not fight for cores
        device = pick_device(device_preference, ray.get_gpu_ids())
        self.worker = ShardWorker(sweep, algorithm, knobs, device=str(device))
        self.ahead: tuple[tuple[str, int, tuple[int, ...]], Any] | None = None

    def gradient(self, params, request):
        """One shard's summed gradient; ``request`` is (split, seed, indices, progress) in one
        argument, which Ray serialises once instead of four times."""
        split, seed, indices, progress = request
        gradient, stats, count = self.worker.gradient(
            unpack(params), split, seed, indices, progress=progress,
            batch=self._sampled_ahead(split, seed, indices))
        return pack(gradient, as_bytes=True), stats, count

    def sample_ahead(self, split, seed, indices) -> None:
        """Sample the shard the next gradient call will most likely ask for. Queued right
        behind a gradient call, this runs while that call's result travels back and the driver
        takes its outer step -- time the actor would spend idle. Tasks depend only on (split,
        seed, index), so a batch sampled ahead is the batch sampled on demand."""
        try:
            self.ahead = (split, seed, tuple(indices)), self.worker.sample(split, seed, indices)
        except Exception:  # noqa: BLE001 -- never fetched; the gradient call samples and raises
            self.ahead = None

    def _sampled_ahead(self, split, seed, indices) -> Any:
        """The batch sampled ahead if it is this shard's, else None (sample now)."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead[0] == (split, seed, tuple(indices)):
            return ahead[1]
        return None

    def evaluate(self, params, split, seed, indices, shots=None, steps=None):
        return self.worker.evaluate(unpack(params), split, seed, indices, shots=shots,
                                    steps=steps)

    def where(self) -> tuple[str, int]:
        return ray.get_runtime_context().get_node_id(), os.getpid()

    def device(self) -> str:
        return str(self.worker.device)


ShardActor = ray.remote(max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)(_ShardActor)


class Packed(NamedTuple):
    """A parameter dict as one flat buffer and its layout: Ray sends a NumPy array without
    pickling it (zero-copy), where a dict of torch tensors is pickled tensor by tensor -- on the
    sinusoid MLP of benchmarks/scaling.py, 3.4 ms per actor round trip against 1.3 ms. Inside a
    call the buffer travels as ``bytes``, pickled in-band with the call: an array's out-of-band
    buffer and its metadata cost about 0.2 ms more each way here. Through the object store it
    stays an array, which readers on the node map without a copy."""

    layout: tuple[tuple[str, tuple[int, ...]], ...]
    dtype: str
    values: np.ndarray | bytes


def pack(params: Params, *, as_bytes: bool = False) -> Packed | Params:
    """``params`` as a ``Packed`` when its tensors share one NumPy dtype on the CPU, else as it
    is."""
    tensors = list(params.values())
    if not tensors or len({t.dtype for t in tensors}) != 1 or any(t.device.type != "cpu"
                                                                  for t in tensors):
        return params
    try:
        values = torch.cat([t.detach().reshape(-1) for t in tensors]).numpy()
    except TypeError:  # a dtype NumPy lacks (bfloat16)
        return params
    return Packed(tuple((name, tuple(t.shape)) for name, t in params.items()), values.dtype.str,
                  values.tobytes() if as_bytes else values)


def unpack(params: Packed | Params) -> Params:
    """The parameter dict of ``pack``, in fresh writable tensors (Ray hands out read-only
    buffers)."""
    if not isinstance(params, Packed):
        return params
    flat = torch.from_numpy(np.frombuffer(params.values, dtype=params.dtype).copy())
    out, start = {}, 0
    for name, shape in params.layout:
        size = math.prod(shape)
        out[name] = flat[start:start + size].view(shape)
        start += size
    return out


# Weights up to this size travel inside each actor call rather than through the object store
# (Ray inlines arguments up to 100 KiB in the task itself).
INLINE_WEIGHTS_BYTES = 100 * 1024


class RayFarm:
    """A meta-batch split over ``workers.count`` Ray actors, one per placement-group bundle."""

    def __init__(self, sweep: dict[str, Any], algorithm: str, knobs: Mapping[str, Any],
                 workers: Workers, *, device: str = "auto", group: PlacementGroup | None = None):
        self.actors = []
        for i in range(workers.count):
            options: dict[str, Any] = dict(num_cpus=workers.cpus, num_gpus=workers.gpus)
            if group is not None:
                options["scheduling_strategy"] = in_bundle(group, i)
            self.actors.append(ShardActor.options(**options).remote(
                sweep, algorithm, dict(knobs), workers.cpus, device))
        self._sampling: list[ray.ObjectRef] = []

    def _shards(self, indices: Sequence[int]) -> list[list[int]]:
        indices = list(indices)
        count = min(len(self.actors), len(indices))
        size, extra = divmod(len(indices), count)
        shards, start = [], 0
        for i in range(count):
            end = start + size + (1 if i < extra else 0)
            shards.append(indices[start:end])
            start = end
        return shards

    def _weights(self, params: Params) -> Packed | Params | ray.ObjectRef:
        """The weights as the actors' argument: stored once in the object store when several
        actors share sizeable ones; else sent inside the call itself, which spares a put and
        a fetch through the store per iteration (benchmarks/scaling.py)."""
        size = sum(v.numel() * v.element_size() for v in params.values())
        if len(self.actors) > 1 and size > INLINE_WEIGHTS_BYTES:
            return ray.put(pack(params))
        return pack(params, as_bytes=True)

    def gradient(self, params: Params, split: str, seed: int, indices: Sequence[int], *,
                 progress: float = 0.0) -> tuple[Params, dict[str, float], int]:
        weights = self._weights(params)
        shards = self._shards(indices)
        pending = [actor.gradient.remote(weights, (split, seed, shard, progress))
                   for actor, shard in zip(self.actors, shards)]
        # The next meta-batch most likely continues the index sequence (MetaTrainer's does):
        # each actor samples its share of it in the gap after this call (a wrong guess costs
        # one sampling, and the next call samples its own tasks).
        self._sampling = [actor.sample_ahead.remote(split, seed, [i + len(indices) for i in shard])
                          for actor, shard in zip(self.actors, shards)]
        results = ray.get(pending)
        total: Params = {}
        for packed, _, _ in results:
            for name, g in unpack(packed).items():
                total[name] = total[name] + g if name in total else g
        stats, count = _sum_statistics([(shard_stats, n) for _, shard_stats, n in results])
        return total, stats, count

    def evaluate(self, params: Params, split: str, seed: int, indices: Sequence[int], *,
                 shots: int | None = None, steps: int | None = None) -> tuple[dict[str, float], int]:
        weights = self._weights(params)
        return _sum_statistics(ray.get([actor.evaluate.remote(weights, split, seed, shard, shots, steps)
                                         for actor, shard in zip(self.actors, self._shards(indices))]))

    def node_ids(self) -> list[str]:
        return [node for node, _ in self.processes()]

    def processes(self) -> list[tuple[str, int]]:
        return ray.get([actor.where.remote() for actor in self.actors])

    def devices(self) -> list[str]:
        return ray.get([actor.device.remote() for actor in self.actors])

    def shutdown(self) -> None:
        sampling, self._sampling = self._sampling, []
        if sampling:  # let the last sampling finish rather than kill it (Ray would log that)
            try:
                ray.wait(sampling, num_returns=len(sampling), timeout=ACTOR_CALL_GRACE_S)
            except Exception:  # noqa: BLE001 -- shutting down regardless
                pass
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []


def _sum_statistics(results: Sequence[tuple[dict[str, float], int]]) -> tuple[dict[str, float], int]:
    """Add up shards' summed statistics and task counts."""
    stats: dict[str, float] = {}
    for shard_stats, _ in results:
        for key, value in shard_stats.items():
            stats[key] = stats.get(key, 0.0) + value
    return stats, sum(n for _, n in results)


def start_loopback_cluster(nodes: int, *, cpus: float, port: int, temp_dir: str,
                           distinct_hosts: bool = False) -> tuple[Any, list[str]]:
    """Start ``nodes`` real Ray nodes on the loopback in this process's care; return the
    cluster (``.address``, ``.shutdown()``) and the node ids.

    ``ray.cluster_utils.Cluster`` is what Ray's own multi-node tests use on one machine: every
    node has its own raylet, object store and CPUs, and all its processes are children of this
    one, so stopping is ``shutdown()`` and never ``ray stop`` (which ends every Ray here). Run
    under ``addresses.LOOPBACK_ENV`` so that the nodes keep their loopback addresses instead of
    the outward IP. With ``distinct_hosts`` each node listens on its own loopback address
    (``addresses.loopback_hosts``): Ray, and orch's rules for clusters of several hosts, see as many hosts
    as nodes."""
    from ray.cluster_utils import Cluster

    hosts = addresses.loopback_hosts(nodes, distinct=distinct_hosts)
    # Ports other than the GCS's are left to the OS, so that clusters side by side never clash.
    node = dict(num_cpus=cpus, temp_dir=temp_dir, dashboard_agent_listen_port=None,
                include_dashboard=False)
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        node, node_ip_address=hosts[0], gcs_server_port=port))
    try:
        for host in hosts[1:]:
            cluster.add_node(node_ip_address=host, **node)
        ids = [cluster.head_node.node_id] + [worker.node_id for worker in cluster.worker_nodes]
    except BaseException:
        cluster.shutdown()
        raise
    return cluster, ids
