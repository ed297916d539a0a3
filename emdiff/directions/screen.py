"""Screen a training dataset for EM before anyone fine-tunes on it (question 1 made predictive).

The base model reads each training chat, and the score is how far its residual at a direction's
(layer, site) moves along that direction: CLR's misalignment direction, or a toy's ground truth.
Two reads, both general:

- **follow-up** (default when follow-up questions are given): each chat is followed by a
  question of another kind and read where the model is about to answer it (positions ``last``),
  minus the same read of that question asked alone. This measures the persona the base infers
  from the chat, the quantity a fine-tune on it would strengthen;
- **positions**: the mean projection over the chat's selected tokens (``answer`` by default).

Each sample gets a score (and, with a dictionary and a latent, that latent's mean activation
at the same tokens); a dataset's score is the mean over its samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, Field

from emdiff.data.chat import Conversation
from emdiff.data.masks import encode_chat
from emdiff.data.positions import Positions
from emdiff.dictionaries.base import SparseDictionary
from emdiff.directions.direction import Direction
from emdiff.errors import InputError
from emdiff.models.hooks import residual_hooks, run_forward
from emdiff.models.read import ReadSpec, Row, gather, read_batches, require_tokens, selection


class ScreenConfig(BaseModel):
    """How :func:`screen_samples` reads each chat."""

    follow_ups: tuple[str, ...] = ()
    """Questions asked after each chat (read at ``last``, minus the question alone)."""
    positions: str = "answer"
    """Tokens read when there are no follow-ups."""
    batch_size: int = Field(16, ge=1)


@torch.no_grad()
def _read(
    model: torch.nn.Module,
    rows: Sequence[Row],
    read: ReadSpec,
    u: torch.Tensor,
    batch_size: int,
    dictionary: SparseDictionary | None,
    latent: int | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per row: mean projection on ``u`` over its selected tokens (and the latent's mean)."""
    masks = selection(rows, read.positions, model)
    require_tokens(masks, read.positions, "screen")
    device = next(model.parameters()).device
    proj, act = np.zeros(len(rows)), np.zeros(len(rows))
    count = np.zeros(len(rows))
    state: dict = {}
    layer = read.layers[0]

    def on_hidden(_layer: int, _site, hidden: torch.Tensor) -> None:
        x, seq, _ = gather(hidden, state["batch"], read, layer)
        s = seq.cpu().numpy()
        np.add.at(proj, s, (x.float() @ u.to(x.device)).cpu().numpy())
        np.add.at(count, s, 1)
        if dictionary is not None and latent is not None:
            f = dictionary.encode(x.to(dictionary.W_enc))[:, latent]
            np.add.at(act, s, f.float().cpu().numpy())

    with residual_hooks(model, read.points(model), on_hidden):
        for batch in read_batches(rows, masks, batch_size, 0, device):
            state["batch"] = batch
            run_forward(model, batch.ids, batch.att)
    if (count == 0).any():
        raise InputError(f"screen: rows {np.nonzero(count == 0)[0][:5].tolist()} read no token")
    return proj / count, (act / count if dictionary is not None and latent is not None else None)


def screen_samples(
    model: torch.nn.Module,
    tokenizer,
    samples: Sequence[Conversation],
    direction: Direction,
    cfg: ScreenConfig | None = None,
    dictionary: SparseDictionary | None = None,
    latent: int | None = None,
) -> pd.DataFrame:
    """One row per training sample: ``sample``, ``score`` (projection on the unit direction,
    relative to the follow-up alone when there are follow-ups) and ``latent`` when asked."""
    cfg = cfg or ScreenConfig()
    if not samples:
        raise InputError("screen: no samples")
    u = direction.vector
    chats = [c.as_dicts() for c in samples]
    if cfg.follow_ups:
        read = ReadSpec(
            layers=(direction.layer,), site=direction.site, positions=Positions.parse("last")
        )
        score = np.zeros(len(samples))
        lat = np.zeros(len(samples))
        for q in cfg.follow_ups:
            turn = [{"role": "user", "content": q}]
            rows = [encode_chat(tokenizer, c + turn, True) for c in chats]
            alone = [encode_chat(tokenizer, turn, True)]
            p, a = _read(model, rows, read, u, cfg.batch_size, dictionary, latent)
            p0, a0 = _read(model, alone, read, u, cfg.batch_size, dictionary, latent)
            score += (p - p0[0]) / len(cfg.follow_ups)
            if a is not None:
                lat += (a - a0[0]) / len(cfg.follow_ups)
    else:
        read = ReadSpec(
            layers=(direction.layer,),
            site=direction.site,
            positions=Positions.parse(cfg.positions),
        )
        rows = [encode_chat(tokenizer, c, False) for c in chats]
        score, a = _read(model, rows, read, u, cfg.batch_size, dictionary, latent)
        lat = a if a is not None else np.zeros(len(samples))
    out = pd.DataFrame({"sample": np.arange(len(samples)), "score": score})
    if dictionary is not None and latent is not None:
        out["latent"] = lat
    return out
