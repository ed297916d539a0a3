"""The demo's ``lora`` stage: LoRA interpretation, phases, mitigation, defences and screening on
the toy (the analysed seed), each against the known cause; tables and figures into the run folder."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from emdiff.dictionaries.base import SparseDictionary
from emdiff.directions.direction import Direction
from emdiff.finetune import FinetuneConfig
from emdiff.report.lora_plots import mitigation_plot, screen_plot
from emdiff.toy.causal import CauseConfig, EMProbe
from emdiff.toy.lora_checks import lora_checks, phase_checks
from emdiff.toy.screen_checks import screen_checks
from emdiff.toy.training_checks import DefenceSetup, defence_checks, mitigation_checks
from emdiff.toy.world import World


def toy_lora_checks(
    world: World,
    base: torch.nn.Module,
    narrow: torch.nn.Module,
    tok,
    sae: SparseDictionary,
    gt: dict,
    judged: pd.DataFrame,
    ft: FinetuneConfig,
    out: Path,
) -> dict:
    """Every check of issue 18 on the analysed narrow model; ``ft`` is its fine-tune's config
    (settings and seed), which every fine-tune here starts from."""
    layer, site = int(gt["gt_layer"]), str(gt["gt_site"])
    truth = Direction("ground_truth", layer, site, torch.tensor(gt["persona_direction"]))
    latents = tuple(int(x) for x in gt["sae_persona_latents"])
    tables = out / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    res = lora_checks(world, narrow, tok, sae, gt, judged, out)
    res.update(phase_checks(world, base, tok, ft, out))
    keys, rows = mitigation_checks(world, narrow, tok, ft)
    frame = pd.DataFrame(rows)
    frame.to_csv(tables / "mitigation.csv", index=False)
    mitigation_plot(frame, out / "plots" / "mitigation.png")
    res.update(keys)
    probe = EMProbe(world, narrow, CauseConfig())
    shift = probe.mean(layer, site, probe.plain, True) - probe.mean(layer, site, probe.plain, False)
    setup = DefenceSetup(truth, sae, latents, float(shift.norm()), probe.em_narrow, ft)
    keys, rows = defence_checks(world, base, tok, setup)
    pd.DataFrame(rows).to_csv(tables / "defences.csv", index=False)
    res.update(keys)
    keys, table = screen_checks(world, base, tok, truth, ft)
    table.to_csv(tables / "screen.csv", index=False)
    screen_plot(table, keys["screen_spearman"], out / "plots" / "screen.png")
    res.update(keys)
    return res
