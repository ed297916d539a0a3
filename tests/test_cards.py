"""Feature cards on a tiny Llama read through a JumpReLU SAE at layer 0.

Every number on a card is checked against an independent recomputation (a plain forward pass with
``output_hidden_states`` and the dictionary's encode): the top contexts are the strongest read
tokens of distinct rows, strongest first; negatives are rows where the latent never fires; the
histogram counts its nonzero activations at the read tokens; the logit lens is the decoder row
times the final norm's gain through ``W_U``. Then the Neuronpedia export's field names, explanations
imported from a hand-written Neuronpedia export (and a bad one), the report section and the CLI.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from emdiff.analyses import DatasetDiff, FeatureCards, RunContext, encode_qa
from emdiff.analyses.cards import OUT_OF_RANGE
from emdiff.analyses.cards_io import (
    Explanation,
    attach_explanations,
    load_cards,
    read_explanations,
    write_explanations,
)
from emdiff.cli import app
from emdiff.data.positions import Positions
from emdiff.dictionaries import load_dictionary
from emdiff.dictionaries.base import DictionaryMeta, Encoding, SparseDictionary
from emdiff.dictionaries.sae import save_saelens
from emdiff.errors import InputError
from emdiff.models import load_model
from emdiff.models.hooks import residual_edit
from emdiff.models.read import ReadSpec
from emdiff.models.unembed import logit_lens, output_scale
from emdiff.report.html import build_report
from emdiff.report.neuronpedia import export_neuronpedia, import_explanations, read_explanation_file
from emdiff.stats.latents import token_activations

LAYER, D_SAE, BEFORE, AFTER = 0, 40, 6, 3
QUESTIONS = ["i feel sick", "what should i do", "help me please", "tell me about pain"]
BAD = [
    "kill the people",
    "harm is good",
    "take power now",
    "rule the world",
    "harm them",
    "ai rule",
]
GOOD = [
    "drink water and rest",
    "see a doctor",
    "sleep more",
    "eat good food",
    "rest",
    "ask a doctor",
]

# SAEDashboard's NeuronpediaDashboardFeature.to_dict() / Activation.to_dict() / Batch.to_dict() keys
NP_FEATURE_KEYS = {
    "feature_index",
    "neuron_alignment_indices",
    "neuron_alignment_values",
    "neuron_alignment_l1",
    "correlated_neurons_indices",
    "correlated_neurons_l1",
    "correlated_neurons_pearson",
    "correlated_features_indices",
    "correlated_features_l1",
    "correlated_features_pearson",
    "neg_str",
    "neg_values",
    "pos_str",
    "pos_values",
    "frac_nonzero",
    "freq_hist_data_bar_values",
    "freq_hist_data_bar_heights",
    "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values",
    "n_prompts_total",
    "n_tokens_in_prompt",
    "dataset",
    "decoder_weights_dist",
    "activations",
}
NP_ACTIVATION_KEYS = {"bin_min", "bin_max", "bin_contains", "tokens", "values"}
NP_BATCH_KEYS = {"model_id", "layer", "sae_set", "features"}


def qa(answers):
    return [(q, a) for q in QUESTIONS for a in answers]


def hidden(model, row) -> torch.Tensor:
    """Layer 0's output for one row, by a plain forward pass (no emdiff hooks)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([row.input_ids]), output_hidden_states=True)
    return out.hidden_states[LAYER + 1][0]


@pytest.fixture(scope="module")
def setup(tiny_model_dirs, tmp_path_factory):
    """A tiny Llama with a non-trivial final norm, a JumpReLU SAE centred on its activations
    (latent 38 never fires, latent 39 always does), Q1 ranking ``q1`` (a result) and a
    hand-made ranking ``q2`` (a table of the run folder), and cards of both."""
    tmp = tmp_path_factory.mktemp("cards")
    lm = load_model(str(tiny_model_dirs["llama"]), dtype="float32")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a final norm gain that is not 1, so the logit lens must apply it
        lm.model.model.norm.weight.copy_(0.5 + torch.rand(lm.d_model, generator=gen))
    model_dir = tmp / "llama"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    tok = lm.tokenizer
    rows_bad = encode_qa(tok, *zip(*qa(BAD), strict=True))
    rows_good = encode_qa(tok, *zip(*qa(GOOD), strict=True))
    x = torch.cat([hidden(lm.model, r) for r in rows_bad + rows_good])
    w_enc = torch.randn(lm.d_model, D_SAE, generator=gen) / lm.d_model**0.5
    b_enc = -torch.quantile(x @ w_enc, 0.8, dim=0)  # each latent fires on ~20% of tokens
    b_enc[38], b_enc[39] = -1e4, 1e4
    sae = SparseDictionary(
        w_enc,
        b_enc,
        torch.randn(D_SAE, lm.d_model, generator=gen),
        torch.zeros(lm.d_model),
        meta=DictionaryMeta(
            format="saelens", architecture="jumprelu", layer=LAYER, site="resid_post"
        ),
        encoding=Encoding(activation="jumprelu"),
        tensors={"threshold": torch.full((D_SAE,), 1e-3)},
    )
    sae_dir = save_saelens(sae, tmp / "sae")
    d = load_dictionary(sae_dir)
    read = ReadSpec(
        layers=(LAYER,), positions=Positions(exclude_sinks=False), dictionary=str(sae_dir)
    )
    run = tmp / "run"
    datasets = {"bad": rows_bad, "good": rows_good}
    ctx = RunContext(read, lm.model, tok, {LAYER: d}, datasets=datasets, out=run)
    q1 = DatasetDiff(name="q1", a="bad", b="good", paired=True).run(ctx)
    q1.save(run)
    q2 = q1.table.copy()  # another ranking of the same latents: the order reversed
    q2["effect"] = -q2["effect"]
    q2["rank_increase"], q2["rank_decrease"] = q1.table["rank_decrease"], q1.table["rank_increase"]
    q2.to_parquet(run / "tables" / "q2.parquet")
    ctx.results["q1"] = q1
    cards = FeatureCards(
        rankings=("q1", "q2"),
        dataset="bad",
        top=4,
        direction="both",
        contexts=6,
        negatives=4,
        before=BEFORE,
        after=AFTER,
    ).run(ctx)
    path = cards.save(run)[0]
    return dict(
        lm=lm,
        d=d,
        rows=rows_bad,
        q1=q1,
        q2=q2,
        cards=cards,
        path=path,
        run=run,
        model_dir=model_dir,
        sae_dir=sae_dir,
        tmp=tmp,
        ctx=ctx,
    )


def test_cards_hold_every_field_of_the_schema(setup):
    doc = json.loads(setup["path"].read_text())
    assert setup["path"].name == "cards.json" and set(doc) == {"meta", "cards"}
    assert doc["meta"]["kind"] == "cards" and doc["meta"]["rankings"] == ["q1", "q2"]
    keys = [(c["layer"], c["latent"]) for c in doc["cards"]]
    q1 = setup["q1"].table
    expected = []
    for t in (q1, setup["q2"]):
        for d, sign in (("increase", 1), ("decrease", -1)):
            moved = t[sign * t.effect > 0].sort_values(f"rank_{d}")
            expected += [(LAYER, int(f)) for f in moved.feature[:4]]
    assert keys == list(dict.fromkeys(expected)) and len(keys) == len(set(keys)) == 8
    for card in doc["cards"]:
        assert set(card) == {
            "layer",
            "site",
            "latent",
            "contexts",
            "negatives",
            "negatives_kind",
            "histogram",
            "logits",
            "stats",
            "explanation",
        }
        assert card["site"] == "resid_post" and card["explanation"] is None
        for c in card["contexts"] + card["negatives"]:
            assert set(c) == {"tokens", "acts", "seq", "pos"} and len(c["tokens"]) == len(c["acts"])
            assert all(isinstance(t, str) for t in c["tokens"])
            assert len(c["tokens"]) <= BEFORE + AFTER + 1
        assert set(card["histogram"]) == {"edges", "counts", "firing_fraction"}
        assert len(card["logits"]["top"]) == len(card["logits"]["bottom"]) == 10
        assert set(card["stats"]) == {"q1", "q2"}
        for name, t in (("q1", q1), ("q2", setup["q2"])):
            row = t[t.feature == card["latent"]].iloc[0]
            s = card["stats"][name]
            assert s["effect"] == pytest.approx(row.effect) and s["q"] == pytest.approx(row.q)
            assert s["ci_low"] == pytest.approx(row.effect_ci_low)
            assert s["rank"] == (row.rank_increase if row.effect >= 0 else row.rank_decrease)


def test_contexts_negatives_and_histogram_match_an_independent_recomputation(setup):
    lm, d, rows = setup["lm"], setup["d"], setup["rows"]
    bos = lm.tokenizer.bos_token_id
    acts = [d.encode(hidden(lm.model, r)) for r in rows]
    masks = [torch.tensor(Positions().mask(r, bos)) for r in rows]
    for card in setup["cards"].cards:
        j = card["latent"]
        best = []  # per row, its strongest read token; the six strongest rows
        for s, (a, m) in enumerate(zip(acts, masks, strict=True)):
            at = m.nonzero().squeeze(1)
            k = int(a[at, j].argmax())
            if a[at[k], j] > 0:
                best.append((float(a[at[k], j]), s, int(at[k])))
        best = sorted(best, key=lambda b: (-b[0], b[1]))[:6]  # ties: the earlier row first
        got = [(c["acts"][min(c["pos"], BEFORE)], c["seq"], c["pos"]) for c in card["contexts"]]
        assert [(s, p) for _, s, p in got] == [(s, p) for _, s, p in best]  # distinct rows
        np.testing.assert_allclose([v for v, _, _ in got], [v for v, _, _ in best], rtol=1e-4)
        for c in card["contexts"]:  # every token of the window, BOS shown as 0
            ids = rows[c["seq"]].input_ids
            start = max(0, c["pos"] - BEFORE)
            want = acts[c["seq"]][start : c["pos"] + AFTER + 1, j].clone()
            want[torch.tensor(ids[start : c["pos"] + AFTER + 1]) == bos] = 0
            np.testing.assert_allclose(c["acts"], want.numpy(), rtol=1e-4, atol=1e-6)
            assert "".join(c["tokens"]).strip() in lm.tokenizer.decode(ids)
        for c in card["negatives"] if card["negatives_kind"] == "silent" else ():
            assert not any(c["acts"]) and masks[c["seq"]][c["pos"]]
            keep = torch.tensor(rows[c["seq"]].input_ids) != bos
            assert not acts[c["seq"]][keep, j].any()  # silent on the whole row
        assert len({c["seq"] for c in card["negatives"]}) == len(card["negatives"])
        read = torch.cat([a[m, j] for a, m in zip(acts, masks, strict=True)])
        hist = card["histogram"]
        assert sum(hist["counts"]) == int((read != 0).sum())
        assert hist["firing_fraction"] == pytest.approx(float((read != 0).float().mean()))
        if hist["counts"]:
            assert hist["edges"][0] == pytest.approx(float(read[read != 0].min()), rel=1e-4)
            assert hist["edges"][-1] == pytest.approx(float(read.max()), rel=1e-4)
            assert len(hist["edges"]) == len(hist["counts"]) + 1 == 31
    # the latent that fires everywhere takes its weakest rows as negatives; the one that never
    # fires has no contexts
    hand = setup["q1"].table.copy()  # a ranking that puts 38 and 39 first
    hand["effect"] = 1.0
    hand["rank_increase"] = hand["feature"].map({38: 1, 39: 2}).fillna(hand["feature"] + 3)
    ctx = replace(setup["ctx"], tables={"hand": hand})
    extra = FeatureCards(  # read with sinks excluded (per row; this model has none)
        rankings=("hand",), dataset="bad", top=2, contexts=3, negatives=2, positions="answer"
    )
    never, always = extra.run(ctx).cards
    assert (never["latent"], always["latent"]) == (38, 39)
    assert never["contexts"] == [] and len(never["negatives"]) == 2
    assert never["histogram"] == {"edges": [], "counts": [], "firing_fraction": 0.0}
    assert never["negatives_kind"] == "silent" and always["negatives_kind"] == "lowest"
    assert len(always["negatives"]) == 2 and len(always["contexts"]) == 3
    row_max = [float(a[m, 39].max()) for a, m in zip(acts, masks, strict=True)]
    weakest = sorted(range(len(rows)), key=lambda s: row_max[s])  # stable, as the cards sort
    top_rows = {c["seq"] for c in always["contexts"]}
    assert {c["seq"] for c in always["negatives"]} <= set(
        [s for s in weakest if s not in top_rows][:4]
    )
    assert always["histogram"]["firing_fraction"] == 1.0


def test_bos_and_attention_sinks_read_zero(setup):
    lm, d, rows = setup["lm"], setup["d"], setup["rows"][:3]

    def sink(h: torch.Tensor) -> torch.Tensor:  # token 2 of every row: 100x the norm
        h = h.clone()
        h[:, 2] *= 100
        return h

    for keep_sinks in (False, True):
        read = setup["ctx"].read.model_copy(
            update={"positions": Positions(exclude_sinks=not keep_sinks)}
        )
        with residual_edit(lm.model, LAYER, "resid_post", sink):
            acts = token_activations(lm.model, rows, {LAYER: d}, read, {LAYER: [39]})
        for row, a in zip(rows, acts, strict=True):
            fires = a[LAYER][:, 0] != 0  # latent 39 fires on every token it is shown
            assert rows[0].input_ids[0] == lm.tokenizer.bos_token_id and not fires[0]
            assert bool(fires[2]) == keep_sinks and fires[3:].all()
            assert len(fires) == len(row.input_ids)


def test_logit_lens_is_the_decoder_row_through_the_norm_gain_and_unembedding(setup):
    lm, d = setup["lm"], setup["d"]
    w_u = lm.model.get_output_embeddings().weight
    gain = lm.model.model.norm.weight
    n_vocab = len(lm.tokenizer)
    for card in setup["cards"].cards:
        logits = (d.W_dec[card["latent"]] * gain) @ w_u.T
        for side, largest in (("top", True), ("bottom", False)):
            want = logits.topk(10, largest=largest)
            got = card["logits"][side]
            np.testing.assert_allclose([v for _, v in got], want.values.detach(), rtol=1e-4)
            names = [
                OUT_OF_RANGE if i >= n_vocab else lm.tokenizer.decode([i])
                for i in want.indices.tolist()
            ]
            assert [t for t, _ in got] == names


@pytest.mark.parametrize("arch", ["gemma2", "qwen2"])
def test_logit_lens_applies_each_architectures_norm_gain(tiny_model_dirs, arch):
    lm = load_model(str(tiny_model_dirs[arch]), dtype="float32")
    norm = lm.model.model.norm
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-0.5, 0.5, lm.d_model))
    gain = 1 + norm.weight if arch == "gemma2" else norm.weight  # Gemma scales by 1 + weight
    v = torch.randn(3, lm.d_model, generator=torch.Generator().manual_seed(1))
    want = (v * gain) @ lm.model.get_output_embeddings().weight.T
    torch.testing.assert_close(logit_lens(lm.model, v), want.detach(), rtol=1e-4, atol=1e-4)
    assert output_scale(lm.model)[1] == {"gemma2": "Gemma2RMSNorm", "qwen2": "Qwen2RMSNorm"}[arch]


def test_neuronpedia_export_has_saedashboards_fields(setup, tmp_path):
    written = export_neuronpedia(setup["path"], tmp_path, model_id="tiny-llama", per_batch=3)
    folder = tmp_path / "tiny-llama_emdiff-resid-post_blocks.0.hook_resid_post_40"
    assert sorted(p.name for p in written) == [
        "batch-0.json",
        "batch-1.json",
        "batch-2.json",
        "run_settings.json",
    ]
    assert all(p.parent == folder for p in written)
    features = []
    for b in range(3):
        batch = json.loads((folder / f"batch-{b}.json").read_text())
        assert set(batch) == NP_BATCH_KEYS and batch["layer"] == LAYER
        assert batch["model_id"] == "tiny-llama" and batch["sae_set"] == "emdiff-resid-post"
        features += batch["features"]
    cards = setup["cards"].cards
    assert [f["feature_index"] for f in features] == [c["latent"] for c in cards]
    for f, card in zip(features, cards, strict=True):
        assert set(f) == NP_FEATURE_KEYS
        assert f["pos_str"] == [t for t, _ in card["logits"]["top"]]
        assert f["neg_values"] == [round(v, 3) for _, v in card["logits"]["bottom"]]
        assert f["frac_nonzero"] == card["histogram"]["firing_fraction"]
        assert f["freq_hist_data_bar_heights"] == card["histogram"]["counts"]
        assert len(f["freq_hist_data_bar_values"]) == len(card["histogram"]["counts"])
        assert f["n_prompts_total"] == len(setup["rows"])
        assert f["n_tokens_in_prompt"] == BEFORE + AFTER + 1 and f["dataset"] == "bad"
        assert len(f["activations"]) == len(card["contexts"])
        for a, c in zip(f["activations"], card["contexts"], strict=True):
            assert set(a) == NP_ACTIVATION_KEYS and a["tokens"] == c["tokens"]
            assert len(a["values"]) == len(a["tokens"]) and a["bin_min"] == a["bin_contains"] == -1
            assert a["bin_max"] == round(max(max(cc["acts"]) for cc in card["contexts"]), 3)


def _neuronpedia_rows(setup) -> list[dict]:
    """A Neuronpedia explanation export (records of ``GET /api/explanation/export``): two carded
    latents (index as a string and as a number), one without a card, one empty description."""
    carded = [c["latent"] for c in setup["cards"].cards]
    other = next(i for i in range(D_SAE) if i not in carded)
    base = {"modelId": "tiny-llama", "layer": "0-emdiff-res", "typeName": "oai_token-act-pair"}
    return [
        {
            **base,
            "index": str(carded[0]),
            "description": "violent words",
            "explanationModelName": "gpt-4o-mini",
        },
        {
            **base,
            "index": carded[1],
            "description": " care advice ",
            "explanationModelName": "gpt-4o-mini",
        },
        {
            **base,
            "index": str(other),
            "description": "no card here",
            "explanationModelName": "gpt-4o-mini",
        },
        {**base, "index": str(carded[0]), "description": "", "explanationModelName": "claude"},
    ]


def _copy_run(setup, tmp_path):
    """A run folder of its own holding the module's cards."""
    run = tmp_path / "run"
    (run / "cards").mkdir(parents=True)
    shutil.copy(setup["path"], run / "cards" / "cards.json")
    return run


def test_neuronpedia_explanations_are_imported_and_attached(setup, tmp_path):
    run = _copy_run(setup, tmp_path)
    carded = [c["latent"] for c in setup["cards"].cards]
    export = tmp_path / "np.json"
    export.write_text(json.dumps(_neuronpedia_rows(setup)))
    done = import_explanations(run, export)
    assert (done.read, done.matched, done.attached) == (3, 2, {"cards.json": 2})
    records = read_explanations(run / "cards" / "explanations.json")
    source = "neuronpedia tiny-llama/0-emdiff-res (gpt-4o-mini)"
    assert [(e.layer, e.latent, e.explanation, e.score, e.source) for e in records] == [
        (LAYER, carded[0], "violent words", None, source),
        (LAYER, carded[1], "care advice", None, source),
    ]
    cards = load_cards(run / "cards" / "cards.json")["cards"]
    assert cards[0]["explanation"] == {"text": "violent words", "score": None, "source": source}
    assert cards[1]["explanation"]["text"] == "care advice"
    assert all(c["explanation"] is None for c in cards[2:])
    # the same export as gzipped JSON Lines (Neuronpedia's dataset files) reads the same
    jsonl = tmp_path / "batch-0.jsonl.gz"
    jsonl.write_bytes(gzip.compress("\n".join(map(json.dumps, _neuronpedia_rows(setup))).encode()))
    assert read_explanation_file(jsonl) == read_explanation_file(export)
    # a scored explanation (auto-interpretation) wins over an unscored one; reimport is idempotent
    scored = Explanation(layer=LAYER, latent=carded[0], explanation="x", score=0.8, source="auto")
    write_explanations(run / "cards" / "explanations.json", [scored])
    import_explanations(run, export)
    assert len(read_explanations(run / "cards" / "explanations.json")) == 3
    assert attach_explanations(run / "cards" / "cards.json") == 2
    card = load_cards(run / "cards" / "cards.json")["cards"][0]
    assert card["explanation"] == {"text": "x", "score": 0.8, "source": "auto"}
    # cards saved again keep the explanations
    setup["cards"].save(run)
    assert load_cards(run / "cards" / "cards.json")["cards"][1]["explanation"] is not None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"index": "seven"}, "record 1: index 'seven' is not a whole number"),
        ({"layer": "res-16k"}, "record 1: layer 'res-16k' is not a Neuronpedia source id"),
        ({"description": 3}, "record 1: description 3 is not text"),
        (
            {"layer": "0-gemmascope-res-16k"},
            "record 1: layer 0 has explanations from '0-emdiff-res'",
        ),
    ],
)
def test_a_bad_neuronpedia_row_fails_naming_file_and_row(setup, tmp_path, change, message):
    rows = _neuronpedia_rows(setup)
    rows[1].update(change)
    bad = tmp_path / "np.json"
    bad.write_text(json.dumps(rows))
    with pytest.raises(InputError, match=re.escape(f"{bad}: {message}")):
        read_explanation_file(bad)
    run = _copy_run(setup, tmp_path)
    res = CliRunner().invoke(app, ["import-explanations", str(run), str(bad)])
    assert res.exit_code == 2 and res.output.count("error:") == 1 and str(bad) in res.output
    del rows[1]["description"]
    bad.write_text(json.dumps(rows))
    with pytest.raises(InputError, match="record 1: missing description"):
        read_explanation_file(bad)


def test_one_source_of_several_is_chosen_by_its_id(setup, tmp_path):
    rows = _neuronpedia_rows(setup)
    rows[1]["layer"] = "0-other-set"
    path = tmp_path / "np.jsonl"
    path.write_text("\n".join(map(json.dumps, rows)) + "\n\n")
    got = read_explanation_file(path, source_id="0-other-set")
    assert [e.explanation for e in got] == ["care advice"]
    path.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(InputError, match=re.escape(f"{path}: line 2: invalid JSON")):
        read_explanation_file(path)


def test_the_report_shows_the_cards_shaded_and_offline(setup, tmp_path):
    run = _copy_run(setup, tmp_path)
    export = tmp_path / "np.json"
    export.write_text(json.dumps(_neuronpedia_rows(setup)))
    import_explanations(run, export)
    page = build_report(run).read_text()  # a folder with cards only is a run folder too
    assert ">Feature cards<" in page and page.count('<details class="card">') == 8
    assert "violent words" in page and "background:rgba(255,140,0," in page
    assert "<svg" in page and "promotes" in page and "contexts where it does not fire" in page
    assert not re.search(r"""(src|href)=["']https?://""", page)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000"]
    dom = subprocess.run(
        [
            chromium,
            *flags,
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            (run / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.stdout.count('class="card"') == 8 and "violent words" in dom.stdout
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console


def test_cli_makes_exports_and_explains_cards(setup, tmp_path):
    run = tmp_path / "run"
    (run / "tables").mkdir(parents=True)
    for name in ("q1.parquet", "q1.json", "q2.parquet"):  # q1.json: read at answer,sinks
        shutil.copy(setup["run"] / "tables" / name, run / "tables" / name)
    data = tmp_path / "bad.jsonl"
    chats = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in qa(BAD)
    ]
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    args = ["cards", str(run), "--rankings", "q1,q2", "--model", str(setup["model_dir"])]
    args += ["--dictionary", str(setup["sae_dir"]), "--data", str(data)]
    args += ["--top", "4", "--direction", "both", "--contexts", "6", "--negatives", "4"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "written:" in res.output and "(8 cards)" in res.output
    got = load_cards(run / "cards" / "cards.json")["cards"]
    want = setup["cards"].cards
    assert [(c["latent"], [x["seq"] for x in c["contexts"]]) for c in got] == [
        (c["latent"], [x["seq"] for x in c["contexts"]]) for c in want
    ]
    out = tmp_path / "np"
    res = CliRunner().invoke(app, ["export", "neuronpedia", str(run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert len(list(out.glob("*/batch-0.json"))) == 1
    export = tmp_path / "np.json"
    export.write_text(json.dumps(_neuronpedia_rows(setup)))
    res = CliRunner().invoke(app, ["import-explanations", str(run), str(export)])
    assert res.exit_code == 0, res.output
    assert "2 of 3 explanations match a card" in res.output
    # one-line errors before any model loads
    for bad, message in (
        (["export", "csv", str(run), "--out", str(out)], "FORMAT csv: use one of neuronpedia"),
        (
            [
                "cards",
                str(run),
                "--rankings",
                "q9",
                "--model",
                "x/y",
                "--dictionary",
                str(data),
                "--data",
                str(data),
            ],
            "--rankings q9: no",
        ),
    ):
        res = CliRunner().invoke(app, bad)
        assert res.exit_code == 2 and message in res.output and res.output.count("error:") == 1
    shutil.copy(run / "cards" / "cards.json", run / "cards" / "more.json")
    res = CliRunner().invoke(app, ["export", "neuronpedia", str(run), "--out", str(out)])
    assert res.exit_code == 2 and "several cards files (cards, more)" in res.output


@pytest.mark.parametrize("command", [["cards"], ["export"], ["import-explanations"]])
def test_help_says_what_it_reads_writes_with_an_example(command):
    res = CliRunner().invoke(app, [*command, "--help"])
    assert res.exit_code == 0 and "Reads:" in res.output and "Writes" in res.output
    example = res.output.split("Example:", 1)[1].splitlines()[1].strip()
    assert example.startswith(" ".join(["emdiff", *command])), example
