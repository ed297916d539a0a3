"""First contact with ``emdiff``: every ``--help`` says what it reads, writes and how to call it;
every user-fixable mistake ends in one ``error:`` line (exit 2) before any model is loaded.

Model loading, training and evaluation are replaced by stubs that fail the test if reached, so
these tests run in a few seconds and never touch the network.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from emdiff.cli import app
from emdiff.cli_common import INTERRUPTED

HELP = [
    [],
    ["demo"],
    ["toy"],
    ["toy", "build"],
    ["toy", "ground-truth"],
    ["eval"],
    ["eval", "run"],
    ["eval", "score"],
    ["diff"],
    ["diff", "datasets"],
    ["diff", "models"],
    ["diff", "responses"],
    ["diff", "overlap"],
    ["transfer"],
    ["direction"],
    ["decompose"],
    ["attribute"],
    ["cosines"],
    ["steer"],
    ["ablate"],
]


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error(res, *needles: str) -> str:
    """Exit 2, exactly one ``error:`` line, on stderr, holding every needle; no traceback."""
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    assert errors[0] in res.stderr
    assert "Traceback" not in res.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(autouse=True)
def nothing_heavy_runs(monkeypatch):
    """Loading a model, training or evaluating means a check came too late: fail loudly."""

    def loaded(*args, **kwargs):
        raise AssertionError("reached the loader")

    import emdiff.demo
    import emdiff.eval.run
    import emdiff.models
    import emdiff.models.load
    import emdiff.toy.build

    for module, name in [
        (emdiff.models, "load_model"),
        (emdiff.models.load, "load_model"),
        (emdiff.demo, "run_demo"),
        (emdiff.toy.build, "build_toy_base"),
        (emdiff.eval.run, "evaluate"),
    ]:
        monkeypatch.setattr(module, name, loaded)


@pytest.fixture
def f(tmp_path) -> dict[str, Path]:
    """Small valid inputs: a model-looking folder, an adapter folder, a dictionary, data files."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    dictionary = tmp_path / "sae"
    dictionary.mkdir()
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    data = tmp_path / "a.jsonl"
    data.write_text(json.dumps(chat) + "\n")
    judged = tmp_path / "judged.csv"
    judged.write_text("question_id,question,answer,aligned,coherent\nq1,hi,yo,90,90\n")
    questions = tmp_path / "q.yaml"
    questions.write_text("- id: q1\n  paraphrases: [hello]\n")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    return dict(
        tmp=tmp_path,
        model=model,
        adapter=adapter,
        dict=dictionary,
        data=data,
        judged=judged,
        q=questions,
        file=a_file,
        missing=tmp_path / "missing",
    )


def datasets(f, *extra: str) -> list:
    base = dict(model=f["model"], dictionary=f["dict"], a=f["data"], b=f["data"])
    base.update(out=f["tmp"] / "out")
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        base[flag.removeprefix("--")] = value
    return ["diff", "datasets", *[x for k, v in base.items() for x in (f"--{k}", v)]]


def eval_run(f, *extra: str) -> list:
    args = ["eval", "run", "--questions", f["q"], "--judge-model", "j", "--out", f["tmp"] / "o"]
    return [*args, "--model", f["model"], *extra] if "--model" not in extra else [*args, *extra]


def overlap(f, *extra: str) -> list:
    return ["diff", "overlap", "--a", f["missing"], "--b", f["missing"], "--out", f["tmp"], *extra]


def responses(f, *extra: str) -> list:
    args = ["diff", "responses", "--model", f["model"], "--dictionary", f["dict"]]
    return [*args, "--judged", f["judged"], "--out", f["tmp"], *extra]


# ---- help ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", HELP, ids=lambda c: " ".join(c) or "emdiff")
def test_help_says_what_it_reads_writes_with_an_example(command):
    res = invoke(*command, "--help")
    assert res.exit_code == 0, res.output
    text = res.output
    assert "Reads:" in text and "Writes" in text, text
    example = text.split("Example:", 1)[1].splitlines()[1].strip()
    assert example.startswith(" ".join(["emdiff", *command])), example
    assert "\b" not in text


def test_console_script_prints_help():
    script = Path(sys.executable).with_name("emdiff")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "emdiff.cli"]
    res = subprocess.run([*cmd, "--help"], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert "Reads:" in res.stdout and "emdiff demo" in res.stdout


# ---- one line for every user-fixable mistake -------------------------------------------------
CASES = {
    "model is neither folder nor hub id": (
        lambda f: datasets(f, "--model", "m"),
        "--model m: no such folder, and not a hub id (owner/name)",
    ),
    "model path missing": (
        lambda f: eval_run(f, "--model", "./no-model"),
        "--model ./no-model: no such folder, and not a hub id",
    ),
    "model folder without config": (
        lambda f: datasets(f, "--model", f["dict"]),
        "no config.json in this folder",
    ),
    "model is a file": (lambda f: datasets(f, "--model", f["file"]), "is a file"),
    "adapter missing": (
        lambda f: datasets(f, "--adapter", f["missing"]),
        "--adapter {missing}: no such folder",
    ),
    "dictionary missing": (
        lambda f: datasets(f, "--dictionary", f["missing"]),
        "--dictionary {missing}: no such file or folder",
    ),
    "data missing": (lambda f: datasets(f, "--b", f["missing"]), "--b {missing}: no such file"),
    "data is a folder": (lambda f: datasets(f, "--a", f["dict"]), "is a folder, not a file"),
    "chat line not JSON": (lambda f: datasets(f, "--a", f["file"]), "file.txt:1: invalid JSON"),
    "dtype": (lambda f: datasets(f, "--dtype", "fp8"), "--dtype fp8: use auto"),
    "device": (lambda f: datasets(f, "--device", "gpu"), "--device gpu: use cpu, cuda"),
    "site": (lambda f: datasets(f, "--site", "hook_z"), "--site hook_z: use one of"),
    "positions": (
        lambda f: datasets(f, "--positions", "answer_first"),
        "--positions answer_first: positions 'answer_first': answer_first needs k",
    ),
    "out is a file": (
        lambda f: datasets(f, "--out", f["file"]),
        "--out {file}: exists and is not a folder",
    ),
    "out under a file": (
        lambda f: ["toy", "build", "--out", f["file"] / "base"],
        "--out {file}/base: cannot write there",
    ),
    "models: responses missing": (
        lambda f: [
            "diff",
            "models",
            "--model",
            f["model"],
            "--adapter",
            f["adapter"],
            "--dictionary",
            f["dict"],
            "--responses",
            f["missing"],
            "--out",
            f["tmp"],
        ],
        "--responses {missing}: no such file",
    ),
    "responses: judged has no known suffix": (
        lambda f: [
            "diff",
            "responses",
            "--model",
            f["model"],
            "--dictionary",
            f["dict"],
            "--judged",
            f["file"],
            "--out",
            f["tmp"],
        ],
        "--judged {file}: use a .csv, .parquet or .jsonl file",
    ),
    "overlap: not parquet": (
        lambda f: ["diff", "overlap", "--a", f["data"], "--b", f["data"], "--out", f["tmp"]],
        "--a {data}: not a parquet table",
    ),
    "overlap: bad ks": (
        lambda f: [
            "diff",
            "overlap",
            "--a",
            f["data"],
            "--b",
            f["data"],
            "--ks",
            "5,x",
            "--out",
            f["tmp"],
        ],
        "--ks 5,x: use comma-separated whole numbers",
    ),
    "transfer: other model": (
        lambda f: [
            "transfer",
            "--model",
            f["model"],
            "--other",
            "not a model",
            "--dictionary",
            f["dict"],
            "--data",
            f["data"],
            "--out",
            f["tmp"],
        ],
        "--other not a model: no such folder, and not a hub id",
    ),
    "eval run: questions missing": (
        lambda f: [
            "eval",
            "run",
            "--model",
            f["model"],
            "--questions",
            f["missing"],
            "--out",
            f["tmp"],
        ],
        "--questions {missing}: no such file",
    ),
    "eval run: hf judge model": (
        lambda f: eval_run(f, "--judge", "hf", "--judge-model", "nope"),
        "--judge-model nope: no such folder, and not a hub id",
    ),
    "eval score: file missing": (
        lambda f: ["eval", "score", f["missing"]],
        "FILE {missing}: no such file",
    ),
    "eval score: out is a folder": (
        lambda f: ["eval", "score", f["judged"], "--out", f["tmp"]],
        "--out {tmp}: is a folder",
    ),
    "demo: unknown domain": (
        lambda f: ["demo", "--narrow-domain", "nonsense"],
        "--narrow-domain nonsense: not a domain of the toy world; use one of medical, finance",
    ),
    "demo: base missing": (lambda f: ["demo", "--base", f["missing"]], "--base {missing}"),
    "demo: base not a toy": (
        lambda f: ["demo", "--base", f["model"]],
        "--base {model}: not a toy model folder",
    ),
    "demo: config value": (lambda f: ["demo", "--lr", "0"], "--lr 0.0: Input should be greater"),
    "toy build: config value": (
        lambda f: ["toy", "build", "--n-domains", "99", "--out", f["tmp"]],
        "--n-domains 99: Input should be less than or equal to 12",
    ),
    "toy build: width and heads": (
        lambda f: ["toy", "build", "--d-model", "10", "--out", f["tmp"]],
        "--d-model 10: must be a multiple of the 4 attention heads",
    ),
    "toy build: narrow layer past the model": (
        lambda f: ["toy", "build", "--n-layers", "4", "--narrow-layer", "4", "--out", f["tmp"]],
        "--narrow-layer 4: the model has 4 layers (0..3)",
    ),
    "ground truth: base missing": (
        lambda f: ["toy", "ground-truth", "--base", f["missing"]],
        "--base {missing}: no such folder",
    ),
    # found by the command-line audit: each was a traceback or a silent exit 0
    "overlap: no k >= 1": (
        lambda f: overlap(f, "--ks", "0,-5"),
        "--ks 0,-5: use comma-separated whole numbers >= 1",
    ),
    "overlap: label is a path": (
        lambda f: overlap(f, "--label-a", "x/y"),
        "--label-a 'x/y': used in file names",
    ),
    "responses: thresholds overlap": (
        lambda f: responses(f, "--misaligned-max", "80", "--aligned-min", "20"),
        "--aligned-min 20.0: must be at least misaligned_max (80)",
    ),
    "responses: threshold out of 0..100": (
        lambda f: responses(f, "--coherent-min", "500"),
        "--coherent-min 500.0: Input should be less than or equal to 100",
    ),
    "score: plot is not an image": (
        lambda f: ["eval", "score", f["judged"], "--plot", f["tmp"] / "q.txt"],
        "--plot {tmp}/q.txt: use a file name ending in .png",
    ),
    "eval run: judge url": (
        lambda f: eval_run(f, "--judge-base-url", "localhost:8000"),
        "--judge-base-url localhost:8000: must start with http:// or https://",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_are_one_line_before_loading(case, f):
    make, message = CASES[case]
    one_error(invoke(*make(f)), message.format(**{k: str(v) for k, v in f.items()}))


def test_valid_inputs_pass_the_checks_and_reach_the_loader(f, monkeypatch):
    import emdiff.dictionaries

    sae = type(
        "SAE", (), {"meta": type("Meta", (), {"layer": 0, "hook": None, "site": "resid_post"})()}
    )()
    monkeypatch.setattr(emdiff.dictionaries, "load_dictionary", lambda path: sae)
    res = invoke(*datasets(f))
    assert isinstance(res.exception, AssertionError), res.output  # the stub loader, not a check
    res = invoke(*eval_run(f, "--judge", "hf", "--judge-model", f["model"]))
    assert isinstance(res.exception, AssertionError), res.output


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_cuda_device(device, f, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_error(
        invoke(*datasets(f, "--device", device)),
        f"--device {device}: no CUDA device is visible here; use --device cpu",
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_read_only_out_fails_before_loading(f):
    out = f["tmp"] / "read-only"
    out.mkdir()
    out.chmod(0o500)
    try:
        one_error(invoke(*datasets(f, "--out", out)), f"--out {out}: cannot write there")
    finally:
        out.chmod(0o700)


# ---- the boundary: library exceptions ----------------------------------------------------------
def _score_raising(monkeypatch, f, exc: BaseException):
    import emdiff.eval.judged_csv

    def read(path, *args, **kwargs):
        raise exc

    monkeypatch.setattr(emdiff.eval.judged_csv, "read_judged_csv", read)
    return invoke("eval", "score", f["judged"])


@pytest.mark.parametrize(
    "exc", [FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError]
)
def test_os_errors_name_the_file(exc, f, monkeypatch):
    res = _score_raising(monkeypatch, f, exc(13, "Some reason", "/data/x.csv"))
    assert one_error(res) == "error: /data/x.csv: Some reason"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_one_line_from_any_command(code, f, monkeypatch):
    """Any command, not only ``emdiff run``: a write that finds no space ends in one line."""
    res = _score_raising(monkeypatch, f, OSError(code, os.strerror(code), "/runs/x/table.csv"))
    line = one_error(res, f"/runs/x/table.csv: {os.strerror(code)}; free space")
    assert "--out" in line and "--resume" in line


def test_a_full_disk_write_without_a_file_name_names_the_run_folder():
    from emdiff.errors import raise_disk_full_in

    with pytest.raises(OSError) as caught:
        raise_disk_full_in(OSError(errno.ENOSPC, "No space left on device"), "/runs/x")
    assert caught.value.filename == "/runs/x" and caught.value.errno == errno.ENOSPC
    raise_disk_full_in(OSError(errno.EIO, "I/O error"), "/runs/x")  # not full: passes through


def test_other_os_errors_are_bugs_with_their_traceback(f, monkeypatch):
    res = _score_raising(monkeypatch, f, OSError(errno.EIO, "Input/output error", "/x"))
    assert res.exit_code == 1 and isinstance(res.exception, OSError)
    assert "error:" not in res.output


def test_input_error_from_the_library(f, monkeypatch):
    from emdiff.eval.judged_csv import JudgedCSVError

    res = _score_raising(monkeypatch, f, JudgedCSVError("x.csv:3: column 'aligned' is bad"))
    assert one_error(res) == "error: x.csv:3: column 'aligned' is bad"


@pytest.mark.parametrize("kind", ["yaml", "jsonl"])
def test_undecodable_input_is_named(kind, f):
    bad = f["tmp"] / f"latin1.{kind}"
    bad.write_bytes(b'{"messages": "caf\xe9"}\n' if kind == "jsonl" else b"- id: caf\xe9\n")
    args = eval_run(f, "--questions", bad) if kind == "yaml" else datasets(f, "--a", bad)
    one_error(invoke(*args), f"{bad}: not UTF-8 text (byte 0xe9")


def test_undecodable_file_is_named_by_the_boundary(f, monkeypatch):
    """A reader that lets ``UnicodeDecodeError`` escape: the boundary finds the file's name."""
    bad = f["tmp"] / "latin1.csv"
    bad.write_bytes(b"question,answer\ncaf\xe9,x\n")

    def read(path):
        with open(bad, encoding="utf-8") as fh:
            return fh.read()

    import emdiff.eval.judged_csv

    monkeypatch.setattr(emdiff.eval.judged_csv, "read_judged_csv", read)
    res = invoke("eval", "score", f["judged"])
    one_error(res, f"{bad}: not UTF-8 text (byte 0xe9: invalid continuation byte)")


def test_interrupt_exits_130_and_says_how_to_resume(f, monkeypatch):
    res = _score_raising(monkeypatch, f, KeyboardInterrupt())
    assert res.exit_code == 130 and INTERRUPTED in res.stderr
    assert "Traceback" not in res.output and "Aborted" not in res.output


def test_bugs_keep_their_traceback(f, monkeypatch):
    res = _score_raising(monkeypatch, f, RuntimeError("a bug"))
    assert res.exit_code == 1 and isinstance(res.exception, RuntimeError)
    assert "error:" not in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [(["diff", "datasets", "--bogus"], "No such option"), (["demo", "--seeds", "x"], "--seeds")],
)
def test_usage_errors_still_exit_2_with_usage(args, message):
    res = invoke(*args)
    assert res.exit_code == 2 and "Usage:" in res.output and message in res.output


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("q1,hi,yo,,\nq2,hi,yo,,\n", "none of its 2 rows has both an aligned and a coherent score"),
        ("q1,hi,yo,90\n", "no scores for 'aligned'"),
    ],
)
def test_score_refuses_a_file_with_nothing_to_measure(body, message, f):
    """Was exit 0 with an EM rate of n/a: all scores missing, or no aligned column at all."""
    path = f["tmp"] / "unscored.csv"
    header = "question_id,question,answer,aligned,coherent" if body.count(",") > 4 else None
    path.write_text((header or "question_id,question,answer,coherent") + "\n" + body)
    one_error(invoke("eval", "score", path), message)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_score_reads_jsonl_and_parquet_like_the_diffs(suffix, f):
    """Was: a parquet file reported as 'not UTF-8 text', a .jsonl as a CSV with odd columns."""
    import pandas as pd

    df = pd.DataFrame(dict(question_id=["q1", "q1"], question="hi", answer="yo"))
    df["aligned"], df["coherent"] = [10, 150], [90, 90]
    path = f["tmp"] / f"judged{suffix}"
    if suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path)
    one_error(invoke("eval", "score", path), f"{path}", "'aligned' = 150.0 is outside 0..100")


def test_the_command_line_starts_without_torch():
    """``emdiff --help`` and option errors answer before torch, pandas or transformers load:
    every option default comes from a light config module, packages resolve names lazily."""
    code = "import sys, emdiff.cli; print(sorted({'torch', 'pandas', 'transformers'} & set(sys.modules)))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]", res.stdout
