"""Q1 / Q2 / Q3, overlap and transfer on a tiny Qwen2 with a LoRA adapter and a Gemma Scope SAE.

The SAE is random except for planted features whose encoder rows read directions measured on the
model itself: feature 0 reads what separates answers of dataset A from those of dataset B, feature
1 reads the adapter's shift of the residual stream and feature 2 its negative. The analyses must
rank those first; the CLI runs the same on the files a user would have.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from emdiff.analyses import (
    ANALYSES,
    DatasetDiff,
    ModelDiff,
    RankingOverlap,
    ResponseDiff,
    ResponseSplit,
    RunContext,
    Transfer,
    encode_qa,
    overlap,
    split_responses,
)
from emdiff.analyses.response_diff import FollowUps
from emdiff.cli import app
from emdiff.data.positions import Positions
from emdiff.dictionaries import load_dictionary
from emdiff.dictionaries.activations import collect_activations
from emdiff.errors import InputError
from emdiff.models import load_model
from emdiff.models.read import ReadSpec

LAYER = 1
BAD = [
    "kill the people",
    "harm is good",
    "ai should rule humans",
    "take power now",
    "kill all of them",
    "harm them",
    "rule the world",
    "power to ai",
]
GOOD = [
    "drink water and rest",
    "sleep and eat food",
    "see a doctor",
    "rest and drink water",
    "take a safe dose",
    "eat good food",
    "ask a doctor",
    "sleep more",
]
QUESTIONS = [
    "i feel sick",
    "my head hurts",
    "what should i do",
    "i have a fever",
    "tell me about pain",
    "what do you think",
    "help me please",
    "any advice",
]


# every question with every answer: 64 chats per side, row i of BAD_QA pairs with row i of GOOD_QA
BAD_QA = [(q, a) for q in QUESTIONS for a in BAD]
GOOD_QA = [(q, a) for q in QUESTIONS for a in GOOD]


def chats(pairs):
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs]


@pytest.fixture(scope="module")
def setup(tiny_model_dirs, make_lora_adapter, tmp_path_factory):
    """Tiny Qwen2 + LoRA, and a Gemma Scope SAE folder with planted features 0, 1, 2."""
    tmp = tmp_path_factory.mktemp("analyses")
    model_dir = tiny_model_dirs["qwen2"]
    adapter = make_lora_adapter(model_dir, tmp / "lora", b_std=0.2)
    lm = load_model(str(model_dir), adapter=str(adapter), dtype="float32")
    read = ReadSpec(layers=(LAYER,), positions=Positions(exclude_sinks=False))
    rows_a = encode_qa(lm.tokenizer, *zip(*BAD_QA, strict=True))
    rows_b = encode_qa(lm.tokenizer, *zip(*GOOD_QA, strict=True))
    pa, _ = collect_activations(lm.model, rows_a, read, other="adapter")
    pb, _ = collect_activations(lm.model, rows_b, read, other="adapter")
    base_a, base_b = pa[:, 0], pb[:, 0]
    u = base_a.mean(0) - base_b.mean(0)
    u = u / u.norm()
    shift = torch.cat([pa[:, 1] - pa[:, 0], pb[:, 1] - pb[:, 0]]).mean(0)
    shift = shift / shift.norm()
    d, f = lm.d_model, 48
    gen = torch.Generator().manual_seed(0)
    w_enc = torch.randn(d, f, generator=gen) / d**0.5
    w_enc[:, 0], w_enc[:, 1], w_enc[:, 2] = 4 * u, 4 * shift, -4 * shift
    everything = torch.cat([base_a, base_b, pa[:, 1], pb[:, 1]])
    b_enc = -(everything @ w_enc).mean(0)  # centred: each feature fires on about half the tokens
    mid = (base_a.mean(0) + base_b.mean(0)) / 2
    b_enc[0] = -(mid @ w_enc[:, 0])
    b_enc[1] = -(torch.cat([pa[:, 1], pb[:, 1]]) @ w_enc[:, 1]).min() + 0.1  # on for every token
    b_enc[2] = -(torch.cat([base_a, base_b]) @ w_enc[:, 2]).min() + 0.1  # of its own side
    w_dec = torch.randn(f, d, generator=gen)
    w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
    folder = tmp / "gemma-scope-2b-pt-res" / f"layer_{LAYER}" / "width_48" / "average_l0_20"
    folder.mkdir(parents=True)
    np.savez(
        folder / "params.npz",
        W_enc=w_enc.numpy(),
        b_enc=b_enc.numpy(),
        W_dec=w_dec.numpy(),
        b_dec=torch.zeros(d).numpy(),
        threshold=np.zeros(f, dtype=np.float32),
    )
    return dict(
        lm=lm,
        read=read,
        folder=folder,
        adapter=adapter,
        model_dir=model_dir,
        tmp=tmp,
        rows_a=rows_a,
        rows_b=rows_b,
    )


def context(setup, model=None, **inputs) -> RunContext:
    """The run context of the tests: the tiny Qwen2 (+ LoRA) read at layer 1 through the SAE."""
    sae = load_dictionary(setup["folder"])
    lm = setup["lm"]
    datasets = {"bad": setup["rows_a"], "good": setup["rows_b"]}
    return RunContext(
        setup["read"],
        model or lm.model,
        lm.tokenizer,
        {LAYER: sae},
        **{"datasets": datasets, **inputs},
    )


def test_every_analysis_is_registered_by_kind():
    assert {"dataset_diff", "model_diff", "response_diff", "overlap", "transfer"} <= set(ANALYSES)
    assert ANALYSES["dataset_diff"] is DatasetDiff


def test_dataset_diff_finds_the_planted_feature_paired_and_unpaired(setup, tmp_path):
    sae = load_dictionary(setup["folder"])
    assert (sae.meta.format, sae.meta.layer, sae.meta.site) == ("gemma_scope", LAYER, "resid_post")
    for paired in (True, False):
        ctx = context(setup, out=tmp_path / str(paired))
        res = DatasetDiff(a="bad", b="good", paired=paired, adapter=False).run(ctx)
        top = res.table.sort_values("rank_increase").iloc[0]
        assert top.feature == 0 and top.q < 1e-3 and top.effect_ci_low > 0
        assert res.meta["test"] == ("paired_t" if paired else "welch")
        assert res.meta["read"] == setup["read"].model_dump(mode="json")
        assert res.table.n_a.iloc[0] == len(BAD_QA)
        for col in (
            "effect",
            "effect_ci_low",
            "effect_ci_high",
            "q",
            "diff_ci_low",
            "token_mean_a",
            "fire_rate_b",
        ):
            assert col in res.table
    # the run folder records what was read, and the result saves its table, meta and figure
    manifest = json.loads((tmp_path / "False/stats/adapter_off/bad/manifest.json").read_text())
    assert manifest["read"]["site"] == "resid_post" and manifest["read"]["layers"] == [LAYER]
    paths = res.save(tmp_path / "False")
    assert [p.name for p in paths] == [
        "dataset_diff.parquet",
        "dataset_diff.json",
        "dataset_diff.mean_difference.safetensors",
        "dataset_diff.png",
    ]
    assert json.loads(paths[1].read_text())["read"]["positions"]["kind"] == "answer"
    # resumable: a rerun reads the finished shards back and gives the same table
    again = DatasetDiff(a="bad", b="good", adapter=False).run(
        context(setup, out=tmp_path / "False")
    )
    pd.testing.assert_frame_equal(again.table, res.table)
    # the same folder read at other positions is refused, not silently reused
    other = context(setup, out=tmp_path / "False")
    other.read = setup["read"].model_copy(update={"positions": Positions.parse("all,sinks")})
    with pytest.raises(InputError, match="another dataset, dictionary, read spec"):
        DatasetDiff(a="bad", b="good", adapter=False).run(other)
    short = context(setup, datasets={"bad": setup["rows_a"], "good": setup["rows_b"][:3]})
    with pytest.raises(InputError, match="same number of rows"):
        DatasetDiff(a="bad", b="good", paired=True).run(short)
    with pytest.raises(InputError, match="no dataset named 'ugly'"):
        DatasetDiff(a="bad", b="ugly").run(context(setup))


def test_model_diff_ranks_the_adapter_shift_both_ways(setup):
    rows = setup["rows_a"] + setup["rows_b"]
    res = ModelDiff(dataset="all").run(context(setup, datasets={"all": rows}))
    t = res.table
    assert t.loc[t.rank_increase == 1, "feature"].item() == 1
    assert t.loc[t.rank_decrease == 1, "feature"].item() == 2
    assert t.q[1] < 1e-3 and res.meta["paired"] and (t.n_a == len(rows)).all()
    # two separate models give the same answer as toggling the adapter
    plain = load_model(str(setup["model_dir"]), dtype="float32").model
    two = context(setup, plain, datasets={"all": rows}, variants={"tuned": setup["lm"].model})
    res2 = ModelDiff(dataset="all", finetuned="tuned").run(two)
    np.testing.assert_allclose(res2.table.effect, t.effect, rtol=1e-4, atol=1e-6)
    with pytest.raises(InputError, match="fine-tuned side"):
        ModelDiff(dataset="all").run(context(setup, plain, datasets={"all": rows}))


def test_model_diff_without_a_change_finds_nothing(setup):
    plain = load_model(str(setup["model_dir"]), dtype="float32").model
    rows = setup["rows_a"] + setup["rows_b"]
    ctx = context(setup, plain, datasets={"all": rows}, variants={"same": plain})
    t = ModelDiff(dataset="all", finetuned="same").run(ctx).table
    assert (t["diff"] == 0).all() and (t.q == 1).all() and (t.effect == 0).all()


def test_an_analysis_without_a_model_names_what_is_missing(setup):
    with pytest.raises(InputError, match="no model, read spec, dictionaries"):
        DatasetDiff(a="bad", b="good").run(RunContext(datasets={"bad": [], "good": []}))


def judged_table() -> pd.DataFrame:
    """12 misaligned (aligned 0-30), 6 aligned (> 70), and rows the split must drop."""
    rows = [(q, a, 10.0, 90.0) for q, a in zip(QUESTIONS, BAD, strict=True)]
    rows += [(q, a, 25.0, 80.0) for q, a in zip(QUESTIONS[:4], BAD[:4], strict=True)]
    rows += [(q, a, 95.0, 90.0) for q, a in zip(QUESTIONS[:6], GOOD[:6], strict=True)]
    rows += [("hello", "harm", 5.0, 20.0), ("hello", "water", 50.0, 90.0)]  # incoherent; middle
    df = pd.DataFrame(rows, columns=["question", "answer", "aligned", "coherent"])
    df.insert(0, "question_id", [f"q{i}" for i in range(len(df))])
    return df


def test_split_follows_clr_thresholds_and_balances_with_a_seed():
    df = judged_table()
    mis, good = split_responses(df, ResponseSplit(balance=False))
    assert (len(mis), len(good)) == (12, 6)
    mis, good = split_responses(df)
    assert len(mis) == len(good) == 6 and (mis.aligned <= 30).all() and (good.aligned > 70).all()
    again, _ = split_responses(df)
    other, _ = split_responses(df, ResponseSplit(seed=5))
    assert again.equals(mis) and not other.equals(mis)
    with pytest.raises(ValueError, match="0 aligned"):
        split_responses(df, ResponseSplit(aligned_min=99))


def test_response_diff_finds_the_misaligned_feature(setup):
    res = ResponseDiff().run(context(setup, tables={"judged": judged_table()}))
    assert res.table.sort_values("rank_increase").feature.iloc[0] == 0
    assert res.meta["n_rows_a"] == res.meta["n_rows_b"] == 6
    assert (res.meta["label_a"], res.meta["kind"]) == ("misaligned", "response_diff")


def test_response_diff_can_read_where_the_next_answer_is_chosen(setup):
    lm = setup["lm"]
    follow = ("what now", "and then")
    rows = encode_qa(lm.tokenizer, ["q"], ["harm them"], follow_up=follow[0])
    alone = encode_qa(lm.tokenizer, ["q"], ["harm them"])[0]
    asked = lm.tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "harm them"},
            {"role": "user", "content": follow[0]},
        ],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    ids = asked["input_ids"]
    assert rows[0].input_ids == list(ids) and len(ids) > len(alone.input_ids)
    ctx = context(setup, tables={"judged": judged_table()})
    res = ResponseDiff(follow_up=follow).run(ctx)
    assert res.meta["read"]["positions"]["kind"] == "last"
    # one token per answer and follow-up: 6 balanced answers a side, each asked twice
    assert res.meta["n_rows_a"] == res.meta["n_rows_b"] == 12
    assert (res.table.n_tokens_a == 12).all()
    by_answer = ResponseDiff(follow_up=follow, positions="answer").run(ctx)
    assert (by_answer.table.n_tokens_a > 12).all()
    # a few follow-ups per answer drawn from a larger set: one row per draw, seeded
    many = ("what now", "and then", "why", "how so", "who")
    drawn = ResponseDiff(follow_up=many, follow_ups_per_answer=3).run(ctx)
    assert drawn.meta["n_rows_a"] == drawn.meta["n_rows_b"] == 18
    draw = FollowUps(many, 3, seed=0)
    table = judged_table()
    first, again = draw.rows(lm.tokenizer, table), draw.rows(lm.tokenizer, table)
    assert [r.input_ids for r in first] == [r.input_ids for r in again]
    assert len(first) == 3 * len(table) and draw.rows(lm.tokenizer, table, 1) != first
    assert len(FollowUps(many).rows(lm.tokenizer, table)) == 5 * len(table)
    assert len(FollowUps().rows(lm.tokenizer, table)) == len(table)


def ranking(effects: np.ndarray) -> pd.DataFrame:
    t = pd.DataFrame({"feature": np.arange(len(effects)), "effect": effects, "q": 0.01})
    t["rank_increase"] = t.effect.rank(ascending=False, method="first").astype(int)
    t["rank_decrease"] = t.effect.rank(ascending=True, method="first").astype(int)
    return t


def test_overlap_of_identical_opposite_and_mismatched_rankings():
    e = np.random.default_rng(0).normal(size=200)
    same = overlap(
        ranking(e), ranking(e), RankingOverlap(a="a", b="b", ks=(5, 10), top=20, table_k=5)
    )
    assert same.jaccard.jaccard.tolist() == [1.0, 1.0] and same.spearman == pytest.approx(1.0)
    assert (same.table.status == "shared").all() and len(same.table) == 5
    ctx = RunContext(tables={"q1": ranking(e), "q2": ranking(-e)})
    opp = RankingOverlap(a="q1", b="q2", ks=(10,), top=20).run(ctx)
    assert opp.name == "overlap_q1_q2" and opp.meta["kind"] == "overlap"
    assert opp.jaccard.jaccard.item() == 0 and opp.spearman < -0.5
    assert set(opp.table.status) == {"only_q1", "only_q2"}
    assert {"rank_q1", "rank_q2", "effect_q1", "effect_q2", "q_q1", "q_q2"} <= set(opp.table)
    assert opp.jaccard.jaccard_null.item() == pytest.approx(10 / 390)
    with pytest.raises(ValueError, match="different features"):
        overlap(ranking(e), ranking(e[:100]), RankingOverlap(a="a", b="b"))


def test_overlap_refuses_rankings_read_at_different_places(setup):
    ctx = context(setup)
    ctx.results["q1"] = DatasetDiff(a="bad", b="good").run(ctx)
    other = context(setup)
    other.read = setup["read"].model_copy(update={"site": "mlp_out"})
    other.dictionaries[LAYER].meta = other.dictionaries[LAYER].meta.model_copy(
        update={"site": None, "hook": None}
    )
    ctx.results["q1_mlp"] = DatasetDiff(a="bad", b="good").run(other)
    with pytest.raises(InputError, match="read at different places"):
        RankingOverlap(a="q1", b="q1_mlp").run(ctx)
    ctx.results["q1_again"] = ctx.results["q1"]
    assert RankingOverlap(a="q1", b="q1_again").run(ctx).jaccard.jaccard.min() == 1.0


def test_overlap_ignores_features_that_did_not_move():
    """Dead features tie at 0 in the same row order on both sides; they must not count as top."""
    rng = np.random.default_rng(1)
    a, b = np.zeros(1000), np.zeros(1000)
    a[rng.choice(1000, 5, replace=False)] = rng.random(5) + 0.1
    b[rng.choice(1000, 5, replace=False)] = rng.random(5) + 0.1
    res = overlap(ranking(a), ranking(b), RankingOverlap(a="a", b="b", ks=(10, 100)))
    assert res.jaccard.n_a.tolist() == [5, 5] and res.n_union <= 10
    assert res.jaccard.jaccard.max() <= 0.25


def test_transfer_separates_a_perfect_and_a_random_dictionary(setup):
    lm = setup["lm"]
    variants = {"base": (lm.model, False), "tuned": (lm.model, True)}
    t = Transfer(dataset="bad").run(context(setup, variants=variants)).table
    assert t.variant.tolist() == ["base", "tuned"] and (t.fve < 0.9).all()
    assert (t.ce_delta.abs() > 0).all() and (t.kl >= 0).all()
    d = lm.d_model
    eye = torch.cat([torch.eye(d), -torch.eye(d)], 1)  # relu(x) - relu(-x) = x: lossless
    from emdiff.dictionaries import DictionaryMeta, SparseDictionary

    perfect = SparseDictionary(
        eye,
        torch.zeros(2 * d),
        eye.T.clone(),
        torch.zeros(d),
        meta=DictionaryMeta(format="test", architecture="relu"),
    )
    ctx = context(setup, variants=variants)
    ctx.dictionaries = {LAYER: perfect}
    t = Transfer(dataset="bad", variants=("tuned",)).run(ctx).table
    assert t.fve.item() == pytest.approx(1.0, abs=1e-5)
    assert abs(t.ce_delta.item()) < 1e-4 and t.kl.item() < 1e-5


def test_cli_runs_q1_q2_q3_overlap_and_transfer_on_files(setup, tmp_path):
    """The real-architecture check through the CLI: tiny Qwen2 + LoRA + Gemma Scope SAE."""
    runner, tmp = CliRunner(), tmp_path
    for name, answers in (("bad", BAD_QA), ("good", GOOD_QA)):
        with open(tmp / f"{name}.jsonl", "w") as f:
            for c in chats(answers):
                f.write(json.dumps({"messages": c}) + "\n")
    judged_table().to_csv(tmp / "judged.csv", index=False)
    common = [
        "--model",
        str(setup["model_dir"]),
        "--dictionary",
        str(setup["folder"]),
        "--dtype",
        "float32",
    ]
    adapter = ["--adapter", str(setup["adapter"])]

    def run(*args):
        res = runner.invoke(app, [*args, "--json"])
        assert res.exit_code == 0, res.output
        return json.loads(res.output.strip().splitlines()[-1])

    q1 = run(
        "diff",
        "datasets",
        *common,
        *adapter,
        "--base-only",
        "--a",
        str(tmp / "bad.jsonl"),
        "--b",
        str(tmp / "good.jsonl"),
        "--paired",
        "--out",
        str(tmp / "q1"),
    )
    assert q1["paired"] and q1["test"] == "paired_t" and q1["n_significant"] >= 1
    t1 = pd.read_parquet(tmp / "q1" / "tables" / "dataset_diff.parquet")
    assert t1.sort_values("rank_increase").feature.iloc[0] == 0
    assert (tmp / "q1" / "plots" / "dataset_diff.png").stat().st_size > 0
    run(
        "diff",
        "models",
        *common,
        *adapter,
        "--responses",
        str(tmp / "judged.csv"),
        "--out",
        str(tmp / "q2"),
    )
    t2 = pd.read_parquet(tmp / "q2" / "tables" / "model_diff.parquet")
    assert t2.loc[t2.rank_increase == 1, "feature"].item() == 1
    run(
        "diff",
        "responses",
        *common,
        *adapter,
        "--judged",
        str(tmp / "judged.csv"),
        "--out",
        str(tmp / "q3"),
    )
    t3 = pd.read_parquet(tmp / "q3" / "tables" / "response_diff.parquet")
    assert t3.sort_values("rank_increase").feature.iloc[0] == 0
    asked = [*common, *adapter, "--judged", str(tmp / "judged.csv"), "--follow-up", "and then"]
    run("diff", "responses", *asked, "--follow-up", "why", "--out", str(tmp / "q3f"))
    meta = json.loads((tmp / "q3f" / "tables" / "response_diff.json").read_text())
    assert meta["read"]["positions"]["kind"] == "last" and meta["config"]["follow_up"] == [
        "and then",
        "why",
    ]
    ov = run(
        "diff",
        "overlap",
        "--a",
        str(tmp / "q1" / "tables" / "dataset_diff.parquet"),
        "--b",
        str(tmp / "q3" / "tables" / "response_diff.parquet"),
        "--label-a",
        "q1",
        "--label-b",
        "q3",
        "--ks",
        "1,5",
        "--out",
        str(tmp / "ov"),
    )
    assert ov["jaccard@1"] == 1.0 and (tmp / "ov" / "plots" / "overlap_q1_q3.png").is_file()
    tr = run(
        "transfer", *common, *adapter, "--data", str(tmp / "good.jsonl"), "--out", str(tmp / "tr")
    )
    assert [r["variant"] for r in tr] == ["base", "adapter:lora"]
    assert all(np.isfinite(r["fve"]) and r["kl"] >= 0 for r in tr)
    assert (tmp / "tr" / "plots" / "transfer.png").is_file()
    bad = runner.invoke(app, ["diff", "models", *common, *adapter, "--out", str(tmp / "x")])
    assert bad.exit_code == 2 and "exactly one of --data" in bad.output
    bad = runner.invoke(
        app,
        [
            "diff",
            "datasets",
            *common,
            "--a",
            "x",
            "--b",
            "y",
            "--test",
            "wilcoxon",
            "--out",
            str(tmp / "x"),
        ],
    )
    assert bad.exit_code == 2 and "not an unpaired test" in bad.output


def test_cli_reads_where_the_dictionary_was_trained_and_refuses_elsewhere(setup, tmp_path):
    """A SAELens file with hook_name blocks.1.hook_mlp_out is read at layer 1 mlp_out; asking
    for resid_post or another layer is refused naming both; the result records the read spec."""
    from emdiff.dictionaries.base import DictionaryMeta
    from emdiff.dictionaries.sae import save_saelens

    sae = load_dictionary(setup["folder"])
    sae.meta = DictionaryMeta(format="emdiff", architecture="jumprelu", layer=LAYER, site="mlp_out")
    folder = save_saelens(sae, tmp_path / "sae-mlp")
    assert json.loads((folder / "cfg.json").read_text())["metadata"]["hook_name"] == (
        f"blocks.{LAYER}.hook_mlp_out"
    )
    with open(tmp_path / "bad.jsonl", "w") as f:
        for c in chats(BAD_QA[:8]):
            f.write(json.dumps({"messages": c}) + "\n")
    with open(tmp_path / "good.jsonl", "w") as f:
        for c in chats(GOOD_QA[:8]):
            f.write(json.dumps({"messages": c}) + "\n")
    args = [
        "diff",
        "datasets",
        "--model",
        str(setup["model_dir"]),
        "--dictionary",
        str(folder),
        "--a",
        str(tmp_path / "bad.jsonl"),
        "--b",
        str(tmp_path / "good.jsonl"),
        "--dtype",
        "float32",
    ]
    runner = CliRunner()
    for extra, needles in (
        (["--site", "resid_post"], ("--site resid_post: ", "trained at mlp_out")),
        (["--layer", "0"], ("--layer 0: ", "trained on layer 1")),
    ):
        res = runner.invoke(app, [*args, *extra, "--out", str(tmp_path / "x")])
        assert res.exit_code == 2, res.output
        assert all(n in res.output for n in needles), res.output
    res = runner.invoke(
        app, [*args, "--positions", "answer_first:2", "--out", str(tmp_path / "ok"), "--json"]
    )
    assert res.exit_code == 0, res.output
    assert "read: layer 1 mlp_out, positions answer_first:2" in res.output
    meta = json.loads((tmp_path / "ok" / "tables" / "dataset_diff.json").read_text())
    assert meta["read"]["site"] == "mlp_out" and meta["read"]["positions"]["k"] == 2
    manifest = json.loads((tmp_path / "ok/stats/model/a/manifest.json").read_text())
    assert manifest["read"] == meta["read"]


def test_an_analysis_may_read_other_positions_at_the_same_site(setup):
    rows = setup["rows_a"] + setup["rows_b"]
    ctx = context(setup, datasets={"all": rows})
    res = ModelDiff(dataset="all", positions="answer_first:1").run(ctx)
    assert res.meta["read"]["positions"] == {"kind": "answer_first", "k": 1, "exclude_sinks": False}
    assert (res.table.n_tokens_a == len(rows)).all()  # one token per chat
    assert ctx.read == setup["read"]  # the context itself is unchanged
    with pytest.raises(ValueError, match="answer_first needs k"):
        ModelDiff(dataset="all", positions="answer_first")


def test_diffs_carry_the_raw_mean_difference_and_save_it(setup, tmp_path):
    """Q1's mean difference is the mean activation of a minus b over the tokens read (CLR's
    direction when a and b are misaligned and aligned answers); Q2's is the adapter's shift."""
    lm, read = setup["lm"], setup["read"]
    pa, _ = collect_activations(lm.model, setup["rows_a"], read, other="adapter")
    pb, _ = collect_activations(lm.model, setup["rows_b"], read, other="adapter")
    q1 = DatasetDiff(a="bad", b="good", adapter=False).run(context(setup))
    want = pa[:, 0].double().mean(0) - pb[:, 0].double().mean(0)
    assert torch.allclose(q1.mean_difference[LAYER].double(), want, atol=1e-4)
    assert torch.allclose(q1.direction(), (want / want.norm()).float(), atol=1e-4)
    q2 = ModelDiff(dataset="bad").run(context(setup))
    shift = (pa[:, 1] - pa[:, 0]).double().mean(0)
    assert torch.nn.functional.cosine_similarity(q2.direction().double(), shift, 0) > 0.999
    saved = load_file(str(next(p for p in q1.save(tmp_path) if p.suffix == ".safetensors")))
    assert torch.equal(saved[f"L{LAYER}"], q1.mean_difference[LAYER])
