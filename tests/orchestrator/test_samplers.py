"""search.sampler: each name runs the Optuna sampler it says, on a real SQLite study, and a space
a sampler cannot search as asked is refused at load in one line."""

from __future__ import annotations

import itertools
import math

import optuna
import pytest

from orchestrator.services import study as studies
from orchestrator.config import ConfigError, sweep_from_dict

GRID_SPACE = {"inner_lr": {"choices": [0.1, 0.3]},
              "inner_steps": {"low": 1, "high": 3, "int": True},
              "outer_lr": {"low": 0.001, "high": 0.003, "step": 0.001}}


def sweep(tmp_path, sampler: str, trials: int, space: dict):
    return sweep_from_dict({"name": "samplers", "run_dir": str(tmp_path),
                            "search": {"sampler": sampler, "trials": trials},
                            "algorithms": {"maml": space}}, source="sweep.yaml")


def run_study(sweep, trials: int) -> list[dict]:
    """Ask and tell as the sweep driver does, one trial at a time, from the study's one sampler
    (orchestrator/sweep/launch.py, StudyRunner.launch_next: SweepStudy.ask)."""
    study = studies.SweepStudy(sweep, "maml", load_if_exists=False)
    space = sweep.space("maml")
    asked = []
    for _ in range(trials):
        trial, knobs = study.ask(space)
        asked.append(knobs)
        study.tell(trial, "complete", [(knobs["outer_lr"] - 0.002) ** 2 + knobs["inner_lr"]])
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
    from orchestrator.sweep.launch import launch

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
                                               ("random", optuna.samplers.RandomSampler),
                                               ("nsgaii", optuna.samplers.NSGAIISampler)])
def test_each_sampler_is_the_one_named(tmp_path, sampler, expected):
    space = {"inner_lr": {"low": 0.01, "high": 0.5, "log": True},
             "inner_steps": {"low": 1, "high": 5, "int": True}}
    sweep_ = sweep(tmp_path, sampler, 8, space)
    assert type(studies.make_sampler(sweep_.search, 0)) is expected
    # Eight trials: past the startup trials the model-based samplers propose from the told ones.
    for knobs in run_study(sweep_, 8):
        assert 0.01 <= knobs["inner_lr"] <= 0.5 and 1 <= knobs["inner_steps"] <= 5
        assert 0.0003 <= knobs["outer_lr"] <= 0.003
    resumed = studies.SweepStudy(sweep_, "maml", load_if_exists=True)
    assert type(resumed.study.sampler) is expected  # the study's one sampler


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


def test_four_trials_started_together_are_proposed_apart(tmp_path):
    """search.parallel 4 after 8 finished trials with one optimum: the driver asks 4 trials
    before any ends (StudyRunner.run), and TPE's constant liar counts each running one as worse
    than every finished one, so the 4 spread over the range instead of crowding the optimum --
    as Optuna's TPE without the liar does on the same seed and history (the control)."""
    sweep_ = sweep_from_dict({"name": "parallel", "run_dir": str(tmp_path),
                              "search": {"trials": 12, "parallel": 4},
                              "algorithms": {"maml": {"inner_lr": {"low": 0.001, "high": 1.0,
                                                                   "log": True},
                                                      "outer_lr": 0.001, "inner_steps": 1}}})
    space = sweep_.space("maml")

    def together(study: studies.SweepStudy) -> list[float]:
        for _ in range(8):  # past TPE's 5 startup trials: the model proposes from the history
            trial, knobs = study.ask(space)
            study.tell(trial, "complete", [(math.log10(knobs["inner_lr"]) + 2) ** 2])
        return [study.ask(space)[1]["inner_lr"] for _ in range(4)]

    asked = together(studies.SweepStudy(sweep_, "maml", load_if_exists=False))
    assert len(set(asked)) == 4
    decades = [math.log10(x) for x in asked]
    assert max(decades) - min(decades) > 0.5, asked

    control = studies.SweepStudy(sweep_.model_copy(update={"name": "control"}), "maml",
                                 load_if_exists=False)
    control.study.sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=5,
                                                       constant_liar=False)
    crowded = [math.log10(x) for x in together(control)]
    assert max(crowded) - min(crowded) < 0.3


def test_successive_halving_prunes_at_its_rungs(tmp_path):
    """search.pruner successive_halving with its knobs, asked as a trial's process asks
    (TrialReporter): before min_resource (10 iterations) no trial is pruned; at that rung a
    trial goes on only if it is in the better 1/reduction_factor (half) of the values reported
    there so far (Optuna's ASHA: the first one is promoted with nothing to compare)."""
    sweep_ = sweep_from_dict({"name": "asha", "run_dir": str(tmp_path),
                              "training": {"iterations": 40, "eval_every": 5},
                              "search": {"trials": 4, "pruner": {
                                  "name": "successive_halving", "min_resource": 10,
                                  "reduction_factor": 2}},
                              "algorithms": {"maml": {}}})
    assert isinstance(studies.make_pruner(sweep_.search), optuna.pruners.SuccessiveHalvingPruner)
    study = studies.SweepStudy(sweep_, "maml", load_if_exists=False)
    early, at_rung = [], []
    for value in (1.0, 2.0, 0.5, 3.0):  # val_loss, the same at iterations 5 and 10
        trial, _ = study.ask(sweep_.space("maml"))
        reporter = studies.TrialReporter(sweep_.storage_url(), study.name, trial.number,
                                         sweep_.search)
        early.append(reporter.report(value, 5))
        at_rung.append(reporter.report(value, 10))
    assert early == [False] * 4
    assert at_rung == [False, True, False, True]


def test_resume_with_other_objectives_is_refused(tmp_path):
    """A study made for val_loss cannot be resumed by a file asking for [val_loss, adapt_ms]:
    its trials' values would be one short."""
    base = {"name": "objectives", "run_dir": str(tmp_path), "algorithms": {"maml": {}}}
    first = sweep_from_dict(base)
    studies.SweepStudy(first, "maml", load_if_exists=False)
    studies.check_same_objectives(first.storage_url(), first)
    changed = sweep_from_dict({**base, "search": {"metric": ["val_loss", "adapt_ms"]}})
    with pytest.raises(ConfigError, match=r"^--resume: study objectives/maml searches val_loss "
                                          r"\(minimize\), but search.metric now asks for "
                                          r"val_loss \(minimize\), adapt_ms \(minimize\);"):
        studies.check_same_objectives(first.storage_url(), changed)
