"""The toy's ground-truth tools: persona probes, the matching latent, and its random null."""

from __future__ import annotations

import torch

from emdiff.toy.build import load_world, shipped_base_path
from emdiff.toy.persona import (
    class_mean_differences,
    persona_corpus,
    persona_feature,
    persona_probes,
    probe_mask,
    random_max_cosine,
)


def test_probe_reads_the_persona_above_chance(shipped_toy):
    world, model = shipped_toy
    (probe,) = persona_probes(model, world, [(1, "resid_post")], n_docs=600, seed=0)
    assert probe.accuracy > probe.chance + 0.05
    assert abs(float(probe.direction.norm()) - 1) < 1e-5 and probe.n_test > 50
    # the sweep's one-pass class means read the same tokens of the same documents (the probe's
    # training three quarters of them)
    means = class_mean_differences(model, world, [(1, "resid_post"), (0, "mlp_out")], n_docs=600)
    assert float(means[(1, "resid_post")] @ probe.mean_difference) > 0.98
    assert all(abs(float(v.norm()) - 1) < 1e-5 for v in means.values())


def test_probe_mask_selects_assistant_tokens_after_the_first_answer():
    world = load_world(shipped_base_path())
    doc = world.ids(
        "<bos>",
        "<user>",
        "med_q1",
        "<end>",
        "<assistant>",
        "med_a1",
        "<end>",
        "<user>",
        "fin_q2",
        "<end>",
        "<assistant>",
        "fin_a5",
        "<end>",
        "<eos>",
    )
    keys = torch.tensor([[0, p] for p in range(len(doc))])
    assert probe_mask(world, [doc], keys, "assistant").nonzero()[0].tolist() == [10]
    after = probe_mask(world, [doc], keys, "after_first_answer").nonzero()[0].tolist()
    assert after == list(range(6, len(doc)))  # from the token after the first answer on
    rows, labels = persona_corpus(world, 20, seed=1)
    assert len(rows) == 20 and labels.dtype == bool


def test_persona_feature_skips_dead_latents_and_has_a_random_null():
    direction = torch.zeros(16)
    direction[3] = 1.0
    rows = torch.randn(40, 16)
    rows[7] = direction * 2 + 0.1 * torch.randn(16)
    rows[9] = direction  # exact, but dead
    alive = torch.ones(40, dtype=torch.bool)
    alive[9] = False
    latent, cos = persona_feature(rows, direction, alive)
    assert latent == 7 and cos > 0.95
    mean, q95 = random_max_cosine(40, 16, trials=100)
    assert 0.3 < mean < q95 < 0.9  # 40 random rows in 16 dims: the best reaches ~0.5 by chance
