"""ITDA: matching pursuit encoding, greedy dictionary construction, Jaccard, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from emdiff.dictionaries.base import DictionaryShapeError, SparseDictionary
from emdiff.dictionaries.itda import (
    ITDAConfig,
    ITDADictionary,
    ITDAFormatError,
    build_itda,
    load_itda,
    matching_pursuit,
    save_itda,
)
from emdiff.dictionaries.itda_similarity import itda_jaccard, itda_jaccard_matrix


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _keys(n: int, start: int = 0) -> torch.Tensor:
    return torch.stack([torch.arange(start, start + n), torch.zeros(n, dtype=torch.long)], 1)


def _rel_err(d: ITDADictionary, x: torch.Tensor) -> torch.Tensor:
    xc = x - d.b_dec
    return ((d(x) - x) ** 2).sum(-1) / (xc**2).sum(-1)


def _planted(n_dirs: int = 5, d: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dirs = _unit(torch.randn(n_dirs, d, generator=g))

    def sample(n: int) -> torch.Tensor:
        which = torch.randint(0, n_dirs, (n,), generator=g)
        scale = 0.5 + torch.rand(n, 1, generator=g)
        return dirs[which] * scale + 1e-3 * torch.randn(n, d, generator=g)

    return dirs, sample


# ---- matching pursuit -----------------------------------------------------------------------
@pytest.mark.parametrize("nonnegative", [False, True])
def test_mp_on_orthonormal_atoms_recovers_exact_sparse_codes(nonnegative):
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    atoms = q.T.contiguous()  # orthonormal rows
    codes = torch.zeros(20, 16, dtype=torch.float64)
    for i in range(20):
        support = torch.randperm(16, generator=g)[:3]
        vals = 0.5 + torch.rand(3, generator=g, dtype=torch.float64)
        if not nonnegative:
            vals = vals * torch.where(torch.rand(3, generator=g) < 0.5, -1.0, 1.0)
        codes[i, support] = vals.to(torch.float64)
    x = codes @ atoms
    d = ITDADictionary(atoms, _keys(16), k=3, nonnegative=nonnegative)
    f = d.encode(x)
    torch.testing.assert_close(f, codes)
    torch.testing.assert_close(d(x), x)
    assert ((f != 0).sum(-1) == 3).all()
    if not nonnegative:
        assert (f < 0).any()  # signed MP keeps negative coefficients


def test_nonnegative_mp_never_emits_negative_codes():
    atoms = _unit(torch.randn(40, 8, generator=torch.Generator().manual_seed(2)))
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(3))
    codes, _ = matching_pursuit(x, atoms, 6, nonnegative=True)
    signed, _ = matching_pursuit(x, atoms, 6)
    assert (codes >= 0).all() and (signed < 0).any()


def test_reconstruction_error_decreases_monotonically_with_k():
    g = torch.Generator().manual_seed(4)
    atoms = _unit(torch.randn(64, 16, generator=g))
    x = torch.randn(100, 16, generator=g)
    errs = []
    for k in range(1, 10):
        codes, residual = matching_pursuit(x, atoms, k)
        torch.testing.assert_close(x - codes @ atoms, residual, atol=1e-5, rtol=0)
        assert ((codes != 0).sum(-1) <= k).all()
        errs.append((residual**2).sum(-1))
    errs = torch.stack(errs)
    assert (errs[1:] <= errs[:-1] + 1e-5).all()
    assert (errs[-1] < 0.5 * errs[0]).all()


def test_encode_accepts_any_leading_shape_and_empty_dictionary():
    d = ITDADictionary(_unit(torch.randn(7, 6)), _keys(7), k=2)
    x = torch.randn(2, 3, 6)
    f = d.encode(x)
    assert f.shape == (2, 3, 7)
    torch.testing.assert_close(f.reshape(6, 7), d.encode(x.reshape(6, 6)))
    offset = torch.arange(6.0)
    empty = ITDADictionary(torch.zeros(0, 6), _keys(0), k=3, offset=offset)
    f0 = empty.encode(x)
    assert f0.shape == (2, 3, 0)
    torch.testing.assert_close(empty.decode(f0), offset.expand(2, 3, 6))
    with pytest.raises(DictionaryShapeError):
        d.encode(torch.randn(3, 5))
    with pytest.raises(ValueError, match="unit-norm"):
        ITDADictionary(2 * _unit(torch.randn(3, 6)), _keys(3), k=1)
    with pytest.raises(DictionaryShapeError, match="atom_keys"):
        ITDADictionary(_unit(torch.randn(3, 6)), _keys(2), k=1)


# ---- construction ---------------------------------------------------------------------------
def test_build_on_planted_directions_finds_each_direction_once():
    dirs, sample = _planted()
    cfg = ITDAConfig(k=2, loss_threshold=0.1)
    d = build_itda([sample(200) for _ in range(4)], cfg, progress=False)
    assert d.d_sae == 5
    cos = d.decoder_rows @ dirs.T
    assert (cos.max(dim=0).values > 0.99).all()
    torch.testing.assert_close(d.decoder_rows.norm(dim=-1), torch.ones(5))
    # a mix of two planted directions is reconstructed with k = 2
    mix = 0.8 * dirs[0] + 0.6 * dirs[3]
    assert _rel_err(d, mix[None]) < 1e-3
    assert d.meta.format == "itda" and d.meta.architecture == "itda"


def test_threshold_holds_on_training_data_and_orders_dictionary_size():
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(5))
    sizes = {}
    for thr in (0.15, 0.3, 0.6):
        d = build_itda(x.split(100), ITDAConfig(k=4, loss_threshold=thr), progress=False)
        err = _rel_err(d, x)
        # greedy MP is not monotone in the dictionary, so a row that passed early can end up a
        # little above the threshold once later atoms change its pursuit; rows that became atoms
        # are reconstructed exactly
        assert (err > thr).float().mean() < 0.05 and (err < thr + 0.15).all()
        assert (err[d.atom_keys[:, 0]] < 1e-6).all()
        sizes[thr] = d.d_sae
    assert sizes[0.15] > sizes[0.3] > sizes[0.6] > 0


def test_max_atoms_caps_the_dictionary():
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(6))
    free = build_itda([x], ITDAConfig(k=3, loss_threshold=0.2), progress=False)
    capped = build_itda(
        x.split(50), ITDAConfig(k=3, loss_threshold=0.2, max_atoms=7), progress=False
    )
    assert free.d_sae > 7 and capped.d_sae == 7
    assert capped.atom_keys.shape == (7, 2)


def test_near_duplicates_in_one_batch_give_one_atom():
    g = torch.Generator().manual_seed(7)
    v, w = _unit(torch.randn(2, 24, generator=g))
    batch = torch.cat(
        [
            v + 1e-4 * torch.randn(50, 24, generator=g),
            2 * w + 1e-4 * torch.randn(50, 24, generator=g),
        ]
    )
    batch = batch[torch.randperm(100, generator=g)]
    d = build_itda([batch], ITDAConfig(k=1, loss_threshold=0.05), progress=False)
    assert d.d_sae == 2
    # same answer as feeding one activation at a time
    one_by_one = build_itda(
        list(batch[:, None]), ITDAConfig(k=1, loss_threshold=0.05), progress=False
    )
    assert one_by_one.d_sae == 2
    assert itda_jaccard(d, one_by_one) == 1.0


def test_batched_build_is_close_to_one_at_a_time():
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(8))
    cfg = ITDAConfig(k=4, loss_threshold=0.3)
    batched = build_itda([x], cfg, progress=False)
    sequential = build_itda(list(x[:, None]), cfg, progress=False)
    assert abs(batched.d_sae - sequential.d_sae) <= 0.25 * sequential.d_sae


def test_centering_uses_first_batch_mean_or_the_given_mean():
    _, sample = _planted(n_dirs=3, d=16, seed=9)
    shift = 10.0 * torch.ones(16)
    batches = [sample(300) + shift for _ in range(3)]
    d = build_itda(batches, ITDAConfig(k=2, loss_threshold=0.1, center=True), progress=False)
    torch.testing.assert_close(d.b_dec, batches[0].mean(0))
    torch.testing.assert_close(d.decode(torch.zeros(d.d_sae)), batches[0].mean(0))
    held_out = sample(50) + shift
    assert (_rel_err(d, held_out) < 0.1).all()
    given = build_itda(
        batches, ITDAConfig(k=2, loss_threshold=0.1, center=True), mean=shift, progress=False
    )
    torch.testing.assert_close(given.b_dec, shift)
    x0 = held_out - shift  # encoding subtracts the offset before the pursuit
    torch.testing.assert_close(given.encode(held_out), matching_pursuit(x0, given.W_dec, 2)[0])
    plain = build_itda(batches, ITDAConfig(k=2, loss_threshold=0.1), progress=False)
    assert (plain.b_dec == 0).all()


def test_keys_default_to_running_index_and_explicit_keys_are_kept():
    g = torch.Generator().manual_seed(10)
    a, b = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    d = build_itda([a, b], ITDAConfig(k=1, loss_threshold=0.01), progress=False)
    assert d.d_sae == 8
    assert d.atom_keys.tolist() == [[i, 0] for i in range(8)]
    keys = torch.tensor([[7, 0], [7, 1], [7, 2], [9, 5]])
    d2 = build_itda([(a, keys)], ITDAConfig(k=1, loss_threshold=0.01), progress=False)
    assert d2.atom_keys.tolist() == keys.tolist()
    with pytest.raises(ValueError, match=r"keys must be \[4, 2\]"):
        build_itda([(a, keys[:3])], ITDAConfig(), progress=False)


def test_nan_batch_raises_naming_batch_and_layer():
    good = torch.randn(10, 8)
    bad = good.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"batch 2 \(layer 5\).*NaN"):
        build_itda([good, good, bad], ITDAConfig(k=2), layer=5, progress=False)
    bad[3, 2] = float("inf")
    with pytest.raises(ValueError, match=r"batch 0"):
        build_itda([bad], ITDAConfig(k=2), progress=False)


def test_width_mismatches_and_empty_stream():
    with pytest.raises(DictionaryShapeError, match="d_in=6"):
        build_itda([torch.randn(3, 8)], ITDAConfig(), d_in=6, progress=False)
    with pytest.raises(DictionaryShapeError, match="batch 1"):
        build_itda([torch.randn(3, 8), torch.randn(3, 7)], ITDAConfig(), progress=False)
    empty = build_itda([], ITDAConfig(), d_in=6, progress=False)
    assert empty.d_sae == 0 and empty.d_in == 6
    with pytest.raises(ValueError, match="d_in"):
        build_itda([], ITDAConfig(), progress=False)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"k": 0},
        {"loss_threshold": 0.0},
        {"loss_threshold": 1.0},
        {"loss_threshold": -0.2},
        {"max_atoms": 0},
    ],
)
def test_bad_config_raises_value_error(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ITDAConfig(**kwargs)


# ---- drop-in for SparseDictionary -----------------------------------------------------------
def test_drop_in_for_sparse_dictionary():
    _, sample = _planted(n_dirs=4, d=16, seed=11)
    d = build_itda(
        [sample(100)],
        ITDAConfig(k=2, loss_threshold=0.1),
        layer=3,
        site="resid_post",
        progress=False,
    )
    assert isinstance(d, SparseDictionary)
    assert (d.d_in, d.d_sae, d.k) == (16, 4, 2)
    assert d.decoder_rows.shape == (4, 16)
    x = sample(6).reshape(2, 3, 16)
    assert d.encode(x).shape == (2, 3, 4)
    assert d(x).shape == x.shape
    d64 = d.to(torch.float64)
    assert d64.W_dec.dtype == torch.float64 and d64.atom_keys.dtype == torch.long
    f = d64.encode(x.double())
    assert f.dtype == torch.float64
    torch.testing.assert_close(d64.decode(f), x.double(), atol=1e-2, rtol=0)
    assert (d.meta.layer, d.meta.site, d.meta.hook) == (3, "resid_post", "blocks.3.hook_resid_post")


# ---- Jaccard --------------------------------------------------------------------------------
def _with_keys(keys: list[tuple[int, int]]) -> ITDADictionary:
    return ITDADictionary(_unit(torch.randn(len(keys), 4)), torch.tensor(keys).reshape(-1, 2), k=1)


def test_jaccard_self_disjoint_and_partial():
    _, sample = _planted(seed=12)
    data = [sample(100) for _ in range(3)]
    cfg = ITDAConfig(k=2, loss_threshold=0.1)
    a = build_itda(data, cfg, progress=False)
    shifted = build_itda(
        [(x, _keys(len(x), 10_000 + 100 * i)) for i, x in enumerate(data)], cfg, progress=False
    )
    assert itda_jaccard(a, a) == 1.0
    assert itda_jaccard(a, shifted) == 0.0
    p = _with_keys([(0, 0), (0, 1), (1, 0)])
    q = _with_keys([(0, 1), (1, 0), (2, 2), (3, 3)])
    assert itda_jaccard(p, q) == pytest.approx(2 / 5)
    assert itda_jaccard(_with_keys([]), _with_keys([])) == 1.0
    assert itda_jaccard(p, _with_keys([])) == 0.0
    m = itda_jaccard_matrix([p, q, a])
    assert isinstance(m, np.ndarray) and m.shape == (3, 3)
    np.testing.assert_allclose(np.diag(m), 1.0)
    np.testing.assert_allclose(m, m.T)
    assert m[0, 1] == pytest.approx(0.4)


# ---- persistence ----------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    _, sample = _planted(seed=13)
    cfg = ITDAConfig(k=3, loss_threshold=0.1, center=True, nonnegative=True)
    d = build_itda([sample(200)], cfg, layer=2, site="mlp_out", model_name="m", progress=False)
    save_itda(d, tmp_path / "itda")
    got = load_itda(tmp_path / "itda")
    x = sample(30)
    assert torch.equal(got.encode(x), d.encode(x))
    assert torch.equal(got.atom_keys, d.atom_keys) and torch.equal(got.b_dec, d.b_dec)
    assert (got.k, got.nonnegative, got.meta.layer, got.meta.site, got.meta.model_name) == (
        3,
        True,
        2,
        "mlp_out",
        "m",
    )
    assert got.meta.hook == "blocks.2.hook_mlp_out"
    assert got.config == cfg and got.meta.path == str(tmp_path / "itda")
    saved = json.loads((tmp_path / "itda" / "cfg.json").read_text())
    assert saved["format"] == "itda" and saved["n_atoms"] == d.d_sae and saved["d_in"] == 32
    empty = build_itda([], ITDAConfig(), d_in=5, progress=False)
    save_itda(empty, tmp_path / "empty")
    assert load_itda(tmp_path / "empty").d_sae == 0


def test_load_errors_name_the_file(tmp_path):
    d = ITDADictionary(_unit(torch.randn(3, 4)), _keys(3), k=1)
    folder = save_itda(d, tmp_path / "a")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "n_atoms": 4}))
    with pytest.raises(ITDAFormatError, match=r"itda\.safetensors.*atoms has shape"):
        load_itda(folder)
    (folder / "itda.safetensors").unlink()
    with pytest.raises(ValueError, match=r"itda\.safetensors is missing"):
        load_itda(folder)
    with pytest.raises(ValueError, match=r"cfg\.json is missing"):
        load_itda(tmp_path / "nowhere")
