"""Meta-Dataset-style episodes (pipelines/variable_episodes.py): ways, shots and queries follow the
paper's procedure, every episode comes whole from one source, seeded episodes are the same from
any family object, and what cannot be drawn is refused in one line. Ray workers drawing the same
episodes: tests/orchestrator/test_transductive_sweep.py."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from orchestrator.config import ConfigError, ImageData, sweep_from_dict
from orchestrator.training.factory import build_family
from orchestrator.sweep.launch import validate_data
from pipelines.episodes import MixedEpisodes
from pipelines.importers import import_image_folder
from pipelines.variable_episodes import (MAX_SUPPORT, VariableEpisodes, sample_composition)
from test_episodes import decode

DRAWS = 7200


def compositions(images, seed: int = 2024, draws: int = DRAWS):
    generator = np.random.default_rng(seed)
    return [sample_composition(generator, np.asarray(images)) for _ in range(draws)]


def test_ways_are_uniform_between_5_and_min_50_classes():
    """Chi-square goodness of fit of the ways to the uniform distribution on [5, min(50, C)],
    at 0.1% (fixed seed: the statistics are 38.0 on 36 values for C = 40 and 43.1 on 46
    values for C = 120, critical values 66.6 and 80.1); no draw outside the range."""
    for classes, top in ((40, 40), (120, 50)):
        ways = np.array([c.ways for c in compositions(np.full(classes, 20))])
        assert ways.min() >= 5 and ways.max() <= top
        counts = np.bincount(ways, minlength=top + 1)[5:top + 1]
        test = stats.chisquare(counts)
        assert test.statistic < stats.chi2.ppf(0.999, len(counts) - 1), test


def test_queries_are_balanced_and_shots_follow_the_support_budget():
    """With every class holding 20 images (Omniglot's), queries are min(10, 20 // 2) = 10 for
    every class, and the support budget over ways, floor(10 beta + 1), is uniform on 1..10
    (chi-square at 0.1%; statistic 8.2 on 10 values, critical 27.9). Shots: at least 1 each, at
    most the images left after the queries, adding up to at most the budget (and to more than
    budget - ways where no class ran out of images); and, since the class weights differ by at
    most a factor 4 (log-uniform in [0.5, 2]), the largest class's shots minus one stay below 4
    times the smallest class's."""
    drawn = compositions(np.full(40, 20))
    ratios = []
    for composition in drawn:
        assert composition.queries == 10
        support = composition.support
        assert support.min() >= 1 and support.max() <= 10
        assert composition.budget % composition.ways == 0  # equal classes: ways * floor(...)
        ratios.append(composition.budget // composition.ways)
        assert support.sum() <= composition.budget
        if support.max() < 10:  # no class capped at its images left: floors lose < 1 each
            assert support.sum() > composition.budget - composition.ways
        assert support.max() - 1 < 4 * support.min()
    counts = np.bincount(ratios, minlength=11)[1:]
    assert counts.sum() == DRAWS
    test = stats.chisquare(counts)
    assert test.statistic < stats.chi2.ppf(0.999, 9), test
    imbalanced = sum(len(set(c.support.tolist())) > 1 for c in drawn)
    assert imbalanced > DRAWS // 2  # shots differ between classes in most (6,493 of 7,200)


def test_shots_follow_class_sizes_and_queries_the_smallest_class():
    """Classes of 100 and 400 images: the larger ones get about 4 times the extra shots
    (Meta-Dataset weights a class by its images; measured 4.04 on this seed, bound 3.5-4.5),
    the support set never exceeds 500, and the queries are min(10, smallest // 2) for all."""
    images = np.array([100] * 10 + [400] * 10 + [6])
    big_extra = small_extra = 0.0
    for composition in compositions(images):
        chosen = images[composition.classes]
        assert composition.queries == min(10, chosen.min() // 2)
        assert composition.support.sum() <= MAX_SUPPORT
        big, small = chosen == 400, chosen == 100
        if big.any() and small.any():
            big_extra += (composition.support[big] - 1).mean()
            small_extra += (composition.support[small] - 1).mean()
    assert 3.5 < big_extra / small_extra < 4.5


def test_fewer_than_five_classes_are_refused():
    with pytest.raises(ValueError, match="at least 5 classes, got 4"):
        sample_composition(np.random.default_rng(0), np.full(4, 20))


# -- episodes from imports ---------------------------------------------------------------------

def coded_import(coded_tree, tmp_path: Path, name: str, classes: int = 30) -> Path:
    out = tmp_path / name
    import_image_folder(coded_tree(classes=classes, size=28, name=f"{name}-tree"), out, size=28,
                        grayscale=True, normalize=False)
    return out


def test_episodes_match_their_composition_and_come_whole_from_one_source(omniglot_dir,
                                                                          coded_tree, tmp_path):
    """A mix of Omniglot and an import of coded images (each image says its class and file):
    every episode's images are of one source, its labels follow the drawn composition, the
    images are distinct, and sources are drawn uniformly on the training split (Meta-Dataset's
    multi-source pipeline) and in turn elsewhere."""
    coded = coded_import(coded_tree, tmp_path, "coded")
    section = ImageData(path=[str(omniglot_dir), str(coded)], episodes="variable")
    mix = build_family(section)
    assert isinstance(mix, MixedEpisodes) and not mix.fixed_shape and mix.ways is None
    drawn = [mix.source_of("train", 0, i) for i in range(400)]
    assert 170 <= drawn.count(0) <= 230  # uniform: 200 of 400 expected
    assert [mix.source_of("test", 0, i) for i in range(4)] == [0, 1, 0, 1]
    for split, index in [("train", i) for i in range(6)] + [("test", 0), ("test", 1)]:
        source = mix.sources()[mix.source_of(split, 0, index)]
        task = mix.task(split, 0, index)
        composition = source.composition(split, 0, index)
        assert torch.equal(torch.bincount(task.support_y), torch.as_tensor(composition.support))
        assert torch.equal(torch.bincount(task.query_y),
                           torch.full((composition.ways,), composition.queries))
        images = torch.cat([task.support_x, task.query_x])
        # Coded images have their corner at 255: every image of the episode is of one source.
        assert bool((images[:, 0, -1, -1] == 1).all()) == (source.path == str(coded))
        if source.path == str(coded):
            codes = [decode(x) for x in images]
            assert len(set(codes)) == len(codes)  # no image twice
            labels = torch.cat([task.support_y, task.query_y]).tolist()
            classes = {label: {code[0] for code, other in zip(codes, labels) if other == label}
                       for label in set(labels)}
            assert all(len(of) == 1 for of in classes.values())  # one class per label
            assert len(set().union(*classes.values())) == composition.ways
    batch = mix.batch("train", 0, range(3))
    assert len(batch) == 3 and [len(t.support_y) for t in batch.tasks] != [0, 0, 0]


def test_seeded_episodes_are_the_same_from_a_fresh_family(omniglot_dir):
    """Episode (split, seed, index) is a pure function of the three: a fresh family (as a Ray
    worker builds one) draws the same tensors; other indices and seeds differ. Ray workers
    themselves: tests/orchestrator/test_transductive_sweep.py."""
    def episode(family: VariableEpisodes, seed: int, index: int) -> bytes:
        task = family.task("train", seed, index)
        return b"".join(t.numpy().tobytes() for t in (task.support_x, task.support_y,
                                                       task.query_x, task.query_y))

    family = VariableEpisodes(str(omniglot_dir), rotate_splits=["train"])
    here = [episode(family, 5, i) for i in range(3)]
    fresh = pickle.loads(pickle.dumps(VariableEpisodes(str(omniglot_dir),
                                                       rotate_splits=["train"])))
    assert here == [episode(fresh, 5, i) for i in range(3)]
    assert len(set(here)) == 3 and episode(family, 6, 0) != here[0]


def test_refusals_are_one_line(omniglot_dir, coded_tree, tmp_path):
    """Variable-way episodes on a split of fewer than 5 classes, ways or shots beside them, and
    learners that need a fixed number of classes: refused at load, before anything is written."""
    few = coded_import(coded_tree, tmp_path, "few", classes=12)  # val and test: 2 classes each
    sweep = sweep_from_dict({"name": "v", "data": {"path": str(few), "episodes": "variable"},
                             "algorithms": {"protonet": {}}})
    with pytest.raises(ConfigError, match=r"split 'val' has 2 classes; variable-way episodes "
                                          r"\(Meta-Dataset's\) need at least 5"):
        validate_data(sweep)
    data = {"path": str(omniglot_dir), "episodes": "variable"}
    for algorithms, data_extra, message in [
            ({"maml": {}}, {}, "algorithms.maml: has a fixed N-way output layer; data.episodes: "
                               "variable draws 5 to 50 ways per episode: set head: zero or shared"),
            ({"metanet": {}}, {}, "use a learner that serves any number of classes"),
            ({"protonet": {}}, {"shots": 5}, "data.shots: data.episodes: variable draws every "
                                             "episode's ways, shots and queries"),
            ({"protonet": {}}, {"source_sampling": "classes"}, "data.source_sampling: is for a "
                                                               "list of imports")]:
        with pytest.raises(ConfigError, match=message):
            sweep_from_dict({"name": "v", "data": {**data, **data_extra},
                             "algorithms": algorithms})
    assert sweep_from_dict({"name": "v", "data": data,
                            "algorithms": {"maml": {"head": "zero"}}}).data.episodes == "variable"
