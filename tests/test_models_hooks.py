"""Residual capture on decoder layers: agreement with HF hidden states, early stop, adapters."""

from __future__ import annotations

import pytest
import torch

from emdiff.data.masks import pad_batch
from emdiff.errors import InputError
from emdiff.models import adapter_disabled, decoder_layers, load_model
from emdiff.models.hooks import capture_residuals, hook_points, sink_mask

ROWS = [[5, 9, 12, 7, 30, 31, 8], [6, 11, 40]]  # different lengths: left padding is exercised


def _batch(side: str = "left"):
    return pad_batch(ROWS, 0, side=side)


@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "llama"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_capture_matches_hf_hidden_states(tiny_model_dirs, arch, side):
    model = load_model(str(tiny_model_dirs[arch]), dtype="float32").model
    ids, att = _batch(side)
    n = len(decoder_layers(model))
    got = capture_residuals(model, ids, att, layers=range(n), sites=("resid_pre", "resid_post"))
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states
    real = att.bool()
    for layer in range(n):
        torch.testing.assert_close(
            got[(layer, "resid_pre")][real], hs[layer][real], atol=1e-5, rtol=1e-5
        )
        if layer < n - 1:  # hidden_states[n] is after the final norm; the hook is not
            torch.testing.assert_close(
                got[(layer, "resid_post")][real], hs[layer + 1][real], atol=1e-5, rtol=1e-5
            )
    assert not torch.allclose(got[(n - 1, "resid_post")][real], hs[n][real], atol=1e-3)


def test_forward_stops_after_the_last_hook_point(tiny_model_dirs):
    model = load_model(str(tiny_model_dirs["qwen2"]), dtype="float32").model
    calls: list[str] = []
    for i, block in enumerate(decoder_layers(model)):
        block.register_forward_hook(lambda *a, i=i: calls.append(f"layer{i}"))
    model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head"))
    ids, att = _batch()
    capture_residuals(model, ids, att, layers=[1], sites="resid_post")
    assert calls == ["layer0", "layer1"]
    calls.clear()
    capture_residuals(model, ids, att, layers=[2], sites="resid_pre")  # block 2 itself never runs
    assert calls == ["layer0", "layer1"]
    calls.clear()
    capture_residuals(model, ids, att, layers=[1], stop_early=False)
    assert calls[-1] == "lm_head"
    # hooks are removed afterwards: a plain forward runs as usual
    calls.clear()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=att)
    assert calls == ["layer0", "layer1", "layer2", "layer3", "lm_head"]


def test_adapter_on_and_off(tiny_model_dirs, make_lora_adapter, tmp_path):
    base_dir = tiny_model_dirs["llama"]
    adapter = make_lora_adapter(
        base_dir, tmp_path / "lora", target_modules=("down_proj",), layers=[0]
    )
    tuned = load_model(str(base_dir), adapter=adapter, dtype="float32").model
    base = load_model(str(base_dir), dtype="float32").model
    ids, att = _batch()
    on = capture_residuals(tuned, ids, att, layers=[0, 1], sites=("resid_pre", "resid_post"))
    with adapter_disabled(tuned):
        off = capture_residuals(tuned, ids, att, layers=[0, 1], sites=("resid_pre", "resid_post"))
    ref = capture_residuals(base, ids, att, layers=[0, 1], sites=("resid_pre", "resid_post"))
    for key in ref:
        torch.testing.assert_close(off[key], ref[key])
    torch.testing.assert_close(on[(0, "resid_pre")], ref[(0, "resid_pre")])  # before the LoRA
    assert not torch.allclose(on[(0, "resid_post")], ref[(0, "resid_post")])  # after it


def test_bf16_and_mistral_style_model():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(cfg).eval()
    ids, att = _batch()
    got32 = capture_residuals(model, ids, att, layers=[1])[(1, "resid_post")]
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states
    torch.testing.assert_close(got32[att.bool()], hs[2][att.bool()], atol=1e-5, rtol=1e-5)
    got16 = capture_residuals(model.to(torch.bfloat16), ids, att, layers=[1])[(1, "resid_post")]
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16.float()[att.bool()], got32[att.bool()], atol=0.1, rtol=0.05)


def test_bad_hook_points_are_clear_errors(tiny_model_dirs):
    model = load_model(str(tiny_model_dirs["llama"]), dtype="float32").model
    with pytest.raises(IndexError, match=r"valid layers are 0\.\.1"):
        hook_points(model, [5])
    with pytest.raises(InputError, match="unknown hook site 'mlp_in'; use one of resid_pre, "):
        hook_points(model, [0], "mlp_in")
    assert hook_points(model, [1, 0, -1], ("resid_post", "resid_pre")) == [
        (0, "resid_pre"),
        (0, "resid_post"),
        (1, "resid_pre"),
        (1, "resid_post"),
    ]


def test_sink_mask_flags_outlier_norms():
    hidden = torch.ones(2, 5, 8)
    hidden[0, 0] *= 50  # a BOS-like sink
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, :2] = False
    mask = sink_mask(hidden, keep)
    assert mask.sum() == 1 and mask[0, 0]
