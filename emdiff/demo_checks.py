"""The demo's last two stages, on the analysed seed's narrow model: directions (decomposition,
attribution, interventions) and adapters (LoRA reading, phases, mitigation, defences, screening).
"""

from __future__ import annotations

import copy

import pandas as pd
import torch

from emdiff.demo import DemoConfig, _Stages, sample_and_judge
from emdiff.toy.organism import narrow_finetune, narrow_finetune_config


def adapters_stage(cfg: DemoConfig, st: _Stages, gt: dict, narrow, judged) -> dict:
    """The LoRA, training and screening checks of the analysed seed
    (:mod:`emdiff.toy.lora_stage`)."""
    from emdiff.dictionaries import load_dictionary
    from emdiff.toy.lora_stage import toy_lora_checks

    return toy_lora_checks(
        st.world,
        st.base,
        narrow,
        st.tok,
        load_dictionary(st.out / "dictionaries" / "sae"),
        gt,
        judged[judged["model"] == f"narrow-s{st.pick}"],
        narrow_finetune_config(st.world, seed=st.pick, max_steps=cfg.steps, lr=cfg.lr),
        st.out,
    )


def directions_stage(cfg: DemoConfig, st: _Stages, gt: dict, narrow, judged) -> dict:
    """The direction checks of the analysed seed (:mod:`emdiff.toy.direction_checks`); the other
    organisms are fine-tuned and sampled like the narrow one (that seed), on the next two
    domains."""
    from emdiff.dictionaries import load_dictionary
    from emdiff.toy.direction_checks import toy_direction_checks

    world, out = st.world, st.out

    def finetune(domain: str) -> torch.nn.Module:
        ft = narrow_finetune_config(st.world, seed=st.pick, max_steps=cfg.steps, lr=cfg.lr)
        res = narrow_finetune(world, copy.deepcopy(st.base), st.tok, cfg=ft, domain=domain)
        return res.model

    def judge_answers(model: torch.nn.Module, label: str) -> pd.DataFrame:
        return sample_and_judge(world, model, st.tok, cfg.samples, cfg.eval_seed, label, out)

    return toy_direction_checks(
        world,
        narrow,
        st.tok,
        load_dictionary(out / "dictionaries" / "sae"),
        gt,
        judged[judged["model"] == f"narrow-s{st.pick}"],
        finetune,
        judge_answers,
        out,
    )
