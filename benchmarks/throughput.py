"""Meta-training speed and memory: orch's meta-step against learn2learn itself (where it is
installed) and against a hand-written per-task loop, measured side by side in one process.

    python benchmarks/throughput.py                        # every learner, meta-batch 32
    python benchmarks/throughput.py --quick                # meta-batch 8, one round
    python benchmarks/throughput.py --only maml --only anil --threads 2 --memory --rounds 5
    python benchmarks/throughput.py --growth --memory --plot docs/throughput-growth.png
    python benchmarks/throughput.py --only maml --steps 1 --steps 5 --steps 10 --no-loop \
        --memory --rounds 5 --clock cpu      # inner steps against learn2learn, one thread
    python benchmarks/throughput.py --only maml --steps 1 --steps 5 --steps 10 --no-loop \
        --rounds 5 --threads 2               # the same, two threads (wall clock)
    python benchmarks/throughput.py --recompute --rounds 3 --clock cpu \
        --plot docs/throughput-recompute.png # training.inner_checkpointing, 1 to 100 steps
(docs/throughput.md lists the commands behind each of its tables.)

The setting: Omniglot 5-way 1-shot, Conv-4 with 64 filters on 28x28 images, 15 queries per class,
meta-batch 32, each learner's own default knobs (MAML: one inner step, second order, inner rate
0.01). The episodes are random tensors of exactly that shape, drawn once: cost does not depend on
the pixels, and the benchmark runs without the data set (on a GPU machine, for one).

Three implementations of each meta-step, each summing the meta-gradient of a meta-batch:

- orch: ``Learner.batch_gradient`` on a batch already in memory -- what a ShardWorker runs per
  shard, without sampling -- on the path training takes on that device (the per-task autograd
  loop on CPU, ``torch.func.vmap`` on CUDA).
- learn2learn 0.2.0, as its examples use it: its own Conv-4 (``vision.models.CNN4`` with max-
  pooling, the same layers as orch's) wrapped in ``algorithms.MAML`` (MAML, first-order MAML),
  ``algorithms.MetaSGD``, or for ANIL its body plus ``algorithms.MAML`` around the head; per
  task ``clone()``, ``adapt(loss)`` per inner step, one ``backward()``. Only where
  ``import learn2learn`` works (docs/throughput.md, at the end, says how to build it).
- loop: the same recipe written by hand with no library (conv, BatchNorm, ReLU, max-pool), kept
  for machines without learn2learn and for learners learn2learn lacks (MAML++, ProtoNet); other
  learners whose update is the gradient of a query loss get a plain loop through their own
  forward code, and those with an update of their own (Reptile, Siamese pairs, MetaOptNet's SVM,
  ALPaCA) none.

Rates are tasks per second of wall time (``--clock cpu``: of this process's CPU time, one
thread, which other jobs on a shared machine disturb far less), the median over rounds that
alternate the implementations, so a busy machine slows them alike; ratios are of those medians. Peak memory
(``--memory``) is measured per implementation and setting in a fresh child process that runs
one meta-step: on CPU the growth of the process's peak resident set over its size just before
the step (``VmHWM``), on CUDA ``torch.cuda.max_memory_allocated`` over the memory allocated
before it. ``--growth`` measures MAML as inner steps (1, 5, 10), shots (1, 5), ways (5, 20) and
meta-batch (8, 32) grow one at a time from the base setting, and ``--plot`` draws it.
``--steps`` times the learners at those inner-step counts instead of their defaults.
``--recompute`` measures MAML at 1, 5, 10, 25, 50 and 100 inner steps with and without
``training.inner_checkpointing: 1`` (rounds alternating the two; allocator peak of each in a
fresh child), at meta-batch 4 (time is per task and the peak is one task's, whatever the
meta-batch), and ``--plot`` draws that instead.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from learners.base import Learner
from learners.registry import LEARNERS
from orchestrator.config import ModelSection
from orchestrator.training.factory import build_learner
from orchestrator.training.loop import should_vectorize
from pipelines.base import Task, TaskBatch

QUERIES, SIZE, FILTERS = 15, 28, 64
Params = dict[str, Tensor]
Step = Callable[[TaskBatch], None]
# Halfway through meta-training: learners that anneal (MAML++: first order for the first third,
# the multi-step loss over the first tenth) are timed in the phase most of training spends in.
PROGRESS = 0.5
IMPLEMENTATIONS = ("orch", "learn2learn", "loop")


@dataclass(frozen=True)
class Setting:
    """One task shape and meta-batch; ``steps`` None keeps the learner's default inner steps."""

    ways: int = 5
    shots: int = 1
    meta_batch: int = 32
    steps: int | None = None
    # ``training.inner_checkpointing`` for orch (learners that support it); None: off.
    inner_checkpointing: int | None = None

    def label(self) -> str:
        steps = "" if self.steps is None else f", {self.steps} step{'s' * (self.steps > 1)}"
        recompute = ("" if self.inner_checkpointing is None else
                     f", inner checkpointing {self.inner_checkpointing}")
        return f"{self.ways}-way {self.shots}-shot, meta-batch {self.meta_batch}{steps}{recompute}"


BASE = Setting(steps=1)
# One knob at a time from the base setting (MAML, the growth table).
GROWTH = {"inner steps": [BASE, replace(BASE, steps=5), replace(BASE, steps=10)],
          "shots": [BASE, replace(BASE, shots=5)],
          "ways": [BASE, replace(BASE, ways=20)],
          "meta-batch": [replace(BASE, meta_batch=8), BASE]}
# MAML with and without inner checkpointing (the memory table).
RECOMPUTE_STEPS = (1, 5, 10, 25, 50, 100)
RECOMPUTE_META_BATCH = 4


def episodes(setting: Setting, device: torch.device, seed: int = 0) -> TaskBatch:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(setting.ways)
    tasks = [Task(torch.rand(setting.ways * setting.shots, 1, SIZE, SIZE, generator=generator),
                  labels.repeat_interleave(setting.shots),
                  torch.rand(setting.ways * QUERIES, 1, SIZE, SIZE, generator=generator),
                  labels.repeat_interleave(QUERIES)) for _ in range(setting.meta_batch)]
    return TaskBatch.stack(tasks).to(device)


def orch_learner(name: str, setting: Setting, device: torch.device) -> Learner:
    knobs = {}
    if setting.steps is not None and "inner_steps" in LEARNERS[name].Hyperparameters.model_fields:
        knobs["inner_steps"] = setting.steps
    model = ModelSection.model_validate({"backbone": "conv4", "filters": FILTERS})
    recompute = (setting.inner_checkpointing
                 if LEARNERS[name].inner_checkpointing_refusal is None else None)
    learner = build_learner(model, name, knobs, kind="classification",
                            input_shape=(1, SIZE, SIZE), output_size=setting.ways,
                            inner_checkpointing=recompute)
    learner.backbone.to(device)
    learner.progress = PROGRESS
    return learner


def orch_step(learner: Learner, device: torch.device) -> Step:
    params = {k: v.to(device) for k, v in learner.init_params(0).items()}
    vectorize = should_vectorize("auto", "conv4", device,
                                 recompute=learner.inner_checkpointing is not None)

    def step(batch: TaskBatch) -> None:
        learner.batch_gradient(params, batch, vectorize=vectorize, progress=PROGRESS)
    return step


def orch_path(learner: Learner, device: torch.device) -> str:
    if should_vectorize("auto", "conv4", device, recompute=learner.inner_checkpointing is not None):
        return "vmap"
    return "autograd loop" if learner.uses_autograd_loop() else "torch.func loop"


# -- learn2learn itself --------------------------------------------------------------------------

def import_learn2learn():
    """learn2learn, or the one-line reason it cannot be imported. Its import prints gym's
    deprecation notice; that is not ours to show."""
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            import learn2learn
    except Exception as error:  # a source build gone wrong fails in many ways
        return None, f"{type(error).__name__}: {error}".splitlines()[0]
    return learn2learn, None


def learn2learn_step(name: str, learner: Learner, setting: Setting,
                     device: torch.device) -> Step | None:
    """One meta-gradient over a batch with learn2learn's own classes, or None where learn2learn
    is missing or has no such learner."""
    l2l, _ = import_learn2learn()
    if l2l is None or name not in ("maml", "fomaml", "metasgd", "anil"):
        return None
    h = learner.hparams
    torch.manual_seed(1)
    model = l2l.vision.models.CNN4(setting.ways, hidden_size=FILTERS, channels=1, max_pool=True,
                                   embedding_size=FILTERS).to(device)
    if name == "anil":
        body, head = model.features, l2l.algorithms.MAML(model.classifier, lr=h.inner_lr)
        wrapped: torch.nn.Module = model
    elif name == "metasgd":
        wrapped = l2l.algorithms.MetaSGD(model, lr=h.inner_lr, first_order=False)
    else:
        wrapped = l2l.algorithms.MAML(model, lr=h.inner_lr, first_order=name == "fomaml")

    def query_loss(task: Task) -> Tensor:
        if name == "anil":
            features, fast = body(task.support_x), head.clone()
            for _ in range(h.inner_steps):
                fast.adapt(F.cross_entropy(fast(features), task.support_y))
            return F.cross_entropy(fast(body(task.query_x)), task.query_y)
        fast = wrapped.clone()
        for _ in range(h.inner_steps):
            fast.adapt(F.cross_entropy(fast(task.support_x), task.support_y))
        return F.cross_entropy(fast(task.query_x), task.query_y)

    def step(batch: TaskBatch) -> None:
        for value in wrapped.parameters():
            value.grad = None
        for i in range(len(batch)):
            query_loss(batch[i]).backward()
    return step


# -- the hand-written baseline ----------------------------------------------------------------

def conv4(weights: Params, x: Tensor, row: int | None = None) -> Tensor:
    """The standard Conv-4 as the literature's code writes it: conv, BatchNorm (batch
    statistics), ReLU, max-pool, four times, then a linear layer. ``row`` picks per-step
    BatchNorm weights (MAML++)."""
    for i in range(4):
        gamma, beta = weights[f"bn{i}.weight"], weights[f"bn{i}.bias"]
        if row is not None:
            gamma, beta = gamma[row], beta[row]
        x = F.conv2d(x, weights[f"conv{i}"], padding=1)
        x = F.batch_norm(x, None, None, gamma, beta, training=True)
        x = F.max_pool2d(F.relu(x), 2)
    x = x.flatten(1)
    return x if "head.weight" not in weights else F.linear(x, weights["head.weight"],
                                                           weights["head.bias"])


def conv4_weights(device: torch.device, ways: int | None, *, rows: int | None = None) -> Params:
    generator = torch.Generator().manual_seed(1)
    weights, channels = {}, 1
    for i in range(4):
        weights[f"conv{i}"] = torch.randn(FILTERS, channels, 3, 3, generator=generator) / math.sqrt(
            9 * channels)
        shape = (FILTERS,) if rows is None else (rows, FILTERS)
        weights[f"bn{i}.weight"], weights[f"bn{i}.bias"] = torch.ones(shape), torch.zeros(shape)
        channels = FILTERS
    if ways is not None:
        weights["head.weight"] = torch.randn(ways, FILTERS, generator=generator) / 8
        weights["head.bias"] = torch.zeros(ways)
    return {k: v.to(device).requires_grad_() for k, v in weights.items()}


def clone(weights: Params) -> Params:
    """learn2learn's ``clone()``: differentiable copies of the meta-weights."""
    return {k: v.clone() for k, v in weights.items()}


def adapt(fast: Params, loss: Tensor, rate: Callable[[str], Tensor | float], *,
          second_order: bool, only: set[str] | None = None) -> Params:
    """learn2learn's ``adapt(loss)``: one gradient step on ``fast`` (or its ``only`` entries)."""
    names = [k for k in fast if only is None or k in only]
    grads = torch.autograd.grad(loss, [fast[k] for k in names], create_graph=second_order)
    return {**fast, **{k: fast[k] - rate(k) * g for k, g in zip(names, grads)}}


def maml_loop(steps: int, lr: float, second_order: bool, ways: int, meta_sgd: bool = False):
    def run(weights: Params, batch: TaskBatch) -> None:
        for task in (batch[i] for i in range(len(batch))):
            fast = clone({k: v for k, v in weights.items() if not k.startswith("lr.")})
            rate = (lambda k: weights["lr." + k]) if meta_sgd else (lambda k: lr)
            for _ in range(steps):
                loss = F.cross_entropy(conv4(fast, task.support_x), task.support_y)
                fast = adapt(fast, loss, rate, second_order=second_order)
            F.cross_entropy(conv4(fast, task.query_x), task.query_y).backward()

    def weights(device: torch.device) -> Params:
        found = conv4_weights(device, ways)
        if meta_sgd:
            found.update({"lr." + k: torch.full_like(v, lr).requires_grad_()
                          for k, v in list(found.items())})
        return found
    return weights, run


def anil_loop(steps: int, lr: float, ways: int):
    def run(weights: Params, batch: TaskBatch) -> None:
        body = {k: v for k, v in weights.items() if not k.startswith("head.")}
        for task in (batch[i] for i in range(len(batch))):
            head = clone({k: weights[k] for k in ("head.weight", "head.bias")})
            features = conv4(body, task.support_x)
            for _ in range(steps):
                loss = F.cross_entropy(F.linear(features, head["head.weight"], head["head.bias"]),
                                       task.support_y)
                head = adapt(head, loss, lambda k: lr, second_order=True)
            logits = F.linear(conv4(body, task.query_x), head["head.weight"], head["head.bias"])
            F.cross_entropy(logits, task.query_y).backward()
    return lambda device: conv4_weights(device, ways), run


def mamlpp_loop(steps: int, lr: float, first_order: bool, loss_weights: list[float], ways: int):
    """MAML++ as its authors' code computes it: per-step BatchNorm weights, a learned rate per
    layer and step, the multi-step query loss."""
    def weights(device: torch.device) -> Params:
        found = conv4_weights(device, ways, rows=steps + 1)
        rates = {f"lr.{k}": torch.full((steps,), lr, device=device).requires_grad_()
                 for k in found if not k.startswith("bn")}
        return {**found, **rates}

    def run(weights: Params, batch: TaskBatch) -> None:
        for task in (batch[i] for i in range(len(batch))):
            fast = clone({k: v for k, v in weights.items() if not k.startswith("lr.")})
            total = 0.0
            for step in range(steps):
                loss = F.cross_entropy(conv4(fast, task.support_x, row=step), task.support_y)
                fast = adapt(fast, loss, lambda k: weights[f"lr.{k}"][step],
                             second_order=not first_order,
                             only={k for k in fast if not k.startswith("bn")})
                if loss_weights[step] > 0:
                    query = F.cross_entropy(conv4(fast, task.query_x, row=step + 1), task.query_y)
                    total = total + loss_weights[step] * query
            total.backward()
    return weights, run


def protonet_loop(ways: int):
    def run(weights: Params, batch: TaskBatch) -> None:
        for task in (batch[i] for i in range(len(batch))):
            support, queries = conv4(weights, task.support_x), conv4(weights, task.query_x)
            prototypes = torch.stack([support[task.support_y == c].mean(0) for c in range(ways)])
            logits = -torch.cdist(queries, prototypes) ** 2
            F.cross_entropy(logits, task.query_y).backward()
    return lambda device: conv4_weights(device, None), run


def learner_loop(learner: Learner, ways: int):
    """A plain loop through the learner's own forward code: ``query_loss``, ``backward``."""
    def weights(device: torch.device) -> Params:
        return {k: v.to(device).requires_grad_() for k, v in learner.init_params(0).items()}

    def run(weights: Params, batch: TaskBatch) -> None:
        for task in (batch[i] for i in range(len(batch))):
            learner.query_loss(weights, task, ways=ways)[0].backward()
    return weights, run


def loop_step(name: str, learner: Learner, setting: Setting, device: torch.device) -> Step | None:
    """One meta-gradient over a batch written by hand, or None."""
    h, ways = learner.hparams, setting.ways
    if name in ("maml", "fomaml", "metasgd"):
        hand = maml_loop(h.inner_steps, h.inner_lr, second_order=name != "fomaml", ways=ways,
                         meta_sgd=name == "metasgd")
    elif name == "anil":
        hand = anil_loop(h.inner_steps, h.inner_lr, ways)
    elif name == "mamlpp":
        hand = mamlpp_loop(h.inner_steps, h.inner_lr,
                           first_order=PROGRESS < h.first_order_fraction,
                           loss_weights=learner.loss_weights(PROGRESS), ways=ways)
    elif name == "protonet":
        hand = protonet_loop(ways)
    elif type(learner).task_gradient is Learner.task_gradient:
        hand = learner_loop(learner, ways)
    else:
        return None
    make_weights, run = hand
    weights = make_weights(device)

    def step(batch: TaskBatch) -> None:
        for value in weights.values():
            value.grad = None
        run(weights, batch)
    return step


def implementation_step(implementation: str, name: str, setting: Setting,
                        device: torch.device) -> Step | None:
    learner = orch_learner(name, setting, device)
    if implementation == "orch":
        return orch_step(learner, device)
    if implementation == "learn2learn":
        return learn2learn_step(name, learner, setting, device)
    return loop_step(name, learner, setting, device)


# -- measuring ---------------------------------------------------------------------------------

# What ``timed`` reads: wall time, or (``--clock cpu``, one thread on CPU) this process's CPU
# time, which other jobs on a shared machine disturb far less.
CLOCK: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCK["wall"]


def timed(step: Step, batch: TaskBatch, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = clock()
    step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - started


def rates(name: str, setting: Setting, device: torch.device, rounds: int,
          implementations: tuple[str, ...] = IMPLEMENTATIONS) -> dict[str, float]:
    """Tasks per second of each implementation that has this learner, rounds alternating."""
    batch = episodes(setting, device)
    steps = {impl: implementation_step(impl, name, setting, device) for impl in implementations}
    steps = {impl: step for impl, step in steps.items() if step is not None}
    for step in steps.values():
        step(batch)  # warm-up: allocator, oneDNN primitives, CUDA kernels
    times: dict[str, list[float]] = {impl: [] for impl in steps}
    for _ in range(rounds):
        for impl, step in steps.items():
            times[impl].append(timed(step, batch, device))
    return {impl: setting.meta_batch / statistics.median(found) for impl, found in times.items()}


def peak_memory(implementation: str, name: str, setting: Setting, device: torch.device,
                threads: int) -> tuple[float, float | None] | None:
    """MiB one meta-step adds at its peak, each measured in a fresh child process (see
    ``child_peak_memory``): the allocator's peak, and on CPU the resident set's; None where the
    implementation lacks the learner."""
    found = []
    for measure in ("allocator", "resident") if device.type == "cpu" else ("allocator",):
        spec = {"implementation": implementation, "name": name, "setting": asdict(setting),
                "device": device.type, "threads": threads, "measure": measure}
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child-memory",
                               json.dumps(spec)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory child for {implementation} {name} failed: "
                               f"{done.stderr.strip().splitlines()[-1:]}")
        found.append(json.loads(done.stdout.strip().splitlines()[-1])["mib"])
    if found[0] is None:
        return None
    return found[0], found[1] if len(found) > 1 else None


def child_peak_memory(spec: dict) -> float | None:
    """In a fresh process: build one implementation's step and batch, then run one meta-step
    and return the MiB it added at its peak. ``allocator``: on CUDA the caching allocator's
    peak, on CPU the peak of live tensor bytes, summed from the profiler's allocation records
    (exact, the same on every run). ``resident``: the process's peak resident set minus its
    resident set just before the step -- what the machine sees, allocator slack and library
    buffers included, and noisy by tens of MiB. No warm-up step: it would raise the peak the
    measured step is compared against."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    setting = Setting(**spec["setting"])
    step = implementation_step(spec["implementation"], spec["name"], setting, device)
    if step is None:
        return None
    batch = episodes(setting, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(batch)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    if spec["measure"] == "allocator":
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            step(batch)
        records = sorted((e for e in profiler.profiler.kineto_results.events()
                          if e.name() == "[memory]"), key=lambda e: e.start_ns())
        return max(itertools.accumulate((e.nbytes() for e in records), initial=0)) / 2**20
    before = resident_mib("VmRSS")
    step(batch)
    return resident_mib("VmHWM") - before


def resident_mib(field: str) -> float:
    """The process's resident set (``VmRSS``) or its peak (``VmHWM``) in MiB. Not ``ru_maxrss``:
    Linux carries that over from the parent across fork and exec, so a child started by a large
    parent reports the parent's size."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


# -- reporting ---------------------------------------------------------------------------------

def cell(value: float | None, form: str = ".2f", width: int = 9) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{form}}"


def mib(peaks: tuple[float, float | None] | None) -> str:
    """``allocator (resident)`` MiB, right-aligned in 12 columns."""
    if peaks is None:
        return f"{'-':>12}"
    allocator, resident = peaks
    return f"{allocator:.0f}" .rjust(12) if resident is None else (
        f"{allocator:.0f} ({resident:.0f})".rjust(12))


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def learner_table(names: list[str], settings: list[Setting], devices: list[str], rounds: int,
                  threads: int, memory: bool,
                  implementations: tuple[str, ...] = IMPLEMENTATIONS) -> None:
    print(f"{'learner':<11}{'steps':>6} {'device':<7}{'orch path':<16}{'orch':>9}{'l2l':>9}"
          f"{'orch/l2l':>9}{'loop':>9}{'orch/loop':>10}"
          + (f"{'orch MiB':>12}{'l2l MiB':>12}{'loop MiB':>12}" if memory else ""))
    for device_name in devices:
        device = torch.device(device_name)
        for name, setting in itertools.product(names, settings):
            found = rates(name, setting, device, rounds, implementations)
            orch, l2l, loop = (found.get(impl) for impl in IMPLEMENTATIONS)
            steps = orch_learner(name, setting, device).hparams
            steps = getattr(steps, "inner_steps", None)
            line = (f"{name:<11}{'-' if steps is None else steps:>6} {device_name:<7}"
                    f"{orch_path(orch_learner(name, setting, device), device):<16}"
                    f"{cell(orch)}{cell(l2l)}{cell(ratio(orch, l2l), '.2f')}{cell(loop)}"
                    f"{cell(ratio(orch, loop), '.2f', 10)}")
            if memory:
                line += "".join(mib(peak_memory(impl, name, setting, device, threads)
                                    if impl in implementations else None)
                                for impl in IMPLEMENTATIONS)
            print(line, flush=True)


def growth_table(devices: list[str], rounds: int, threads: int, memory: bool,
                 plot: str | None) -> None:
    """MAML's tasks/s and peak memory as one knob at a time grows from the base setting."""
    print("MAML, second order; each row changes one knob of the base setting "
          f"({BASE.label()}); time x and mem x: orch's seconds per task and peak allocator "
          "memory relative to the base row")
    print(f"{'knob':<12}{'setting':<38}{'orch':>9}{'l2l':>9}{'orch/l2l':>9}{'time x':>8}"
          + (f"{'orch MiB':>12}{'l2l MiB':>12}{'mem x':>7}" if memory else ""))
    results: dict[str, list[tuple[Setting, dict]]] = {}
    for device_name in devices:
        device = torch.device(device_name)
        base: dict = {}
        for knob, settings in GROWTH.items():
            for setting in settings:
                found = rates("maml", setting, device, rounds)
                row = {"orch": found["orch"], "other": found.get("learn2learn", found.get("loop"))}
                if memory:
                    other = "learn2learn" if "learn2learn" in found else "loop"
                    row["orch MiB"] = peak_memory("orch", "maml", setting, device, threads)
                    row["other MiB"] = peak_memory(other, "maml", setting, device, threads)
                if setting == BASE and not base:
                    base = row
                results.setdefault(knob, []).append((setting, row))
                # seconds per task relative to the base setting's (1.0: linear in tasks)
                time_x = base["orch"] / row["orch"] if base else None
                line = (f"{knob:<12}{setting.label() + ' (' + device_name + ')':<38}"
                        f"{cell(row['orch'])}{cell(row['other'])}"
                        f"{cell(ratio(row['orch'], row['other']))}{cell(time_x, '.2f', 8)}")
                if memory:
                    growth = ratio(row["orch MiB"][0], base["orch MiB"][0]) if base else None
                    line += f"{mib(row['orch MiB'])}{mib(row['other MiB'])}{cell(growth, '.2f', 7)}"
                print(line, flush=True)
    if plot:
        draw_growth(results, plot, memory)


def draw_growth(results: dict[str, list[tuple[Setting, dict]]], path: str, memory: bool) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    knob_value = {"inner steps": lambda s: s.steps, "shots": lambda s: s.shots,
                  "ways": lambda s: s.ways, "meta-batch": lambda s: s.meta_batch}
    rows = 2 if memory else 1
    figure, axes = plt.subplots(rows, len(results), figsize=(3.2 * len(results), 2.8 * rows),
                                squeeze=False)
    for column, (knob, found) in enumerate(results.items()):
        xs = [knob_value[knob](setting) for setting, _ in found]
        panels = [("ms per task", lambda r, k: 1000 / r[k], ("orch", "other"))]
        if memory:
            panels.append(("peak MiB (allocator)", lambda r, k: r[k][0], ("orch MiB", "other MiB")))
        for row, (label, value, keys) in enumerate(panels):
            axis = axes[row][column]
            for key, name in zip(keys, ("orch", "learn2learn")):
                axis.plot(xs, [value(r, key) for _, r in found], marker="o", label=name)
            axis.set_xlabel(knob)
            axis.set_xticks(xs)
            axis.set_ylim(bottom=0)
            if column == 0:
                axis.set_ylabel(label)
    axes[0][0].legend()
    figure.suptitle(f"MAML meta-step on CPU, from {BASE.label()}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"plot written to {path}")


def recompute_table(devices: list[str], rounds: int, threads: int, plot: str | None) -> None:
    """MAML's time per task and allocator peak at ``RECOMPUTE_STEPS`` inner steps, plain and
    with ``training.inner_checkpointing: 1``, rounds alternating the two."""
    print(f"MAML, second order, {replace(BASE, meta_batch=RECOMPUTE_META_BATCH).label()} and "
          "more steps; plain against inner checkpointing 1 (every step recomputed in the "
          "outer backward); time x: recomputed over plain; peak: allocator MiB one meta-step adds")
    print(f"{'steps':>6} {'device':<7}{'plain ms/task':>14}{'recomputed':>12}{'time x':>8}"
          f"{'plain MiB':>11}{'recomputed':>11}{'mem x':>7}")
    results: dict[str, list[tuple[int, dict]]] = {}
    for device_name in devices:
        device = torch.device(device_name)
        for steps in RECOMPUTE_STEPS:
            plain = Setting(meta_batch=RECOMPUTE_META_BATCH, steps=steps)
            recomputed = replace(plain, inner_checkpointing=1)
            batch = episodes(plain, device)
            variants = {"plain": orch_step(orch_learner("maml", plain, device), device),
                        "recomputed": orch_step(orch_learner("maml", recomputed, device), device)}
            for step in variants.values():
                step(batch)
            times: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(rounds):
                for name, step in variants.items():
                    times[name].append(timed(step, batch, device))
            row = {name: 1000 * statistics.median(found) / len(batch)
                   for name, found in times.items()}
            row["plain MiB"] = peak_memory("orch", "maml", plain, device, threads)[0]
            row["recomputed MiB"] = peak_memory("orch", "maml", recomputed, device, threads)[0]
            results.setdefault(device_name, []).append((steps, row))
            print(f"{steps:>6} {device_name:<7}{row['plain']:>14.1f}{row['recomputed']:>12.1f}"
                  f"{row['recomputed'] / row['plain']:>8.2f}{row['plain MiB']:>11.0f}"
                  f"{row['recomputed MiB']:>11.0f}"
                  f"{row['recomputed MiB'] / row['plain MiB']:>7.2f}", flush=True)
    if plot:
        draw_recompute(results, plot)


def draw_recompute(results: dict[str, list[tuple[int, dict]]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for device_name, found in results.items():
        steps = [s for s, _ in found]
        suffix = "" if len(results) == 1 else f" ({device_name})"
        for key, label in (("plain", "plain"), ("recomputed", "inner checkpointing")):
            axes[0].plot(steps, [r[key] for _, r in found], marker="o", label=label + suffix)
            axes[1].plot(steps, [r[key + " MiB"] for _, r in found], marker="o",
                         label=label + suffix)
    for axis, label in zip(axes, ("ms per task", "peak MiB (allocator)")):
        axis.set_xlabel("inner steps")
        axis.set_ylabel(label)
        axis.set_ylim(bottom=0)
    axes[1].legend()
    figure.suptitle("MAML meta-step with and without training.inner_checkpointing: 1",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"plot written to {path}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child-memory":
        print(json.dumps({"mib": child_peak_memory(json.loads(sys.argv[2]))}))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="meta-batch 8, one round")
    parser.add_argument("--meta-batch", type=int, default=None, help="default 32 (8 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument("--only", action="append",
                        choices=sorted(n for n, c in LEARNERS.items() if c.family != "pretrained"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", action="append", choices=["cpu", "cuda"],
                        help="default: cpu, and cuda when visible")
    parser.add_argument("--memory", action="store_true",
                        help="also peak memory per meta-step, one fresh child process each")
    parser.add_argument("--growth", action="store_true",
                        help="MAML as inner steps, shots, ways and meta-batch grow, instead of "
                             "the table of learners")
    parser.add_argument("--steps", type=int, action="append",
                        help="inner steps of the learners that take them (repeat for a row "
                             "each; default: each learner's own)")
    parser.add_argument("--clock", choices=sorted(CLOCK), default="wall",
                        help="time meta-steps by wall time (default) or by this process's CPU "
                             "time (one thread, CPU only: steadier on a shared machine)")
    parser.add_argument("--no-loop", action="store_true",
                        help="leave the hand-written loop out (it stands in where learn2learn "
                             "is missing)")
    parser.add_argument("--recompute", action="store_true",
                        help="MAML's time and allocator peak at 1 to 100 inner steps with and "
                             "without training.inner_checkpointing, instead of the table of "
                             "learners")
    parser.add_argument("--plot", metavar="PNG",
                        help="with --growth or --recompute: draw it into this file")
    args = parser.parse_args()
    if args.plot and not (args.growth or args.recompute):
        parser.error("--plot draws the --growth or --recompute table; add one")
    if args.clock == "cpu" and (args.threads != 1 or args.device not in (None, ["cpu"])):
        parser.error("--clock cpu measures one CPU thread: use it with --threads 1 --device cpu")
    global clock
    clock = CLOCK[args.clock]
    meta_batch = args.meta_batch or (8 if args.quick else 32)
    rounds = args.rounds or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    devices = args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    l2l, why = import_learn2learn()
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"# torch {torch.__version__}, {args.threads} CPU thread(s) of {os.cpu_count()}, "
          f"{platform.processor() or 'cpu'}"
          + (f", GPU {torch.cuda.get_device_name(0)}" if "cuda" in devices else "")
          + f"; load average {load} at the start")
    print(f"# learn2learn {l2l.__version__}" if l2l else f"# learn2learn not importable ({why}): "
          "its column stays empty")
    print(f"# tasks/s: median of {rounds} round(s) alternating the implementations, "
          f"{'CPU' if args.clock == 'cpu' else 'wall'} time; "
          f"{QUERIES} queries per class, Conv-4-{FILTERS}, {SIZE}x{SIZE}"
          + ("; MiB: peak memory one meta-step adds, fresh child process each" if args.memory
             else ""))
    if args.growth:
        growth_table(devices, rounds, args.threads, args.memory, args.plot)
    elif args.recompute:
        recompute_table(devices, rounds, args.threads, args.plot)
    else:
        settings = [Setting(meta_batch=meta_batch, steps=steps) for steps in args.steps or [None]]
        print(f"# {Setting(meta_batch=meta_batch).label()}, each learner's default knobs"
              + ("" if args.steps is None else
                 f" but inner steps {', '.join(map(str, args.steps))}"))
        # Pretraining learners take no meta-step: they train on labelled minibatches.
        names = args.only or [n for n, cls in LEARNERS.items()
                              if "classification" in cls.task_kinds and cls.family != "pretrained"]
        implementations = tuple(i for i in IMPLEMENTATIONS if i != "loop" or not args.no_loop)
        learner_table(names, settings, devices, rounds, args.threads, args.memory,
                      implementations)
    print(f"# load average {' '.join(f'{v:.1f}' for v in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
