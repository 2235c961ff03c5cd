"""MAML, Meta-SGD and MAML++ on sinusoid regression at MAML's setting, for a stated CPU budget each.

    python benchmarks/sinusoid.py --minutes 5
    python benchmarks/sinusoid.py --minutes 1 --only maml --only metasgd

Meta-trains each learner with MAML's sinusoid setting of Finn et al. (2017), section 5.1 -- K=10,
meta-batch 25, inner lr 0.01, one inner step, Adam 1e-3, MLP 1-40-40-1 (Meta-SGD's rates and
MAML++'s per-step rates start at 0.01; MAML++ takes its inner steps, see LEARNERS) -- for
``--minutes`` of CPU time each, and a "pretrained" baseline (the same network trained by plain
regression on all tasks for the same CPU budget). All are then scored on 600 held-out tasks at K=5
after 1 and 10 inner steps (each learner's own inner update: SGD with lr 0.01 for MAML and the
baseline, the learned rates for Meta-SGD and MAML++) and printed beside the papers' figures (MAML
0.67 / 0.35, pretrained 2.41 / 2.19 after 70,000 iterations). Target: Meta-SGD and MAML++ below
MAML's 1-step error of the same run. Learned rates are tuned for the trained number of steps
(Meta-SGD 1, MAML++ 2): repeated for 10 steps they may overshoot and diverge ("diverged"). Not a
test: run by hand. ALPaCA (``--only alpaca``, or with no ``--only``) gets the same budget and is
scored at K = 1, 5 and 10 with its 95%-interval coverage (section below).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from learners.backbones import call
from orchestrator.config import sweep_from_dict
from orchestrator.training.loop import LocalFarm, MetaTrainer, ShardWorker

# Learner -> (knobs, the paper's K=5 figures after 1 and 10 steps where it gives them).
LEARNERS = {
    "maml": ({"inner_lr": 0.01, "inner_steps": 1, "outer_lr": 0.001}, (0.67, 0.35)),
    # Li et al. (2017) report Meta-SGD below MAML on their sinusoid tasks, but trained at the
    # test K with one step, so their figures are not comparable here and not printed.
    "metasgd": ({"inner_lr": 0.01, "inner_steps": 1, "outer_lr": 0.001}, (None, None)),
    # MAML++ reports no sinusoid figures.
    "mamlpp": ({"inner_lr": 0.01, "inner_steps": 2, "outer_lr": 0.001}, (None, None)),
}
PRETRAINED_PAPER = (2.41, 2.19)


def paper_sweep(algorithm: str, seed: int) -> dict:
    return {"name": "bench-sinusoid",
            "data": {"family": "sinusoid", "shots": 10, "queries": 10},
            "model": {"backbone": "mlp", "hidden": [40, 40]},
            "training": {"meta_batch": 25, "iterations": 70000, "eval_every": 70000,
                         "eval_tasks": 600, "seed": seed},
            "workers": {"count": 0}, "algorithms": {algorithm: {}}}


def trainer_for(algorithm: str, seed: int) -> MetaTrainer:
    sweep = sweep_from_dict(paper_sweep(algorithm, seed))
    knobs = LEARNERS[algorithm][0]
    return MetaTrainer(sweep, algorithm, knobs,
                       LocalFarm(ShardWorker(sweep.model_dump(), algorithm, knobs)))


def pretrain(trainer: MetaTrainer, seconds: float) -> tuple[dict[str, torch.Tensor], int]:
    """The paper's baseline: one network regressed on all tasks' points, no meta-learning, for
    ``seconds`` of CPU time."""
    params = {k: v.clone().requires_grad_(True) for k, v in trainer.initial_params().items()}
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    family, backbone = trainer.farm.worker.family, trainer.learner.backbone
    started, iteration = time.process_time(), 0
    while time.process_time() - started < seconds:
        batch = family.batch("train", trainer.seed, range(iteration * 25, (iteration + 1) * 25))
        x = torch.cat([batch.support_x, batch.query_x], dim=1).reshape(-1, 1)
        y = torch.cat([batch.support_y, batch.query_y], dim=1).reshape(-1, 1)
        loss = torch.nn.functional.mse_loss(call(backbone, params, x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        iteration += 1
    return {k: v.detach() for k, v in params.items()}, iteration


def scores(trainer: MetaTrainer, params: dict[str, torch.Tensor]) -> list[float]:
    return [trainer.validate(params, shots=5, steps=steps, tasks=600)["val_loss"]
            for steps in (1, 10)]


def cell(value: float | None) -> str:
    return f"{value:>8.2f}" if value is not None else f"{'-':>8}"


def error(value: float, width: int) -> str:
    return f"{value:>{width}.3f}" if math.isfinite(value) and value < 1e3 else f"{'diverged':>{width}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0,
                        help="meta-training budget per learner (and the baseline's) in CPU minutes")
    parser.add_argument("--only", choices=sorted([*LEARNERS, "alpaca"]), action="append",
                        help="run only this learner (repeatable; MAML always runs, as the yardstick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = ["maml", *[n for n in LEARNERS if n != "maml" and (not args.only or n in args.only)]]

    rows, iterations = [], []
    for name in names:
        trainer = trainer_for(name, args.seed)
        outcome = trainer.train(time_budget_s=args.minutes * 60)
        iterations.append(f"{name} {outcome.evaluations[-1].iteration}")
        rows.append((name, scores(trainer, outcome.params), LEARNERS[name][1]))
        if name == "maml":
            maml = trainer
    baseline, baseline_iterations = pretrain(maml, args.minutes * 60)
    rows.append(("pretrained", scores(maml, baseline), PRETRAINED_PAPER))

    print(f"budget {args.minutes:g} CPU min each on {torch.get_num_threads()} thread(s): "
          f"meta-iterations {', '.join(iterations)}; pretrained {baseline_iterations} "
          f"iterations; paper: 70,000")
    print(f"{'model':<12}{'K=5, 1 step':>14}{'paper':>8}{'K=5, 10 steps':>16}{'paper':>8}  target")
    maml_one_step = rows[0][1][0]
    for name, (one, ten), (paper_one, paper_ten) in rows:
        target = ""
        if name not in ("maml", "pretrained"):
            target = "meets" if one < maml_one_step else f"ABOVE MAML's {maml_one_step:.3f}"
        print(f"{name:<12}{error(one, 14)}{cell(paper_one)}{error(ten, 16)}{cell(paper_ten)}  "
              f"{target}")
    if not args.only or "alpaca" in args.only:
        run_alpaca(args, maml_one_step)


# -- ALPaCA (Harrison, Sharma and Pavone, 2018) ---------------------------------------------------
# Same data, network (MLP 1-40-40 as the features), meta-batch and CPU budget as MAML; Adam 3e-3
# (the paper's rate is 1e-3; 3e-3 did better in 0.5-minute runs); meta-trained on K=10 support sets, every
# prefix of them (0..10 points), as the paper's random context sizes. The paper plots its sinusoid results (MSE and predictive intervals against K)
# rather than tabulating them, so there is no paper column; the target is MAML's K=5
# 1-step MSE of this run, and 95% intervals holding 90-99% of query targets.
ALPACA_KNOBS = {"variable_context": True, "outer_lr": 0.003}


def run_alpaca(args: argparse.Namespace, maml_k5: float | None) -> None:
    from orchestrator.models.inference import uncertainty_scores

    sweep_dict = paper_sweep("alpaca", args.seed)
    sweep = sweep_from_dict(sweep_dict)
    worker = ShardWorker(sweep.model_dump(), "alpaca", ALPACA_KNOBS)
    trainer = MetaTrainer(sweep, "alpaca", ALPACA_KNOBS, LocalFarm(worker))
    outcome = trainer.train(time_budget_s=args.minutes * 60)
    params, learner = outcome.params, trainer.learner
    print(f"budget {args.minutes:g} min on {torch.get_num_threads()} thread(s): ALPaCA "
          f"{outcome.evaluations[-1].iteration} meta-iterations ({outcome.tasks_per_second:.0f} "
          "tasks/s); 600 held-out tasks per K")
    print(f"{'model':<12}{'K':>3}{'MSE':>10}{'log-lik':>10}{'95% cover':>11}")
    for shots in (1, 5, 10):
        batch = worker.family.batch("val", args.seed, range(600), shots=shots)
        with torch.no_grad():
            mean, std = torch.vmap(lambda sx, sy, qx: learner.adapted_prediction(
                params, sx, sy, qx))(batch.support_x, batch.support_y, batch.query_x)
        mse = float(torch.nn.functional.mse_loss(mean, batch.query_y))
        scores = uncertainty_scores(mean, std, batch.query_y)
        print(f"{'alpaca':<12}{shots:>3}{mse:>10.3f}{scores['log_likelihood']:>10.3f}"
              f"{scores['coverage95']:>11.3f}")
        if shots == 5:
            alpaca_k5, coverage = mse, scores["coverage95"]
    versus = (f"MAML K=5 1-step {maml_k5:.3f}: {'met' if alpaca_k5 <= maml_k5 else 'NOT met'}"
              if maml_k5 is not None else "MAML not run (--only)")
    calibrated = "met" if 0.90 <= coverage <= 0.99 else "NOT met"
    print(f"target: ALPaCA K=5 MSE {alpaca_k5:.3f} <= {versus}; K=5 95% coverage "
          f"{coverage:.3f} in [0.90, 0.99]: {calibrated}")


if __name__ == "__main__":
    main()
