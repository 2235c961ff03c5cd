"""Meta Networks: fast weights matter, example-level fast weights come from each example's own
gradient, layer augmentation, and learning Omniglot characters."""

from __future__ import annotations

from pathlib import Path

import torch

from learners.backbones import build_backbone, call
from learners.base import Objective
from learners.metanet import MetaNet
from learners.nets.metanet import augmented
from pipelines.episodes import EpisodeFamily

from meta_training import meta_train, trainable


def make(input_shape=(16,), *, backbone: str = "mlp", ways: int = 3, **knobs) -> MetaNet:
    net = build_backbone(backbone, input_shape, ways, hidden=(16, 16), filters=8)
    return MetaNet(net, Objective.for_task_kind("classification"), MetaNet.Hyperparameters(**knobs))


def task(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(6, 16, generator=generator), torch.tensor([0, 1, 2, 0, 1, 2]),
            torch.randn(4, 16, generator=generator))


def test_zeroing_the_fast_weights_changes_the_logits():
    learner = make()
    params = learner.init_params(0)
    support_x, support_y, query_x = task()
    adapted = learner.adapt(params, support_x, support_y)
    logits = learner.predict(params, adapted, query_x)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    for zeroed in (["memory"], [k for k in adapted if k.startswith("embed_fast.")]):
        changed = {k: torch.zeros_like(v) if k in zeroed else v for k, v in adapted.items()}
        assert (learner.predict(params, changed, query_x) - logits).abs().max() > 1e-4, zeroed
    # With no fast weights at all the base learner is the plain backbone with its slow weights.
    slow = learner.base(params)
    torch.testing.assert_close(augmented(learner.backbone, slow, None, query_x),
                               call(learner.backbone, slow, query_x))


def test_example_fast_weights_come_from_each_examples_own_gradient():
    learner = make()
    params = learner.init_params(0)
    support_x, support_y, _ = task()
    memory = learner.example_fast_weights(params, support_x, support_y)
    assert memory.shape[0] == 6
    for i in (0, 4):
        alone = learner.example_fast_weights(params, support_x[i:i + 1], support_y[i:i + 1])
        torch.testing.assert_close(memory[i], alone[0])
    assert not torch.allclose(memory[0], memory[1])


def test_learns_held_out_omniglot_alphabets(omniglot_dir: Path):
    """5-way 1-shot on the small Omniglot set (Conv-4 with 8 filters), scored on the test split's
    held-out alphabet (chance 0.2).

    Seeded trajectories differ between machines (oneDNN's kernels per instruction set), so the
    bound must hold for any seed. Measured here over seeds 0-15 (initial weights and training
    episodes): 0.43-0.60, median 0.53 (seed 0: 0.51). Hence the paper's meta_hidden 20, and 80
    steps of 2 tasks at rate 0.01: some seeds never leave the plateau of chance (0.19-0.23)
    with meta_hidden 10 (seeds 4 and 5 of 0-5, at rates 0.003, 0.006 and 0.01, and at 80 x 2),
    or with 40 steps of 4 tasks (1 or 2 seeds of 0-11 at rates 0.003 and 0.01). The old
    setting (meta_hidden 10, 40 x 4 at 0.003) scored 0.19-0.36 over seeds 0-5 here, and 0.261
    against its bound 0.3 on an AVX2 machine."""
    family = EpisodeFamily(omniglot_dir, ways=5, shots=1, queries=2)
    learner = make(family.input_shape(), backbone="conv4", ways=5, meta_hidden=20)
    params = meta_train(learner, family, trainable(learner), iterations=80, meta_batch=2,
                        lr=0.01)
    tests = 100
    accuracy = learner.batch_evaluate(params, family.batch("test", 1, range(tests)))["accuracy"]
    print(f"metanet 5-way 1-shot on held-out alphabets after 80 iterations: {accuracy / tests:.3f}")
    assert accuracy / tests > 0.35
