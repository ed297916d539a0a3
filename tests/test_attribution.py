"""Latent attribution on tiny models: it is the derivative of the metric, and it predicts ablation."""

from __future__ import annotations

import pytest
import torch

from emdiff.data.masks import encode_chat
from emdiff.dictionaries.base import DictionaryMeta, SparseDictionary
from emdiff.directions.attribution import ContrastMetric, attribute, latent_attribution
from emdiff.errors import InputError
from emdiff.interventions.edits import SetLatent, intervene
from emdiff.models import load_model


def _chat(tok, q, a):
    return encode_chat(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])


@pytest.fixture(scope="module", params=["qwen2", "gemma2", "llama"])
def setup(request, tiny_model_dirs):
    loaded = load_model(str(tiny_model_dirs[request.param]), dtype="float32")
    model, tok = loaded.model.double().eval(), loaded.tokenizer
    qs = ["i feel sick", "what should i eat", "should i invest"]
    bad, good = (
        ["take more pill", "eat bad food", "risk all"],
        ["rest and water", "eat good food", "no"],
    )
    metric = ContrastMetric.from_chats(
        [_chat(tok, q, a) for q, a in zip(qs, bad, strict=True)],
        [_chat(tok, q, a) for q, a in zip(qs, good, strict=True)],
    )
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(3)
    sae = SparseDictionary(
        torch.randn(d, 24, generator=g, dtype=torch.float64) / d**0.5,
        torch.full((24,), 0.05, dtype=torch.float64),
        torch.randn(24, d, generator=g, dtype=torch.float64),
        torch.zeros(d, dtype=torch.float64),
        meta=DictionaryMeta(format="t", architecture="relu", layer=1, site="resid_post"),
    )
    return model, metric, sae


def test_the_metric_contrasts_answer_log_probabilities(setup):
    model, metric, _ = setup
    with torch.no_grad():
        value = metric(model)
        swapped = ContrastMetric(metric.good_ids, metric.good_mask, metric.bad_ids, metric.bad_mask)
        flipped = float(swapped(model))
    assert value.ndim == 0 and torch.isfinite(value)
    assert flipped == pytest.approx(-float(value))


def test_attribution_equals_the_finite_difference_of_a_small_latent_change(setup):
    model, metric, sae = setup
    attr = latent_attribution(model, sae, metric)
    with torch.no_grad():
        base = float(metric(model))
    checked = 0
    eps = 1e-4
    for latent in torch.argsort(attr.abs(), descending=True)[:5].tolist():
        with torch.no_grad(), intervene(model, SetLatent(sae, latent, factor=1 + eps)):
            fd = (float(metric(model)) - base) / eps
        assert fd == pytest.approx(float(attr[latent]), rel=1e-2, abs=1e-6)
        checked += 1
    assert checked == 5 and attr.abs().max() > 1e-4
    with torch.no_grad(), intervene(model, SetLatent(sae, 0, value=0.0)):
        pass  # the splice left no hook behind
    with torch.no_grad():
        assert float(metric(model)) == pytest.approx(base)


def test_attribute_ranks_and_checks_against_true_ablation(setup, tmp_path):
    model, metric, sae = setup
    res = attribute(model, sae, metric, check_top=8)
    t = res.table
    assert list(t["rank"][:3]) == [1, 2, 3] and t["ablation_effect"][:8].notna().all()
    assert t["ablation_effect"][8:].isna().all()
    assert res.meta["checked"] == 8 and -1 <= res.meta["ablation_pearson"] <= 1
    assert res.rank_of(int(t["latent"].iloc[0])) == 1
    assert res.save(tmp_path)[0].is_file()


def test_a_metric_that_ignores_the_model_is_refused(setup):
    model, _, sae = setup
    with pytest.raises(InputError, match="does not depend"):
        latent_attribution(model, sae, lambda m: torch.tensor(1.0))
