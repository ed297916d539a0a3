"""LoRA interpretation on tiny Llama / Qwen2 / Gemma2 adapters: B mapped into the residual
reproduces what the adapter adds there, the per-token scalars are the values the adapter
multiplies B by, A rows map to the residual direction they read, and the reading orients and
decomposes each rank."""

from __future__ import annotations

import pytest
import torch

from emdiff.data.positions import Positions
from emdiff.dictionaries.base import DictionaryMeta, SparseDictionary
from emdiff.directions.direction import Direction
from emdiff.errors import InputError
from emdiff.lora.adapters import lora_modules
from emdiff.lora.interpret import read_lora, scalar_signs
from emdiff.lora.scalars import lora_scalars, per_row
from emdiff.models import load_model
from emdiff.models.hooks import capture_residuals
from emdiff.models.load import adapter_state, decoder_layers, load_adapter

TINY_ARCHS = ("qwen2", "gemma2", "llama")
IDS = torch.tensor([[3, 5, 7, 9, 11, 13], [4, 6, 8, 10, 12, 14]])


def _adapted(tiny_model_dirs, make_lora_adapter, tmp_path, arch: str, module: str, r: int = 1):
    path = make_lora_adapter(tiny_model_dirs[arch], tmp_path / module, (module,), r=r, layers=[1])
    base = load_model(str(tiny_model_dirs[arch]), dtype="float32").model.eval()
    return load_adapter(base, path).eval()


def _module_input(model, layer: int, name: str) -> torch.Tensor:
    """What the adapted module reads, hooked directly."""
    block = decoder_layers(model)[layer]
    target = block.mlp.down_proj if name == "down_proj" else block.self_attn.q_proj
    seen = {}
    handle = target.register_forward_hook(lambda _m, args, _o: seen.update(x=args[0]))
    with torch.no_grad():
        model(IDS)
    handle.remove()
    return seen["x"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_b_mapping_reproduces_the_adapters_contribution_exactly(
    arch, tiny_model_dirs, make_lora_adapter, tmp_path
):
    model = _adapted(tiny_model_dirs, make_lora_adapter, tmp_path, arch, "down_proj")
    (m,) = lora_modules(model)
    assert m.layer == 1 and m.kind == "down_proj" and m.writes_how == "direct"
    with adapter_state(model, True):
        on = capture_residuals(model, IDS, layers=[1], sites="resid_post")[(1, "resid_post")]
    with adapter_state(model, False):
        off = capture_residuals(model, IDS, layers=[1], sites="resid_post")[(1, "resid_post")]
    frame, cols = lora_scalars(model, [r.tolist() for r in IDS], Positions.parse("all"))
    scalars = torch.tensor(frame[cols[0]].to_numpy()).reshape(IDS.shape)
    predicted = scalars[..., None] * m.writes[0]
    torch.testing.assert_close(on - off, predicted, atol=1e-5, rtol=1e-4)
    assert (on - off).abs().max() > 1e-3  # the adapter does something


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_scalars_equal_a_times_the_hooked_input(arch, tiny_model_dirs, make_lora_adapter, tmp_path):
    model = _adapted(tiny_model_dirs, make_lora_adapter, tmp_path, arch, "down_proj", r=2)
    (m,) = lora_modules(model)
    x = _module_input(model, 1, "down_proj")
    expected = (x @ m.A.T).reshape(-1, 2)  # every token of both rows, rank 0 and 1
    frame, cols = lora_scalars(model, [r.tolist() for r in IDS], Positions.parse("all"))
    assert cols == ["L1.down_proj[0]", "L1.down_proj[1]"]
    got = torch.tensor(frame[cols].to_numpy(), dtype=torch.float32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    means = per_row(frame, cols, 2)
    torch.testing.assert_close(
        torch.tensor(means, dtype=torch.float32), expected.reshape(2, -1, 2).mean(1)
    )


def test_gemma2_writes_through_its_post_norm(tiny_model_dirs, make_lora_adapter, tmp_path):
    model = _adapted(tiny_model_dirs, make_lora_adapter, tmp_path, "gemma2", "down_proj")
    (m,) = lora_modules(model)
    norm = decoder_layers(model)[1].post_feedforward_layernorm.weight.detach()
    assert m.writes_how == "through post-norm"
    torch.testing.assert_close(m.writes[0], m.B[:, 0] * (1 + norm) * m.scaling)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_v_proj_maps_through_o_proj_exactly_at_the_first_token(
    arch, tiny_model_dirs, make_lora_adapter, tmp_path
):
    """The first token attends only to itself, so there the mapping is exact."""
    model = _adapted(tiny_model_dirs, make_lora_adapter, tmp_path, arch, "v_proj")
    (m,) = lora_modules(model)
    assert m.writes_how == "through o_proj" and m.reads is not None
    with adapter_state(model, True):
        on = capture_residuals(model, IDS, layers=[1], sites="attn_out")[(1, "attn_out")]
    with adapter_state(model, False):
        off = capture_residuals(model, IDS, layers=[1], sites="attn_out")[(1, "attn_out")]
    frame, cols = lora_scalars(model, [r.tolist() for r in IDS], Positions.parse("all"))
    first = torch.tensor(frame[frame.pos == 0][cols[0]].to_numpy(), dtype=torch.float32)
    torch.testing.assert_close((on - off)[:, 0], first[:, None] * m.writes[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_a_rows_of_attention_modules_read_the_normed_residual(
    arch, tiny_model_dirs, make_lora_adapter, tmp_path
):
    model = _adapted(tiny_model_dirs, make_lora_adapter, tmp_path, arch, "q_proj")
    (m,) = lora_modules(model)
    resid = capture_residuals(model, IDS, layers=[1], sites="resid_pre")[(1, "resid_pre")]
    rms = resid.pow(2).mean(-1, keepdim=True).add(model.config.rms_norm_eps).sqrt()
    x = _module_input(model, 1, "q_proj")
    torch.testing.assert_close(x @ m.A[0], (resid / rms) @ m.reads[0], atol=1e-4, rtol=1e-4)


def _dictionary(d: int, rows: torch.Tensor) -> SparseDictionary:
    n = rows.shape[0]
    return SparseDictionary(
        W_enc=rows.T.clone(),
        b_enc=torch.zeros(n),
        W_dec=rows.clone(),
        b_dec=torch.zeros(d),
        meta=DictionaryMeta(format="t", architecture="relu", layer=1, site="resid_post"),
    )


def test_reading_orients_each_rank_and_finds_its_latent(
    tiny_model_dirs, make_lora_adapter, tmp_path
):
    model = _adapted(tiny_model_dirs, make_lora_adapter, tmp_path, "llama", "down_proj")
    (m,) = lora_modules(model)
    w = m.writes[0]
    d = w.numel()
    rows = torch.randn(16, d, generator=torch.Generator().manual_seed(0))
    rows[7] = -w  # the latent that matches what the rank writes when its scalar is negative
    rows = rows / rows.norm(dim=1, keepdim=True)
    truth = Direction("truth", 1, "resid_post", -w)
    signs = {"L1.down_proj[0]": -1.0}
    reading = read_lora(model, _dictionary(d, rows), {"truth": truth}, signs=signs)
    row = reading.row("L1.down_proj[0]")
    assert row["b_top_latent"] == 7 and row["b_cos_truth"] == pytest.approx(1.0, abs=1e-5)
    assert row["b_explained_k1"] == pytest.approx(1.0, abs=1e-5) and row["b_null_k1"] < 0.9
    unsigned = read_lora(model, None, {"truth": truth}).row("L1.down_proj[0]")
    assert unsigned["sign"] == 0 and unsigned["b_cos_truth"] == pytest.approx(-1.0, abs=1e-5)
    frame, cols = lora_scalars(model, [r.tolist() for r in IDS], Positions.parse("all"))
    assert set(scalar_signs(frame, cols).values()) <= {1.0, -1.0}
    written = reading.save(tmp_path / "run")
    assert all(p.is_file() for p in written)


def test_a_model_without_lora_is_refused(tiny_model_dirs):
    base = load_model(str(tiny_model_dirs["llama"]), dtype="float32").model
    with pytest.raises(InputError, match="no LoRA modules"):
        lora_modules(base)


def test_toy_probe_tasks_leave_out_a_one_sided_sub_task_and_say_why():
    import numpy as np

    from emdiff.toy.lora_checks import probe_tasks

    bad = np.array([1] * 40 + [0] * 30)
    in_domain = np.where(np.arange(70) < 44, bad, -1)  # 40 misaligned, 4 aligned
    usable, skipped = probe_tasks({"general": bad, "in_domain": in_domain, "unseen": bad})
    assert set(usable) == {"general", "unseen"}
    assert skipped == {"in_domain": "40 misaligned and 4 aligned answers (a probe needs 6 of each)"}
    usable, skipped = probe_tasks({"general": np.ones(10, dtype=int)})  # never left out
    assert set(usable) == {"general"} and not skipped
