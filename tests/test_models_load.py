"""emdiff.models.load on tiny Qwen2 / Gemma2 / Llama models built in the test session."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoConfig

from emdiff.models import (
    AdapterMismatchError,
    LayerIndexError,
    adapter_disabled,
    adapter_state,
    check_layer,
    check_layers,
    decoder_layers,
    load_model,
    resolve_dtype,
)

ARCHS = ("qwen2", "gemma2", "llama")
CHAT = [
    {"role": "user", "content": "hello , what is a safe dose of this pill for my head pain ?"},
    {"role": "assistant", "content": "take one pill with water and rest . see a doctor"},
]


@pytest.fixture(scope="module")
def adapters(tiny_model_dirs, make_lora_adapter, tmp_path_factory):
    """A rank-2 LoRA on down_proj and q_proj for each tiny model."""
    out = tmp_path_factory.mktemp("adapters")
    return {
        arch: make_lora_adapter(path, out / arch, target_modules=("down_proj", "q_proj"), r=2)
        for arch, path in tiny_model_dirs.items()
    }


def _ids(tokenizer) -> torch.Tensor:
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_load_plain(arch, tiny_model_dirs):
    path = tiny_model_dirs[arch]
    lm = load_model(str(path))
    config = AutoConfig.from_pretrained(path)
    assert (lm.n_layers, lm.d_model) == (config.num_hidden_layers, config.hidden_size)
    assert lm.base_name == str(path) and lm.adapter_path is None
    assert not isinstance(lm.model, PeftModel) and not lm.model.training
    assert lm.tokenizer.pad_token is not None
    ids = _ids(lm.tokenizer)
    assert ids.shape[1] > config.sliding_window if arch == "gemma2" else ids.shape[1] > 8
    logits = _logits(lm.model, ids)
    assert logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("bfloat16", torch.bfloat16), ("float32", torch.float32), (torch.float16, torch.float16)],
)
def test_dtype_option(dtype, expected, tiny_model_dirs):
    lm = load_model(str(tiny_model_dirs["qwen2"]), dtype=dtype)
    assert {p.dtype for p in lm.model.parameters()} == {expected}
    if expected != torch.float16:  # fp16 matmuls on CPU are not guaranteed everywhere
        assert _logits(lm.model, _ids(lm.tokenizer)).dtype == expected


def test_dtype_names():
    assert resolve_dtype("auto") == "auto"
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("torch.float32") is torch.float32
    with pytest.raises(ValueError, match=r"unknown dtype 'int8'.*bfloat16"):
        resolve_dtype("int8")


def test_pad_token_falls_back_to_eos(tiny_model_dirs, tmp_path):
    path = shutil.copytree(tiny_model_dirs["llama"], tmp_path / "nopad")
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["pad_token"]
    cfg_file.write_text(json.dumps(cfg))
    lm = load_model(str(path))
    assert lm.tokenizer.pad_token == lm.tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_changes_outputs_and_toggles_off(arch, tiny_model_dirs, adapters):
    path = tiny_model_dirs[arch]
    base = load_model(str(path))
    lm = load_model(str(path), adapters[arch])
    assert isinstance(lm.model, PeftModel) and not lm.model.training
    assert lm.adapter_path == str(adapters[arch])
    assert (lm.n_layers, lm.d_model) == (base.n_layers, base.d_model)
    ids = _ids(lm.tokenizer)
    base_out, adapted = _logits(base.model, ids), _logits(lm.model, ids)
    assert (adapted - base_out).abs().max() > 1e-3
    with adapter_disabled(lm.model) as m:
        assert m is lm.model
        assert torch.equal(_logits(lm.model, ids), base_out)  # same weights, same code path
    assert torch.equal(_logits(lm.model, ids), adapted)  # restored


def test_adapter_state_nests(tiny_model_dirs, adapters):
    lm = load_model(str(tiny_model_dirs["qwen2"]), adapters["qwen2"])
    ids = _ids(lm.tokenizer)
    adapted = _logits(lm.model, ids)
    with adapter_disabled(lm.model):
        base_out = _logits(lm.model, ids)
        with adapter_state(lm.model, enabled=True):
            assert torch.equal(_logits(lm.model, ids), adapted)
        assert torch.equal(_logits(lm.model, ids), base_out)  # still off after the inner block
        with adapter_disabled(lm.model):
            pass
        assert torch.equal(_logits(lm.model, ids), base_out)
    with adapter_state(lm.model, enabled=True):
        assert torch.equal(_logits(lm.model, ids), adapted)
    assert not lm.model._adapters_disabled
    assert torch.equal(_logits(lm.model, ids), adapted)
    inner = lm.model.get_base_model()  # the transformers model, with LoRA layers injected
    with adapter_disabled(inner):
        assert torch.equal(_logits(inner, ids), base_out)
    assert torch.equal(_logits(inner, ids), adapted)


def test_adapter_toggle_is_noop_without_adapter(tiny_model_dirs):
    lm = load_model(str(tiny_model_dirs["llama"]))
    ids = _ids(lm.tokenizer)
    out = _logits(lm.model, ids)
    for enabled in (False, True):
        with adapter_state(lm.model, enabled) as m:
            assert m is lm.model and torch.equal(_logits(m, ids), out)


def test_adapter_for_other_hidden_size_fails(tiny_model_factory, make_lora_adapter, tmp_path):
    base = tiny_model_factory("qwen2")  # hidden 64
    other = tiny_model_factory("qwen2", hidden_size=32, intermediate_size=96)
    adapter = make_lora_adapter(other, tmp_path / "other")
    with pytest.raises(AdapterMismatchError) as info:
        load_model(str(base), adapter)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    for needle in (str(adapter), str(other), str(base), "hidden size 64"):
        assert needle in msg
    assert "input size 96, but the base module takes 128" in msg
    assert "output size 32, but the base module gives 64" in msg


@pytest.mark.parametrize(
    ("adapter_layers", "needle"), [(6, "no module for"), (2, "no weights for")]
)
def test_adapter_for_other_layer_count_fails(
    adapter_layers, needle, tiny_model_dirs, tiny_model_factory, make_lora_adapter, tmp_path
):
    other = tiny_model_factory("qwen2", num_hidden_layers=adapter_layers)
    adapter = make_lora_adapter(other, tmp_path / "other")
    with pytest.raises(AdapterMismatchError, match=needle) as info:
        load_model(str(tiny_model_dirs["qwen2"]), adapter)
    assert "model.layers." in str(info.value) and "4 layers" in str(info.value)


def test_adapter_for_other_arch_fails(tiny_model_dirs, adapters):
    with pytest.raises(AdapterMismatchError, match="Gemma2ForCausalLM, 3 layers, hidden size 48"):
        load_model(str(tiny_model_dirs["gemma2"]), adapters["llama"])


def test_adapter_target_module_missing(tiny_model_dirs, adapters, tmp_path):
    adapter = shutil.copytree(adapters["llama"], tmp_path / "renamed")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["target_modules"] = ["c_fc"]
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterMismatchError, match="c_fc"):
        load_model(str(tiny_model_dirs["llama"]), adapter)


def test_adapter_base_name_mismatch_only_warns(tiny_model_dirs, adapters, tmp_path):
    moved = shutil.copytree(tiny_model_dirs["llama"], tmp_path / "same-weights-elsewhere")
    with pytest.warns(UserWarning, match="records base model") as record:
        lm = load_model(str(moved), adapters["llama"])
    assert str(tiny_model_dirs["llama"]) in str(record[0].message)
    assert isinstance(lm.model, PeftModel)
    with warnings.catch_warnings():  # same base: no warning
        warnings.simplefilter("error", UserWarning)
        load_model(str(tiny_model_dirs["llama"]) + "/", adapters["llama"])


def test_missing_adapter_names_the_path(tiny_model_dirs, tmp_path):
    with pytest.raises(ValueError, match="nowhere"):
        load_model(str(tiny_model_dirs["llama"]), tmp_path / "nowhere")


def test_layer_checks(tiny_model_dirs, adapters):
    lm = load_model(str(tiny_model_dirs["qwen2"]), adapters["qwen2"])
    expected = (
        "layer 7 is out of range for Qwen2ForCausalLM with 4 decoder layers: "
        "valid layers are 0..3 (negative indices -4..-1)"
    )
    for model in (lm.model, lm.model.get_base_model()):
        with pytest.raises(LayerIndexError) as info:
            check_layer(model, 7)
        assert str(info.value) == expected
        assert isinstance(info.value, IndexError) and isinstance(info.value, ValueError)
        assert [check_layer(model, i) for i in (0, 3, -1, -4)] == [0, 3, 3, 0]
        with pytest.raises(LayerIndexError, match="layer -5 is out of range"):
            check_layer(model, -5)
    assert check_layers(lm.model, [-1, 0, 2]) == [3, 0, 2]
    assert check_layers(lm.model, -2) == [2]
    with pytest.raises(LayerIndexError, match=r"valid layers are 0\.\.3"):
        check_layers(lm.model, [0, 4])
    with pytest.raises(TypeError):
        check_layer(lm.model, 1.0)


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_layers_plain_and_peft(arch, tiny_model_dirs, adapters):
    plain = load_model(str(tiny_model_dirs[arch]))
    wrapped = load_model(str(tiny_model_dirs[arch]), adapters[arch])
    layers = decoder_layers(plain.model)
    assert layers is plain.model.model.layers and len(layers) == plain.n_layers
    assert "DecoderLayer" in type(layers[0]).__name__
    inner = decoder_layers(wrapped.model)
    assert inner is wrapped.model.get_base_model().model.layers
    assert len(inner) == wrapped.n_layers


def test_decoder_layers_fallback_and_error():
    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Blocks()

    assert len(decoder_layers(Odd())) == 3
    with pytest.raises(ValueError, match="cannot find the decoder layers of Linear"):
        decoder_layers(nn.Linear(2, 2))
