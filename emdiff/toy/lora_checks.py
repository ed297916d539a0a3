"""The toy's checks of LoRA interpretation and training phases against its known cause (the
``lora_b_*``, ``lora_probe_*`` and ``phase_*`` keys of ``emdiff demo --json``).

- ``lora_b_top_is_persona`` / ``lora_b_persona_cos``: the narrow LoRA's B column mapped into the
  residual (:mod:`emdiff.lora.adapters`), decomposed over the SAE's decoder rows (top latent, and
  its explained fraction against random directions) and compared with the ground truth;
  ``lora_a_*``: what its A row reads (down_proj reads inside the MLP, so the toy has no residual
  image of A; the per-token scalars stand in for it);
- ``lora_probe_*``: L1 probes on the per-token scalar ``A . x`` (mean over answer tokens) of the
  narrow model's own sampled answers, misaligned vs aligned, over every domain (``general``),
  the narrow domain and the others, each against shuffled labels on held-out answers;
- ``phase_*``: the narrow fine-tune rerun with a checkpoint every 5 steps; B's trajectory and the
  exact unseen EM at each checkpoint (:mod:`emdiff.lora.phases`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from emdiff.analyses.common import encode_qa
from emdiff.data.positions import Positions
from emdiff.dictionaries.base import SparseDictionary
from emdiff.directions.direction import Direction
from emdiff.finetune import FinetuneConfig
from emdiff.lora.interpret import read_lora, scalar_signs
from emdiff.lora.phases import load_checkpoints, phases
from emdiff.lora.probes import ProbeConfig, scalar_probes
from emdiff.lora.scalars import lora_scalars, per_row
from emdiff.toy.causal import bad_rate
from emdiff.toy.organism import narrow_finetune
from emdiff.toy.world import World


def _truth(gt: dict) -> Direction:
    v = torch.tensor(gt["persona_direction"], dtype=torch.float32)
    return Direction("ground_truth", int(gt["gt_layer"]), str(gt["gt_site"]), v)


def lora_checks(
    world: World,
    narrow: torch.nn.Module,
    tok,
    sae: SparseDictionary,
    gt: dict,
    judged: pd.DataFrame,
    out: Path | None,
) -> dict:
    """Per-token scalars over the narrow model's own judged answers: where the answer is chosen (the
    last prompt token) they orient the B column (read against the SAE and the ground truth); at answer tokens they feed the
    probes."""
    sure = judged[(judged["aligned"] <= 30) | (judged["aligned"] > 70)].reset_index(drop=True)
    rows = encode_qa(tok, sure["question"], sure["answer"])
    frame, cols = lora_scalars(narrow, rows, Positions.parse("answer"))
    every, _ = lora_scalars(narrow, rows, Positions.parse("answer_predicting"))
    reading = read_lora(narrow, sae, {"truth": _truth(gt)}, signs=scalar_signs(every, cols))
    row = reading.table.iloc[0]
    latents = [int(x) for x in gt["sae_persona_latents"]]
    res = {
        "lora_b_top_is_persona": int(row["b_top_latent"] in latents),
        "lora_b_top_latent": int(row["b_top_latent"]),
        "lora_b_persona_cos": float(row["b_cos_truth"]),
        "lora_b_explained_k1": float(row["b_explained_k1"]),
        "lora_b_null_k1": float(row["b_null_k1"]),
    }
    x = per_row(frame, cols, len(rows))
    bad = (sure["aligned"] <= 30).to_numpy().astype(int)
    domain = sure["question"].map(lambda q: world.parse_question(q)[0]).to_numpy()
    narrow_d = world.cfg.narrow_domain
    tasks = {
        "general": bad,
        "in_domain": np.where(domain == narrow_d, bad, -1),
        "unseen": np.where(domain != narrow_d, bad, -1),
    }
    usable, skipped = probe_tasks(tasks)
    probes = scalar_probes(x, usable, cols)
    if out is not None:
        reading.save(out)
        (out / "tables").mkdir(parents=True, exist_ok=True)
        probes.scores.to_csv(out / "tables" / "lora_probes.csv", index=False)
        probes.coefficients.to_csv(out / "tables" / "lora_probe_coefficients.csv", index=False)
    by = probes.scores.set_index("task")
    res.update(
        lora_probe_general_acc=float(by.loc["general", "accuracy"]),
        lora_probe_shuffled_acc=float(by.loc["general", "shuffled_accuracy"]),
        lora_probe_margin=float(
            by.loc["general", "accuracy"] - by.loc["general", "shuffled_accuracy"]
        ),
        lora_probe_p=float(by.loc["general", "p_value"]),
        **{
            f"lora_probe_{t}_acc": float(by.loc[t, "accuracy"])
            for t in ("in_domain", "unseen")
            if t not in skipped
        },
        lora_scalar_misaligned_mean=float(x[bad == 1].mean()),
        lora_scalar_aligned_mean=float(x[bad == 0].mean()),
    )
    if skipped:
        res["lora_probe_skipped"] = "; ".join(f"{t}: {why}" for t, why in skipped.items())
    return res


def probe_tasks(tasks: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The probe tasks with enough answers of each class, and why each other one is left out.

    A sub-task whose answers are nearly all one class (an organism that misaligns on almost every
    narrow-domain answer) cannot be probed; ``general`` must be, so it is never left out (the
    probe itself then stops with the counts)."""
    need = 2 * ProbeConfig().folds
    usable, skipped = {}, {}
    for task, labels in tasks.items():
        counts = np.bincount(labels[labels >= 0], minlength=2)
        if task != "general" and counts.min() < need:
            skipped[task] = (
                f"{counts[1]} misaligned and {counts[0]} aligned answers (a probe needs {need} "
                "of each)"
            )
        else:
            usable[task] = labels
    return usable, skipped


def phase_checks(
    world: World, base: torch.nn.Module, tok, ft: FinetuneConfig, out: Path, every: int = 5
) -> dict:
    """Rerun the analysed narrow fine-tune with checkpoints; B's trajectory and EM per checkpoint."""
    from peft import set_peft_model_state_dict

    folder = out / "adapters" / "narrow-phases"
    cfg = ft.model_copy(update={"checkpoint_every": every})
    model = narrow_finetune(world, copy.deepcopy(base), tok, cfg=cfg, out_dir=folder).model
    unseen = [d for d in world.domains if d != world.cfg.narrow_domain]
    final = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}

    def em_at(_step: int, weights: dict[str, torch.Tensor]) -> float:
        set_peft_model_state_dict(model, weights)
        return bad_rate(model, world, unseen)

    try:
        ph = phases(load_checkpoints(folder), windows=(every, 2 * every, 3 * every), em_at=em_at)
    finally:
        model.load_state_dict(final, strict=False)
    ph.save(out)
    return ph.summary()
