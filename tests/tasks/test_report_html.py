"""OUT/report.html: one self-contained page (no external asset), every sample listed with its
plan beside its text, rejections with an example each, the planned-vs-written scatter and the
length histogram; a 6,000-sample build stays far below 100 MB; and a real headless chromium
renders it (sample count, one sample's text, a screenshot that is not blank)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from storage.models import Instruction, LLMCall, Paragraph, Plan, Rejection, Sample
from storage.store import Store
from tasks.card import write_card_and_report
from tasks.export import export_shards, export_store, to_record
from tasks.plan import PlanStep, steps_to_json
from tasks.report_html import scatter

WORDS = ("harbour", "lantern", "tide", "granite", "gull", "rope", "keel", "salt", "mist", "quay")


_POOL = [
    " ".join(random.Random(i).choice(WORDS) for _ in range(8 + i % 9)).capitalize() + "."
    for i in range(997)
]


def _paragraph(rng: random.Random, n_words: int) -> str:
    # Sentences drawn from a fixed pool: varied text at a cost that allows 6,000 samples.
    sentences, words = [], 0
    while words < n_words:
        s = _POOL[rng.randrange(len(_POOL))]
        sentences.append(s)
        words += s.count(" ") + 1
    return " ".join(sentences)


def synthetic_store(
    path: Path, n: int, *, paragraphs: int = 3, words: int = 60, seed: int = 0
) -> Store:
    """n accepted samples (paragraphs x ~words each, every text distinct so the export's
    near-duplicate check keeps them) plus rejections of three kinds, written in bulk."""
    rng = random.Random(seed)
    store = Store(f"sqlite:///{path}")
    store.save(LLMCall(key="k", stage="plan", model="m", prompt_version="plan@x", content="{}"))
    batch: list = []
    for i in range(1, n + 1):
        planned = [rng.randint(words // 2, words * 2) for _ in range(paragraphs)]
        texts = [f"Sample {i} part {j}. " + _paragraph(rng, words) for j in range(paragraphs)]
        batch.append(
            Instruction(
                id=i,
                uid=f"u{i}",
                prompt=f"Write about harbour {i}",
                norm_hash=f"h{i}",
                source="synthetic",
                status="accepted",
            )
        )
        batch.append(
            Plan(
                instruction_id=i,
                call_key="k",
                steps_json=steps_to_json(
                    [PlanStep(f"point {i}.{j}", w) for j, w in enumerate(planned)]
                ),
                n_steps=paragraphs,
                total_words=sum(planned),
                prompt_version="plan@x",
            )
        )
        for j, t in enumerate(texts, start=1):
            batch.append(
                Paragraph(
                    instruction_id=i,
                    step=j,
                    call_key="k",
                    text=t,
                    words=len(t.split()),
                    prompt_version="write@y",
                    trimmed=(j == 2 and i % 7 == 0),
                )
            )
        text = "\n\n".join(texts)
        batch.append(
            Sample(
                instruction_id=i,
                text=text,
                words=len(text.split()),
                n_paragraphs=paragraphs,
                model="m",
                prompt_version="plan@x,write@y",
            )
        )
        if len(batch) > 2000:
            store.add_all(batch)
            batch = []
    store.add_all(batch)
    bad = [
        Instruction(
            id=n + 1,
            uid="r1",
            prompt="Write <b>bold</b> & loud [[short]]",
            norm_hash="r1",
            source="synthetic",
            status="rejected",
        ),
        Instruction(
            id=n + 2,
            uid="r2",
            prompt="Write a loop",
            norm_hash="r2",
            source="synthetic",
            status="rejected",
        ),
    ]
    store.add_all(bad)
    store.add_all(
        [
            Rejection(
                stage="filter",
                reason="too_short",
                detail="180 words; minimum 2000",
                instruction_id=n + 1,
                source="synthetic",
                line_no=3,
            ),
            Rejection(
                stage="filter",
                reason="repetition",
                detail="repeated 13-grams 0.61",
                instruction_id=n + 2,
                source="synthetic",
                raw="the same the same the same",
            ),
            Rejection(
                stage="ingest",
                reason="invalid_json",
                detail="line 9",
                source="in.jsonl",
                line_no=9,
                raw="{broken",
            ),
            Rejection(
                stage="ingest",
                reason="invalid_json",
                detail="line 12",
                source="in.jsonl",
                line_no=12,
                raw="{also broken",
            ),
        ]
    )
    return store


def test_report_shows_samples_rejections_and_charts(tmp_path):
    store = synthetic_store(tmp_path / "s.db", 12)
    with store.session() as s:  # model text with markup must be shown, never interpreted
        inst = s.get(Instruction, 3)
        inst.prompt = "Write about <script>alert(1)</script> harbours"
        s.add(inst)
        # What the quality stage stores: a paragraph's cleanings, a sample's judge scores.
        para = s.get(Paragraph, (4, 2))
        para.cleanings_json = json.dumps([{"check": "chatter", "detail": "cut 'Sure! Here is'"}])
        sample = s.get(Sample, 4)
        sample.quality_json = json.dumps({"relevance": 4.0, "S_q": 70.0})
        sample.length_score = 88.5
        s.add_all([para, sample])
        s.commit()
    out = tmp_path / "out"
    export_store(store, out, {})
    html = (out / "report.html").read_text(encoding="utf-8")

    assert '<b id="sample-count">12</b>' in html
    assert html.count('class="sample-row"') == 12 and html.count('<section class="sample"') == 12
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    # Self-contained: no external stylesheet, script or image.
    assert not re.search(r"<(link|img)\b|<script[^>]+src=|@import|url\(http", html)
    # Rejections by reason, one example each (the first), counts right.
    assert re.search(r"<td>ingest</td><td>invalid_json</td><td class=\"num\">2</td>", html)
    assert "{broken" in html and "{also broken" not in html
    assert "Write &lt;b&gt;bold&lt;/b&gt; &amp; loud" in html
    # Plan beside text: a main point and its paragraph's text in one sample's section.
    sec = html.split('id="s-5"', 1)[1].split("</section>", 1)[0]
    assert "point 5.0" in sec and "Sample 5 part 0." in sec and "trimmed" not in sec
    assert "trimmed at last sentence" in html.split('id="s-7"', 1)[1].split("</section>", 1)[0]
    sec4 = html.split('id="s-4"', 1)[1].split("</section>", 1)[0]
    assert "cleaned: check: chatter, detail: cut &#39;Sure! Here is&#39;" in sec4
    assert "relevance 4" in sec4 and "S_q 70" in sec4 and "length_score 88.50" in sec4
    assert "1 judged samples" in html  # the summary's quality table
    # Charts: a scatter with every paragraph and the y = x line; a histogram.
    assert "36 paragraphs" in html and "y = x" in html
    assert html.count("<rect ") >= 1
    assert "cap-note" not in html  # small build: every text embedded


def test_scatter_draws_every_point_until_the_cap():
    points = [(100, 100), (300, 100), (400, 500)] * 10
    s = scatter(points, max_points=1000)
    assert s is not None and s.shown == s.total == 30 and s.path.count("M") == 30
    assert s.within_half == pytest.approx(2 / 3)
    capped = scatter(points * 100, max_points=1000)
    assert capped.total == 3000 and capped.shown <= 1000


@pytest.mark.slow
def test_six_thousand_samples_stay_small(tmp_path):
    """6,000 samples of ~5,000 words (LongWriter-6k's size): the page keeps every sample in
    the list and plan view, embeds full text up to its budget, and stays far under 100 MB."""
    store = synthetic_store(tmp_path / "s.db", 6000, paragraphs=8, words=600, seed=1)
    out = tmp_path / "out"
    # export_store's steps minus its near-duplicate pass (MinHash over 6,000 long texts takes
    # minutes and is not what this measures): shards + manifest, then card and report.
    records = (to_record(s, i, p) for s, i, p in store.iter_samples())
    manifest = export_shards(records, 6000, out, shard_size=1000)
    t0 = time.monotonic()
    write_card_and_report(store, out, manifest)
    elapsed = time.monotonic() - t0
    size = (out / "report.html").stat().st_size
    text_mb = sum(f["bytes"] for f in manifest["files"] if f["path"].endswith(".jsonl")) / 1e6
    print(
        f"6000 samples: report.html {size / 1e6:.1f} MB (jsonl {text_mb:.0f} MB), card+report {elapsed:.0f} s"
    )
    assert manifest["counts"]["samples"] == 6000
    assert size < 25e6, size
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count('class="sample-row"') == 6000
    assert 'id="cap-note"' in html and "jsonl/train-00005-of-00006.jsonl line 1000" in html


# -- a real browser ----------------------------------------------------------------------------


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is not installed (make install puts it there with apt-get)")
        pytest.skip("chromium not installed: `apt-get install chromium` (make install does it)")
    return exe


def _run_chromium(exe: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
            f"--user-data-dir={cwd / 'profile'}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_report_renders_in_headless_chromium(tmp_path):
    exe = _chromium()
    store = synthetic_store(tmp_path / "s.db", 120)
    out = tmp_path / "out"
    export_store(store, out, {})
    url = (out / "report.html").resolve().as_uri()

    dom = _run_chromium(exe, "--dump-dom", "--virtual-time-budget=5000", url, cwd=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert '<b id="sample-count">120</b>' in html
    # The pager's script ran: 120 samples, 50 a page -> 3 pages, rows beyond the first hidden.
    assert "page 1 of 3 · 120 sample(s)" in html
    assert len(re.findall(r'<tr class="sample-row" hidden="">', html)) == 70
    first = json.loads((out / "jsonl" / "train-00000-of-00001.jsonl").open().readline())
    opening = first["response"].split("\n\n")[0][:80]
    assert opening in html  # one sample's text, as the browser holds it

    # The page top (summary, charts, list); with a #fragment headless chromium paints only the
    # tiles around its target and the rest of the capture comes out blank.
    shot = tmp_path / "report.png"
    res = _run_chromium(
        exe,
        f"--screenshot={shot}",
        "--window-size=1280,1600",
        "--hide-scrollbars",
        "--virtual-time-budget=5000",
        url,
        cwd=tmp_path,
    )
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    from PIL import Image

    img = Image.open(shot).convert("L")
    lo, hi = img.getextrema()
    colours = len(img.getcolors(maxcolors=1 << 16) or [])
    assert hi - lo > 100 and colours > 20, (lo, hi, colours)  # not a blank page
    keep = os.environ.get("LONGWRITER_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
