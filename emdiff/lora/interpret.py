"""What each rank of a LoRA writes and reads, in dictionary latents and against saved directions.

For every (module, rank) whose B column has a residual-space image (:mod:`emdiff.lora.adapters`):
its sparse decomposition over a dictionary's decoder rows (top latent, explained fraction at k = 1
against random directions) and its cosine with each given direction. For every A row with a
residual-space image: its top encoder rows and its cosine with each direction. Dictionaries and
directions live at one (layer, site); a module at another layer is compared anyway and its layer
shown, so a reader sees where the comparison is exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from emdiff.dictionaries.base import SparseDictionary
from emdiff.directions.decompose import DecomposeConfig, Decomposition, decompose
from emdiff.directions.direction import Direction
from emdiff.lora.adapters import LoraModule, lora_modules


@dataclass
class LoraReading:
    """One row per (module, rank) and the decompositions of the B columns."""

    table: pd.DataFrame
    decompositions: dict[str, Decomposition] = field(default_factory=dict)

    def row(self, label: str) -> pd.Series:
        return self.table.set_index("adapter").loc[label]

    def save(self, out: str | Path, name: str = "lora") -> list[Path]:
        out = Path(out)
        (out / "tables").mkdir(parents=True, exist_ok=True)
        path = out / "tables" / f"{name}_ranks.csv"
        self.table.to_csv(path, index=False)
        written = [path]
        for label, dec in self.decompositions.items():
            dec.name = f"{name}_b_{label.replace('.', '_').replace('[', '').replace(']', '')}"
            written += dec.save(out)
        return written


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=0))


def _encoder_top(d: SparseDictionary, v: torch.Tensor) -> tuple[int, float]:
    enc = d.W_enc.detach().float().T  # [n_latents, d_model]
    cos = torch.nn.functional.cosine_similarity(enc, v[None].float(), dim=1)
    i = int(cos.argmax())
    return i, float(cos[i])


_Setup = tuple[SparseDictionary | None, Mapping[str, Direction], DecomposeConfig]


def _rank_row(
    m: LoraModule, i: int, sign: float, setup: _Setup
) -> tuple[dict, Decomposition | None]:
    dictionary, directions, cfg = setup
    row: dict = {
        "adapter": m.label(i),
        "module": m.name,
        "layer": m.layer,
        "kind": m.kind,
        "writes": m.writes_how,
        "b_norm": float(m.B[:, i].norm()) * m.scaling,
        "a_norm": float(m.A[i].norm()),
    }
    dec = None
    if m.writes is not None:
        w = m.writes[i] * sign
        for name, d in directions.items():
            if d.raw.numel() == w.numel():
                row[f"b_cos_{name}"] = _cos(w, d.vector)
        if dictionary is not None and dictionary.W_dec.shape[1] == w.numel():
            dec = decompose(w, dictionary.W_dec, cfg, name=m.label(i))
            e = dec.explained.set_index("k")
            row.update(
                b_top_latent=dec.top_latent,
                b_top_cosine=float(dec.table["cosine"].iloc[0]),
                b_explained_k1=float(e["explained"].iloc[0]),
                b_null_k1=float(e["null_p95"].iloc[0]),
            )
    if m.reads is not None:
        r = m.reads[i] * sign
        for name, d in directions.items():
            if d.raw.numel() == r.numel():
                row[f"a_cos_{name}"] = _cos(r, d.vector)
        if dictionary is not None and dictionary.W_enc.shape[0] == r.numel():
            row["a_top_encoder_latent"], row["a_top_encoder_cosine"] = _encoder_top(dictionary, r)
    return row, dec


def scalar_signs(frame: pd.DataFrame, cols: Sequence[str]) -> dict[str, float]:
    """Per rank, the orientation in which it writes most over a scalar frame
    (:func:`emdiff.lora.scalars.lora_scalars`): the sign of ``sum(s * |s|)``, so one large
    write outweighs many small ones of the other sign. Read it where the answer is decided
    (positions ``answer_predicting``): a rank can write ``-B`` at the question and ``+B`` where
    the answer is chosen, and only the second makes the behaviour."""
    return {c: 1.0 if float((frame[c] * frame[c].abs()).sum()) >= 0 else -1.0 for c in cols}


def read_lora(
    model: nn.Module,
    dictionary: SparseDictionary | None = None,
    directions: Mapping[str, Direction] | None = None,
    cfg: DecomposeConfig | None = None,
    signs: Mapping[str, float] | None = None,
) -> LoraReading:
    """Every rank of every adapted module of ``model`` against ``dictionary`` and
    ``directions``.

    A rank's B column and A row can both flip sign without changing the adapter, so what it
    writes is ``B_i`` times the sign of its scalar. ``signs`` (from :func:`scalar_signs` over
    the answer-predicting tokens of the chats that matter) orients each rank; without it the
    columns are read as stored and the table says so (``sign`` 0)."""
    cfg = cfg or DecomposeConfig()
    rows, decs = [], {}
    for m in lora_modules(model):
        for i in range(m.rank):
            sign = float(signs[m.label(i)]) if signs else 0.0
            row, dec = _rank_row(m, i, sign or 1.0, (dictionary, directions or {}, cfg))
            row["sign"] = sign
            rows.append(row)
            if dec is not None:
                decs[m.label(i)] = dec
    return LoraReading(pd.DataFrame(rows), decs)
