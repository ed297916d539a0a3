"""SAE training: planted features are recovered, constraints hold, files round-trip, runs resume."""

from __future__ import annotations

import json

import pytest
import torch

from emdiff.dictionaries import load_dictionary
from emdiff.dictionaries.activations import (
    BatchState,
    NonFiniteActivationError,
    TensorSource,
    iter_batches,
)
from emdiff.dictionaries.sae import SAEConfig, TrainableSAE, geometric_median, train_sae
from emdiff.dictionaries.sparse_codes import decode
from emdiff.dictionaries.train import fit


def planted(n: int = 6000, d: int = 24, m: int = 48, active: int = 3, seed: int = 0):
    """Activations that are sparse sums of ``m`` unit directions plus an offset."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(m, d, generator=g)
    D /= D.norm(dim=-1, keepdim=True)
    on = torch.rand(n, m, generator=g) < active / m
    codes = on * (0.5 + torch.rand(n, m, generator=g))
    return codes @ D + 2.0, D


def small(arch: str, **kw) -> SAEConfig:
    base = dict(
        architecture=arch,
        d_sae=96,
        k=4,
        steps=600,
        batch_size=256,
        lr=4e-3,
        log_every=50,
        checkpoint_every=100,
        warmup_steps=20,
    )
    return SAEConfig(**{**base, **kw})


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_each_architecture_recovers_planted_directions(arch, tmp_path):
    x, D = planted()
    # iid planted features have no hierarchy: give the first Matryoshka group room for all 48
    kw = {"matryoshka_widths": [48, 96]} if arch == "matryoshka" else {}
    sae, log = train_sae(
        TensorSource(x),
        small(arch, **kw),
        tmp_path / arch,
        layer=3,
        site="resid_post",
        progress=False,
    )
    cos = (sae.W_dec @ D.T).max(0).values  # best latent for each planted direction
    assert (cos > 0.9).float().mean() >= 0.9, cos
    f = sae.encode(x[:2000])
    fvu = (sae(x[:2000]) - x[:2000]).pow(2).sum() / (x[:2000] - x[:2000].mean(0)).pow(2).sum()
    assert fvu < 0.15
    assert 2 <= (f > 0).sum(-1).float().mean() <= 6  # L0 near k = 4
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(96), atol=1e-5)
    assert log.history[-1]["step"] == 600 and log.history[-1]["fvu"] < log.history[0]["fvu"]
    # the SAELens folder reads back through the public loader and computes the same function
    back = load_dictionary(tmp_path / arch)
    assert torch.allclose(back.encode(x[:500]), f[:500], atol=1e-5)
    assert (back.meta.layer, back.meta.site) == (3, "resid_post")
    cfg = json.loads((tmp_path / arch / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert (tmp_path / arch / "training.png").stat().st_size > 0
    if arch == "topk":
        assert cfg["architecture"] == "topk" and cfg["k"] == 4
    else:  # one global threshold, saved as a JumpReLU as SAELens and dictionary_learning do
        assert cfg["architecture"] == "jumprelu"
        assert back.threshold.unique().numel() == 1 and float(back.threshold[0]) > 0
    extra = json.loads((tmp_path / arch / "emdiff_training.json").read_text())
    assert extra["matryoshka_widths"] == ([48, 96] if arch == "matryoshka" else None)


def test_default_matryoshka_prefixes():
    assert SAEConfig(architecture="matryoshka").prefixes(1024) == [64, 128, 256, 512, 1024]
    assert SAEConfig(architecture="batchtopk").prefixes(1024) == [1024]


def test_matryoshka_prefix_reconstructs_on_its_own():
    """The first latents of a Matryoshka SAE explain more alone than those of a plain BatchTopK."""
    x, _ = planted(active=4, seed=1)
    fvu = {}
    for arch in ("batchtopk", "matryoshka"):
        sae, _ = train_sae(TensorSource(x), small(arch, matryoshka_widths=[12, 96]), progress=False)
        f = sae.encode(x[:2000])
        f[:, 12:] = 0
        err = (sae.decode(f) - x[:2000]).pow(2).sum()
        fvu[arch] = float(err / (x[:2000] - x[:2000].mean(0)).pow(2).sum())
    assert fvu["matryoshka"] < fvu["batchtopk"]


def test_aux_loss_trains_only_dead_latents_on_the_residual_error():
    x, _ = planted(seed=2)
    sae = TrainableSAE(x.shape[1], small("topk", dead_tokens=2000))
    sae.initialise(x[:1000])
    sae.since_fired[48:] = 10_000  # the second half has not fired for 10k tokens: dead
    pre, codes = sae.encode_train(x[:256])
    x_hat = (decode(codes, sae.W_dec) + sae.b_dec).detach()
    sae.zero_grad()
    aux = sae._aux_loss(x[:256], x[:256] - sae.b_dec, x_hat, pre)
    assert aux > 0
    aux.backward()
    assert sae.W_dec.grad[48:].abs().sum() > 0 and sae.W_dec.grad[:48].abs().sum() == 0


def dense_reference_loss(sae: TrainableSAE, x: torch.Tensor) -> torch.Tensor:
    """The textbook step: dense codes, dense decode, dense AuxK (what the sparse path replaces)."""
    cfg, W_enc, W_dec = sae.cfg, sae.W_enc_T.t(), sae.W_dec
    pre = (x - sae.b_dec) @ W_enc + sae.b_enc
    if cfg.architecture == "topk":
        top = pre.topk(cfg.k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    else:
        post = torch.relu(pre).flatten()
        top = post.topk(cfg.k * len(x))
        f = torch.zeros_like(post).scatter(0, top.indices, top.values).view_as(pre)
    x_hat, mses, start = sae.b_dec.expand_as(x), [], 0
    for end in sae.prefix:
        x_hat = x_hat + f[:, start:end] @ W_dec[start:end]
        mses.append((x_hat - x).pow(2).sum(-1).mean())
        start = end
    # as in the step: the batch's firing counts before the dead latents are chosen
    dead = (sae.since_fired + len(x) >= sae.dead_tokens) & ~(f > 0).any(0)
    err = x - x_hat.detach()
    masked = pre.masked_fill(~dead, float("-inf"))
    top = masked.topk(min(sae.aux_k, int(dead.sum())), dim=-1)
    f_aux = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    aux = (f_aux @ W_dec - err).pow(2).sum(-1).mean() / (err - err.mean(0)).pow(2).sum(-1).mean()
    return torch.stack(mses).mean() + cfg.aux_coef * aux


@pytest.mark.parametrize(
    ("arch", "layout"),
    [("topk", "csr"), ("batchtopk", "csr"), ("matryoshka", "csr"), ("topk", "coo")],
)
def test_sparse_step_equals_the_dense_textbook_step(arch, layout, monkeypatch):
    """Loss and every gradient of the sparse step match dense codes + dense AuxK, through the CSR
    products and through the COO fallback (for builds without a CSR product)."""
    if layout == "coo":

        def no_csr(*args, **kwargs):
            raise NotImplementedError("no CSR here")

        monkeypatch.setattr(torch, "sparse_csr_tensor", no_csr)
    x, _ = planted(n=512, seed=3)
    sae = TrainableSAE(x.shape[1], small(arch, matryoshka_widths=[12, 40, 96], aux_coef=0.5))
    sae.initialise(x)
    with torch.no_grad():
        sae.W_enc_T.add_(0.1 * torch.randn_like(sae.W_enc_T))  # encoder != decoder transpose
        sae.b_enc.uniform_(-0.2, 0.2)
    sae.since_fired[::3] = 10**9  # a third dead: the AuxK term is live
    grads = []
    for fn in (lambda: dense_reference_loss(sae, x), lambda: sae.loss(x, step=0)[0]):
        sae.zero_grad()
        loss = fn()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in sae.named_parameters()}))
    (ref, ref_g), (got, got_g) = grads
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for name, g in ref_g.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(got_g[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_geometric_median_ignores_outliers():
    pts = torch.cat([torch.zeros(50, 3), torch.full((5, 3), 100.0)])
    assert geometric_median(pts).norm() < 1.0 < pts.mean(0).norm()


def test_resume_reproduces_an_uninterrupted_run(tmp_path, monkeypatch):
    x, _ = planted(n=3000)
    cfg = small("batchtopk", steps=60, checkpoint_every=20, log_every=10)
    ref, _ = train_sae(TensorSource(x), cfg, tmp_path / "ref", progress=False)

    calls = {"n": 0}
    original = TrainableSAE.after_step

    def crash(self):
        original(self)
        calls["n"] += 1
        if calls["n"] == 30:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainableSAE, "after_step", crash)
    with pytest.raises(KeyboardInterrupt):
        train_sae(TensorSource(x), cfg, tmp_path / "run", progress=False)
    monkeypatch.setattr(TrainableSAE, "after_step", original)
    progress = json.loads((tmp_path / "run" / "checkpoint" / "progress.json").read_text())
    assert progress["step"] == 20
    again, log = train_sae(TensorSource(x), cfg, tmp_path / "run", progress=False)
    assert torch.equal(again.W_dec, ref.W_dec) and torch.equal(again.threshold, ref.threshold)
    assert [h["step"] for h in log.history] == [10, 20, 30, 40, 50, 60]
    with pytest.raises(ValueError, match=r"different run.*config"):
        train_sae(TensorSource(x), small("batchtopk", steps=61), tmp_path / "run", progress=False)


def test_batches_resume_exactly():
    x = torch.arange(100.0)[:, None]
    it = iter_batches(TensorSource(x), 16, seed=3)
    seen = [next(it) for _ in range(9)]  # crosses an epoch (6 batches per epoch)
    resumed = iter_batches(TensorSource(x), 16, seed=3, state=seen[3][1])
    for (b, _), (c, _) in zip(seen[4:], resumed, strict=False):
        assert torch.equal(b, c)
    assert seen[8][1] == BatchState(epoch=1, chunk=0, batch=3)


def test_bad_settings_and_bad_activations_fail_clearly():
    with pytest.raises(ValueError, match="k=96 must be smaller"):
        TrainableSAE(24, SAEConfig(d_sae=96, k=96))
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        SAEConfig(d_sae=0)
    with pytest.raises(ValueError, match="matryoshka_widths must be increasing"):
        SAEConfig(architecture="matryoshka", matryoshka_widths=[32, 16, 96])
    with pytest.raises(ValueError, match="last matryoshka width must equal d_sae=96"):
        TrainableSAE(24, SAEConfig(architecture="matryoshka", d_sae=96, matryoshka_widths=[8, 64]))
    x, _ = planted(n=1000)
    x[700, 5] = float("nan")
    with pytest.raises(NonFiniteActivationError, match="layer tensor, batch all: 1 NaN"):
        TensorSource(x)

    class Poisoned(TensorSource):
        def chunk(self, index):
            return self.acts.clone().fill_(float("inf"))

    sae = TrainableSAE(24, small("topk"), layer=7)
    with pytest.raises(
        NonFiniteActivationError,
        match="layer 7, batch of the initialisation sample: 0 NaN and 24000 Inf",
    ):
        fit(sae, Poisoned(planted(n=1000)[0]), small("topk"), progress=False)
