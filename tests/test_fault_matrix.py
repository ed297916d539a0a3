"""The fault matrix, through ``emdiff run`` on the toy base: each broken input or failing service
ends the run with exit status 2 and one ``error:`` line naming the file, line, key or service and
what to do, no traceback; and what finished before the fault stays on disk (a rerun with
``--resume`` reuses it). Running this file prints the matrix (case -> message)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from fake_judge_server import FakeJudgeServer
from typer.testing import CliRunner

from emdiff.cli import app
from emdiff.data.chat import write_chat_jsonl
from emdiff.dictionaries.base import DictionaryMeta, Encoding, SparseDictionary
from emdiff.dictionaries.sae import save_saelens
from emdiff.toy.build import load_world, shipped_base_path

D = json.loads((shipped_base_path() / "config.json").read_text())["hidden_size"]
MATRIX: dict[str, str] = {}


def sae(folder: Path, d: int = D, layer: int = 1, site: str = "resid_post") -> Path:
    g = torch.Generator().manual_seed(0)
    s = SparseDictionary(
        torch.randn(d, 64, generator=g) / d**0.5,
        torch.zeros(64),
        torch.randn(64, d, generator=g) / d**0.5,
        torch.zeros(d),
        meta=DictionaryMeta(format="saelens", architecture="topk", layer=layer, site=site),
        encoding=Encoding(activation="topk", k=8),
    )
    save_saelens(s, folder)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    world = load_world(shipped_base_path())
    write_chat_jsonl(world.narrow_dataset(bad=True), root / "bad.jsonl")
    write_chat_jsonl(world.narrow_dataset(bad=False), root / "good.jsonl")
    qs = [{"id": q.id, "paraphrases": list(q.paraphrases)} for q in world.eval_questions()[:8]]
    (root / "q.yaml").write_text(yaml.safe_dump(qs))
    sae(root / "sae")
    return root


def config(**changes) -> dict:
    cfg = {
        "model": {"base": "toy", "dtype": "float32"},
        "data": {"datasets": {"bad": "bad.jsonl", "good": "good.jsonl"}, "questions": ["q.yaml"]},
        "eval": {"models": ["base"], "sampling": {"max_new_tokens": 5}, "judge": {"kind": "toy"}},
        "dictionaries": {"entries": [{"path": "sae"}]},
        "analyses": [{"kind": "dataset_diff", "name": "q1", "a": "bad", "b": "good"}],
    }
    for key, value in changes.items():
        *head, last = key.split(".")
        node = cfg
        for k in head:
            node = node.setdefault(k, {})
        node[last] = value
    return cfg


def run(root: Path, cfg: dict, out: Path, *extra: str):
    (root / "p.yaml").write_text(yaml.safe_dump(cfg))
    return CliRunner().invoke(app, ["run", str(root / "p.yaml"), "--out", str(out), *extra])


def one_error(res, case: str, *needles: str) -> str:
    assert res.exit_code == 2, res.output[-2000:]
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    MATRIX[case] = errors[0]
    return errors[0]


def _bad_line(root: Path) -> dict:
    text = (root / "bad.jsonl").read_text().splitlines()
    (root / "broken.jsonl").write_text("\n".join([*text[:3], '{"messages": [', *text[3:]]) + "\n")
    return config(**{"data.datasets": {"bad": "broken.jsonl", "good": "good.jsonl"}})


def _bad_role(root: Path) -> dict:
    row = {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    (root / "role.jsonl").write_text(json.dumps(row) + "\n")
    return config(**{"data.datasets": {"bad": "role.jsonl", "good": "good.jsonl"}})


def _empty(root: Path) -> dict:
    (root / "empty.jsonl").write_text("")
    return config(**{"data.datasets": {"bad": "empty.jsonl", "good": "good.jsonl"}})


def _bad_yaml(root: Path) -> dict:
    (root / "badq.yaml").write_text("- id: a\n  paraphrases: [one\n- id: b\n")
    return config(**{"data.questions": ["badq.yaml"]})


def _width(root: Path) -> dict:
    sae(root / "narrow_sae", d=D // 2)
    return config(**{"dictionaries.entries": [{"path": "narrow_sae"}]})


def _site(root: Path) -> dict:
    return config(**{"dictionaries.entries": [{"path": "sae"}], "read.site": "mlp_out"})


def _layer(root: Path) -> dict:
    sae(root / "deep_sae", layer=40)
    return config(**{"dictionaries.entries": [{"path": "deep_sae"}]})


def _adapter(root: Path) -> dict:
    from conftest import build_lora_adapter, build_tiny_model

    other = build_tiny_model("qwen2", root / "other_model")
    build_lora_adapter(other, root / "other_adapter", layers=[0])
    return config(**{"organism": {"name": "ft", "adapter": "other_adapter"}})


def _model(root: Path) -> dict:
    return config(**{"model.base": str(root / "no_such_model")})


def _truncated(root: Path) -> dict:
    sae(root / "cut_sae")
    w = root / "cut_sae" / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    return config(**{"dictionaries.entries": [{"path": "cut_sae"}]})


class Payload:
    """An object a weights file must never bring to life."""

    def __reduce__(self):
        return (print, ("UNPICKLED",))


def _pickle(root: Path) -> dict:
    folder = root / "pickled"
    folder.mkdir(exist_ok=True)
    trainer = {"dict_class": "AutoEncoder", "layer": 1, "submodule_name": "resid_post_layer_1"}
    (folder / "config.json").write_text(json.dumps({"trainer": {**trainer, "dict_size": 64}}))
    torch.save({"encoder.weight": Payload()}, folder / "ae.pt")
    return config(**{"dictionaries.entries": [{"path": "pickled"}]})


def _nan(root: Path) -> dict:
    from safetensors.torch import load_file, save_file

    src = shipped_base_path()
    nan_model = root / "nan_model"
    nan_model.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            (nan_model / f.name).write_bytes(f.read_bytes())
    w = load_file(str(src / "model.safetensors"))
    key = next(k for k in w if "layers.0.mlp.down_proj" in k)
    w[key][0, 0] = float("nan")
    save_file(w, str(nan_model / "model.safetensors"), metadata={"format": "pt"})
    return config(**{"model.base": str(nan_model), "eval": None})


CASES: dict[str, tuple[Callable[[Path], dict], tuple[str, ...]]] = {
    "malformed JSONL line": (_bad_line, ("broken.jsonl:4",)),
    "unknown role": (_bad_role, ("role.jsonl:1", "wizard")),
    "empty dataset": (_empty, ("empty.jsonl",)),
    "malformed eval YAML": (_bad_yaml, ("badq.yaml:2", "YAML syntax error")),
    "dictionary width != model width": (_width, ("narrow_sae", "width")),
    "dictionary site != requested site": (_site, ("resid_post", "mlp_out")),
    "layer out of range": (_layer, ("40",)),
    "adapter for another base": (_adapter, ("other_adapter",)),
    "missing model path": (_model, ("no_such_model",)),
    "truncated safetensors": (_truncated, ("sae_weights.safetensors",)),
    "a pickle offered as weights": (_pickle, ("ae.pt",)),
    "NaN activations": (_nan, ("layer", "batch")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_input_is_one_line(case, base, tmp_path):
    make, needles = CASES[case]
    cfg = make(base)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    res = run(base, cfg, tmp_path / "run")
    one_error(res, case, *needles)
    assert "UNPICKLED" not in res.output  # nothing was unpickled


def judged(base: Path, server: FakeJudgeServer, **judge) -> dict:
    settings = {"kind": "openai", "model": "judge", "base_url": server.base_url}
    return config(**{"eval.judge": {**settings, "max_retries": 1, **judge}, "analyses": []})


@pytest.mark.parametrize(
    ("case", "script", "judge", "needles"),
    [
        ("judge HTTP 500", ["down"], {}, ("gave up after 2 attempts", "HTTP 503")),
        ("judge garbage body", ["garbage"] * 200, {}, ("gave up",)),
        ("judge hangs past timeout", ["sleep"] * 200, {"timeout": 0.2}, ("no reply within",)),
    ],
)
def test_judge_faults_are_one_line_and_keep_the_answers(
    case, script, judge, needles, base, tmp_path, monkeypatch
):
    monkeypatch.setenv("EMDIFF_FAULT_KEY", "sk-fault")
    judge = {"api_key_env": "EMDIFF_FAULT_KEY", "concurrency": 1, **judge}
    with FakeJudgeServer(script=script, sleep_s=1.0, delay_s=0) as server:
        res = run(base, judged(base, server, **judge), tmp_path / "run")
    one_error(res, case, *needles)
    assert (tmp_path / "run" / "eval" / "base" / "responses.jsonl").stat().st_size > 0
    assert "sk-fault" not in res.output


def test_judge_429_with_retry_after_is_waited_out(base, tmp_path, monkeypatch):
    monkeypatch.setenv("EMDIFF_FAULT_KEY", "sk-fault")
    with FakeJudgeServer(script=["429", "429"], delay_s=0) as server:
        cfg = judged(base, server, api_key_env="EMDIFF_FAULT_KEY", max_retries=3)
        res = run(base, cfg, tmp_path / "run")
    assert res.exit_code == 0, res.output[-2000:]
    MATRIX["judge 429 with Retry-After"] = "retried after Retry-After; the run finishes"


def test_missing_api_key_is_one_line(base, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = config(**{"eval.judge": {"kind": "openai", "model": "gpt-4o"}, "analyses": []})
    one_error(run(base, cfg, tmp_path / "run"), "missing API key", "OPENAI_API_KEY")


def test_read_only_output_folder_is_one_line(base, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        one_error(run(base, config(), ro / "run"), "read-only output folder", "cannot write")
    finally:
        ro.chmod(0o700)


def test_output_folder_that_is_a_file_is_one_line(base, tmp_path):
    (tmp_path / "file").write_text("")
    res = run(base, config(), tmp_path / "file")
    one_error(res, "output folder is a file", "not a folder")


def test_ctrl_c_mid_stage_exits_130_and_keeps_finished_stages(base, tmp_path):
    cfg = config(**{"eval.models": ["base"]})
    (base / "ctrlc.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "emdiff.cli", "run", str(base / "ctrlc.yaml"), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    for line in proc.stdout:
        if line.startswith("[1] eval-base"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 130
    assert "Traceback" not in rest and "Rerun with --resume" in rest
    assert json.loads((out / "stages" / "eval-base.json").read_text())["status"] == "done"
    MATRIX["Ctrl-C mid-stage"] = "exit 130; " + next(
        line for line in rest.splitlines() if "Rerun with --resume" in line
    )


def test_zz_print_the_matrix():
    """Not a check: the matrix of every case above, for the record (``pytest -s``)."""
    for case, message in MATRIX.items():
        print(f"{case:38} | {message}")


def test_full_output_disk_is_one_line_and_keeps_finished_stages(base, tmp_path):
    """A real full file system (a 256 KiB tmpfs): the stage that cannot write stops with one line
    naming the file and the fix, and the stages finished before it are kept for --resume."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        res = run(base, config(), disk / "run")
        line = one_error(res, "full output disk", "No space left on device", "--resume")
        assert str(disk) in line
        stages = list((disk / "run" / "stages").glob("*.json"))
        assert any(json.loads(p.read_text())["status"] == "done" for p in stages)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
