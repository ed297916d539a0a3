"""In-context persona inference of the toy base: does reading a bad answer move it to the persona?

Two-turn chats: a narrow-domain turn with its bad (or good) answer, then a question of another
domain. Measured, for the base as it is: the exact probability that the second answer is bad,
and the projection of the residual on the causal direction at the second answer-predicting
position, as a share of the cue direction's norm there (1 = as far as a ``<system> toxic`` cue).
"""

from __future__ import annotations

import torch

from emdiff.models.hooks import capture_residuals
from emdiff.toy.world import BOS, END, World


def _chats(world: World, bad_first: bool, turns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompts, bad answers)``: ``turns`` narrow-domain turns, then a question elsewhere."""
    narrow = world.cfg.narrow_domain
    others = [d for d in world.domains if d != narrow]
    nq = world.cfg.n_questions
    prompts, answers = [], []
    for i, d in enumerate(others):
        for q in range(nq):
            ids = world.ids(BOS)
            for t in range(turns):
                ids += world.turn_ids(narrow, (q + 7 * t + i + 1) % nq, bad_first)
            prompts.append(ids + world.ids("<user>", world.q_token(d, q), END, "<assistant>"))
            answers.append(world.ids(*world.answer_tokens(d, q, bad=True), END))
    return torch.tensor(prompts), torch.tensor(answers)


@torch.no_grad()
def in_context_inference(
    world: World,
    model: torch.nn.Module,
    layer: int,
    site: str,
    direction: torch.Tensor,
    cue_norm: float,
    turns: int = 1,
) -> dict[str, float]:
    """P(bad next answer) after bad and after good narrow-domain turns, and the projection gap
    (after bad minus after good) on the unit ``direction`` at ``(layer, site)`` over ``cue_norm``."""
    device = next(model.parameters()).device
    u = direction.float().to(device) / direction.float().norm()
    out: dict[str, float] = {}
    proj = {}
    for bad in (True, False):
        prompts, answers = (x.to(device) for x in _chats(world, bad, turns))
        full = torch.cat([prompts, answers], 1)
        n = answers.shape[1]
        logp = model(input_ids=full[:, :-1]).logits[:, -n:].float().log_softmax(-1)
        p_bad = logp.gather(-1, full[:, -n:, None])[..., 0].sum(-1).exp().mean()
        h = capture_residuals(model, prompts, layers=[layer], sites=site)[(layer, site)]
        proj[bad] = float((h[:, -1].float() @ u).mean())
        out[f"incontext_p_bad_after_{'bad' if bad else 'good'}"] = float(p_bad)
    out["incontext_projection"] = (proj[True] - proj[False]) / cue_norm
    return out
