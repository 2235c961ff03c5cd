"""Models on imports other than their training data (``--data``, ``--convert``), and what a model
trained on several imports records.

Models are untrained (initial weights) Conv-4s with 8 filters saved as folders: an Omniglot
ProtoNet (28x28 grey, inverted strokes) and one for a small RGB 32x32 import built here with
``import_image_folder`` (normalised by its train split's mean and std). What is tested is which
images each model sees and what is recorded, not accuracy.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from orchestrator.compare_cli import compare
from orchestrator.config import sweep_from_dict
from orchestrator.factory import build_family, build_learner, task_shape
from orchestrator.inference import evaluate as evaluate_episodes, evaluation_family
from orchestrator.meta_model import MetaModel
from orchestrator.model_cli import evaluate
from orchestrator.sweep import data_mix_params
from pipelines.episodes import EpisodeFamily, MixedEpisodes, convert_pixels
from pipelines.importers import import_image_folder
from pipelines.preprocessing import make_preprocessing, normalise

TASKS = "4"


def save_model(folder: Path, data: dict) -> Path:
    sweep = {"name": "cross", "data": data, "model": {"backbone": "conv4", "filters": 8},
             "algorithms": {"protonet": {}}}
    config = sweep_from_dict(sweep)
    learner = build_learner(config.model, "protonet", {}, **task_shape(build_family(config.data)))
    return MetaModel.build(sweep, "protonet", {}, learner.init_params(0)).save(folder)


def image_tree(root: Path, *, classes: int, per_class: int, mode: str, size: int) -> Path:
    """Class folders of seeded random blobs: a colour (or grey level) and a square per class."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        colour = rng.integers(0, 256, 3 if mode == "RGB" else 1)
        for i in range(per_class):
            pixels = rng.integers(0, 40, (size, size, len(colour))).astype(np.uint8)
            corner = (c * 3) % (size - 8)
            pixels[corner:corner + 8, i % 8:i % 8 + 8] = colour
            target = root / f"class{c:02d}" / f"{i}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels if mode == "RGB" else pixels[..., 0]).save(target)
    return root


@pytest.fixture(scope="module")
def world(omniglot_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cross")
    rgb, grey = root / "rgb32", root / "grey28"
    import_image_folder(image_tree(root / "rgb-tree", classes=20, per_class=8, mode="RGB",
                                   size=32), rgb, size=32, val_ratio=0.3, test_ratio=0.3)
    import_image_folder(image_tree(root / "grey-tree", classes=20, per_class=8, mode="L",
                                   size=28), grey, size=28, grayscale=True, val_ratio=0.3,
                        test_ratio=0.3)
    setting = {"ways": 5, "shots": 1, "queries": 3}
    return {"omniglot": omniglot_dir, "rgb": rgb, "grey": grey,
            "omni_model": save_model(root / "omni", {"path": str(omniglot_dir), **setting}),
            "rgb_model": save_model(root / "rgbm", {"path": str(rgb), **setting}),
            "mix_model": save_model(root / "mix", {"path": [str(omniglot_dir), str(grey)],
                                                   "weights": [3, 1], **setting})}


def test_conversion_is_the_models_treatment_of_the_raw_images():
    grey = np.random.default_rng(1).integers(0, 256, (2, 1, 20, 20)).astype(np.uint8)
    inverted_grey = make_preprocessing(size=20, mode="L", invert=True)
    rgb = make_preprocessing(size=20, mode="RGB", invert=False)
    # Grey to RGB: the import's inversion undone, the channel repeated.
    as_rgb = convert_pixels(grey, inverted_grey, rgb)
    assert as_rgb.shape == (2, 3, 20, 20) and all(np.array_equal(c, 255 - grey[:, 0])
                                                  for c in as_rgb.transpose(1, 0, 2, 3))
    # RGB to grey: luminance (ITU-R 601-2), then the target's inversion and size.
    colour = np.random.default_rng(2).integers(0, 256, (1, 3, 20, 20)).astype(np.uint8)
    luminance = np.tensordot([0.299, 0.587, 0.114], colour[0].astype(float), axes=1)
    back = convert_pixels(colour, rgb, inverted_grey)
    assert np.abs(255 - back[0, 0].astype(float) - luminance).max() <= 1
    resized = convert_pixels(colour, rgb, make_preprocessing(size=12, mode="RGB", invert=False))
    expected = Image.fromarray(colour[0].transpose(1, 2, 0)).resize((12, 12),
                                                                    Image.Resampling.LANCZOS)
    assert np.array_equal(resized[0], np.asarray(expected).transpose(2, 0, 1))
    assert np.array_equal(convert_pixels(grey, rgb | {"mode": "L", "channels": 1}, rgb | {
        "mode": "L", "channels": 1}), grey)


def test_converted_episodes_are_the_same_images_normalised_as_the_model_does(world):
    target = MetaModel.load(world["rgb_model"]).spec["preprocessing"]
    plain = EpisodeFamily(world["omniglot"], ways=5, shots=1, queries=3)
    converted = EpisodeFamily(world["omniglot"], ways=5, shots=1, queries=3, convert_to=target)
    assert converted.converted and converted.input_shape() == (3, 32, 32)
    assert target["normalization"] != "none"  # the RGB import's own mean and std
    a, b = plain.task("test", 0, 4), converted.task("test", 0, 4)
    stored = np.rint(a.support_x.numpy() * 255).astype(np.uint8)  # Omniglot: no normalisation
    expected = normalise(convert_pixels(stored, plain.preprocessing(), target), target)
    assert torch.allclose(b.support_x, torch.from_numpy(expected))
    assert torch.equal(a.support_y, b.support_y)
    assert converted.fingerprint_spec()["converted_from"] == plain.preprocessing()


def one_line_failure(result, *expected: str) -> None:
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    for text in expected:
        assert text in result.output, result.output


def test_evaluate_on_another_import_converts_only_when_asked(world):
    model, rgb = str(world["omni_model"]), str(world["rgb"])
    refused = CliRunner().invoke(evaluate, ["--model", model, "--data", rgb, "--tasks", TASKS])
    one_line_failure(refused, f"{rgb} holds 3x32x32 (RGB) images but the model was trained on "
                              "1x28x28 (grey); pass --convert")
    done = CliRunner().invoke(evaluate, ["--model", model, "--data", rgb, "--convert", "--tasks",
                                         TASKS])
    assert done.exit_code == 0, done.output
    assert f"on test of {rgb} (converted to 1x28x28), 5way1shot, 4 tasks: accuracy" in done.output
    # The other way round: grey, inverted strokes to an RGB model's input.
    back = CliRunner().invoke(evaluate, ["--model", str(world["rgb_model"]), "--data",
                                         str(world["omniglot"]), "--convert", "--tasks", TASKS])
    assert back.exit_code == 0 and "(converted to 3x32x32)" in back.output, back.output


def test_compare_records_the_import_and_who_saw_it_converted(world, tmp_path):
    models, rgb = [str(world["omni_model"]), str(world["rgb_model"])], str(world["rgb"])

    def run(*args: str):
        return CliRunner().invoke(compare, [*models, "--data", rgb, "--tasks", TASKS, "--queries",
                                           "3", "--out", str(tmp_path / "out"), "--tracking-uri",
                                           f"sqlite:///{tmp_path}/runs/mlflow.db", *args])

    one_line_failure(run(), f"omni: {rgb} holds 3x32x32 (RGB) images but the model was trained "
                            "on 1x28x28 (grey)")
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()
    first = run("--convert", "--json")
    assert first.exit_code == 0, first.output
    table = json.loads(first.output)
    assert table["data"] == rgb
    assert {(r["model"], r["data"], r["converted"], r["cached"]) for r in table["rows"]} == {
        ("omni", rgb, True, False), ("rgbm", rgb, False, False)}
    assert any(note.startswith(f"omni saw the episodes of {rgb} converted to its input (28x28 L, "
                               "inverted) from 32x32 RGB") for note in table["notes"])
    markdown = (tmp_path / "out" / "compare.md").read_text()
    assert f"Episodes from: `{rgb}`" in markdown and "omni saw the episodes" in markdown
    with open(tmp_path / "out" / "compare.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["model"], r["data"], r["converted"]) for r in rows} == {
        ("omni", rgb, "True"), ("rgbm", rgb, "False")}
    again = json.loads(run("--convert", "--json").output)  # scored once: read from the cache
    assert [(r["cached"], r["mean"]) for r in again["rows"]] == \
        [(True, r["mean"]) for r in table["rows"]]


def test_a_mix_model_records_each_import_and_is_evaluated_on_them_in_turn(world):
    model = MetaModel.load(world["mix_model"])
    records = model.spec["data_sources"]
    assert [r["path"] for r in records] == [str(world["omniglot"]), str(world["grey"])]
    assert records[0]["preprocessing"] != records[1]["preprocessing"]  # inverted; normalised
    assert model.spec["preprocessing"] == records[0]["preprocessing"]  # for raw image files
    family = evaluation_family(model)
    assert isinstance(family, MixedEpisodes)
    assert [family.source_of("test", 0, i) for i in range(4)] == [0, 1, 0, 1]
    result = evaluate_episodes(model, family, tasks=4)
    assert result.data is None and not result.converted  # its own imports
    # Its second import alone is its own training data too: no conversion, no other import.
    second = evaluation_family(model, data=str(world["grey"]))
    assert not second.converted and evaluate_episodes(model, second, tasks=2).data is None
    # The mix and its record: the task fingerprint weighs [3, 1] as [0.75, 0.25].
    raw = {"name": "m", "algorithms": {"protonet": {}},
           "data": {"path": [str(world["omniglot"]), str(world["grey"])], "weights": [3, 1]}}
    same = {**raw, "data": {**raw["data"], "weights": [0.75, 0.25]}}
    assert sweep_from_dict(raw).task_fingerprint() == sweep_from_dict(same).task_fingerprint()
    assert data_mix_params(sweep_from_dict(raw)) == {
        "data_sources": f"{world['omniglot']} {world['grey']}", "data_weights": "0.75,0.25"}
