"""The cross-run stage cache: whole entries, keyed by inputs and code, never fatal to write."""

from __future__ import annotations

import json

from emdiff import stagecache
from emdiff.stagecache import StageCache, default_root


def _stage_output(folder):
    (folder / "sae").mkdir(parents=True)
    (folder / "sae" / "cfg.json").write_text('{"d": 4}')
    return folder


def test_restore_gives_back_the_result_and_the_files(tmp_path):
    cache = StageCache(tmp_path / "cache")
    src = _stage_output(tmp_path / "run1" / "dictionaries")
    assert cache.store("dicts", "k1", {"cos": 0.9}, src) is not None
    dest = tmp_path / "run2" / "dictionaries"
    (dest / "stale").mkdir(parents=True)
    assert cache.restore("dicts", "k1", dest) == {"cos": 0.9}
    assert json.loads((dest / "sae" / "cfg.json").read_text()) == {"d": 4}
    assert not (dest / "stale").exists()  # replaced, not merged


def test_other_key_other_stage_or_other_code_misses(tmp_path, monkeypatch):
    cache = StageCache(tmp_path / "cache")
    cache.store("dicts", "k1", {"cos": 0.9}, _stage_output(tmp_path / "src"))
    assert cache.restore("dicts", "k2", tmp_path / "d") is None
    assert cache.restore("other", "k1", tmp_path / "d") is None
    monkeypatch.setattr(stagecache, "code_hash", lambda: "changed-code")
    assert cache.restore("dicts", "k1", tmp_path / "d") is None
    assert not (tmp_path / "d").exists()


def test_a_half_written_entry_is_a_miss_and_an_unwritable_cache_is_skipped(tmp_path):
    cache = StageCache(tmp_path / "cache")
    entry = cache._entry("dicts", "k1")
    (entry / "files").mkdir(parents=True)  # files copied, result never written
    assert cache.restore("dicts", "k1", tmp_path / "d") is None
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert StageCache(blocked).store("dicts", "k1", {}, _stage_output(tmp_path / "s")) is None


def test_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EMDIFF_CACHE_DIR", str(tmp_path / "a"))
    assert default_root() == tmp_path / "a"
    monkeypatch.delenv("EMDIFF_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_root() == tmp_path / "x" / "emdiff"
