"""Hooks on a model that accelerate has split over devices (``device_map``): the same captures,
edits and statistics as on the whole model.

Without several GPUs the split is over the CPU and disk offload: every offloaded layer then runs
under accelerate's hooks, which move its weights in before its forward and out after, the same
hooks that move activations between GPUs in a multi-GPU ``device_map``. A pass cut short at the
last hook point must leave the model usable for the next full pass.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_ARCHS
from transformers import AutoModelForCausalLM

from emdiff.data.masks import EncodedChat, TokenRole
from emdiff.data.positions import Positions
from emdiff.dictionaries.base import DictionaryMeta, Encoding, SparseDictionary
from emdiff.models.hooks import SITES, capture_residuals, residual_edit
from emdiff.models.read import ReadSpec
from emdiff.stats.collect import StatsConfig, collect_stats


def _split(path, offload) -> torch.nn.Module:
    """Even layers on the CPU, odd layers offloaded to disk; the rest on the CPU."""
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    n = plain.config.num_hidden_layers
    device_map = {name: "cpu" for name, _ in plain.model.named_children() if name != "layers"}
    device_map |= {f"model.{k}": v for k, v in device_map.items()}
    device_map = {k: v for k, v in device_map.items() if k.startswith("model.")}
    device_map |= {f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(n)}
    device_map["lm_head"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, device_map=device_map, offload_folder=str(offload)
    )
    assert getattr(model, "hf_device_map", None), "accelerate did not dispatch the model"
    return model.eval()


@pytest.fixture(scope="module", params=TINY_ARCHS)
def models(request, tiny_model_dirs, tmp_path_factory):
    path = tiny_model_dirs[request.param]
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return plain, _split(path, tmp_path_factory.mktemp("offload")), request.param


def _ids(model, n: int = 3, seq: int = 12) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(5, model.config.vocab_size, (n, seq), generator=gen)


def test_captures_at_every_site_equal_the_whole_model(models):
    plain, split, _ = models
    ids = _ids(plain)
    layers = list(range(plain.config.num_hidden_layers))
    want = capture_residuals(plain, ids, layers=layers, sites=SITES)
    got = capture_residuals(split, ids, layers=layers, sites=SITES)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=str(key))
    # a pass cut short inside an offloaded layer (its weights moved in, never moved out) leaves
    # the model as it was: the next full pass still matches
    assert split.hf_device_map["model.layers.1"] == "disk"
    cut = capture_residuals(split, ids, layers=[1], sites="mlp_out")[(1, "mlp_out")]
    torch.testing.assert_close(cut, want[(1, "mlp_out")], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(split(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("site", ["resid_post", "resid_mid", "mlp_out"])
def test_an_edit_changes_the_split_model_as_it_changes_the_whole_one(models, site):
    plain, split, _ = models
    ids = _ids(plain)
    layer = 1  # offloaded to disk
    v = torch.randn(plain.config.hidden_size, generator=torch.Generator().manual_seed(1))
    out = {}
    for name, model in (("plain", plain), ("split", split)):
        with torch.no_grad(), residual_edit(model, layer, site, lambda h, v=v: h + v.to(h)):
            out[name] = model(ids).logits
    torch.testing.assert_close(out["split"], out["plain"], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and the edit is gone after the block
        torch.testing.assert_close(split(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)


def test_statistics_equal_the_whole_model(models):
    plain, split, _ = models
    d, layer, width = plain.config.hidden_size, 1, 64
    gen = torch.Generator().manual_seed(2)
    sae = SparseDictionary(
        torch.randn(d, width, generator=gen) / d**0.5,
        torch.zeros(width),
        torch.randn(width, d, generator=gen) / d**0.5,
        torch.zeros(d),
        encoding=Encoding(activation="relu"),
        meta=DictionaryMeta(format="test", architecture="relu", layer=layer, site="resid_post"),
    )
    cut, seq = 4, 12
    roles = [int(TokenRole.USER)] * cut + [int(TokenRole.ASSISTANT)] * (seq - cut)
    rows = [EncodedChat(r.tolist(), roles) for r in _ids(plain, n=6, seq=seq)]
    read = ReadSpec(layers=(layer,), site="resid_post", positions=Positions())
    cfg = StatsConfig(batch_size=2)
    want = collect_stats(plain, rows, {layer: sae}, read, cfg)[0][layer]
    got = collect_stats(split, rows, {layer: sae}, read, cfg)[0][layer]
    assert got.n_tokens == want.n_tokens > 0
    assert torch.equal(got.fire, want.fire)
    torch.testing.assert_close(got.sum, want.sum, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.max, want.max, rtol=1e-5, atol=1e-5)
