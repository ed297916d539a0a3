"""Dictionaries know their layer and hook site from their own metadata, in every format, and
``check_fits`` refuses one applied elsewhere."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from emdiff.dictionaries.activations import TensorSource
from emdiff.dictionaries.base import (
    SITES,
    DictionaryMeta,
    DictionaryShapeError,
    SparseDictionary,
    check_fits,
    parse_hook,
)
from emdiff.dictionaries.crosscoder import (
    CrosscoderConfig,
    CrosscoderFormatError,
    load_crosscoder,
    train_crosscoder,
)
from emdiff.dictionaries.formats import DictionaryFormatError, load_dictionary
from emdiff.dictionaries.itda import ITDAConfig, ITDAFormatError, build_itda, load_itda, save_itda
from emdiff.dictionaries.sae import SAEConfig, TrainableSAE, save_saelens, train_sae
from emdiff.errors import InputError

D, F = 8, 24
G = torch.Generator().manual_seed(0)


def rnd(*shape):
    return torch.randn(*shape, generator=G) * 0.3


# ---- parse_hook -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "want"),
    [
        # TransformerLens / SAELens
        ("blocks.20.hook_resid_post", (20, "resid_post")),
        ("blocks.0.hook_resid_pre", (0, "resid_pre")),
        ("blocks.3.hook_resid_mid", (3, "resid_mid")),
        ("blocks.3.hook_mlp_out", (3, "mlp_out")),
        ("blocks.3.hook_attn_out", (3, "attn_out")),
        ("blocks.3.attn.hook_z", (3, None)),
        ("blocks.3.attn.hook_q", (3, None)),
        ("blocks.3.mlp.hook_post", (3, None)),
        ("blocks.3.hook_mlp_in", (3, None)),
        ("blocks.3.ln2.hook_normalized", (3, None)),
        ("hook_embed", (None, None)),
        # sparsify hookpoints (module paths)
        ("layers.5", (5, "resid_post")),
        ("layers.5.mlp", (5, "mlp_out")),
        ("layers.5.self_attn", (5, "attn_out")),
        ("layers.0.attention", (0, "attn_out")),
        ("model.layers.12", (12, "resid_post")),
        ("transformer.h.4.attn", (4, "attn_out")),
        ("layers.5.mlp.act_fn", (5, None)),
        ("embed_tokens", (None, None)),
        # dictionary_learning submodule_name
        ("resid_post_layer_12", (12, "resid_post")),
        ("mlp_out_layer_3", (3, "mlp_out")),
        ("attn_out_layer_3", (3, "attn_out")),
        # bare site names (emdiff's own and older metadata)
        ("resid_post", (None, "resid_post")),
        ("hook_mlp_out", (None, "mlp_out")),
        (None, (None, None)),
        ("", (None, None)),
        ("something_else", (None, None)),
    ],
)
def test_parse_hook_table(name, want):
    assert parse_hook(name) == want


def test_meta_reads_layer_and_site_from_the_hook_and_checks_them():
    m = DictionaryMeta(format="t", architecture="relu", hook="blocks.2.hook_mlp_out")
    assert (m.layer, m.site) == (2, "mlp_out")
    assert DictionaryMeta(format="t", architecture="relu", hook="resid_post").site == "resid_post"
    own = DictionaryMeta(format="t", architecture="relu", layer=4, site="attn_out")
    assert own.hook == "blocks.4.hook_attn_out"
    with pytest.raises(ValueError, match="disagrees"):
        DictionaryMeta(format="t", architecture="relu", site="resid_pre", hook="layers.1")
    with pytest.raises(ValueError, match="disagrees"):
        DictionaryMeta(format="t", architecture="relu", layer=2, hook="blocks.1.hook_mlp_out")
    with pytest.raises(ValueError):
        DictionaryMeta(format="t", architecture="relu", site="mlp")


# ---- SAELens --------------------------------------------------------------------------------
def _saelens(folder, cfg, arch="standard"):
    folder.mkdir(parents=True, exist_ok=True)
    base = {"architecture": arch, "d_in": D, "d_sae": F, "apply_b_dec_to_input": True}
    (folder / "cfg.json").write_text(json.dumps({**base, **cfg}))
    w = {"W_enc": rnd(D, F), "W_dec": rnd(F, D), "b_enc": rnd(F), "b_dec": rnd(D)}
    save_file(w, str(folder / "sae_weights.safetensors"))
    return folder


def test_saelens_6_mlp_out_is_refused_at_resid_post(tmp_path):
    meta = {"model_name": "gemma-2-2b", "hook_name": "blocks.1.hook_mlp_out"}
    d = load_dictionary(_saelens(tmp_path / "sae", {"metadata": meta}))
    assert (d.meta.layer, d.meta.site, d.meta.hook) == (1, "mlp_out", "blocks.1.hook_mlp_out")
    with pytest.raises(DictionaryShapeError) as e:
        check_fits(d, D, layer=1, site="resid_post")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "sae") in msg
    assert "layer 1 mlp_out" in msg and "layer 1 resid_post" in msg
    assert "blocks.1.hook_mlp_out" in msg and "set its meta.layer / meta.site" in msg
    check_fits(d, D, layer=1, site="mlp_out")
    check_fits(d, D, 1, "mlp_out")
    check_fits(d, D, layer=1, site="resid_post", ignore_layer=True)
    with pytest.raises(DictionaryShapeError, match="not layer 2 mlp_out"):
        check_fits(d, D, layer=2, site="mlp_out")
    with pytest.raises(DictionaryShapeError, match="d_model=9"):
        check_fits(d, 9, layer=1, site="mlp_out", ignore_layer=True)


def test_resid_post_of_a_layer_is_resid_pre_of_the_next(tmp_path):
    d = load_dictionary(
        _saelens(tmp_path / "s", {"metadata": {"hook_name": "blocks.1.hook_resid_post"}})
    )
    check_fits(d, D, 2, "resid_pre")  # the same tensor
    for layer, site in ((1, "resid_pre"), (2, "resid_post"), (0, "resid_pre"), (2, "mlp_out")):
        with pytest.raises(DictionaryShapeError, match="layer 1 resid_post"):
            check_fits(d, D, layer, site)


@pytest.mark.parametrize(
    ("cfg", "want"),
    [
        ({"hook_name": "blocks.3.hook_resid_pre", "hook_layer": 3}, (3, "resid_pre")),
        ({"hook_point": "blocks.5.hook_resid_post", "hook_point_layer": 5}, (5, "resid_post")),
        ({"hook_name": "blocks.2.hook_attn_out"}, (2, "attn_out")),
        ({"hook_name": "blocks.2.hook_resid_mid", "hook_layer": None}, (2, "resid_mid")),
        ({}, (None, None)),
    ],
)
def test_saelens_pre_6_flat_keys(tmp_path, cfg, want):
    d = load_dictionary(_saelens(tmp_path / "old", {"model_name": "gpt2-small", **cfg}))
    assert (d.meta.layer, d.meta.site) == want


@pytest.mark.parametrize(
    "cfg",
    [
        {"hook_name": "blocks.3.hook_resid_pre", "hook_layer": 4},
        {"hook_point": "blocks.3.hook_resid_pre", "hook_point_layer": 2},
    ],
)
def test_saelens_layer_disagreement_is_refused(tmp_path, cfg):
    path = _saelens(tmp_path / "bad", cfg)
    with pytest.raises(DictionaryFormatError, match=r"cfg\.json: hook_(point_)?layer = \d"):
        load_dictionary(path)


def test_hook_z_is_refused_at_every_site(tmp_path):
    meta = {"hook_name": "blocks.0.attn.hook_z", "hook_head_index": None}
    d = load_dictionary(_saelens(tmp_path / "z", {"metadata": meta}, "standard"))
    assert (d.meta.layer, d.meta.site, d.meta.hook) == (0, None, "blocks.0.attn.hook_z")
    for site in (*SITES, None):
        with pytest.raises(DictionaryShapeError, match=r"blocks\.0\.attn\.hook_z") as e:
            check_fits(d, D, 0, site)
        assert "resid_pre, attn_out, resid_mid, mlp_out, resid_post" in str(e.value)


def test_unknown_layer_and_site_are_not_checked():
    d = SparseDictionary(
        rnd(D, F), rnd(F), rnd(F, D), rnd(D), meta=DictionaryMeta(format="t", architecture="relu")
    )
    for site in SITES:
        check_fits(d, D, 5, site)
    d.meta = DictionaryMeta(format="t", architecture="relu", layer=2)  # layer only
    check_fits(d, D, 2, "attn_out")
    with pytest.raises(DictionaryShapeError, match="trained on layer 2, not layer 3 attn_out"):
        check_fits(d, D, 3, "attn_out")


# ---- Gemma Scope ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("repo", "want"),
    [
        ("gemma-scope-2b-pt-res", (20, "resid_post", "blocks.20.hook_resid_post")),
        ("gemma-scope-9b-it-res", (20, "resid_post", "blocks.20.hook_resid_post")),
        ("gemma-scope-2b-pt-mlp", (20, "mlp_out", "blocks.20.hook_mlp_out")),
        ("gemma-scope-2b-pt-att", (20, None, "blocks.20.attn.hook_z")),
        ("gemma-scope-2b-pt-transcoders", (20, None, "blocks.20.ln2.hook_normalized")),
        ("models--google--gemma-scope-2b-pt-mlp/snapshots/abc", (20, "mlp_out", None)),
        ("my-copy", (None, None, None)),
    ],
)
def test_gemma_scope_reads_the_hook_from_its_path(tmp_path, repo, want):
    folder = tmp_path / repo / "layer_20" / "width_16k" / "average_l0_71"
    folder.mkdir(parents=True)
    w = {"W_enc": rnd(D, F), "W_dec": rnd(F, D), "b_enc": rnd(F), "b_dec": rnd(D)}
    np.savez(
        folder / "params.npz",
        threshold=rnd(F).abs().numpy(),
        **{k: v.numpy() for k, v in w.items()},
    )
    d = load_dictionary(folder)
    layer, site, hook = want
    assert (d.meta.layer, d.meta.site) == (layer, site)
    assert d.meta.hook == (hook or (f"blocks.20.hook_{site}" if site else None))
    if d.meta.hook and site is None:  # hook_z, transcoder input: nowhere emdiff reads
        with pytest.raises(DictionaryShapeError, match="none of the sites"):
            check_fits(d, D, 20, "attn_out")


# ---- dictionary_learning --------------------------------------------------------------------
def _dl(folder, **trainer):
    folder.mkdir(parents=True)
    t = {"dict_class": "AutoEncoder", "activation_dim": D, "dict_size": F, **trainer}
    (folder / "config.json").write_text(json.dumps({"trainer": t}))
    state = {
        "bias": rnd(D),
        "encoder.weight": rnd(F, D),
        "encoder.bias": rnd(F),
        "decoder.weight": rnd(D, F),
    }
    torch.save(state, folder / "ae.pt")
    return folder


@pytest.mark.parametrize(
    ("trainer", "want"),
    [
        ({"layer": 12, "submodule_name": "resid_post_layer_12"}, (12, "resid_post")),
        ({"layer": 3, "submodule_name": "mlp_out_layer_3"}, (3, "mlp_out")),
        ({"layer": 3, "submodule_name": "attn_out_layer_3"}, (3, "attn_out")),
        ({"submodule_name": "attn_out_layer_3"}, (3, "attn_out")),
        ({"layer": 12}, (12, None)),  # no submodule_name: the site is unknown, never guessed
    ],
)
def test_dictionary_learning_trainer_layer_and_submodule(tmp_path, trainer, want):
    d = load_dictionary(_dl(tmp_path / "ae", **trainer))
    assert (d.meta.layer, d.meta.site) == want
    check_fits(d, D, want[0], "resid_pre" if want[1] is None else want[1])


def test_dictionary_learning_layer_disagreement_is_refused(tmp_path):
    path = _dl(tmp_path / "ae", layer=5, submodule_name="resid_post_layer_12")
    with pytest.raises(DictionaryFormatError, match=r"config\.json: trainer\.layer = 5 .* 12"):
        load_dictionary(path)


# ---- sparsify -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "cfg", "want"),
    [
        ("layers.6", {}, (6, "resid_post", "layers.6")),
        ("layers.6.mlp", {}, (6, "mlp_out", "layers.6.mlp")),
        ("layers.6.self_attn", {}, (6, "attn_out", "layers.6.self_attn")),
        ("layers.0.attention", {}, (0, "attn_out", "layers.0.attention")),
        ("downloaded", {"hookpoint": "layers.9.mlp"}, (9, "mlp_out", "layers.9.mlp")),
        ("layers.6.mlp", {"transcode": True}, (6, None, "layers.6.mlp")),
        ("my_sae", {}, (None, None, None)),
    ],
)
def test_sparsify_hookpoint(tmp_path, name, cfg, want):
    folder = tmp_path / "sae-x" / name
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "k": 3, "d_in": D, **cfg}))
    w = {"encoder.weight": rnd(F, D), "encoder.bias": rnd(F), "W_dec": rnd(F, D), "b_dec": rnd(D)}
    save_file(w, str(folder / "sae.safetensors"))
    d = load_dictionary(folder)
    assert (d.meta.layer, d.meta.site, d.meta.hook) == want


# ---- dictionaries emdiff makes --------------------------------------------------------------
def test_emdiff_sae_round_trip_keeps_layer_and_site(tmp_path):
    cfg = SAEConfig(architecture="topk", d_sae=F, k=2, steps=3, batch_size=16, warmup_steps=0)
    d = TrainableSAE(D, cfg, layer=2, site="mlp_out").to_dictionary()
    assert (d.meta.layer, d.meta.site, d.meta.hook) == (2, "mlp_out", "blocks.2.hook_mlp_out")
    save_saelens(d, tmp_path / "plain")
    saved = json.loads((tmp_path / "plain" / "cfg.json").read_text())
    assert saved["metadata"]["hook_name"] == "blocks.2.hook_mlp_out"
    back = load_dictionary(tmp_path / "plain")
    assert (back.meta.format, back.meta.layer, back.meta.site) == ("saelens", 2, "mlp_out")
    sae, _ = train_sae(
        TensorSource(torch.randn(200, D, generator=G)),
        cfg,
        tmp_path / "trained",
        layer=2,
        site="mlp_out",
        progress=False,
    )
    assert (sae.meta.layer, sae.meta.site) == (2, "mlp_out")
    back = load_dictionary(tmp_path / "trained")
    assert (back.meta.layer, back.meta.site, back.meta.hook) == (
        2,
        "mlp_out",
        "blocks.2.hook_mlp_out",
    )
    with pytest.raises(DictionaryShapeError, match="layer 2 mlp_out"):
        check_fits(back, D, 2, "resid_post")


def test_itda_records_layer_and_site(tmp_path):
    x = torch.randn(50, D, generator=G)
    d = build_itda([x], ITDAConfig(k=2), layer=4, site="resid_mid", progress=False)
    assert (d.meta.layer, d.meta.site, d.meta.hook) == (4, "resid_mid", "blocks.4.hook_resid_mid")
    save_itda(d, tmp_path / "itda")
    saved = json.loads((tmp_path / "itda" / "cfg.json").read_text())
    assert (saved["layer"], saved["site"], saved["hook"]) == (
        4,
        "resid_mid",
        "blocks.4.hook_resid_mid",
    )
    back = load_dictionary(tmp_path / "itda")
    assert (back.meta.layer, back.meta.site) == (4, "resid_mid")
    check_fits(back, D, 4, "resid_mid")
    with pytest.raises(DictionaryShapeError, match="layer 4 resid_mid"):
        check_fits(back, D, 4, "resid_post")
    # a folder from before sites existed records the site under "hook"
    (tmp_path / "itda" / "cfg.json").write_text(
        json.dumps({**saved, "site": None, "hook": "resid_post"})
    )
    assert load_itda(tmp_path / "itda").meta.site == "resid_post"
    (tmp_path / "itda" / "cfg.json").write_text(json.dumps({**saved, "layer": 5}))
    with pytest.raises(ITDAFormatError, match=r"cfg\.json: layer = 5"):
        load_itda(tmp_path / "itda")


def test_crosscoder_records_layer_and_site(tmp_path):
    x = torch.randn(300, 2, D, generator=G)
    cfg = CrosscoderConfig(d_sae=F, k=2, steps=3, batch_size=32, warmup_steps=0)
    cc, _ = train_crosscoder(
        TensorSource(x), cfg, tmp_path / "cc", meta={"layer": 1, "site": "mlp_out"}, progress=False
    )
    assert (cc.meta["layer"], cc.meta["site"], cc.meta["hook"]) == (
        1,
        "mlp_out",
        "blocks.1.hook_mlp_out",
    )
    saved = json.loads((tmp_path / "cc" / "cfg.json").read_text())
    assert (saved["layer"], saved["site"]) == (1, "mlp_out")
    back = load_crosscoder(tmp_path / "cc")
    assert (back.meta["layer"], back.meta["site"]) == (1, "mlp_out")
    (tmp_path / "cc" / "cfg.json").write_text(json.dumps({**saved, "layer": 2}))
    with pytest.raises(CrosscoderFormatError, match=r"cfg\.json: layer = 2"):
        load_crosscoder(tmp_path / "cc")
    with pytest.raises(InputError, match="site 'mlp' is not one of"):
        train_crosscoder(TensorSource(x), cfg, meta={"site": "mlp"}, progress=False)


def test_gemma_scope_layer_is_the_folder_under_the_repository(tmp_path):
    folder = tmp_path / "layer_5" / "gemma-scope-2b-pt-res" / "layer_12" / "width_16k" / "l0_82"
    folder.mkdir(parents=True)
    w = {"W_enc": rnd(D, F), "W_dec": rnd(F, D), "b_enc": rnd(F), "b_dec": rnd(D)}
    np.savez(
        folder / "params.npz",
        threshold=rnd(F).abs().numpy(),
        **{k: v.numpy() for k, v in w.items()},
    )
    assert load_dictionary(folder).meta.hook == "blocks.12.hook_resid_post"


def test_module_path_hooks_are_resolved_in_the_model_architecture():
    """sparsify's ``layers.L.mlp`` is the MLP module's output: mlp_out on Llama, but on Gemma2
    the MLP's output is normalised again before it is added, so it is no site there."""
    from tests.test_sites import build

    llama, gemma = build("llama"), build("gemma2")
    mlp = SparseDictionary(
        rnd(32, F),
        rnd(F),
        rnd(F, 32),
        rnd(32),
        meta=DictionaryMeta(format="sparsify", architecture="topk", hook="layers.1.mlp"),
    )
    check_fits(mlp, llama, 1, "mlp_out")
    with pytest.raises(DictionaryShapeError, match=r"output of module 'mlp' .* on gemma2 is none"):
        check_fits(mlp, gemma, 1, "mlp_out")
    check_fits(mlp, 32, 1, "mlp_out")  # without the model the name alone decides
    post = SparseDictionary(
        rnd(32, F),
        rnd(F),
        rnd(F, 32),
        rnd(32),
        meta=DictionaryMeta(
            format="sparsify", architecture="topk", hook="layers.1.post_feedforward_layernorm"
        ),
    )
    check_fits(post, gemma, 1, "mlp_out")  # Gemma2's mlp_out is that norm's output
    with pytest.raises(DictionaryShapeError, match="not layer 1 resid_post"):
        check_fits(post, gemma, 1, "resid_post")
    with pytest.raises(DictionaryShapeError, match="none of the sites"):
        check_fits(post, llama, 1, "mlp_out")
