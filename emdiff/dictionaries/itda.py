"""ITDA: Inference-Time Decomposition of Activations (Leask, Nanda & Al Moubayed, ICML 2025).

An ITDA dictionary is a set of *real* activations, each normalised to unit length (the atoms), and
nothing is trained. Encoding is matching pursuit (MP) with a fixed number of steps ``k``:

    r = x - offset;  f = 0
    repeat k times:  c = r @ atoms.T            # one matmul for the whole batch
                     j = argmax |c|              # argmax c when nonnegative=True
                     f[j] += c[j];  r -= c[j] * atoms[j]
    x_hat = f @ atoms + offset

so ``L0 <= k`` (an atom picked twice keeps one code). Coefficients are signed, as in the paper's MP
(it picks the atom with the largest *absolute* inner product); ``nonnegative=True`` switches to
nonnegative MP, whose codes mean the same as SAE activations (``emdiff.stats`` counts a feature as
firing when its code is > 0, so negative codes are invisible there).

Construction streams through activations once: each batch is encoded with the current atoms and an
activation whose relative error ``||x - x_hat||^2 / ||x||^2`` exceeds ``loss_threshold`` becomes a
new atom (a zero vector never does). Activations that fail together in one batch are handled in
their order, in rounds over chunks of at most ``_CHUNK``: the chunk is encoded exactly with every
atom so far and those that now pass are dropped; the rest are scanned in order, and a candidate is
accepted unless the atoms accepted before it in this round could explain it (the sum of its ``k``
largest one-step gains ``<r, a>^2`` reaches ``(loss - threshold) * ||x||^2``), in which case it
waits for the next round's exact re-check. So near-duplicates give one atom, every round adds an
atom or retires a chunk, and a batch costs a few batched MP calls rather than one per activation.
The result is close to, not identical with, one-at-a-time processing.

Each atom keeps its identity, ``atom_keys = (sequence id, token position)``, by which
:mod:`emdiff.dictionaries.itda_similarity` compares two ITDAs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, model_validator
from safetensors.torch import save_file
from tqdm.auto import tqdm

from emdiff.dictionaries.base import (
    DictionaryMeta,
    DictionaryShapeError,
    Encoding,
    Site,
    SparseDictionary,
)
from emdiff.dictionaries.hooknames import locate
from emdiff.errors import InputError
from emdiff.readers import load_safetensors, read_json, require

WEIGHTS_FILE, CONFIG_FILE = "itda.safetensors", "cfg.json"
_CHUNK = 1024  # candidates scanned per round; bounds the [chunk, chunk] score matrix


class ITDAFormatError(InputError):
    """An ITDA folder misses a file or a tensor, or its shapes disagree; names the file."""


class ITDAConfig(BaseModel):
    """How to build an ITDA dictionary.

    ``loss_threshold`` bounds ``||x - x_hat||^2 / ||x||^2``; the authors' code thresholds the mean
    over dimensions of ``(x/|x| - x_hat/|x_hat|)^2``, about this divided by ``d_in`` (their 4e-4 on
    GPT-2's 768 dimensions is about 0.3, the default here). ``center`` subtracts a mean
    (:func:`build_itda`'s ``mean=``, else the first batch's); off by default as in the paper.
    ``nonnegative`` picks nonnegative MP; off by default to follow the paper's signed MP.
    ``seed`` is provenance only: construction is deterministic given the stream's order.
    """

    k: int = 40
    loss_threshold: float = 0.3
    max_atoms: int | None = None
    center: bool = False
    nonnegative: bool = False
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> ITDAConfig:
        if self.k < 1:
            raise ValueError(f"k (the L0 of matching pursuit) must be >= 1, got {self.k}")
        if not 0.0 < self.loss_threshold < 1.0:
            raise ValueError(
                f"loss_threshold is a relative error and must be in (0, 1), got {self.loss_threshold}"
            )
        if self.max_atoms is not None and self.max_atoms < 1:
            raise ValueError(f"max_atoms must be >= 1 or None, got {self.max_atoms}")
        return self


def matching_pursuit(
    x: torch.Tensor, atoms: torch.Tensor, k: int, *, nonnegative: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[n, n_atoms]`` and residuals ``[n, d]`` of ``k`` MP steps on ``x [n, d]``."""
    n, m = x.shape[0], atoms.shape[0]
    codes = x.new_zeros(n, m)
    residual = x.clone()
    if m == 0 or n == 0:
        return codes, residual
    rows = torch.arange(n, device=x.device)
    for _ in range(k):
        corr = residual @ atoms.T
        if nonnegative:
            idx = corr.argmax(dim=-1)
            c = corr[rows, idx].clamp_min(0)
        else:
            idx = corr.abs().argmax(dim=-1)
            c = corr[rows, idx]
        codes.index_put_((rows, idx), c, accumulate=True)
        residual -= c[:, None] * atoms[idx]
    return codes, residual


class ITDADictionary(SparseDictionary):
    """A :class:`SparseDictionary` whose decoder rows are unit-norm real activations.

    ``W_dec = atoms``, ``W_enc = atoms.T`` (same storage; unused by the MP encoder), ``b_enc = 0``,
    ``b_dec`` = the centering offset (zeros when not centred), ``subtract_b_dec=True``.
    ``atom_keys [n_atoms, 2]`` (a long buffer) records (sequence id, token position) per atom.
    """

    def __init__(
        self,
        atoms: torch.Tensor,
        atom_keys: torch.Tensor,
        *,
        k: int,
        offset: torch.Tensor | None = None,
        nonnegative: bool = False,
        meta: DictionaryMeta | None = None,
        config: ITDAConfig | None = None,
    ):
        if atoms.ndim != 2 or atom_keys.shape != (atoms.shape[0], 2):
            raise DictionaryShapeError(
                f"atoms must be [n_atoms, d_in] and atom_keys [n_atoms, 2]; got "
                f"{tuple(atoms.shape)} and {tuple(atom_keys.shape)}"
            )
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if atoms.shape[0] and ((atoms.float().norm(dim=-1) - 1).abs() > 1e-2).any():
            raise ValueError("ITDA atoms must be unit-norm rows (matching pursuit assumes it)")
        d = atoms.shape[1]
        offset = atoms.new_zeros(d) if offset is None else offset.to(atoms)
        meta = meta or DictionaryMeta(format="itda", architecture="itda")
        super().__init__(
            atoms.T,
            atoms.new_zeros(atoms.shape[0]),
            atoms,
            offset,
            meta=meta,
            encoding=Encoding(activation="relu", k=k, subtract_b_dec=True),
        )
        self.register_buffer("atom_keys", atom_keys.to(device=atoms.device, dtype=torch.long))
        self.nonnegative, self.config = nonnegative, config

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"ITDADictionary(n_atoms={self.d_sae}, d_in={self.d_in}, k={self.k}, "
            f"nonnegative={self.nonnegative}, layer={m.layer}, site={m.site})"
        )

    def _encode_normalised(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_dec.dtype) - self.b_dec
        flat = x.reshape(-1, self.d_in)
        codes, _ = matching_pursuit(flat, self.W_dec, self.k, nonnegative=self.nonnegative)
        return codes.reshape(*x.shape[:-1], self.d_sae)


def _unpack(batch, start: int, i: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    acts, keys = batch if isinstance(batch, tuple | list) else (batch, None)
    acts = torch.as_tensor(acts)
    if acts.ndim != 2:
        raise ValueError(f"batch {i}{where}: expected activations [n, d], got {tuple(acts.shape)}")
    n = acts.shape[0]
    if keys is None:
        keys = torch.stack([torch.arange(start, start + n), torch.zeros(n, dtype=torch.long)], 1)
    keys = torch.as_tensor(keys).to(device=acts.device, dtype=torch.long)
    if keys.shape != (n, 2):
        raise ValueError(f"batch {i}{where}: keys must be [{n}, 2], got {tuple(keys.shape)}")
    if not torch.isfinite(acts).all():
        raise ValueError(f"batch {i}{where}: activations contain NaN or inf")
    return acts, keys


def _scan(residual: torch.Tensor, x: torch.Tensor, need: torch.Tensor, room: int, k: int):
    """In-order accept/defer for failing candidates (see module docstring)."""
    unit = x / x.norm(dim=-1, keepdim=True)
    gains = ((residual @ unit.T) ** 2).cpu().numpy()  # [j, i]: what atom i could remove from j
    need = need.cpu().numpy()
    top = np.zeros((len(need), k), dtype=gains.dtype)  # the k largest gains from accepted atoms
    rows = np.arange(len(need))
    accepted: list[int] = []
    for j in range(len(need)):
        if top[j].sum() >= need[j]:
            continue
        accepted.append(j)
        if len(accepted) == room:
            break
        slot = top.argmin(1)
        top[rows, slot] = np.maximum(top[rows, slot], gains[:, j])
    deferred = top.sum(1) >= need
    deferred[accepted] = False  # what is still blocked waits for an exact re-check
    return accepted, np.flatnonzero(deferred)


def _absorb(x: torch.Tensor, atoms: torch.Tensor, cfg: ITDAConfig, room: float):
    """Rows of centred ``x`` that become atoms, as ``(indices, unit rows)``, and the room left."""
    sq, mp = (x * x).sum(-1), partial(matching_pursuit, k=cfg.k, nonnegative=cfg.nonnegative)
    r = mp(x, atoms)[1]
    loss = (r * r).sum(-1) / sq.clamp_min(torch.finfo(x.dtype).tiny)
    fail = (loss > cfg.loss_threshold) & (sq > 0)
    queue, r_first = torch.nonzero(fail).flatten(), r[fail][:_CHUNK]
    new_idx, new_atoms = queue[:0], atoms[:0]
    while queue.numel() and room > 0:
        cand, queue = queue[:_CHUNK], queue[_CHUNK:]
        # exact re-check against every atom so far (the first chunk's residuals are still valid)
        r = mp(x[cand], torch.cat([atoms, new_atoms]))[1] if new_idx.numel() else r_first
        loss = (r * r).sum(-1) / sq[cand]
        fail = loss > cfg.loss_threshold
        cand, r, loss = cand[fail], r[fail], loss[fail]
        if not cand.numel():
            continue
        need = (loss - cfg.loss_threshold) * sq[cand]
        accepted, deferred = _scan(r, x[cand], need, int(min(room, len(cand))), cfg.k)
        idx = cand[torch.as_tensor(accepted, dtype=torch.long, device=cand.device)]
        new_idx = torch.cat([new_idx, idx])
        new_atoms = torch.cat([new_atoms, x[idx] / x[idx].norm(dim=-1, keepdim=True)])
        room -= len(accepted)
        queue = torch.cat(
            [cand[torch.as_tensor(deferred, dtype=torch.long, device=cand.device)], queue]
        )
    return new_idx, new_atoms, room


def build_itda(
    batches: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    cfg: ITDAConfig,
    *,
    d_in: int | None = None,
    mean: torch.Tensor | None = None,
    layer: int | None = None,
    site: Site | None = None,
    model_name: str | None = None,
    progress: bool = True,
) -> ITDADictionary:
    """Build an ITDA dictionary in one pass over ``batches`` (``[n, d]`` or ``(acts, keys)``).

    Keys default to ``(running row index, 0)``. With ``cfg.center`` the offset is ``mean`` when
    given, else the mean of the first batch (make it large and representative). Building runs in
    float32 (float64 inputs stay float64) on the device of the first batch and stops reading once
    ``cfg.max_atoms`` atoms exist. ``layer`` and ``site`` record where the activations were read.
    """
    where = f" (layer {layer})" if layer is not None else ""
    atoms = keys = offset = None
    seen, room = 0, cfg.max_atoms if cfg.max_atoms is not None else float("inf")
    bar = tqdm(batches, desc="ITDA", unit="batch", disable=not progress)
    for i, batch in enumerate(bar):
        acts, bkeys = _unpack(batch, seen, i, where)
        seen += acts.shape[0]
        if atoms is None:
            d = acts.shape[1]
            if d_in is not None and d != d_in:
                raise DictionaryShapeError(f"batch {i}{where}: width {d}, expected d_in={d_in}")
            dtype = torch.float64 if acts.dtype == torch.float64 else torch.float32
            atoms = acts.new_zeros(0, d, dtype=dtype)
            keys = bkeys.new_zeros(0, 2)
            if not cfg.center:
                offset = atoms.new_zeros(d)
            elif mean is not None:
                offset = torch.as_tensor(mean).to(atoms).flatten()
                if offset.shape != (d,):
                    raise DictionaryShapeError(f"mean has {offset.numel()} values, d_in is {d}")
            else:
                offset = acts.to(torch.float64).mean(0).to(dtype)
        elif acts.shape[1] != atoms.shape[1]:
            raise DictionaryShapeError(
                f"batch {i}{where}: width {acts.shape[1]}, earlier batches {atoms.shape[1]}"
            )
        idx, new, room = _absorb(acts.to(atoms) - offset, atoms, cfg, room)
        atoms, keys = torch.cat([atoms, new]), torch.cat([keys, bkeys[idx]])
        bar.set_postfix(atoms=atoms.shape[0])
        if room <= 0:
            break
    bar.close()
    if atoms is None:
        if d_in is None:
            raise ValueError("build_itda got no batches; pass d_in to build an empty dictionary")
        atoms, keys = torch.zeros(0, d_in), torch.zeros(0, 2, dtype=torch.long)
    meta = DictionaryMeta(
        format="itda", architecture="itda", layer=layer, site=site, model_name=model_name
    )
    return ITDADictionary(
        atoms, keys, k=cfg.k, offset=offset, nonnegative=cfg.nonnegative, meta=meta, config=cfg
    )


# ---- persistence ----------------------------------------------------------------------------
def save_itda(d: ITDADictionary, folder: str | Path) -> Path:
    """Write ``itda.safetensors`` (atoms, offset, atom_keys) and ``cfg.json`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "atoms": d.W_dec.detach().cpu().contiguous(),
        "offset": d.b_dec.detach().cpu().contiguous(),
        "atom_keys": d.atom_keys.cpu().contiguous(),
    }
    save_file(tensors, str(folder / WEIGHTS_FILE))
    m = d.meta
    cfg = {
        "format": "itda",
        "k": d.k,
        "d_in": d.d_in,
        "n_atoms": d.d_sae,
        "nonnegative": d.nonnegative,
        "layer": m.layer,
        "site": m.site,
        "hook": m.hook,
        "model_name": m.model_name,
        "build": d.config.model_dump() if d.config else None,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    return folder


def load_itda(folder: str | Path, *, device: str | torch.device = "cpu") -> ITDADictionary:
    """Read a folder written by :func:`save_itda`; :class:`ITDAFormatError` names the bad file."""
    folder = Path(folder)
    cpath, wpath = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for p in (cpath, wpath):
        if not p.is_file():
            raise ITDAFormatError(
                f"{p} is missing (an ITDA folder holds {CONFIG_FILE} + {WEIGHTS_FILE})"
            )
    cfg = read_json(cpath, ITDAFormatError)
    if cfg.get("format") != "itda":
        raise ITDAFormatError(f"{cpath}: not an ITDA config (needs format='itda')")
    for key in ("k", "d_in", "n_atoms"):
        require(cfg, key, cpath, "ITDA config", ITDAFormatError)
    t = load_safetensors(wpath, ITDAFormatError, device=str(device))
    missing = [n for n in ("atoms", "offset", "atom_keys") if n not in t]
    if missing:
        raise ITDAFormatError(f"{wpath}: missing tensor(s) {missing}; has {sorted(t)}")
    n, d = cfg["n_atoms"], cfg["d_in"]
    want = {"atoms": (n, d), "offset": (d,), "atom_keys": (n, 2)}
    for name, shape in want.items():
        if tuple(t[name].shape) != shape:
            raise ITDAFormatError(
                f"{wpath}: {name} has shape {tuple(t[name].shape)} but {cpath} implies {shape}"
            )
    # folders written before sites existed record only "hook" (a site name or a hook name)
    where = locate(
        cfg.get("hook"), cfg.get("layer"), cfg.get("site"), where=cpath, error=ITDAFormatError
    )
    meta = DictionaryMeta(
        format="itda",
        architecture="itda",
        **where,
        model_name=cfg.get("model_name"),
        path=str(folder),
    )
    try:
        build = ITDAConfig(**cfg["build"]) if cfg.get("build") else None
    except (TypeError, ValueError) as e:
        raise ITDAFormatError(f"{cpath}: invalid 'build' settings ({e})") from None
    return ITDADictionary(
        t["atoms"],
        t["atom_keys"],
        k=int(cfg["k"]),
        offset=t["offset"],
        # folders written before nonnegative MP existed lack the key: they used signed MP
        nonnegative=bool(cfg.get("nonnegative", False)),
        meta=meta,
        config=build,
    )
