"""The toy's causal ground truth on the shipped base: the cue direction is the cause where the
sweep says so, against random directions, and the artefacts say which point was chosen."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from emdiff.models import load_model
from emdiff.models.hooks import SITES
from emdiff.models.load import decoder_layers
from emdiff.toy.build import load_world, shipped_base_path
from emdiff.toy.causal import CauseConfig, bad_rate, cause_table, gt_row, sweep
from emdiff.toy.config import NARROW_LAYER
from emdiff.toy.organism import narrow_finetune


def world_layers(model) -> int:
    return len(decoder_layers(model))


@pytest.fixture(scope="module")
def cause():
    world = load_world(shipped_base_path())
    lm = load_model(str(shipped_base_path()), dtype="float32")
    narrow = narrow_finetune(world, copy.deepcopy(lm.model), lm.tokenizer).model
    return world, narrow, sweep(world, narrow, CauseConfig(probe_docs=400))


def test_sweep_covers_every_hook_point_with_random_controls(cause):
    world, narrow, res = cause
    t = res.table
    n_layers = world_layers(narrow)
    assert [(int(r.layer), r.site) for r in t.itertuples()] == [
        (layer, site) for layer in range(n_layers) for site in SITES
    ]
    unseen = [d for d in world.domains if d != world.cfg.narrow_domain]
    assert t.em_narrow.iloc[0] == pytest.approx(bad_rate(narrow, world, unseen))
    assert (t.em_narrow > 0.5).all() and (t.em_base < 0.02).all()
    # random directions do little anywhere (a 128-wide stream: one of 20 may brush the cause)
    assert (t.random_ablation_cut_max < 0.1).all() and (t.random_steer_em_max < 0.2).all()
    # before the LoRA's layer nothing has changed: no shift, nothing to cut
    assert (t[t.layer < NARROW_LAYER].cos_lora_shift == 0).all()


def test_the_chosen_point_is_causal_and_saved(cause, tmp_path):
    _, _, res = cause
    row = gt_row(res)
    # measured on the shipped toy: where the LoRA writes, the output of its layer
    assert (row["gt_layer"], row["gt_site"]) == (NARROW_LAYER, "resid_post")
    assert row["gt_cos_lora_shift"] > 0.9 and row["gt_cos_class_mean"] > 0.9
    assert row["gt_steer_fraction"] > 0.7 and row["gt_ablation_cut"] > 0.85
    assert row["gt_ablation_cut"] > 10 * row["gt_random_ablation_cut_max"]
    paths = res.save(tmp_path)
    assert json.loads(paths[1].read_text())["site"] == "resid_post"
    d = load_file(str(paths[2]))["direction"]
    assert torch.allclose(d.norm(), torch.tensor(1.0)) and torch.equal(d, res.direction())
    assert "*" in cause_table(res)
