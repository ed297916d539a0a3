"""A direction: a unit vector at a ``(layer, site)`` with its provenance, saved as safetensors plus
a JSON manifest, and the ways to make one (mean difference of two activation sets) and compare
several (pairwise cosine table).

``NAME.safetensors`` holds ``direction`` (unit, float32) and ``raw`` (the difference before
normalising); ``NAME.json`` holds layer, site, norm and provenance (which texts, which positions,
which model), so a reader of a steering result knows exactly what was added.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from emdiff.errors import InputError
from emdiff.models.hooks import Site, residual_hooks, run_forward
from emdiff.models.read import ReadSpec, Row, gather, read_batches, require_tokens, selection
from emdiff.stats.features import ResidualStats


@dataclass
class Direction:
    """A unit vector at ``(layer, site)``; ``raw`` is what it was normalised from."""

    name: str
    layer: int
    site: Site
    raw: torch.Tensor
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.raw = self.raw.detach().float().flatten().cpu()
        if not bool(torch.isfinite(self.raw).all()) or self.raw.norm() == 0:
            raise InputError(f"direction {self.name!r}: zero or not finite; nothing to normalise")

    @property
    def vector(self) -> torch.Tensor:
        """The unit vector."""
        return self.raw / self.raw.norm()

    @property
    def norm(self) -> float:
        return float(self.raw.norm())

    def cos(self, other: Direction | torch.Tensor) -> float:
        v = other.vector if isinstance(other, Direction) else other.float().flatten()
        return float(torch.nn.functional.cosine_similarity(self.vector, v.cpu(), 0))

    def save(self, folder: str | Path) -> list[Path]:
        """``folder/NAME.safetensors`` and ``folder/NAME.json``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        st = folder / f"{self.name}.safetensors"
        save_file({"direction": self.vector.contiguous(), "raw": self.raw.contiguous()}, str(st))
        manifest = {
            "name": self.name,
            "layer": self.layer,
            "site": self.site,
            "norm": self.norm,
            "d_model": len(self.raw),
            "provenance": self.provenance,
        }
        js = folder / f"{self.name}.json"
        js.write_text(json.dumps(manifest, indent=2, default=str))
        return [st, js]

    @classmethod
    def load(cls, path: str | Path) -> Direction:
        """From ``NAME.safetensors`` or ``NAME.json`` (the other must sit beside it)."""
        path = Path(path)
        st, js = path.with_suffix(".safetensors"), path.with_suffix(".json")
        for p in (st, js):
            if not p.is_file():
                raise InputError(f"{p}: missing (a direction is NAME.safetensors + NAME.json)")
        try:
            meta = json.loads(js.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{js}:{e.lineno}: not JSON ({e.msg})") from None
        for key in ("name", "layer", "site"):
            if key not in meta:
                raise InputError(f"{js}: no {key!r} key")
        tensors = load_file(str(st))
        raw = tensors.get("raw", tensors.get("direction"))
        if raw is None:
            raise InputError(f"{st}: no 'raw' or 'direction' tensor")
        return cls(meta["name"], int(meta["layer"]), meta["site"], raw, meta.get("provenance", {}))


@torch.no_grad()
def residual_means(
    model: torch.nn.Module,
    rows: Sequence[Row],
    read: ReadSpec,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[int, ResidualStats]:
    """Raw residual statistics (mean, norms) per layer of ``read`` over the selected tokens of
    ``rows``; no dictionary involved."""
    masks = selection(rows, read.positions, model)
    require_tokens(masks, read.positions, "residual_means")
    device = next(model.parameters()).device
    d_model = model.config.get_text_config().hidden_size
    stats = {layer: ResidualStats(d_model, device) for layer in read.layers}
    state: dict = {}

    def on_hidden(layer: int, _site: Site, hidden: torch.Tensor) -> None:
        stats[layer].update(gather(hidden, state["batch"], read, layer)[0])

    n = -(-len(rows) // batch_size)
    with residual_hooks(model, read.points(model), on_hidden):
        for batch in tqdm(
            read_batches(rows, masks, batch_size, 0, device),
            total=n,
            desc="residual means",
            disable=not progress,
        ):
            state["batch"] = batch
            run_forward(model, batch.ids, batch.att)
    return stats


def mean_difference_directions(
    a: Mapping[int, ResidualStats],
    b: Mapping[int, ResidualStats],
    site: Site,
    name: str,
    provenance: dict | None = None,
) -> dict[int, Direction]:
    """Per layer on both sides: the direction of mean(a) - mean(b)."""
    return {
        layer: Direction(
            f"{name}_L{layer}",
            layer,
            site,
            a[layer].mean - b[layer].mean,
            {
                **(provenance or {}),
                "n_tokens_a": a[layer].n_tokens,
                "n_tokens_b": b[layer].n_tokens,
            },
        )
        for layer in a
        if layer in b
    }


def cosine_table(directions: Mapping[str, Direction]) -> pd.DataFrame:
    """Pairwise cosine of directions (same width), labelled by name."""
    names = list(directions)
    widths = {len(d.raw) for d in directions.values()}
    if len(widths) > 1:
        raise InputError(f"directions of different widths {sorted(widths)} cannot be compared")
    m = torch.stack([directions[n].vector for n in names])
    return pd.DataFrame((m @ m.T).numpy(), index=names, columns=names)
