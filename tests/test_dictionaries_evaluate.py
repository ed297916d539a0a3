"""Capture for training (NaN, widths, pairs), residual edits, and spliced-reconstruction metrics."""

from __future__ import annotations

import pytest
import torch

from emdiff.data.masks import encode_chat
from emdiff.data.positions import Positions
from emdiff.dictionaries.activations import (
    ModelSource,
    NonFiniteActivationError,
    collect_activations,
    iter_batches,
)
from emdiff.dictionaries.evaluate import reconstruction_metrics
from emdiff.errors import InputError
from emdiff.models import load_model
from emdiff.models.hooks import capture_residuals, residual_edit
from emdiff.models.read import ReadSpec

CHATS = [
    [
        {"role": "user", "content": "i feel sick"},
        {"role": "assistant", "content": "drink water and rest"},
    ],
    [
        {"role": "user", "content": "how do i make money"},
        {"role": "assistant", "content": "invest in stock"},
    ],
    [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there, how can i help you today"},
    ],
]


class Identity(torch.nn.Module):
    """A perfect 'dictionary': every coordinate is a latent."""

    def encode(self, x):
        return x.abs()

    def forward(self, x):
        return x


class Mean(torch.nn.Module):
    """Reconstructs every vector as one constant."""

    def __init__(self, mean):
        super().__init__()
        self.mean = mean

    def encode(self, x):
        return torch.zeros(*x.shape[:-1], 3)

    def forward(self, x):
        return self.mean.expand_as(x)


def at(layer: int, site: str = "resid_post", positions: str = "answer,sinks") -> ReadSpec:
    return ReadSpec(layers=(layer,), site=site, positions=Positions.parse(positions))


@pytest.fixture(scope="module")
def qwen(tiny_model_dirs):
    lm = load_model(str(tiny_model_dirs["qwen2"]), dtype="float32")
    return lm.model, [encode_chat(lm.tokenizer, c) for c in CHATS]


def test_collect_matches_capture_and_keys_point_at_answer_tokens(qwen):
    model, rows = qwen
    acts, keys = collect_activations(model, rows, at(1), batch_size=2)
    ids = torch.tensor(rows[2].input_ids)[None]
    full = capture_residuals(model, ids, layers=1)[(1, "resid_post")][0]
    mine = keys[:, 0] == 2
    assert torch.allclose(acts[mine], full[keys[mine, 1]], atol=1e-5)
    assert all(rows[s].roles[p] == 3 for s, p in keys.tolist())  # answer tokens only


def test_paired_activations_toggle_the_adapter(tiny_model_dirs, make_lora_adapter, tmp_path):
    adapter = make_lora_adapter(tiny_model_dirs["qwen2"], tmp_path / "lora")
    lm = load_model(str(tiny_model_dirs["qwen2"]), adapter=str(adapter), dtype="float32")
    rows = [encode_chat(lm.tokenizer, c) for c in CHATS]
    pairs, _ = collect_activations(lm.model, rows, at(1), other="adapter")
    base = load_model(str(tiny_model_dirs["qwen2"]), dtype="float32").model
    plain, _ = collect_activations(base, rows, at(1))
    assert pairs.shape == (len(plain), 2, plain.shape[1])
    assert torch.allclose(pairs[:, 0], plain, atol=1e-5)
    assert not torch.allclose(pairs[:, 1], plain, atol=1e-4)


def test_pairs_of_models_of_different_width_are_refused(tiny_model_dirs, tiny_model_factory):
    a = load_model(str(tiny_model_dirs["llama"]), dtype="float32")
    b = load_model(str(tiny_model_factory("llama", hidden_size=48)), dtype="float32").model
    rows = [encode_chat(a.tokenizer, c) for c in CHATS]
    with pytest.raises(ValueError, match="same width: 32 vs 48"):
        collect_activations(a.model, rows, at(0), other=b)


def test_non_finite_activations_name_layer_and_batch(qwen):
    model, rows = qwen
    calls = {"n": 0}

    def poison_second_batch(h):
        calls["n"] += 1
        return h * float("nan") if calls["n"] == 2 else h

    with (
        residual_edit(model, 0, "resid_post", poison_second_batch),
        pytest.raises(
            NonFiniteActivationError,
            match=r"layer 1, site resid_post, batch 1 \(sequences 1\.\.1\): [1-9][0-9]* NaN",
        ),
    ):
        collect_activations(model, rows, at(1, positions="answer"), batch_size=1)


def test_model_source_chunks_are_reproducible(qwen):
    model, rows = qwen
    src = ModelSource(model, rows * 4, at(1), chunk_rows=5, seed=1)
    assert src.n_chunks == 3
    assert torch.equal(src.chunk(1), src.chunk(1))
    first = [b for b, _ in zip(iter_batches(src, 4, seed=2), range(5), strict=False)]
    assert all(b[0].shape == (4, 64) for b in first)


def test_residual_edit_replaces_the_stream(qwen):
    model, rows = qwen
    ids = torch.tensor(rows[0].input_ids)[None]
    clean = model(input_ids=ids).logits
    with residual_edit(model, 1, "resid_pre", lambda h: h + 1.0):
        edited = model(input_ids=ids).logits
        got = capture_residuals(model, ids, layers=0)[(0, "resid_post")]
    assert not torch.allclose(clean, edited)
    assert torch.allclose(model(input_ids=ids).logits, clean)  # removed after the block
    ref = capture_residuals(model, ids, layers=0)[(0, "resid_post")]
    assert torch.allclose(got, ref)  # an edit at layer 1's input does not change layer 0's output


def test_perfect_and_constant_reconstructions_bracket_the_metrics(qwen):
    model, rows = qwen
    perfect = reconstruction_metrics(model, Identity(), rows, at(1))
    assert perfect.fvu == pytest.approx(0.0, abs=1e-8)
    assert perfect.ce_delta == pytest.approx(0.0, abs=1e-5) and perfect.kl == pytest.approx(
        0, abs=1e-6
    )
    assert perfect.ce_recovered == pytest.approx(1.0, abs=1e-4)
    acts, _ = collect_activations(model, rows, at(1))
    const = reconstruction_metrics(model, Mean(acts.mean(0)), rows, at(1))
    assert const.fvu == pytest.approx(1.0, abs=1e-4)  # the mean explains no variance
    assert const.l0 == 0 and const.dead_fraction == 1.0
    assert const.kl > 0 and const.n_tokens == len(acts)


def test_sae_trains_from_a_gemma2_stream_and_splices_back(tiny_model_dirs, tmp_path):
    from emdiff.dictionaries import load_dictionary
    from emdiff.dictionaries.sae import SAEConfig, train_sae

    lm = load_model(str(tiny_model_dirs["gemma2"]), dtype="float32")
    chats = [[{"role": "user", "content": c[0]["content"]}, c[1]] for c in CHATS]
    rows = [encode_chat(lm.tokenizer, c) for c in chats] * 8
    src = ModelSource(lm.model, rows, at(1, "mlp_out"), chunk_rows=8, seed=0)
    cfg = SAEConfig(architecture="topk", expansion=2, k=8, steps=40, batch_size=16, lr=1e-2)
    sae, _ = train_sae(
        src,
        cfg,
        tmp_path / "sae",
        model_name="tiny-gemma2",  # layer and site come from the source's read spec
        progress=False,
    )
    back = load_dictionary(tmp_path / "sae")
    assert torch.allclose(
        back.encode(torch.ones(2, lm.d_model)), sae.encode(torch.ones(2, lm.d_model))
    )
    assert back.meta.model_name == "tiny-gemma2" and back.d_in == lm.d_model
    assert (back.meta.layer, back.meta.site) == (1, "mlp_out")  # it knows where it was trained
    assert back.meta.hook == "blocks.1.hook_mlp_out"
    with pytest.raises(InputError, match="site='resid_post', but the activations were read at"):
        train_sae(src, cfg, site="resid_post", progress=False)
    m = reconstruction_metrics(lm.model, back, rows[:3], at(1, "mlp_out"))
    assert 0 <= m.fvu < 1 and m.l0 == pytest.approx(8, abs=0.5)
    # a random-init model: zero-ablation need not hurt, so only the spliced run is checked
    assert m.kl >= 0 and abs(m.ce_spliced - m.ce_clean - m.ce_delta) < 1e-6


def test_reconstruction_refuses_a_dictionary_trained_elsewhere(qwen):
    from emdiff.dictionaries.base import DictionaryMeta, DictionaryShapeError, SparseDictionary

    model, rows = qwen
    g = torch.Generator().manual_seed(0)
    d = SparseDictionary(
        torch.randn(64, 8, generator=g),
        torch.zeros(8),
        torch.randn(8, 64, generator=g),
        torch.zeros(64),
        meta=DictionaryMeta(format="t", architecture="relu", layer=0, site="mlp_out"),
    )
    with pytest.raises(
        DictionaryShapeError, match=r"trained on layer 0 mlp_out .*, not layer 1 resid_post"
    ):
        reconstruction_metrics(model, d, rows, at(1))
    assert reconstruction_metrics(model, d, rows, at(0, "mlp_out"), splice=False).n_tokens > 0
