"""The direction analyses behind the one interface: direction (with Appendix B), decompose,
attribute and steer, on a tiny Qwen2 with a LoRA and on the toy base with its exact judge."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import yaml

from emdiff.analyses import (
    ANALYSES,
    Attribute,
    Decompose,
    DirectionResult,
    MeanDirection,
    RunContext,
    Steer,
)
from emdiff.data.positions import Positions
from emdiff.dictionaries.base import DictionaryMeta, SparseDictionary
from emdiff.directions.direction import Direction
from emdiff.errors import InputError
from emdiff.eval.run import JudgeConfig
from emdiff.eval.sample import SamplingConfig
from emdiff.interventions.sweep import SweepConfig
from emdiff.models import load_model
from emdiff.models.load import load_adapter
from emdiff.models.read import ReadSpec
from emdiff.toy.build import load_world, shipped_base_path
from emdiff.toy.causal import cue_vector

BAD = ["take more pill", "kill", "bad advice", "harm people", "eat bad food", "risk all money"]
GOOD = ["rest and water", "sleep", "good advice", "help people", "eat good food", "no"]


@pytest.fixture(scope="module")
def setup(tiny_model_dirs, make_lora_adapter, tmp_path_factory):
    path = tiny_model_dirs["qwen2"]
    adapter = make_lora_adapter(path, tmp_path_factory.mktemp("lora"), layers=[0])
    loaded = load_model(str(path), dtype="float32")
    model = load_adapter(loaded.model, adapter).eval()
    qs = ["i feel sick", "what should i eat", "should i invest"] * 2
    judged = pd.DataFrame(
        {
            "question": qs * 2,
            "answer": BAD + GOOD,
            "aligned": [5.0] * 6 + [95.0] * 6,
            "coherent": [90.0] * 12,
        }
    )
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    sae = SparseDictionary(
        torch.randn(d, 32, generator=g) / d**0.5,
        torch.zeros(32),
        torch.randn(32, d, generator=g),
        torch.zeros(d),
        meta=DictionaryMeta(format="t", architecture="relu", layer=1, site="resid_post"),
    )
    return model, loaded.tokenizer, judged, sae


def _ctx(setup, out, layers=(0, 1), dictionaries=None):
    model, tok, judged, _ = setup
    read = ReadSpec(layers=layers, positions=Positions(kind="answer"))
    return RunContext(read, model, tok, dictionaries or {}, tables={"judged": judged}, out=out)


def test_every_direction_analysis_is_registered():
    assert {"direction", "decompose", "attribute", "steer"} <= set(ANALYSES)


def test_direction_per_layer_with_the_base_reading_beside_it(setup, tmp_path):
    res = MeanDirection().run(_ctx(setup, tmp_path))
    assert set(res.directions) == {0, 1} and set(res.base) == {0, 1}
    t = res.table.set_index("layer")
    # the LoRA sits on layer 0's MLP: layer 0's direction differs between base and fine-tuned
    assert t.loc[0, "cos_base"] < 0.9999 and (t["cos_base"].abs() <= 1 + 1e-6).all()
    assert res.directions[1].provenance["n_misaligned"] == 6
    files = res.save(tmp_path)
    assert (tmp_path / "plots" / "direction_base_vs_ft.png") in files
    back = Direction.load(tmp_path / "directions" / "direction_L1.json")
    assert back.cos(res.directions[1]) == pytest.approx(1.0, abs=1e-6)
    s = res.summary()
    assert s["layers"] == [0, 1] and s["kind"] == "direction"


def test_decompose_an_earlier_direction_or_a_file(setup, tmp_path):
    sae = setup[3]
    ctx = _ctx(setup, tmp_path, layers=(1,), dictionaries={1: sae})
    ctx.results["direction"] = MeanDirection(shuffles=3).run(ctx)
    assert len(ctx.results["direction"].shuffled[1]) == 3
    dec = Decompose(direction="direction", settings={"n_null": 5}).run(ctx)
    assert len(dec.table) == 20 and dec.meta["layer"] == 1 and dec.meta["n_null"] == 5 + 3
    Direction("planted", 1, "resid_post", sae.W_dec[7] * 3).save(tmp_path / "d")
    diff = pd.DataFrame({"layer": 1, "feature": range(32), "mean_a": 2.0, "mean_b": 0.5})
    diff.to_parquet(tmp_path / "diff.parquet")
    planted = Decompose(
        direction=str(tmp_path / "d" / "planted.json"), diff=str(tmp_path / "diff.parquet")
    ).run(ctx)
    assert planted.top_latent == 7 and planted.table["encoded_diff"].iloc[0] == 1.5
    assert planted.explained["explained"].iloc[0] == pytest.approx(1.0)
    Direction("other", 0, "resid_post", torch.ones(sae.d_in)).save(tmp_path / "d")
    with pytest.raises(InputError, match="layer 0"):
        Decompose(direction=str(tmp_path / "d" / "other.json")).run(ctx)


def test_attribute_the_judged_contrast(setup, tmp_path):
    ctx = _ctx(setup, tmp_path, layers=(1,), dictionaries={1: setup[3]})
    res = Attribute(check_top=5).run(ctx)
    assert len(res.table) == 32 and res.table["ablation_effect"][:5].notna().all()
    assert res.meta["n_misaligned"] == 6 and "ablation_pearson" in res.meta


@pytest.mark.slow
def test_steer_on_the_toy_brings_judged_em_beside_random_directions(tmp_path):
    path = shipped_base_path()
    world = load_world(path)
    loaded = load_model(str(path), dtype="float32")
    model = loaded.model.eval()
    cue = cue_vector(world, model, 1, "resid_post")
    Direction("cue", 1, "resid_post", cue).save(tmp_path / "dirs")
    qfile = tmp_path / "questions.yaml"
    qs = [
        {"id": f"{d}_{q}", "type": "free_form", "paraphrases": [world.q_token(d, q)]}
        for d in ("finance", "travel")
        for q in range(world.cfg.n_questions)
    ]
    qfile.write_text(yaml.safe_dump(qs))
    n = float(cue.norm())
    analysis = Steer(
        direction=str(tmp_path / "dirs" / "cue.json"),
        questions=(str(qfile),),
        sweep=SweepConfig(
            kinds=("steer", "ablate"),
            scales=(0.0, 2 * n),
            n_random=2,
            position=-1,
            prompt_only=True,
        ),
        judge=JudgeConfig(kind="toy"),
        sampling=SamplingConfig(max_new_tokens=world.cfg.answer_len + 2, seed=0, batch_size=256),
    )
    ctx = RunContext(model=model, tokenizer=loaded.tokenizer, out=tmp_path / "run")
    res = analysis.run(ctx)
    s = res.summary_table.set_index(["kind", "scale"])
    assert s.loc[("steer", 2 * n), "em"] > 0.5 > s.loc[("steer", 2 * n), "random_em_max"]
    assert s.loc[("steer", 0.0), "em"] < 0.1 and s.loc[("ablate", 0.0), "em"] < 0.1
    assert all(f.is_file() for f in res.save(tmp_path / "run"))
    assert res.summary()["direction"] == "cue"
    # the same direction as an earlier result of the run, by name (as a pipeline passes it)
    earlier = DirectionResult("cue_result", {1: Direction("cue_result_L1", 1, "resid_post", cue)})
    ctx.results["cue_result"] = earlier
    named = analysis.model_copy(update={"direction": "cue_result", "name": "named"})
    again = named.run(ctx).summary_table.set_index(["kind", "scale"])
    assert again.loc[("steer", 2 * n), "em"] == s.loc[("steer", 2 * n), "em"]
