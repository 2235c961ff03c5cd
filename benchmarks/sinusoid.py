"""MAML on sinusoid regression at the paper's setting, for a stated CPU budget.

    python benchmarks/sinusoid.py --minutes 5

Meta-trains MAML as in Finn et al. (2017), section 5.1 -- K=10, meta-batch 25, inner lr 0.01,
one inner step, Adam 1e-3, MLP 1-40-40-1 -- for ``--minutes`` of wall-clock time on this machine,
and a "pretrained" baseline (the same network trained by plain regression on all tasks for the
same budget). Both are then scored on 600 held-out tasks at K=5 after 1 and 10 inner steps of SGD
(lr 0.01) and printed beside the paper's figures (MAML 0.67 / 0.35, pretrained 2.41 / 2.19; the
paper trains for 70,000 iterations). Not a test: run by hand.
"""

from __future__ import annotations

import argparse
import time

import torch

from learners.backbones import call
from orchestrator.config import sweep_from_dict
from orchestrator.training import LocalFarm, MetaTrainer, ShardWorker

PAPER = {"maml": (0.67, 0.35), "pretrained": (2.41, 2.19)}
KNOBS = {"inner_lr": 0.01, "inner_steps": 1, "outer_lr": 0.001}


def paper_sweep(seed: int) -> dict:
    return {"name": "bench-sinusoid",
            "data": {"family": "sinusoid", "shots": 10, "queries": 10},
            "model": {"backbone": "mlp", "hidden": [40, 40]},
            "training": {"meta_batch": 25, "iterations": 70000, "eval_every": 70000,
                         "eval_tasks": 600, "seed": seed},
            "workers": {"count": 0}, "algorithms": {"maml": {}}}


def pretrain(trainer: MetaTrainer, seconds: float) -> tuple[dict[str, torch.Tensor], int]:
    """The paper's baseline: one network regressed on all tasks' points, no meta-learning."""
    params = {k: v.clone().requires_grad_(True) for k, v in trainer.initial_params().items()}
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    family, backbone = trainer.farm.worker.family, trainer.learner.backbone
    started, iteration = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        batch = family.batch("train", trainer.seed, range(iteration * 25, (iteration + 1) * 25))
        x = torch.cat([batch.support_x, batch.query_x], dim=1).reshape(-1, 1)
        y = torch.cat([batch.support_y, batch.query_y], dim=1).reshape(-1, 1)
        loss = torch.nn.functional.mse_loss(call(backbone, params, x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        iteration += 1
    return {k: v.detach() for k, v in params.items()}, iteration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="meta-training budget (and baseline budget)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sweep = sweep_from_dict(paper_sweep(args.seed))
    trainer = MetaTrainer(sweep, "maml", KNOBS, LocalFarm(ShardWorker(sweep.model_dump(), "maml", KNOBS)))

    outcome = trainer.train(time_budget_s=args.minutes * 60)
    iterations = outcome.evaluations[-1].iteration
    baseline, baseline_iterations = pretrain(trainer, args.minutes * 60)

    print(f"budget {args.minutes:g} min each on {torch.get_num_threads()} thread(s): MAML "
          f"{iterations} meta-iterations ({outcome.tasks_per_second:.0f} tasks/s), pretrained "
          f"{baseline_iterations} iterations; paper: 70,000")
    print(f"{'model':<12}{'K=5, 1 step':>14}{'paper':>8}{'K=5, 10 steps':>16}{'paper':>8}")
    for name, params in (("maml", outcome.params), ("pretrained", baseline)):
        scores = [trainer.validate(params, shots=5, steps=steps, tasks=600)["val_loss"]
                  for steps in (1, 10)]
        print(f"{name:<12}{scores[0]:>14.3f}{PAPER[name][0]:>8.2f}{scores[1]:>16.3f}{PAPER[name][1]:>8.2f}")


if __name__ == "__main__":
    main()
