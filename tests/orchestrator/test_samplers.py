"""search.sampler: each name runs the Optuna sampler it says, on a real SQLite study, and a space
a sampler cannot search as asked is refused at load in one line."""

from __future__ import annotations

import itertools

import optuna
import pytest

from orchestrator import study as studies
from orchestrator.config import ConfigError, sweep_from_dict

GRID_SPACE = {"inner_lr": {"choices": [0.1, 0.3]},
              "inner_steps": {"low": 1, "high": 3, "int": True},
              "outer_lr": {"low": 0.001, "high": 0.003, "step": 0.001}}


def sweep(tmp_path, sampler: str, trials: int, space: dict):
    return sweep_from_dict({"name": "samplers", "run_dir": str(tmp_path),
                            "search": {"sampler": sampler, "trials": trials},
                            "algorithms": {"maml": space}}, source="sweep.yaml")


def run_study(sweep, trials: int) -> list[dict]:
    """Ask and tell as the sweep driver does: a new sampler seeded by the trial's slot before
    each ask (orchestrator/sweep.py, StudyRunner.launch_next: SweepStudy.ask)."""
    study = studies.SweepStudy(sweep, "maml", load_if_exists=False)
    space = sweep.space("maml")
    asked = []
    for slot in range(trials):
        trial, knobs = study.ask(sweep.training.seed + slot, space)
        asked.append(knobs)
        study.tell(trial, "complete", (knobs["outer_lr"] - 0.002) ** 2 + knobs["inner_lr"])
    return asked


def test_grid_runs_every_combination_once(tmp_path):
    sweep_ = sweep(tmp_path, "grid", 18, GRID_SPACE)
    asked = run_study(sweep_, 18)
    seen = sorted((k["inner_lr"], k["inner_steps"], k["outer_lr"]) for k in asked)
    expected = sorted(itertools.product([0.1, 0.3], [1, 2, 3], [0.001, 0.002, 0.003]))
    assert seen == expected


def test_a_grid_sweep_runs_each_point_once(ray_local, tmp_path):
    """Through the sweep driver, two trials at a time; Optuna's own GridSampler would raise at
    the tell of the last point (it stops ``study.optimize``, which ask/tell is not in)."""
    from orchestrator.sweep import launch

    raw = {"name": "grid", "run_dir": str(tmp_path / "runs"),
           "data": {"family": "sinusoid", "shots": 5, "queries": 5},
           "training": {"meta_batch": 4, "iterations": 5, "eval_every": 5, "eval_tasks": 10},
           "workers": {"count": 0, "driver_cpus": 1},
           "search": {"sampler": "grid", "trials": 4, "parallel": 2, "pruner": "none"},
           "algorithms": {"maml": {"inner_lr": {"choices": [0.01, 0.05]},
                                   "outer_lr": {"low": 0.001, "high": 0.002, "step": 0.001}}}}
    (summary,) = launch(sweep_from_dict(raw))
    assert summary.counts["complete"] == 4
    trials = optuna.load_study(study_name="grid/maml",
                               storage=f"sqlite:///{tmp_path}/runs/optuna.db").trials
    assert sorted((t.params["inner_lr"], t.params["outer_lr"]) for t in trials) == [
        (0.01, 0.001), (0.01, 0.002), (0.05, 0.001), (0.05, 0.002)]


def test_grid_of_fewer_trials_draws_distinct_points(tmp_path):
    asked = run_study(sweep(tmp_path, "grid", 5, GRID_SPACE), 5)
    points = {(k["inner_lr"], k["inner_steps"], k["outer_lr"]) for k in asked}
    assert len(points) == 5


@pytest.mark.parametrize("sampler, expected", [("gp", optuna.samplers.GPSampler),
                                               ("cmaes", optuna.samplers.CmaEsSampler),
                                               ("tpe", optuna.samplers.TPESampler),
                                               ("random", optuna.samplers.RandomSampler)])
def test_each_sampler_is_the_one_named(tmp_path, sampler, expected):
    space = {"inner_lr": {"low": 0.01, "high": 0.5, "log": True},
             "inner_steps": {"low": 1, "high": 5, "int": True}}
    sweep_ = sweep(tmp_path, sampler, 8, space)
    assert type(studies.make_sampler(sweep_.search, 0)) is expected
    # Eight trials: past the startup trials the model-based samplers propose from the told ones.
    for knobs in run_study(sweep_, 8):
        assert 0.01 <= knobs["inner_lr"] <= 0.5 and 1 <= knobs["inner_steps"] <= 5
        assert 0.0003 <= knobs["outer_lr"] <= 0.003


@pytest.mark.parametrize("sampler, space, expected", [
    ("grid", {"inner_lr": {"low": 0.01, "high": 0.5, "log": True}},
     "algorithms.maml.inner_lr: search.sampler grid cannot enumerate a continuous range; "),
    ("grid", {"inner_lr": {"choices": [0.1]}},
     "algorithms.maml.outer_lr: search.sampler grid cannot enumerate a continuous range "
     "(from maml's default search space); "),
    ("grid", {"inner_lr": 0.1, "outer_lr": {"low": 0.001, "high": 0.002, "step": 0}},
     "algorithms.maml.outer_lr: step must be positive, got 0.0"),
    ("cmaes", {"inner_lr": {"choices": [0.1, 0.2]}},
     "algorithms.maml.inner_lr: search.sampler cmaes cannot search choices; "),
])
def test_a_space_the_sampler_cannot_search_is_refused(tmp_path, sampler, space, expected):
    with pytest.raises(ConfigError) as error:
        sweep(tmp_path, sampler, 4, space)
    message = str(error.value)
    assert message.startswith(f"sweep.yaml: {expected}") and "\n" not in message, message


def test_grid_refuses_more_trials_than_points(tmp_path):
    with pytest.raises(ConfigError, match=r"^sweep.yaml: search.trials: 19 trials exceed the 18 "
                                          r"points of maml's grid; set at most 18$"):
        sweep(tmp_path, "grid", 19, GRID_SPACE)
