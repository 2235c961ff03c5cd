"""Episodes from several imports (``data.path`` a list), and one import's episodes unchanged.

The second source is an import of coded images (see imagefiles.coded_image), so every image of
an episode says which class and file it is and the source of an episode can be read off it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.config import ConfigError, ImageData, sweep_from_dict
from orchestrator.training.factory import build_family
from orchestrator.sweep.launch import validate_data
from pipelines.episodes import EpisodeFamily, MixedEpisodes
from pipelines.importers import import_image_folder
from test_episodes import decode


def coded_import(coded_tree, tmp_path: Path, size: int, name: str) -> Path:
    out = tmp_path / name
    import_image_folder(coded_tree(size=size, name=f"{name}-tree"), out, size=size, grayscale=True,
                        normalize=False)
    return out


def test_one_import_draws_the_episodes_it_always_drew(coded_tree, tmp_path):
    """Seeded episodes are part of every result recorded so far: these are the (class, image,
    quarter turns) of two episodes as orch drew them before imports could be mixed."""
    family = EpisodeFamily(coded_import(coded_tree, tmp_path, 8, "coded"), ways=5, shots=1,
                           queries=2, rotate_splits=["train"])
    train = family.task("train", 0, 3)
    assert [decode(x) for x in train.support_x] == [(27, 14, 2), (11, 5, 2), (8, 0, 0),
                                                    (9, 1, 1), (2, 9, 0)]
    assert [decode(x) for x in train.query_x[::2]] == [(27, 8, 2), (11, 17, 2), (8, 8, 0),
                                                       (9, 19, 1), (2, 4, 0)]
    val = family.task("val", 0, 1)
    assert [decode(x) for x in val.support_x] == [(7, 5, 0), (20, 15, 0), (26, 6, 0), (14, 6, 0),
                                                  (29, 5, 0)]


def test_a_mix_takes_each_episode_whole_from_one_source(omniglot_dir, coded_tree, tmp_path):
    coded = coded_import(coded_tree, tmp_path, 28, "coded28")
    section = ImageData(path=[str(omniglot_dir), str(coded)], weights=[3, 1], ways=5, shots=1,
                        queries=2)
    mix = build_family(section)
    assert isinstance(mix, MixedEpisodes) and mix.input_shape() == (1, 28, 28)
    omniglot, codes = mix.sources()
    drawn = [mix.source_of("train", 0, i) for i in range(400)]
    assert 270 <= drawn.count(0) <= 330  # weights 3:1 -> 300 of 400 expected
    assert [mix.source_of("val", 0, i) for i in range(6)] == [0, 1, 0, 1, 0, 1]  # in turn
    for split, index in [("train", i) for i in range(8)] + [("val", 0), ("val", 1)]:
        task = mix.task(split, 0, index)
        source = mix.sources()[mix.source_of(split, 0, index)]
        own = source.task(split, 0, index)  # the source's own episode of that address
        assert torch.equal(task.support_x, own.support_x) and torch.equal(task.query_x, own.query_x)
        # Coded images have their corner at 255: every image of the episode is of one source.
        corners = torch.cat([task.support_x, task.query_x])[:, 0, -1, -1]
        assert bool((corners == 1).all()) == (source is codes)
    again = build_family(section)  # another process builds the same mix: the same episodes
    assert torch.equal(again.task("train", 5, 17).query_x, mix.task("train", 5, 17).query_x)
    spec = mix.fingerprint_spec()
    assert spec["weights"] == [0.75, 0.25] and len(spec["sources"]) == 2


def test_sources_of_another_image_shape_are_refused_in_one_line(omniglot_dir, coded_tree,
                                                                  tmp_path):
    small = coded_import(coded_tree, tmp_path, 8, "coded8")
    sweep = sweep_from_dict({"name": "mix", "algorithms": {"protonet": {}},
                             "data": {"path": [str(omniglot_dir), str(small)], "ways": 5}})
    with pytest.raises(ConfigError) as error:
        validate_data(sweep, "sweep.yaml")
    message = str(error.value)
    assert "\n" not in message and message.startswith("sweep.yaml: data: ")
    assert f"{small} holds 1x8x8 (grey) images but {omniglot_dir} holds 1x28x28 (grey)" in message
