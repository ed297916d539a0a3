"""The five hook sites per architecture: they add up, the pass stops after them, edits propagate."""

from __future__ import annotations

import functools
from collections import Counter

import pytest
import torch

from emdiff.errors import InputError
from emdiff.models import decoder_layers
from emdiff.models.hooks import (
    SITES,
    capture_residuals,
    hook_points,
    residual_edit,
    residual_hooks,
    run_forward,
)
from emdiff.models.sites import LAYOUTS, Layout, LayoutError, Tap, model_type, site_tap

ARCHS = ("llama", "qwen2", "gemma2", "mistral", "qwen3", "gemma3_text")
IDS = torch.tensor([[0, 5, 9, 12, 7, 30, 31, 8], [0, 0, 0, 6, 11, 40, 2, 3]])
ATT = torch.tensor([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]])
REAL = ATT.bool()
TOL = dict(atol=1e-5, rtol=1e-5)


def build(arch: str) -> torch.nn.Module:
    """A 3-layer float32 model of ``arch`` with random weights and perturbed norm weights."""
    import transformers as tf

    prefix = dict(llama="Llama", qwen2="Qwen2", gemma2="Gemma2", mistral="Mistral", qwen3="Qwen3")
    name = prefix.get(arch, "Gemma3")  # gemma3_text: Gemma3TextConfig + Gemma3ForCausalLM
    config_cls = getattr(tf, "Gemma3TextConfig" if arch == "gemma3_text" else f"{name}Config")
    model_cls = getattr(tf, f"{name}ForCausalLM")
    config = config_cls(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        initializer_range=0.1,
        pad_token_id=0,
        **(dict(sliding_window=4) if arch.startswith(("gemma", "mistral")) else {}),
    )
    torch.manual_seed(0)
    model = model_cls(config).to(torch.float32).eval()
    with torch.no_grad():  # Gemma norms start as the identity; make every norm matter
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.5)
    return model


tiny = functools.cache(build)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=ATT).logits[REAL]


def capture_all(model: torch.nn.Module, **kw) -> dict:
    n = len(decoder_layers(model))
    return capture_residuals(model, IDS, ATT, layers=range(n), sites=SITES, **kw)


def test_layouts_cover_the_installed_architectures():
    assert {model_type(tiny(a)) for a in ARCHS} == set(LAYOUTS)


@pytest.mark.parametrize("arch", ARCHS)
def test_sites_add_up(arch):
    model = tiny(arch)
    got = capture_all(model)
    n = len(decoder_layers(model))
    assert len(got) == 5 * n
    for layer in range(n):
        at = {site: got[(layer, site)][REAL] for site in SITES}
        assert not torch.allclose(at["attn_out"], torch.zeros_like(at["attn_out"]))
        assert not torch.allclose(at["mlp_out"], torch.zeros_like(at["mlp_out"]))
        torch.testing.assert_close(at["resid_mid"], at["resid_pre"] + at["attn_out"], **TOL)
        torch.testing.assert_close(at["resid_post"], at["resid_mid"] + at["mlp_out"], **TOL)
        if layer + 1 < n:
            torch.testing.assert_close(got[(layer + 1, "resid_pre")], got[(layer, "resid_post")])
    with torch.no_grad():
        hs = model(input_ids=IDS, attention_mask=ATT, output_hidden_states=True).hidden_states
    for layer in range(n):
        torch.testing.assert_close(got[(layer, "resid_pre")][REAL], hs[layer][REAL], **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_attn_out_is_what_the_layer_adds(arch):
    """Gemma norms the attention output before adding it; Llama-style layers add it raw."""
    model = tiny(arch)
    block = decoder_layers(model)[1]
    raw: list[torch.Tensor] = []
    handle = block.self_attn.register_forward_hook(lambda m, a, out: raw.append(out[0]))
    try:
        got = capture_residuals(model, IDS, ATT, layers=1, sites="attn_out")[(1, "attn_out")]
    finally:
        handle.remove()
    if arch.startswith("gemma"):
        assert not torch.allclose(got, raw[0], atol=1e-3)
        with torch.no_grad():
            torch.testing.assert_close(got, block.post_attention_layernorm(raw[0]))
    else:
        torch.testing.assert_close(got, raw[0])


# layer 1's modules in execution order, and how many of them run when the last point is (1, site)
ORDER = {
    "llama": ["input_layernorm", "self_attn", "post_attention_layernorm", "mlp"],
    "gemma2": [
        "input_layernorm",
        "self_attn",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "mlp",
        "post_feedforward_layernorm",
    ],
}
RUN = {
    "llama": dict(resid_pre=0, attn_out=2, resid_mid=2, mlp_out=4, resid_post=4),
    "gemma2": dict(resid_pre=0, attn_out=3, resid_mid=3, mlp_out=6, resid_post=6),
}


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("site", SITES)
def test_forward_stops_right_after_the_last_point(arch, site):
    model = tiny(arch)
    order = ORDER[arch]
    calls: Counter[str] = Counter()
    handles = [
        module.register_forward_hook(lambda *a, name=name: calls.update([name]))
        for name, module in model.named_modules()
        if name
    ]
    try:
        capture_residuals(model, IDS, ATT, layers=[1], sites=site)
    finally:
        for h in handles:
            h.remove()
    layer0 = [n for n, _ in model.named_modules() if n.startswith("model.layers.0.")]
    assert all(calls[n] == 1 for n in layer0)
    k = RUN[arch][site]
    assert [calls[f"model.layers.1.{m}"] for m in order] == [1] * k + [0] * (len(order) - k)
    later = [n for n in calls if n.startswith(("model.layers.2", "model.norm", "lm_head"))]
    assert later == []


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("site", SITES)
def test_identity_edit_keeps_logits(arch, site):
    model = tiny(arch)
    clean = logits(model)
    with residual_edit(model, 1, site, lambda h: h + torch.zeros_like(h)):
        torch.testing.assert_close(logits(model), clean, **TOL)
    with residual_edit(model, 1, site, lambda h: h * 0.0):
        assert not torch.allclose(logits(model), clean, atol=1e-3)  # the edit does reach logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("site", SITES)
def test_added_vector_propagates(arch, site):
    model = tiny(arch)
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    clean = capture_all(model)
    with residual_edit(model, 1, site, lambda h: h + v):
        got = capture_all(model, stop_early=False)  # reads are hooked after the edit: they see it
    i = SITES.index(site)
    if site == "resid_mid":  # done by moving what the attention branch adds, which reads show
        torch.testing.assert_close(got[(1, "attn_out")], clean[(1, "attn_out")] + v, **TOL)
        i -= 1
    for before in SITES[:i]:  # upstream of the edit: untouched
        torch.testing.assert_close(got[(1, before)], clean[(1, before)])
    torch.testing.assert_close(got[(1, site)], clean[(1, site)] + v, **TOL)
    shift = v if site == "resid_post" else 0.0  # the sums still hold after the edit
    torch.testing.assert_close(
        got[(1, "resid_post")] - got[(1, "mlp_out")], got[(1, "resid_mid")] + shift, **TOL
    )
    if site in ("attn_out", "resid_mid"):  # the residual the MLP reads and adds to moved by v
        torch.testing.assert_close(got[(1, "resid_mid")], clean[(1, "resid_mid")] + v, **TOL)
    if site == "mlp_out":
        torch.testing.assert_close(got[(1, "resid_post")], clean[(1, "resid_post")] + v, **TOL)
    torch.testing.assert_close(got[(2, "resid_pre")], got[(1, "resid_post")])  # downstream
    assert not torch.allclose(got[(2, "resid_post")], clean[(2, "resid_post")], atol=1e-3)


def test_unknown_architecture_reads_only_the_layer_boundaries():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    model = GPTNeoXForCausalLM(config).eval()
    for site in ("attn_out", "resid_mid", "mlp_out"):
        with pytest.raises(
            LayoutError,
            match=rf"site '{site}' is not mapped for model type "
            r"'gpt_neox'.*add a layout for 'gpt_neox' to LAYOUTS in "
            r"emdiff/models/sites.py",
        ):
            hook_points(model, 0, site)
        with pytest.raises(InputError, match="gpt_neox"):
            residual_edit(model, 0, site, lambda h: h).__enter__()
    got = capture_residuals(model, IDS, ATT, layers=[0, 1], sites=("resid_pre", "resid_post"))
    torch.testing.assert_close(got[(1, "resid_pre")], got[(0, "resid_post")])
    assert got[(1, "resid_post")].shape == (2, 8, 32)
    assert site_tap(model, "resid_post") == Tap("", "output")


def test_a_layout_naming_a_missing_module_is_an_input_error(monkeypatch):
    model = tiny("llama")
    bad = Layout(Tap("attention", "output"), Tap("ln_2", "input"), Tap("mlp", "output"))
    monkeypatch.setitem(LAYOUTS, "llama", bad)
    with pytest.raises(InputError, match=r"submodule 'attention', which LlamaDecoderLayer"):
        hook_points(model, 1, "attn_out")
    with pytest.raises(InputError, match="'ln_2'"):
        capture_residuals(model, IDS, layers=0, sites="resid_mid")
    assert hook_points(model, 1, "mlp_out") == [(1, "mlp_out")]


def test_unknown_site_lists_the_five():
    model = tiny("llama")
    with pytest.raises(InputError, match="resid_pre, attn_out, resid_mid, mlp_out, resid_post"):
        hook_points(model, 0, "hook_z")
    with pytest.raises(InputError, match="unknown hook site"):
        residual_edit(model, 0, "resid", lambda h: h).__enter__()


def test_hook_points_are_in_execution_order():
    model = tiny("gemma2")
    got = hook_points(model, [2, 0], ("resid_post", "mlp_out", "resid_pre", "resid_mid"))
    assert got == [
        (0, "resid_pre"),
        (0, "resid_mid"),
        (0, "mlp_out"),
        (0, "resid_post"),
        (2, "resid_pre"),
        (2, "resid_mid"),
        (2, "mlp_out"),
        (2, "resid_post"),
    ]


def _hooks(model: torch.nn.Module) -> list[tuple[str, list[int], list[int]]]:
    """Hook ids per module (transformers keeps its own output-recording hooks installed)."""
    return [
        (name, list(m._forward_hooks), list(m._forward_pre_hooks))
        for name, m in model.named_modules()
    ]


def test_hooks_are_removed_also_on_errors():
    model = tiny("gemma2")
    before = _hooks(model)
    capture_all(model)
    assert _hooks(model) == before
    for site in SITES:
        with residual_edit(model, 1, site, lambda h: h):
            assert _hooks(model) != before
        assert _hooks(model) == before
        with pytest.raises(RuntimeError, match="boom"), residual_edit(model, 1, site, lambda h: h):
            raise RuntimeError("boom")
        assert _hooks(model) == before

    def fail(layer, site, hidden):
        raise RuntimeError("boom in hook")

    points = hook_points(model, [0, 1], SITES)
    with pytest.raises(RuntimeError, match="boom in hook"), residual_hooks(model, points, fail):
        run_forward(model, IDS, ATT)
    assert _hooks(model) == before


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")
def test_sublayer_sites_through_a_peft_wrapper():
    from peft import LoraConfig, get_peft_model

    base = build("qwen2")
    clean = capture_residuals(base, IDS, ATT, layers=[0], sites=SITES)
    config = LoraConfig(r=2, target_modules=["o_proj"], lora_dropout=0.0, init_lora_weights=False)
    tuned = get_peft_model(base, config).eval()
    assert model_type(tuned) == "qwen2"
    got = capture_residuals(tuned, IDS, ATT, layers=[0], sites=SITES)
    torch.testing.assert_close(got[(0, "resid_pre")], clean[(0, "resid_pre")])
    assert not torch.allclose(got[(0, "attn_out")], clean[(0, "attn_out")], atol=1e-4)
    torch.testing.assert_close(
        got[(0, "resid_mid")], got[(0, "resid_pre")] + got[(0, "attn_out")], **TOL
    )
