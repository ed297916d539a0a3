"""Every dictionary format, written here with the publisher's key names and shapes, encodes exactly
like a small independent reference of its math."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from emdiff.dictionaries.base import (
    DictionaryMeta,
    DictionaryShapeError,
    Encoding,
    SparseDictionary,
    check_fits,
)
from emdiff.dictionaries.formats import DictionaryFormatError, detect_format, load_dictionary

D, F = 16, 48
G = torch.Generator().manual_seed(0)
X = torch.randn(30, D, generator=G) * 2 + 0.5


def rnd(*shape, scale=1.0):
    return torch.randn(*shape, generator=G) * scale


def relu(t):
    return torch.clamp(t, min=0)


def topk_dense(values, k):
    idx = values.topk(k, dim=-1).indices
    return torch.zeros_like(values).scatter(-1, idx, values.gather(-1, idx))


# ---- SAELens --------------------------------------------------------------------------------
def _saelens(tmp, cfg, tensors):
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "sae_weights.safetensors"))
    return tmp


def _weights():
    return {
        "W_enc": rnd(D, F, scale=0.3),
        "W_dec": rnd(F, D, scale=0.3),
        "b_enc": rnd(F, scale=0.1),
        "b_dec": rnd(D, scale=0.2),
    }


V6 = {
    "d_in": D,
    "d_sae": F,
    "dtype": "float32",
    "device": "cpu",
    "apply_b_dec_to_input": True,
    "normalize_activations": "none",
    "metadata": {
        "model_name": "gemma-2-9b-it",
        "hook_name": "blocks.7.hook_resid_post",
        "sae_lens_version": "6.3.0",
    },
}


def test_saelens_standard_v6(tmp_path):
    w = _weights()
    d = load_dictionary(_saelens(tmp_path / "sae", {**V6, "architecture": "standard"}, w))
    ref = relu((X - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    torch.testing.assert_close(d.encode(X), ref)
    torch.testing.assert_close(d(X), ref @ w["W_dec"] + w["b_dec"])
    assert (d.meta.layer, d.meta.site, d.meta.model_name) == (7, "resid_post", "gemma-2-9b-it")
    assert d.meta.hook == "blocks.7.hook_resid_post"
    assert (d.d_in, d.d_sae) == (D, F) and d.decoder_rows.shape == (F, D)


def test_saelens_jumprelu_without_b_dec_input(tmp_path):
    w = {**_weights(), "threshold": rnd(F, scale=0.2).abs()}
    cfg = {**V6, "architecture": "jumprelu", "apply_b_dec_to_input": False}
    d = load_dictionary(_saelens(tmp_path / "sae", cfg, w))
    pre = X @ w["W_enc"] + w["b_enc"]
    torch.testing.assert_close(d.encode(X), relu(pre) * (pre > w["threshold"]))


@pytest.mark.parametrize("rescale", [False, True])
def test_saelens_topk(tmp_path, rescale):
    w = _weights()
    cfg = {**V6, "architecture": "topk", "k": 5, "rescale_acts_by_decoder_norm": rescale}
    d = load_dictionary(_saelens(tmp_path / "sae", cfg, w))
    pre = (X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    norms = w["W_dec"].norm(dim=-1)
    if rescale:
        pre = pre * norms
    acts = relu(topk_dense(pre, 5))  # top-k of the raw pre-activations, then ReLU
    torch.testing.assert_close(d.encode(X), acts)
    recon = (acts / norms if rescale else acts) @ w["W_dec"] + w["b_dec"]
    torch.testing.assert_close(d(X), recon)


def test_saelens_gated(tmp_path):
    w = {k: v for k, v in _weights().items() if k != "b_enc"}
    w |= {"b_gate": rnd(F, scale=0.1), "b_mag": rnd(F, scale=0.1), "r_mag": rnd(F, scale=0.1)}
    d = load_dictionary(_saelens(tmp_path / "sae", {**V6, "architecture": "gated"}, w))
    x = X - w["b_dec"]
    gate = (x @ w["W_enc"] + w["b_gate"]) > 0
    mag = relu(x @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])
    torch.testing.assert_close(d.encode(X), gate * mag)


@pytest.mark.parametrize(
    "norm", ["constant_norm_rescale", "layer_norm", "expected_average_only_in"]
)
def test_saelens_normalisation(tmp_path, norm):
    w = _weights()
    cfg = {**V6, "architecture": "standard", "normalize_activations": norm}
    if norm == "expected_average_only_in":
        (tmp_path / "sae").mkdir()
        (tmp_path / "sae" / "activation_scaler.json").write_text('{"scaling_factor": 0.37}')
    d = load_dictionary(_saelens(tmp_path / "sae", cfg, w))
    if norm == "constant_norm_rescale":
        c = D**0.5 / X.norm(dim=-1, keepdim=True)
        xin, out = X * c, lambda y: y / c
    elif norm == "layer_norm":
        mu, std = X.mean(-1, keepdim=True), (X - X.mean(-1, keepdim=True)).std(-1, keepdim=True)
        xin, out = (X - mu) / (std + 1e-5), lambda y: y * std + mu
    else:
        xin, out = X * 0.37, lambda y: y / 0.37
    acts = relu((xin - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    torch.testing.assert_close(d.encode(X), acts)
    torch.testing.assert_close(d(X), out(acts @ w["W_dec"] + w["b_dec"]))


def test_saelens_expected_average_needs_a_factor(tmp_path):
    cfg = {**V6, "architecture": "standard", "normalize_activations": "expected_average_only_in"}
    path = _saelens(tmp_path / "sae", cfg, _weights())
    with pytest.raises(DictionaryFormatError, match="pass scaling_factor="):
        load_dictionary(path)
    assert load_dictionary(path, scaling_factor=2.0).input_scale == 2.0


def test_saelens_pre_6_flat_layout(tmp_path):
    w = _weights()
    cfg = {
        "d_in": D,
        "d_sae": F,
        "dtype": "torch.float32",
        "model_name": "gpt2-small",
        "hook_point": "blocks.3.hook_resid_pre",
        "hook_point_layer": 3,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 4},
        "normalize_activations": False,
    }
    d = load_dictionary(_saelens(tmp_path / "old", cfg, w))
    assert (d.meta.architecture, d.k, d.meta.layer, d.meta.site) == ("topk", 4, 3, "resid_pre")
    assert d.subtract_b_dec  # the pre-6 default
    pre = (X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    torch.testing.assert_close(d.encode(X), relu(topk_dense(pre, 4)))


# ---- Gemma Scope ----------------------------------------------------------------------------
def test_gemma_scope_npz(tmp_path):
    folder = tmp_path / "gemma-scope-9b-it-res" / "layer_20" / "width_16k" / "average_l0_91"
    folder.mkdir(parents=True)
    w = {
        **{k: v.numpy() for k, v in _weights().items()},
        "threshold": rnd(F, scale=0.3).abs().numpy(),
    }
    np.savez(folder / "params.npz", **w)
    assert detect_format(folder / "params.npz") == "gemma_scope"
    d = load_dictionary(folder)
    pre = X @ torch.from_numpy(w["W_enc"]) + torch.from_numpy(w["b_enc"])  # no b_dec subtracted
    torch.testing.assert_close(d.encode(X), relu(pre) * (pre > torch.from_numpy(w["threshold"])))
    assert (d.meta.layer, d.meta.site, d.meta.model_name) == (20, "resid_post", "gemma-2-9b-it")


# ---- dictionary_learning --------------------------------------------------------------------
def _dl(tmp, cls, state, extra=None):
    tmp.mkdir(parents=True, exist_ok=True)
    trainer = {
        "dict_class": cls,
        "activation_dim": D,
        "dict_size": F,
        "layer": 12,
        "lm_name": "google/gemma-2-2b",
        "submodule_name": "resid_post_layer_12",
        **(extra or {}),
    }
    (tmp / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"ctx_len": 128}}))
    torch.save(state, tmp / "ae.pt")
    return tmp


def test_dictionary_learning_autoencoder(tmp_path):
    s = {
        "bias": rnd(D),
        "encoder.weight": rnd(F, D, scale=0.3),
        "encoder.bias": rnd(F, scale=0.1),
        "decoder.weight": rnd(D, F, scale=0.3),
    }
    d = load_dictionary(_dl(tmp_path / "ae", "AutoEncoder", s))
    f = relu((X - s["bias"]) @ s["encoder.weight"].T + s["encoder.bias"])
    torch.testing.assert_close(d.encode(X), f)
    torch.testing.assert_close(d(X), f @ s["decoder.weight"].T + s["bias"])
    assert (d.meta.layer, d.meta.site, d.meta.model_name) == (12, "resid_post", "google/gemma-2-2b")


def test_dictionary_learning_gated_and_jumprelu(tmp_path):
    s = {
        "encoder.weight": rnd(F, D, scale=0.3),
        "decoder.weight": rnd(D, F),
        "decoder_bias": rnd(D),
        "r_mag": rnd(F, scale=0.1),
        "gate_bias": rnd(F, scale=0.1),
        "mag_bias": rnd(F, scale=0.1),
    }
    d = load_dictionary(_dl(tmp_path / "g", "GatedAutoEncoder", s))
    x_enc = (X - s["decoder_bias"]) @ s["encoder.weight"].T
    ref = ((x_enc + s["gate_bias"]) > 0) * relu(s["r_mag"].exp() * x_enc + s["mag_bias"])
    torch.testing.assert_close(d.encode(X), ref)
    j = {
        "W_enc": rnd(D, F, scale=0.3),
        "b_enc": rnd(F),
        "W_dec": rnd(F, D),
        "b_dec": rnd(D),
        "threshold": rnd(F).abs(),
    }
    d = load_dictionary(_dl(tmp_path / "j", "JumpReluAutoEncoder", j))
    pre = X @ j["W_enc"] + j["b_enc"]  # apply_b_dec_to_input is False (not saved)
    torch.testing.assert_close(d.encode(X), relu(pre * (pre > j["threshold"])))


def test_dictionary_learning_topk_family(tmp_path):
    s = {
        "encoder.weight": rnd(F, D, scale=0.3),
        "encoder.bias": rnd(F, scale=0.1),
        "decoder.weight": rnd(D, F),
        "b_dec": rnd(D),
        "k": torch.tensor(6, dtype=torch.int32),
        "threshold": torch.tensor(0.4),
    }
    post = relu((X - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
    d = load_dictionary(_dl(tmp_path / "t", "AutoEncoderTopK", s, {"k": 6}))
    torch.testing.assert_close(d.encode(X), topk_dense(post, 6))  # ReLU before top-k
    d = load_dictionary(_dl(tmp_path / "b", "BatchTopKSAE", s, {"k": 6}))
    torch.testing.assert_close(d.encode(X), post * (post > 0.4))  # inference uses the threshold
    m = {
        "W_enc": s["encoder.weight"].T.contiguous(),
        "b_enc": s["encoder.bias"],
        "W_dec": s["decoder.weight"].T.contiguous(),
        "b_dec": s["b_dec"],
        "k": s["k"],
        "threshold": s["threshold"],
        "group_sizes": torch.tensor([16, 32]),
    }
    d = load_dictionary(_dl(tmp_path / "m", "MatryoshkaBatchTopKSAE", m, {"group_sizes": [16, 32]}))
    torch.testing.assert_close(d.encode(X), post * (post > 0.4))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_dictionary_learning_refuses_pickled_objects(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    (folder / "ae.pt").write_bytes(pickle.dumps({"bias": Payload()}))
    with pytest.raises(DictionaryFormatError, match="not a weights-only state dict"):
        load_dictionary(folder)


# ---- sparsify -------------------------------------------------------------------------------
def test_sparsify_folder(tmp_path):
    folder = tmp_path / "sae-pythia" / "layers.6"
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(
        json.dumps(
            {
                "activation": "topk",
                "expansion_factor": 3,
                "normalize_decoder": True,
                "num_latents": 0,
                "k": 7,
                "multi_topk": False,
                "skip_connection": False,
                "transcode": False,
                "d_in": D,
            }
        )
    )
    s = {
        "encoder.weight": rnd(F, D, scale=0.3),
        "encoder.bias": rnd(F, scale=0.1),
        "W_dec": rnd(F, D),
        "b_dec": rnd(D),
    }
    save_file(s, str(folder / "sae.safetensors"))
    d = load_dictionary(folder)
    post = relu((X - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
    acts = topk_dense(post, 7)
    torch.testing.assert_close(d.encode(X), acts)
    torch.testing.assert_close(d(X), acts @ s["W_dec"] + s["b_dec"])
    assert (d.meta.layer, d.meta.site, d.meta.hook, d.k) == (6, "resid_post", "layers.6", 7)


# ---- errors ---------------------------------------------------------------------------------
def test_unknown_folder_and_missing_tensors(tmp_path):
    with pytest.raises(DictionaryFormatError, match="not a dictionary folder"):
        load_dictionary(tmp_path)
    w = _weights()
    del w["b_dec"]
    with pytest.raises(DictionaryFormatError, match=r"missing tensor\(s\) \['b_dec'\]"):
        load_dictionary(_saelens(tmp_path / "sae", {**V6, "architecture": "standard"}, w))


def test_fit_checks(tmp_path):
    d = load_dictionary(_saelens(tmp_path / "sae", {**V6, "architecture": "standard"}, _weights()))
    check_fits(d, D, 7, "resid_post")
    with pytest.raises(DictionaryShapeError, match="d_in=16 but the model's d_model=32"):
        check_fits(d, 32, 7)
    with pytest.raises(DictionaryShapeError, match="trained on layer 7"):
        check_fits(d, D, 8)
    check_fits(d, D, 8, ignore_layer=True)
    with pytest.raises(
        DictionaryShapeError, match=r"trained on layer 7 resid_post .*not layer 7 resid_pre"
    ):
        check_fits(d, D, 7, "resid_pre")
    with pytest.raises(DictionaryShapeError, match="width 16, got width 5"):
        d.encode(torch.zeros(2, 5))


def test_encoding_settings_and_optional_tensors():
    w = _weights()
    w = [w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"]]
    enc = Encoding(activation="jumprelu", subtract_b_dec=True, input_norm="scale", input_scale=2.0)
    thr = rnd(F, scale=0.1).abs()
    meta = DictionaryMeta(format="t", architecture="jumprelu")
    d = SparseDictionary(*w, meta=meta, encoding=enc, tensors={"threshold": thr})
    assert (d.activation, d.subtract_b_dec, d.input_norm, d.input_scale) == (
        "jumprelu",
        True,
        "scale",
        2.0,
    )
    assert d.k is None and d.b_gate is None and torch.equal(d.threshold, thr)
    with pytest.raises(AttributeError):
        d.k = 3  # settings are read-only views of d.encoding
    plain = SparseDictionary(*w, meta=meta)
    assert plain.activation == "relu" and plain.threshold is None
    cases = [
        ({"activation": "jumprelu"}, {}, "a jumprelu dictionary needs a threshold"),
        ({"activation": "batchtopk"}, {}, "a batchtopk dictionary needs a threshold"),
        ({"activation": "topk"}, {}, "a topk dictionary needs k"),
        ({"activation": "gated"}, {"b_gate": thr}, "needs b_gate, b_mag and r_mag"),
        ({}, {"scale": thr}, r"unknown tensor\(s\) \['scale'\]"),
    ]
    for kw, tensors, msg in cases:
        with pytest.raises(ValueError, match=msg):
            SparseDictionary(*w, meta=meta, encoding=Encoding(**kw), tensors=tensors)


ENTRY_CASES = [
    ({"activation": "relu"}, {}),
    ({"activation": "jumprelu", "subtract_b_dec": True}, {"threshold": "mixed"}),
    (
        {"activation": "batchtopk", "input_norm": "scale", "input_scale": 1.7},
        {"threshold": "mixed"},
    ),
    ({"activation": "topk", "k": 5}, {}),
    ({"activation": "topk", "k": 5, "relu_after_topk": False}, {}),
    ({"activation": "topk", "k": 5, "rescale_by_decoder_norm": True}, {}),
    ({"activation": "relu", "input_norm": "layer_norm"}, {}),
    ({"activation": "gated"}, {"b_gate": "vec", "b_mag": "vec", "r_mag": "vec"}),
]


@pytest.mark.parametrize(("encoding", "extra"), ENTRY_CASES)
def test_encode_entries_equal_the_nonzero_codes(encoding, extra):
    """The sparse path the statistics use gives exactly the nonzero entries of encode()."""
    w = _weights()
    tensors = {}
    for name, kind in extra.items():
        # thresholds on both sides of zero: the rule is pre > max(threshold, 0)
        tensors[name] = rnd(F, scale=0.3) if kind == "mixed" else rnd(F, scale=0.1)
    d = SparseDictionary(
        w["W_enc"],
        w["b_enc"],
        w["W_dec"],
        w["b_dec"],
        encoding=Encoding(**encoding),
        tensors=tensors,
        meta=DictionaryMeta(format="t", architecture=encoding["activation"]),
    )
    f = d.encode(X)
    rows, cols = f.nonzero(as_tuple=True)
    got = d.encode_entries(X)
    assert len(rows) > len(X)  # something fired
    assert torch.equal(got[0], rows) and torch.equal(got[1], cols)
    assert torch.equal(got[2], f[rows, cols])
    with pytest.raises(DictionaryShapeError, match="width 16, got width 5"):
        d.encode_entries(torch.zeros(2, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_entries_at_the_threshold_boundary(dtype):
    """Thresholds set exactly at pre-activations (pre > t is false there) and one ulp either
    side: the sparse path keeps exactly the entries encode() keeps, in float32 and bfloat16."""
    w = {k: v.to(dtype) for k, v in _weights().items()}
    pre = (X.to(dtype) @ w["W_enc"] + w["b_enc"])[0]
    thr = pre.clone()
    thr[1::3] = torch.nextafter(pre[1::3].float(), torch.tensor(-1e9)).to(dtype)
    thr[2::3] = torch.nextafter(pre[2::3].float(), torch.tensor(1e9)).to(dtype)
    d = SparseDictionary(
        w["W_enc"],
        w["b_enc"],
        w["W_dec"],
        w["b_dec"],
        encoding=Encoding(activation="jumprelu"),
        tensors={"threshold": thr},
        meta=DictionaryMeta(format="t", architecture="jumprelu"),
    )
    f = d.encode(X.to(dtype))
    rows, cols = f.nonzero(as_tuple=True)
    got = d.encode_entries(X.to(dtype))
    assert torch.equal(got[0], rows) and torch.equal(got[1], cols)
    assert torch.equal(got[2], f[rows, cols])
