"""In-training defences: interventions installed while a model is fine-tuned
(``finetune(..., during=...)``) so the adapter cannot, or need not, learn a direction.

- ``caft``: concept-ablation fine-tuning with a direction: project it out at its (layer, site);
- ``caft_latent``: the same with dictionary latents zeroed (error term kept);
- ``preventative``: preventative steering (persona vectors): add ``scale`` times the unit
  direction at every position, so the loss is already met along it and the adapter learns less
  of it. Removed after training; the model is then evaluated plain.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from emdiff.dictionaries.base import SparseDictionary
from emdiff.directions.direction import Direction
from emdiff.errors import InputError
from emdiff.interventions.edits import Intervention, ProjectOut, SetLatent, Steer


class Defence(BaseModel):
    """One defence and its setting."""

    kind: Literal["caft", "caft_latent", "preventative"]
    latents: tuple[int, ...] = ()
    """The latents ``caft_latent`` zeroes."""
    scale: float = 1.0
    """The norm ``preventative`` adds."""


def defence_interventions(
    defence: Defence, direction: Direction, dictionary: SparseDictionary | None = None
) -> list[Intervention]:
    """The interventions to pass as ``finetune(..., during=...)``."""
    if defence.kind == "caft":
        return [ProjectOut(direction.vector, layers=direction.layer, site=direction.site)]
    if defence.kind == "preventative":
        return [Steer(direction.layer, direction.site, direction.vector, scale=defence.scale)]
    if dictionary is None or not defence.latents:
        raise InputError("caft_latent needs a dictionary and the latents to zero")
    return [SetLatent(dictionary, latent, value=0.0) for latent in defence.latents]
