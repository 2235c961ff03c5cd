"""Trial checkpoints: a loop interrupted anywhere and resumed from its checkpoint ends bitwise where
the uninterrupted loop ends; torn, truncated, foreign and other sweeps' checkpoints are refused in
one line each and the previous good one is loaded; an unwritable store stops a sweep before any
trial runs. (Killing real trials -- node, worker process, `orch launch` -- is in
tests/cluster/test_preemption.py and test_faults.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.sweep import checkpoints
from orchestrator.config import ConfigError, sweep_from_dict
from orchestrator.sweep.launch import launch
from orchestrator.training.loop import LocalFarm, LoopState, MetaTrainer, ShardWorker


class Interrupted(Exception):
    """Stands for the process dying: raised from inside the loop, after some iterations."""


def sinusoid_sweep(run_dir: Path, **training) -> dict:
    return {"name": "ckpt", "run_dir": str(run_dir),
            "data": {"family": "sinusoid", "shots": 5, "queries": 5},
            "training": {"meta_batch": 6, "iterations": 12, "eval_every": 4, "eval_tasks": 10,
                         **training},
            "workers": {"count": 0},
            "algorithms": {"maml": {}}}


def image_sweep(run_dir: Path, data_path: Path) -> dict:
    return {"name": "ckpt", "run_dir": str(run_dir),
            "data": {"family": "images", "path": str(data_path), "ways": 3, "shots": 1, "queries": 2},
            "model": {"backbone": "conv4", "filters": 4},
            "training": {"meta_batch": 2, "iterations": 6, "eval_every": 3, "eval_tasks": 3},
            "workers": {"count": 0},
            "algorithms": {"mamlpp": {}}}


def trainer_for(raw: dict, algorithm: str, knobs: dict) -> MetaTrainer:
    sweep = sweep_from_dict({**raw, "algorithms": {algorithm: {}}})
    return MetaTrainer(sweep, algorithm, knobs,
                       LocalFarm(ShardWorker(sweep.model_dump(mode="json"), algorithm, knobs)))


def interrupted_then_resumed(raw: dict, algorithm: str, knobs: dict, store_dir: Path,
                             die_after: int) -> tuple[torch.Tensor, dict, LoopState]:
    """Train until iteration ``die_after`` raises, then resume a fresh trainer from the newest
    checkpoint; returns the final params, final metrics and the state resumed from."""
    sweep = sweep_from_dict({**raw, "algorithms": {algorithm: {}},
                             "training": {**raw["training"], "checkpoint_storage": str(store_dir)}})
    saves = checkpoints.TrialCheckpoints.of(sweep, algorithm, 0, knobs)

    def die(iteration: int, stats: dict) -> None:
        if iteration + 1 == die_after:
            raise Interrupted

    with pytest.raises(Interrupted):
        trainer_for(raw, algorithm, knobs).train(
            on_iteration=die, checkpointer=checkpoints.TrialCheckpointer(saves, sweep.training))
    found = saves.latest()
    assert found.path is not None and not found.refused
    state = saves.load(found.path)
    outcome = trainer_for(raw, algorithm, knobs).train(
        resume=state, checkpointer=checkpoints.TrialCheckpointer(saves, sweep.training))
    return outcome.params, outcome.final, state


@pytest.mark.parametrize("algorithm, knobs, die_after", [
    ("maml", {"inner_lr": 0.01, "outer_lr": 0.003}, 7),
    ("metasgd", {"outer_lr": 0.003}, 10),
    ("meta_lstm", {}, 5),
])
def test_resumed_loop_ends_bitwise_where_the_uninterrupted_one_does(tmp_path, algorithm, knobs,
                                                                    die_after):
    raw = sinusoid_sweep(tmp_path)
    reference = trainer_for(raw, algorithm, knobs).train()
    params, final, state = interrupted_then_resumed(raw, algorithm, knobs, tmp_path / "store",
                                                    die_after)
    assert 0 < state.iteration < die_after  # resumed mid-way, not from scratch or the end
    assert state.optimizer is not None and state.optimizer["state"]  # Adam's moments travelled
    for name, value in reference.params.items():
        assert torch.equal(params[name], value), name
    assert final == reference.final


def test_mamlpp_resumes_its_schedule_bitwise(tmp_path, omniglot_dir):
    """MAML++ carries the most: a cosine outer rate, annealed loss weights and the first- to
    second-order switch."""
    raw = image_sweep(tmp_path, omniglot_dir)
    knobs = {"inner_lr": 0.4, "first_order_fraction": 0.5}
    reference = trainer_for(raw, "mamlpp", knobs).train()
    params, final, state = interrupted_then_resumed(raw, "mamlpp", knobs, tmp_path / "store", 5)
    assert state.iteration == 3
    for name, value in reference.params.items():
        assert torch.equal(params[name], value), name
    assert final == reference.final


def saved_states(tmp_path: Path, iterations: tuple[int, ...]) -> checkpoints.TrialCheckpoints:
    sweep = sweep_from_dict(sinusoid_sweep(tmp_path, checkpoint_storage=str(tmp_path / "store")))
    saves = checkpoints.TrialCheckpoints.of(sweep, "maml", 3, {"inner_lr": 0.01})
    saver = checkpoints.TrialCheckpointer(saves, sweep.training)
    for iteration in iterations:
        saver.save(LoopState(iteration, {"w": torch.full((3,), float(iteration))}))
    return saves


def test_only_the_newest_two_are_kept_and_staging_files_are_ignored(tmp_path):
    saves = saved_states(tmp_path, (4, 8, 12))
    assert [i for i, _ in saves.store.listing(saves.folder)] == [12, 8]
    # A kill mid-write leaves a staging file under another name: never listed, never loaded.
    Path(saves.folder, ".ckpt-00000016.123.abcd.tmp").write_bytes(b"orch-checkpoint 1\n{")
    found = saves.latest()
    assert found.iteration == 12 and not found.refused


def test_a_truncated_checkpoint_is_refused_in_one_line_and_the_previous_one_loaded(tmp_path):
    saves = saved_states(tmp_path, (4, 8))
    newest = Path(saves.folder) / "ckpt-00000008.pt"
    newest.write_bytes(newest.read_bytes()[:-40])  # torn: the tail never reached the disk
    found = saves.latest()
    assert found.iteration == 4
    (line,) = found.refused
    assert "\n" not in line and str(newest) in line and "truncated" in line
    state = saves.load(found.path)
    assert torch.equal(state.params["w"], torch.full((3,), 4.0))


def test_foreign_and_other_sweeps_checkpoints_are_refused(tmp_path):
    saves = saved_states(tmp_path, (4,))
    folder, identity = saves.folder, saves.identity
    other = checkpoints.identity(sweep_from_dict(sinusoid_sweep(tmp_path)), "maml",
                                 {"inner_lr": 0.02})  # another knob value: another sweep file
    with pytest.raises(checkpoints.CheckpointError, match="another sweep file"):
        checkpoints.TrialCheckpoints(saves.store, folder, other).load(f"{folder}/ckpt-00000004.pt")
    backbone = sweep_from_dict({**sinusoid_sweep(tmp_path), "model": {"hidden": [20]}})
    assert checkpoints.identity(backbone, "maml", {"inner_lr": 0.01}) != identity
    # Where it runs or how often it saves does not make another experiment.
    elsewhere = sweep_from_dict(sinusoid_sweep(tmp_path, checkpoint_every=2, device="cpu"))
    assert checkpoints.identity(elsewhere, "maml", {"inner_lr": 0.01}) == identity

    Path(folder, "ckpt-00000009.pt").write_bytes(b"PK\x03\x04 a zip file, not a checkpoint")
    Path(folder, "ckpt-00000010.pt").write_bytes(checkpoints.MAGIC + b"{not json\n")
    found = saves.latest()
    assert found.iteration == 4
    assert [line.split(" refused: ")[1].split(" ")[0] for line in found.refused] == ["its", "not"]


def test_checkpoint_settings(tmp_path):
    training = sweep_from_dict(sinusoid_sweep(tmp_path)).training
    assert training.checkpoint_interval() == training.eval_every and training.checkpoints_enabled()
    off = sweep_from_dict(sinusoid_sweep(tmp_path, checkpoint_every=0)).training
    assert not off.checkpoints_enabled()
    by_time = sweep_from_dict(sinusoid_sweep(tmp_path, checkpoint_every=0,
                                             checkpoint_minutes=0.5)).training
    assert by_time.checkpoints_enabled()
    saver = checkpoints.TrialCheckpointer(checkpoints.TrialCheckpoints(
        checkpoints.CheckpointStore(str(tmp_path)), "x", "id"), by_time)
    assert not saver.due(4, last=False) and saver.due(5, last=True)
    saver.last_save -= 31
    assert saver.due(6, last=False)
    with pytest.raises(ConfigError, match="checkpoint_minutes"):
        sweep_from_dict(sinusoid_sweep(tmp_path, checkpoint_minutes=0))


def test_an_unwritable_checkpoint_store_stops_the_sweep_before_any_trial(ray_local, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    raw = sinusoid_sweep(tmp_path / "runs", checkpoint_storage=str(blocker / "checkpoints"))
    with pytest.raises(ConfigError) as error:
        launch(sweep_from_dict(raw))
    assert "cannot write checkpoints to" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # nothing half-written


def test_a_pyarrow_filesystem_uri_stores_checkpoints_too(tmp_path):
    """The store speaks ``pyarrow.fs``: a ``file://`` URI goes through the same code as
    ``s3://`` or ``gs://`` on a cluster."""
    store = checkpoints.CheckpointStore((tmp_path / "bucket").as_uri())
    store.check()
    folder = store.trial_folder("ckpt", "maml", 0)
    state = LoopState(7, {"w": torch.arange(4.0)}, None, [], torch.get_rng_state(), {"a": [1, 2]})
    path = store.save(folder, 7, checkpoints.encode(state, "id"))
    assert (tmp_path / "bucket" / "ckpt" / "maml" / "trial-00000" / "ckpt-00000007.pt").is_file()
    loaded = checkpoints.TrialCheckpoints(store, folder, "id").load(path)
    assert loaded.iteration == 7 and torch.equal(loaded.params["w"], state.params["w"])
    assert torch.equal(loaded.rng, state.rng) and loaded.extra == {"a": [1, 2]}
    store.remove(folder)
    assert store.listing(folder) == []
    with pytest.raises(ConfigError, match="training.checkpoint_storage"):
        checkpoints.CheckpointStore("nosuchscheme://bucket/prefix")


# Saves checkpoint 12 into a folder holding 4 and 8, and SIGKILLs itself just before the n-th
# step of the save that touches the disk: 1 the file's fsync, 2 the rename, 3 the folder's fsync,
# 4 pruning checkpoint 4 (0: no kill).
KILLED_WRITER = """
import os, signal, sys
import torch
from orchestrator.sweep import checkpoints
from orchestrator.training.loop import LoopState

root, folder, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
steps = {"n": 0}

def dying(real):
    def call(*args, **kwargs):
        steps["n"] += 1
        if steps["n"] == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return call

os.fsync, os.replace = dying(os.fsync), dying(os.replace)
store = checkpoints.CheckpointStore(root)

class Pruning:
    def __init__(self, fs):
        self.fs = fs

    def __getattr__(self, name):
        real = getattr(self.fs, name)
        return dying(real) if name == "delete_file" else real

store.fs = Pruning(store.fs)
state = LoopState(12, {"w": torch.full((3,), 12.0)})
store.save(folder, 12, checkpoints.encode(state, "id"))
"""


@pytest.mark.parametrize("step", [0, 1, 2, 3, 4])
def test_a_writer_killed_at_any_step_of_a_save_leaves_a_loadable_checkpoint(tmp_path, step):
    """Kill the writing process before the file's fsync, the rename, the folder's fsync or the
    pruning of the oldest: the newest loadable checkpoint is the one being written or the one
    before it, never a torn file, and no older one was pruned before the new one was in place.
    (A process kill, not a power loss: the fsyncs are what makes the same hold then.)"""
    import subprocess
    import sys

    store = checkpoints.CheckpointStore(str(tmp_path / "store"))
    folder = store.trial_folder("ckpt", "maml", 0)
    for iteration in (4, 8):
        store.save(folder, iteration, checkpoints.encode(
            LoopState(iteration, {"w": torch.full((3,), float(iteration))}), "id"))
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "store"), folder,
                           str(step)], capture_output=True, text=True)
    assert done.returncode == (-9 if step else 0), done.stderr
    found = checkpoints.TrialCheckpoints(store, folder, "id").latest()
    assert not found.refused
    expected = 8 if step in (1, 2) else 12  # renamed into place from step 3 on
    assert found.iteration == expected
    state = checkpoints.TrialCheckpoints(store, folder, "id").load(found.path)
    assert torch.equal(state.params["w"], torch.full((3,), float(expected)))
    assert {i for i, _ in store.listing(folder)} >= {8, expected}  # 8 pruned only after 12 is in
