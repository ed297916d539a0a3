"""Interventions on tiny Llama / Qwen2 / Gemma2: each does exactly what it says at its hook point,
composes with the others, and is removed on exit."""

from __future__ import annotations

import pytest
import torch

from emdiff.dictionaries.base import DictionaryMeta, Encoding, SparseDictionary
from emdiff.errors import InputError
from emdiff.interventions.edits import EditLoraB, ProjectOut, SetLatent, Steer, intervene
from emdiff.models import load_model
from emdiff.models.hooks import capture_residuals
from emdiff.models.load import adapter_state, load_adapter

TINY_ARCHS = ("qwen2", "gemma2", "llama")

IDS = torch.tensor([[3, 5, 7, 9, 11, 13], [4, 6, 8, 10, 12, 14]])


@pytest.fixture(scope="module", params=TINY_ARCHS)
def tiny(request, tiny_model_dirs):
    model = load_model(str(tiny_model_dirs[request.param]), dtype="float32").model
    return request.param, model.eval()


def _at(model, layer, site, ids=IDS):
    return capture_residuals(model, ids, layers=[layer], sites=site)[(layer, site)]


def _run_with(model, *edits) -> None:
    with intervene(model, *edits):
        model(IDS)


def _unit(d: int, seed: int) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


@pytest.mark.parametrize("site", ["resid_post", "resid_mid", "mlp_out"])
def test_projection_leaves_no_component_along_the_direction(tiny, site):
    _, model = tiny
    u = _unit(model.config.hidden_size, 1)
    before = _at(model, 1, site)
    with intervene(model, ProjectOut(u * 3.0, layers=1, site=site)):
        after = _at(model, 1, site)
    assert (before @ u).abs().max() > 1e-2
    assert (after @ u).abs().max() < 1e-4
    other = before - (before @ u)[..., None] * u  # everything else unchanged
    torch.testing.assert_close(after, other, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_at(model, 1, site), before)  # removed on exit


def test_projection_at_all_layers_reaches_every_layer(tiny):
    _, model = tiny
    u = _unit(model.config.hidden_size, 2)
    n = model.config.num_hidden_layers
    with intervene(model, ProjectOut(u, layers="all")):
        outs = capture_residuals(model, IDS, layers=list(range(n)), sites="resid_post")
    assert all((h @ u).abs().max() < 1e-4 for h in outs.values())


@pytest.mark.parametrize("position", [None, -1, 2])
def test_steering_changes_the_site_by_exactly_s_v(tiny, position):
    _, model = tiny
    v = _unit(model.config.hidden_size, 3)
    before = _at(model, 0, "resid_post")
    with intervene(model, Steer(0, "resid_post", v, scale=2.5, position=position)):
        after = _at(model, 0, "resid_post")
    expected = before.clone()
    if position is None:
        expected += 2.5 * v
    else:
        expected[:, position] += 2.5 * v
    torch.testing.assert_close(after, expected, atol=1e-4, rtol=1e-4)


def test_steering_reaches_the_output_and_composes_with_projection(tiny):
    _, model = tiny
    d = model.config.hidden_size
    v = _unit(d, 4)
    plain = model(IDS).logits
    with intervene(model, Steer(0, "resid_post", v, scale=5.0)):
        steered = model(IDS).logits
    # steering along v then projecting v out at the same point cancels it
    with intervene(model, Steer(0, "resid_post", v, 5.0), ProjectOut(v, 0)):
        both = _at(model, 0, "resid_post")
    assert not torch.allclose(plain, steered)
    assert (both @ v).abs().max() < 1e-4
    torch.testing.assert_close(model(IDS).logits, plain)


def _dictionary(d: int, layer: int, encoding: Encoding | None = None) -> SparseDictionary:
    g = torch.Generator().manual_seed(5)
    F = 16
    return SparseDictionary(
        torch.randn(d, F, generator=g) / d**0.5,
        torch.full((F,), 0.1),
        torch.randn(F, d, generator=g) / d**0.5,
        torch.randn(d, generator=g) * 0.01,
        meta=DictionaryMeta(format="t", architecture="relu", layer=layer, site="resid_post"),
        encoding=encoding,
    )


def _orthonormal(d: int, layer: int, scale: float = 1.0) -> SparseDictionary:
    """A square dictionary whose decoder rows are orthonormal and whose encoder is their
    transpose: re-encoding an edited vector reads every latent back exactly."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(8)))
    return SparseDictionary(
        q.T.contiguous(),
        torch.zeros(d),
        q.contiguous(),
        torch.zeros(d),
        meta=DictionaryMeta(format="t", architecture="relu", layer=layer, site="resid_post"),
        encoding=Encoding(input_norm="scale" if scale != 1.0 else "none", input_scale=scale),
    )


@pytest.mark.parametrize("scale", [1.0, 0.25])
@pytest.mark.parametrize("value", [0.0, 3.0])
def test_a_clamped_latent_reads_back_its_value_and_the_error_is_kept(tiny, value, scale):
    _, model = tiny
    sae = _orthonormal(model.config.hidden_size, 1, scale)
    before = _at(model, 1, "resid_post")
    f = sae.encode(before)
    latent = int((f > 0).float().mean((0, 1)).argmax())  # one that fires
    with intervene(model, SetLatent(sae, latent, value=value)):
        after = _at(model, 1, "resid_post")
    f2 = sae.encode(after)
    # where the latent fired it reads back exactly; where it did not, its negative
    # pre-activation belongs to the error term, which is kept, so it reads back a little less
    on = f[..., latent] > 0
    torch.testing.assert_close(f2[..., latent][on], torch.full_like(f2[..., latent][on], value))
    assert (f2[..., latent][~on] <= value + 1e-5).all()
    others = [i for i in range(sae.d_sae) if i != latent]
    torch.testing.assert_close(f2[..., others], f[..., others], atol=1e-4, rtol=1e-4)
    error = before - sae(before)
    assert error.norm() > 1.0  # relu drops the negative parts: a real error term
    kept = after - sae(after)
    torch.testing.assert_close(kept[on], error[on], atol=1e-4, rtol=1e-4)


def test_a_clamp_adds_exactly_the_change_of_that_latent_times_its_decoder_row(tiny):
    _, model = tiny
    sae = _dictionary(model.config.hidden_size, 1)
    before = _at(model, 1, "resid_post")
    f = sae.encode(before)
    latent = int((f > 0).float().mean((0, 1)).argmax())
    with intervene(model, SetLatent(sae, latent, value=2.0)):
        after = _at(model, 1, "resid_post")
    expected = before + (2.0 - f[..., latent])[..., None] * sae.W_dec[latent]
    torch.testing.assert_close(after, expected, atol=1e-4, rtol=1e-4)


def test_set_latent_only_where_active_and_bad_latent(tiny):
    _, model = tiny
    sae = _dictionary(model.config.hidden_size, 1)
    before = _at(model, 1, "resid_post")
    f = sae.encode(before)
    latent = int(((f > 0).float().mean((0, 1)) - 0.5).abs().argmin())  # fires on some tokens
    off = f[..., latent] == 0
    assert off.any() and (~off).any()
    with intervene(model, SetLatent(sae, latent, value=9.0, only_active=True)):
        after = _at(model, 1, "resid_post")
    torch.testing.assert_close(after[off], before[off])
    with pytest.raises(InputError, match="latent 99"):
        _run_with(model, SetLatent(sae, 99))


def _down_proj_out(model, layer: int) -> torch.Tensor:
    """The output of layer ``layer``'s MLP down-projection (with its LoRA), where the LoRA
    writes before any post-MLP norm (Gemma 2 has one)."""
    module = model.get_base_model().model.layers[layer].mlp.down_proj
    seen = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            model(IDS)
    finally:
        handle.remove()
    return seen[0]


def test_lora_b_ablation_equals_the_activation_ablation_where_the_lora_writes_alone(
    tiny, tiny_model_dirs, make_lora_adapter, tmp_path
):
    arch, _ = tiny
    path = tiny_model_dirs[arch]
    adapter = make_lora_adapter(path, tmp_path / "lora", layers=[1])
    model = load_adapter(load_model(str(path), dtype="float32").model, adapter).eval()
    u = _unit(model.config.hidden_size, 6)
    with adapter_state(model, False):
        base = _down_proj_out(model, 1)
    lora_part = _down_proj_out(model, 1) - base
    assert lora_part.abs().max() > 1e-2
    with intervene(model, EditLoraB(direction=u)):
        edited = _down_proj_out(model, 1) - base
    expected = lora_part - (lora_part @ u)[..., None] * u  # the activation ablation of v
    torch.testing.assert_close(edited, expected, atol=1e-5, rtol=1e-4)
    with intervene(model, EditLoraB(scale=0.0)):
        torch.testing.assert_close(_down_proj_out(model, 1), base, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(_down_proj_out(model, 1) - base, lora_part)  # restored
    with pytest.raises(InputError, match="no LoRA B weight matches"):
        _run_with(model, EditLoraB(modules=("q_proj",)))


def test_lora_b_edit_refuses_a_plain_model_and_a_wrong_width(tiny):
    _, model = tiny
    with pytest.raises(InputError, match="not a PEFT LoRA"):
        _run_with(model, EditLoraB(scale=0.5))
    with pytest.raises(InputError, match="zero"):
        _run_with(model, ProjectOut(torch.zeros(model.config.hidden_size), 0))


def test_prompt_only_steering_leaves_single_token_passes_alone(tiny):
    _, model = tiny
    v = _unit(model.config.hidden_size, 9)
    one = IDS[:, :1]
    before = _at(model, 0, "resid_post", one)
    with intervene(model, Steer(0, "resid_post", v, 3.0, position=-1, prompt_only=True)):
        torch.testing.assert_close(_at(model, 0, "resid_post", one), before)
        steered = _at(model, 0, "resid_post")
    torch.testing.assert_close(steered[:, -1], _at(model, 0, "resid_post")[:, -1] + 3.0 * v)


def test_interventions_apply_during_generation_and_keep_gradients(tiny):
    _, model = tiny
    v = _unit(model.config.hidden_size, 7)
    prompt = IDS[:1, :3]
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    plain = model.generate(prompt, **kw)
    with intervene(model, Steer(0, "resid_post", v, scale=200.0)):
        steered = model.generate(prompt, **kw)
    assert not torch.equal(plain, steered)
    vec = torch.zeros(model.config.hidden_size, requires_grad=True)
    with intervene(model, Steer(0, "resid_post", vec)):
        model(IDS).logits.sum().backward()
    assert vec.grad is not None and vec.grad.abs().sum() > 0
