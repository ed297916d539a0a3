"""``emdiff report``: one self-contained HTML file of a run folder, a section per stage that ran."""

from __future__ import annotations

import json
import re

import matplotlib
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from emdiff.cli import app
from emdiff.directions.direction import Direction
from emdiff.errors import InputError
from emdiff.report.html import build_report

matplotlib.use("Agg")


def _png(path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


@pytest.fixture
def run(tmp_path):
    for name in ("quadrant_narrow", "q2_model_diff", "phases", "something_new"):
        _png(tmp_path / "plots" / f"{name}.png")
    (tmp_path / "tables").mkdir()
    ranking = pd.DataFrame(
        {
            "feature": range(50),
            "effect": [50 - i for i in range(50)],
            "q": [0.001] * 50,
            "rank_increase": range(50, 0, -1),
            "not_shown": 0,
        }
    )
    ranking.to_parquet(tmp_path / "tables" / "q2_model_diff.parquet")
    pd.DataFrame({"model": ["base", "narrow"], "em_rate": [0.0, 0.7]}).to_parquet(
        tmp_path / "tables" / "em_rates.parquet"
    )
    for layer in (1, 2):  # two saved directions: the report draws their cosine heatmap
        v = torch.randn(16, generator=torch.Generator().manual_seed(layer))
        Direction(f"direction_L{layer}", layer, "resid_post", v).save(tmp_path / "directions")
    summary = {"gt_ablation_cut": 0.95, "q2_persona_rank": 3}
    manifest = {"command": "demo", "config": {"seeds": 1}, "summary": summary}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def test_report_is_self_contained_with_a_section_per_stage(run):
    page = build_report(run, top=10).read_text()
    assert page.count("data:image/png;base64,") == 5  # 4 plots and the directions heatmap
    assert ">Directions<" in page and "directions_cosine_d16" in page
    assert not re.search(r"""(src|href)=["']https?://""", page)  # nothing fetched at view time
    titles = ("Toy scorecard", "Emergent misalignment", "Q2: base vs fine-tuned", "Other figures")
    for title in (*titles, "Phases of the fine-tune"):
        assert f">{title}<" in page
    assert ">Q1:" not in page  # no Q1 ran, no Q1 section
    assert 'class="fail">FAIL' in page  # q2_persona_rank 3 against == 1
    ranking = page[page.index("q2_model_diff.parquet") :]
    assert "(10 rows shown)" in ranking and "not_shown" not in ranking
    first = re.search(r"<tbody>\s*<tr>\s*<td>(\d+)</td>\s*<td>(\d+)</td>", ranking)
    assert first.groups() == ("1", "49")  # rank 1 first: the feature with rank_increase 1
    assert 'class="dataframe sortable"' in page and "addEventListener" in page


def test_cli_writes_the_report_and_refuses_a_folder_without_results(run, tmp_path):
    res = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r.html").stat().st_size > 1000 and "written:" in res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="not an emdiff run folder"):
        build_report(empty)
    res = CliRunner().invoke(app, ["report", str(empty)])
    assert res.exit_code == 2 and "not an emdiff run folder" in res.output


CHECK = """<script>window.addEventListener('load',function(){var bad=Array.from(document.images)
.filter(function(i){return !(i.complete&&i.naturalWidth>0)}).length;var d=document.createElement('div');
d.id='emdiff-check';d.textContent='images '+document.images.length+' broken '+bad;
document.body.appendChild(d);});</script>"""


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    _chromium() is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)
def test_report_opens_in_a_headless_browser_without_errors_or_empty_figures(run, tmp_path):
    import base64
    import io
    import subprocess

    import matplotlib.image as mpimg

    page = build_report(run).read_text()
    for data in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page):
        pixels = mpimg.imread(io.BytesIO(base64.b64decode(data)), format="png")
        assert pixels.std() > 0  # not a blank figure
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", CHECK + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]
    dom = subprocess.run(
        [_chromium(), *flags, "--enable-logging=stderr", "--v=0", "--dump-dom", checked.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert 'id="emdiff-check">images 5 broken 0<' in dom.stdout
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console  # the page logs nothing: no script error
    shot = tmp_path / "report.png"
    subprocess.run(
        [_chromium(), *flags, "--window-size=1200,1600", f"--screenshot={shot}", checked.as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
