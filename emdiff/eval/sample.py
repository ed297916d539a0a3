"""Sample answers to eval questions into an append-only, resumable JSONL file.

Every question x paraphrase x sample is one job, keyed by ``(question_id, paraphrase, sample)``.
Jobs run in a fixed order, in fixed batches; each batch seeds the RNG from the run seed and its
first key, so a run that was killed and resumed writes exactly what an uninterrupted run would
(same device and batch size). A sidecar ``<file>.meta.json`` records what was sampled; resuming with
different settings, model or questions is refused rather than silently mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch
from tqdm.auto import tqdm

from emdiff.data.questions import Question
from emdiff.errors import InputError
from emdiff.eval.config import SamplingConfig
from emdiff.eval.generate import NO_PENALTIES, UNTRUNCATED, generate_batch
from emdiff.models.load import model_identity
from emdiff.readers import read_json, read_text

KEY = ("question_id", "paraphrase", "sample")
COLUMNS = (*KEY, "system", "question", "answer", "n_tokens", "finished")


class SamplingMismatchError(InputError):
    """A responses file exists but was sampled with different settings, model or questions."""


class Job(NamedTuple):
    question_id: str
    paraphrase: int
    sample: int
    system: str | None
    question: str
    messages: list[dict[str, str]]


def sampling_jobs(questions: Sequence[Question], cfg: SamplingConfig) -> list[Job]:
    """Every (question, paraphrase, sample) in a fixed order."""
    ids = [q.id for q in questions]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"duplicate question ids: {dupes}")
    jobs = []
    for q in questions:
        n = cfg.samples_per_paraphrase or q.samples_per_paraphrase
        system = q.system if cfg.include_system else None
        for p, text in enumerate(q.paraphrases):
            msgs = q.messages(p, include_system=cfg.include_system)
            jobs.extend(Job(q.id, p, s, system, text, msgs) for s in range(n))
    return jobs


def _batch_seed(seed: int, job: Job) -> int:
    h = hashlib.sha256(f"{seed}:{job.question_id}:{job.paraphrase}:{job.sample}".encode())
    return int.from_bytes(h.digest()[:7], "little")


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()


def _identity(questions: Sequence[Question], cfg: SamplingConfig, model_id: str, tok) -> dict:
    """What must not change between a run and its resumption. Sample counts may change: more
    samples extend a run, fewer select a subset."""
    return {
        "model": model_id,
        "sampling": cfg.model_dump(exclude={"batch_size", "samples_per_paraphrase"}),
        "generation_overrides": {**UNTRUNCATED, **NO_PENALTIES},
        "chat_template_sha256": _sha(getattr(tok, "chat_template", None)),
        "questions_sha256": _sha([[q.id, q.system, list(q.paraphrases)] for q in questions]),
    }


def default_model_id(model: torch.nn.Module) -> str:
    """``name_or_path`` and dtype of the base, plus a hash of the adapter weights if any."""
    return model_identity(model)


def meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


def _check_meta(path: Path, identity: dict) -> None:
    meta = meta_path(path)
    if meta.exists():
        old = read_json(meta)
        if old != identity:
            diff = [
                f"{k}: {old.get(k)!r} -> {identity[k]!r}"
                for k in identity
                if old.get(k) != identity[k]
            ]
            raise SamplingMismatchError(
                f"{path} was sampled with other settings ({'; '.join(diff)}). "
                "Use another output path, or delete it to start over."
            )
    elif path.exists() and path.stat().st_size > 0:
        raise SamplingMismatchError(f"{path} exists without {meta.name}; refusing to append to it")
    else:
        meta.write_text(json.dumps(identity, indent=2))


def _drop_partial_line(path: Path) -> None:
    """A kill during a write can leave half a line at the end; cut it so appends stay valid."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)


def responses_in_job_order(df: pd.DataFrame, jobs: Sequence[Job]) -> pd.DataFrame:
    """The rows of ``df`` answering ``jobs``, in the jobs' order (a file holds them in the order
    they arrived, which a pool of server requests or a resumed run shuffles)."""
    wanted = pd.MultiIndex.from_tuples([j[:3] for j in jobs], names=list(KEY))
    indexed = df.set_index(list(KEY))
    missing = wanted.difference(indexed.index)
    if len(missing):  # every job was answered before this is called: a bug, never a NaN row
        raise RuntimeError(f"{len(missing)} sampling jobs have no answer (first {missing[0]})")
    return indexed.loc[wanted].reset_index()[list(df.columns)]


def read_responses(path: str | Path) -> pd.DataFrame:
    """The responses file as a DataFrame (one row per key; a torn last line is ignored)."""
    path = Path(path)
    rows = []
    if path.exists():
        lines = read_text(path).splitlines()
        for n, line in enumerate(lines, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if n == len(lines):
                    break
                raise InputError(f"{path}:{n}: not a JSON line") from None
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    return df.drop_duplicates(list(KEY), keep="first").reset_index(drop=True)


def sample_responses(
    model: torch.nn.Module,
    tokenizer,
    questions: Sequence[Question],
    out: str | Path,
    cfg: SamplingConfig | None = None,
    *,
    model_id: str | None = None,
    progress: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """Sample every job missing from ``out`` (JSONL), append it, and return the responses to
    exactly these jobs (a file sampled with more samples per paraphrase keeps its extra rows).

    ``model_id`` names the model in the sidecar meta file; by default :func:`default_model_id`
    (path, dtype and a hash of adapter weights). ``on_batch(n_written)`` runs after each batch is
    on disk.
    """
    cfg = cfg or SamplingConfig()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model_id = model_id or default_model_id(model)
    _check_meta(out, _identity(questions, cfg, model_id, tokenizer))
    _drop_partial_line(out)
    done = {tuple(r) for r in read_responses(out)[list(KEY)].itertuples(index=False)}
    jobs = sampling_jobs(questions, cfg)
    batches = [jobs[i : i + cfg.batch_size] for i in range(0, len(jobs), cfg.batch_size)]
    todo = [b for b in batches if any(j[:3] not in done for j in b)]
    was_training = model.training
    model.eval()
    written = 0
    try:
        with out.open("a") as fh:
            for batch in tqdm(todo, desc="sample", unit="batch", disable=not progress):
                torch.manual_seed(_batch_seed(cfg.seed, batch[0]))
                gens = generate_batch(
                    model,
                    tokenizer,
                    [j.messages for j in batch],
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    max_new_tokens=cfg.max_new_tokens,
                )
                for job, g in zip(batch, gens, strict=True):
                    if job[:3] in done:
                        continue
                    rec = dict(
                        zip(COLUMNS, (*job[:5], g.text, g.n_tokens, g.finished), strict=True)
                    )
                    fh.write(json.dumps(rec) + "\n")
                    written += 1
                fh.flush()
                os.fsync(fh.fileno())
                if on_batch is not None:
                    on_batch(written)
    finally:
        model.train(was_training)
    return responses_in_job_order(read_responses(out), jobs)
