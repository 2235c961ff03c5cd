"""Meta-training tasks per second: orch's meta-step against a hand-written per-task loop, for every
learner, on CPU and (where one is visible) on a GPU, measured side by side in one run.

    python benchmarks/throughput.py                        # every learner, meta-batch 32
    python benchmarks/throughput.py --quick                # meta-batch 8, one round
    python benchmarks/throughput.py --only maml --only protonet --rounds 5

The setting: Omniglot 5-way 1-shot, Conv-4 with 64 filters on 28x28 images, 15 queries per class,
meta-batch 32, each learner's own default knobs (MAML: one inner step, second order). The
episodes are random tensors of exactly that shape, drawn once: cost does not depend on the
pixels, and the benchmark runs without the data set (on a GPU machine, for one).

orch's rate is ``Learner.batch_gradient`` on a batch already in memory -- what a ShardWorker runs
per shard, without sampling -- with the path training takes on that device (the per-task loop on
CPU, ``torch.func.vmap`` on CUDA). The loop baseline is what a researcher writes by hand, as
learn2learn's examples do: a standard Conv-4 module (conv, BatchNorm, ReLU, max-pool), per task a
``clone()`` of the weights, ``adapt`` by ``torch.autograd.grad(..., create_graph=True)`` and one
``backward()``. It is written here for MAML, first-order MAML, Meta-SGD, ANIL, MAML++ and
ProtoNet; the other learners whose update is the gradient of a query loss get a plain loop
through the learner's own forward code (``query_loss`` then ``backward`` per task), and learners
with an update of their own (Reptile, Siamese verification pairs, MetaOptNet's SVM, ALPaCA) are
timed without a baseline. Rounds alternate orch and loop, so a busy machine slows both alike;
the ratio is of the medians.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from learners.base import Learner
from learners.registry import LEARNERS
from orchestrator.config import ModelSection
from orchestrator.factory import build_learner
from orchestrator.training import should_vectorize
from pipelines.base import Task, TaskBatch

WAYS, SHOTS, QUERIES, SIZE, FILTERS = 5, 1, 15, 28, 64
Params = dict[str, Tensor]
# Halfway through meta-training: learners that anneal (MAML++: first order for the first third,
# the multi-step loss over the first tenth) are timed in the phase most of training spends in.
PROGRESS = 0.5


def episodes(count: int, device: torch.device, seed: int = 0) -> TaskBatch:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(WAYS)
    tasks = [Task(torch.rand(WAYS * SHOTS, 1, SIZE, SIZE, generator=generator),
                  labels.repeat_interleave(SHOTS),
                  torch.rand(WAYS * QUERIES, 1, SIZE, SIZE, generator=generator),
                  labels.repeat_interleave(QUERIES)) for _ in range(count)]
    return TaskBatch.stack(tasks).to(device)


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


def conv4_weights(device: torch.device, *, head: bool = True, rows: int | None = None) -> Params:
    generator = torch.Generator().manual_seed(1)
    weights, channels = {}, 1
    for i in range(4):
        weights[f"conv{i}"] = torch.randn(FILTERS, channels, 3, 3, generator=generator) / math.sqrt(
            9 * channels)
        shape = (FILTERS,) if rows is None else (rows, FILTERS)
        weights[f"bn{i}.weight"], weights[f"bn{i}.bias"] = torch.ones(shape), torch.zeros(shape)
        channels = FILTERS
    if head:
        weights["head.weight"] = torch.randn(WAYS, FILTERS, generator=generator) / 8
        weights["head.bias"] = torch.zeros(WAYS)
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


def maml_loop(steps: int, lr: float, second_order: bool, meta_sgd: bool = False):
    def run(weights: Params, batch: TaskBatch) -> None:
        for task in (batch[i] for i in range(len(batch))):
            fast = clone({k: v for k, v in weights.items() if not k.startswith("lr.")})
            rate = (lambda k: weights["lr." + k]) if meta_sgd else (lambda k: lr)
            for _ in range(steps):
                loss = F.cross_entropy(conv4(fast, task.support_x), task.support_y)
                fast = adapt(fast, loss, rate, second_order=second_order)
            F.cross_entropy(conv4(fast, task.query_x), task.query_y).backward()

    def weights(device: torch.device) -> Params:
        found = conv4_weights(device)
        if meta_sgd:
            found.update({"lr." + k: torch.full_like(v, lr).requires_grad_()
                          for k, v in list(found.items())})
        return found
    return weights, run


def anil_loop(steps: int, lr: float):
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
    return conv4_weights, run


def mamlpp_loop(steps: int, lr: float, first_order: bool, loss_weights: list[float]):
    """MAML++ as its authors' code computes it: per-step BatchNorm weights, a learned rate per
    layer and step, the multi-step query loss."""
    def weights(device: torch.device) -> Params:
        found = conv4_weights(device, rows=steps + 1)
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


def protonet_loop():
    def run(weights: Params, batch: TaskBatch) -> None:
        for task in (batch[i] for i in range(len(batch))):
            support, queries = conv4(weights, task.support_x), conv4(weights, task.query_x)
            prototypes = torch.stack([support[task.support_y == c].mean(0) for c in range(WAYS)])
            logits = -torch.cdist(queries, prototypes) ** 2
            F.cross_entropy(logits, task.query_y).backward()
    return lambda device: conv4_weights(device, head=False), run


def learner_loop(learner: Learner):
    """A plain loop through the learner's own forward code: ``query_loss``, ``backward``."""
    def weights(device: torch.device) -> Params:
        return {k: v.to(device).requires_grad_() for k, v in learner.init_params(0).items()}

    def run(weights: Params, batch: TaskBatch) -> None:
        for task in (batch[i] for i in range(len(batch))):
            learner.query_loss(weights, task, ways=WAYS)[0].backward()
    return weights, run


def baseline(name: str, learner: Learner):
    """(initial weights, one meta-gradient over a batch) written by hand, or None."""
    h = learner.hparams
    if name in ("maml", "fomaml", "metasgd"):
        return maml_loop(h.inner_steps, h.inner_lr, second_order=name != "fomaml",
                         meta_sgd=name == "metasgd")
    if name == "anil":
        return anil_loop(h.inner_steps, h.inner_lr)
    if name == "mamlpp":
        return mamlpp_loop(h.inner_steps, h.inner_lr,
                           first_order=PROGRESS < h.first_order_fraction,
                           loss_weights=learner.loss_weights(PROGRESS))
    if name == "protonet":
        return protonet_loop()
    if type(learner).task_gradient is Learner.task_gradient:
        return learner_loop(learner)
    return None


# -- measuring ---------------------------------------------------------------------------------

def timed(step: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def measure(name: str, device: torch.device, meta_batch: int, rounds: int
            ) -> tuple[float, float | None, str]:
    model = ModelSection.model_validate({"backbone": "conv4", "filters": FILTERS})
    learner = build_learner(model, name, {}, kind="classification",
                            input_shape=(1, SIZE, SIZE), output_size=WAYS)
    learner.backbone.to(device)
    batch = episodes(meta_batch, device)
    params = {k: v.to(device) for k, v in learner.init_params(0).items()}
    vectorize = should_vectorize("auto", "conv4", device)
    learner.progress = PROGRESS

    def orch_step() -> None:
        learner.batch_gradient(params, batch, vectorize=vectorize, progress=PROGRESS)

    hand = baseline(name, learner)
    loop_step = None
    if hand is not None:
        make_weights, run = hand
        weights = make_weights(device)

        def loop_step() -> None:
            for value in weights.values():
                value.grad = None
            run(weights, batch)
    orch_step()  # warm-up: allocator, oneDNN primitives, CUDA kernels
    if loop_step is not None:
        loop_step()
    orch_times, loop_times = [], []
    for _ in range(rounds):
        orch_times.append(timed(orch_step, device))
        if loop_step is not None:
            loop_times.append(timed(loop_step, device))
    orch_rate = meta_batch / statistics.median(orch_times)
    loop_rate = meta_batch / statistics.median(loop_times) if loop_times else None
    path = "vmap" if vectorize else ("autograd loop" if learner.uses_autograd_loop()
                                     else "torch.func loop")
    return orch_rate, loop_rate, path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="meta-batch 8, one round")
    parser.add_argument("--meta-batch", type=int, default=None, help="default 32 (8 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument("--only", action="append",
                        choices=sorted(n for n, c in LEARNERS.items() if c.family != "pretrained"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", action="append", choices=["cpu", "cuda"],
                        help="default: cpu, and cuda when visible")
    args = parser.parse_args()
    meta_batch = args.meta_batch or (8 if args.quick else 32)
    rounds = args.rounds or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    devices = args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    # Pretraining learners take no meta-step: they train on labelled minibatches, not episodes.
    names = args.only or [n for n, cls in LEARNERS.items()
                          if "classification" in cls.task_kinds and cls.family != "pretrained"]
    print(f"# Omniglot-shaped {WAYS}-way {SHOTS}-shot, {QUERIES} queries/class, Conv-4-{FILTERS}, "
          f"{SIZE}x{SIZE}, meta-batch {meta_batch}, median of {rounds} round(s); torch "
          f"{torch.__version__}, {args.threads} CPU thread(s), {platform.processor() or 'cpu'}"
          + (f", GPU {torch.cuda.get_device_name(0)}" if "cuda" in devices else ""))
    print(f"{'learner':<11}{'device':<7}{'orch path':<17}{'orch tasks/s':>13}"
          f"{'loop tasks/s':>13}{'orch/loop':>10}")
    for device_name in devices:
        device = torch.device(device_name)
        for name in names:
            orch_rate, loop_rate, path = measure(name, device, meta_batch, rounds)
            loop = f"{loop_rate:>13.2f}{orch_rate / loop_rate:>10.2f}" if loop_rate else (
                f"{'-':>13}{'-':>10}")
            print(f"{name:<11}{device_name:<7}{path:<17}{orch_rate:>13.2f}{loop}", flush=True)


if __name__ == "__main__":
    main()
