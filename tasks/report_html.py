"""OUT/report.html: one self-contained page to look at a build in a browser.

Run it:   written by `longwriter export` / `longwriter build` after the manifest; open
          OUT/report.html (no server, no network: CSS, script and SVG charts are inline).

What it shows: the summary, rejections by stage and reason with one example each, every
paragraph's planned vs written words (scatter with the y = x line), the length histogram, and
every sample: a paged list, and per sample its plan beside its text, paragraph by paragraph,
with the paragraph flags (trimmed, truncated, continued), cleanings and quality scores when the
store and shard carry them.

Size: the list holds every sample; full texts are embedded until `text_budget` bytes (16 MB by
default), and a sample past it says where its text is (shard file and line). 6,000 LongWriter
samples (~30 KB each) would otherwise make a ~200 MB page no browser opens comfortably. The
scatter draws every point as one path segment, down-sampled evenly past `max_points`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from sqlmodel import col, func, select

from storage.models import Instruction, Paragraph, Rejection
from storage.store import Store
from tasks.files import atomic_write_text
from tasks.report import build_summary
from tasks.shards import ShardScan, numeric_leaves, scan_shards, to_record
from tasks.wordcount import detect_lang

# The card's and the report's templates (tasks.card renders with this environment too).
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
TEXT_BUDGET_BYTES = 16_000_000
MAX_SCATTER_POINTS = 20_000
PAGE_SIZE = 50
EXCERPT = 600  # characters of a rejection's raw output / detail shown as its example


@cache
def template_env() -> Environment:
    """Templates for the card (markdown, not escaped) and report (HTML, escaped): files that
    ship next to this module, never prompts/ (those are LLM prompts rendered in a sandbox).
    Autoescaping is keyed on the file name, so the HTML report escapes all model text."""
    return Environment(
        loader=FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=select_autoescape(["html", "html.j2"], default_for_string=False),
        undefined=StrictUndefined,  # a missing variable is a bug, not an empty string
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


@dataclass
class ParagraphView:
    step: int
    main_point: str
    planned: int
    text: str | None  # None: not written (or not embedded)
    words: int | None
    flags: list[str] = field(default_factory=list)
    cleanings: list[str] = field(default_factory=list)


@dataclass
class SampleView:
    n: int  # 1-based position in the export order (= shard order)
    id: str
    instruction: str
    words: int
    planned: int
    n_paragraphs: int
    lang: str
    model: str
    source: str
    location: str  # "jsonl/train-00000-of-00001.jsonl line 3"
    embedded: bool
    paragraphs: list[ParagraphView] = field(default_factory=list)
    quality: list[tuple[str, float]] = field(default_factory=list)
    scores: list[tuple[str, float]] = field(default_factory=list)  # length_score, plan_fidelity
    cleanings: list[str] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return f"s-{self.n}"

    @property
    def excerpt(self) -> str:
        one_line = " ".join(self.instruction.split())
        return one_line if len(one_line) <= 160 else one_line[:157] + "..."


def _as_list(value: Any) -> list[str]:
    """Cleanings are recorded by the quality stage (issue 15) as a list, JSON text or a
    string; the report shows whatever form is there, one entry per line."""
    if value in (None, "", [], {}):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return [value]
    if isinstance(value, dict):
        return [f"{k}: {v}" for k, v in value.items()]
    if isinstance(value, list | tuple):
        return [_one_cleaning(v) for v in value]
    return [str(value)]


def _one_cleaning(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}: {x}" for k, x in v.items() if x not in (None, ""))
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def _quality_of(rec: dict[str, Any], sample: Any) -> Any:
    """Judge scores: the shard record's `quality` field, else the store's column."""
    if rec.get("quality") is not None:
        return rec["quality"]
    raw = getattr(sample, "quality_json", None)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


class ParagraphRow(NamedTuple):
    """The paragraph columns the report shows, read as plain values: ~6 us a row where an
    ORM Paragraph took 11-18 us (~60 us of a 6-paragraph sample)."""

    instruction_id: int
    step: int
    words: int
    continuation_keys: str
    trimmed: bool
    truncated: bool
    cleanings_json: str | None
    text: str


_PARAGRAPH_COLUMNS = tuple(getattr(Paragraph, name) for name in ParagraphRow._fields)


def _paragraph_flags(p: ParagraphRow) -> list[str]:
    flags = []
    if p.continuation_keys:
        n = len([k for k in p.continuation_keys.split(",") if k])
        flags.append(f"continued ×{n}")
    if p.trimmed:
        flags.append("trimmed at last sentence")
    if p.truncated:
        flags.append("truncated")
    return flags


def _locations(manifest: dict[str, Any]) -> Iterator[str]:
    """Where the k-th exported record sits: shard file and line, in export order."""
    for f in manifest.get("files", []):
        if f["path"].endswith(".jsonl"):
            for line in range(1, f["records"] + 1):
                yield f"{f['path']} line {line}"
    while True:
        yield "(not in the shards)"


def _paragraphs_of(store: Store, ids: list[int]) -> dict[int, list[ParagraphRow]]:
    out: dict[int, list[ParagraphRow]] = {}
    with store.session() as s:
        for row in s.exec(
            select(*_PARAGRAPH_COLUMNS)
            .where(col(Paragraph.instruction_id).in_(ids))
            .order_by(col(Paragraph.instruction_id), col(Paragraph.step))
        ).all():
            p = ParagraphRow(*row)
            out.setdefault(p.instruction_id, []).append(p)
    return out


@dataclass
class Collected:
    samples: list[SampleView]
    points: list[tuple[int, int]]  # (planned, written) per paragraph
    embedded: int
    embedded_bytes: int


def collect_samples(
    store: Store, manifest: dict[str, Any], text_budget: int = TEXT_BUDGET_BYTES, batch: int = 200
) -> Collected:
    """Stream the accepted samples (export order) with their paragraphs; keep full text only
    while the budget lasts, and every paragraph's (planned, written) point."""
    samples: list[SampleView] = []
    points: list[tuple[int, int]] = []
    used = 0
    embedded = 0
    locations = _locations(manifest)
    rows = store.iter_samples(batch_size=batch)
    while True:
        chunk = [r for _, r in zip(range(batch), rows, strict=False)]
        if not chunk:
            break
        paras = _paragraphs_of(store, [s.instruction_id for s, _, _ in chunk])
        for sample, inst, plan in chunk:
            rec = to_record(sample, inst, plan)  # the shard's own record (quality...)
            written = {p.step: p for p in paras.get(sample.instruction_id, [])}
            steps = rec["plan"]
            size = len(sample.text.encode("utf-8"))
            keep = used + size <= text_budget
            if keep:
                used += size
                embedded += 1
            views = []
            for i, step in enumerate(steps, start=1):
                p = written.get(i)
                if p is not None:
                    points.append((step["word_count"], p.words))
                views.append(
                    ParagraphView(
                        step=i,
                        main_point=step["main_point"],
                        planned=step["word_count"],
                        text=p.text if (p is not None and keep) else None,
                        words=p.words if p is not None else None,
                        flags=_paragraph_flags(p) if p is not None else ["not written"],
                        # The quality stage's column (issue 15); an older store gains it
                        # (with its default) when opened.
                        cleanings=_as_list(p.cleanings_json) if p is not None else [],
                    )
                )
            samples.append(
                SampleView(
                    n=len(samples) + 1,
                    id=rec["id"],
                    instruction=rec["instruction"],
                    words=rec["words"],
                    planned=sum(s["word_count"] for s in steps),
                    n_paragraphs=len(steps),
                    lang=detect_lang(sample.text[:4000]),
                    model=rec["model"],
                    source=rec["source"],
                    location=next(locations),
                    embedded=keep,
                    paragraphs=views,
                    quality=numeric_leaves(_quality_of(rec, sample)),
                    scores=[
                        (name, float(v))
                        for name in ("length_score", "plan_fidelity")
                        if isinstance(v := getattr(sample, name, None), int | float)
                    ],
                    cleanings=_as_list(rec.get("cleanings")),
                )
            )
    return Collected(samples, points, embedded, used)


@dataclass(frozen=True)
class RejectionGroup:
    stage: str
    reason: str
    count: int
    detail: str
    raw: str
    instruction: str
    where: str


def rejection_groups(store: Store) -> list[RejectionGroup]:
    """Counts by stage and reason, each with its first rejection as the example."""
    with store.session() as s:
        groups = s.exec(
            select(
                Rejection.stage, Rejection.reason, func.count(), func.min(Rejection.id)
            ).group_by(Rejection.stage, Rejection.reason)
        ).all()
        out = []
        for stage, reason, n, first_id in groups:
            r = s.get(Rejection, first_id)
            assert r is not None
            inst = s.get(Instruction, r.instruction_id) if r.instruction_id else None
            where = r.source + (f" line {r.line_no}" if r.line_no is not None else "")
            out.append(
                RejectionGroup(
                    stage=stage,
                    reason=reason,
                    count=n,
                    detail=(r.detail or "")[:EXCERPT],
                    raw=(r.raw or "")[:EXCERPT],
                    instruction=(inst.prompt[:EXCERPT] if inst else ""),
                    where=where,
                )
            )
    return sorted(out, key=lambda g: (-g.count, g.stage, g.reason))


# -- charts (inline SVG) ---------------------------------------------------------------------


def _nice_max(x: float) -> float:
    """A round axis end at or above x (1, 2, 2.5, 5 x 10^k)."""
    if x <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(x))
    for m in (1, 2, 2.5, 5, 10):
        if m * exp >= x:
            return m * exp
    return 10 * exp


def _ticks(top: float, n: int = 5) -> list[float]:
    return [top * i / n for i in range(n + 1)]


@dataclass
class Scatter:
    width: int
    height: int
    pad: int
    top: float
    path: str  # every point as "M x y h0": one short segment, drawn with round caps
    shown: int
    total: int
    ticks: list[tuple[float, str]]  # (pixel offset, label) on both axes
    within_half: float  # share of paragraphs written within ±50% of their planned words
    median_ratio: float


def scatter(points: list[tuple[int, int]], max_points: int = MAX_SCATTER_POINTS) -> Scatter | None:
    if not points:
        return None
    w, h, pad = 460, 460, 48
    top = _nice_max(max(max(a, b) for a, b in points))
    step = max(1, math.ceil(len(points) / max_points))
    shown = points[::step]
    span = w - 2 * pad

    def px(v: float) -> float:
        return round(pad + span * v / top, 1)

    def py(v: float) -> float:
        return round(h - pad - span * v / top, 1)

    path = "".join(f"M{px(a)} {py(b)}h0" for a, b in shown)
    ratios = sorted(b / a for a, b in points if a > 0)
    within = sum(0.5 <= r <= 1.5 for r in ratios) / len(ratios) if ratios else 0.0
    median = ratios[len(ratios) // 2] if ratios else 0.0
    ticks = [(round(span * t / top, 1), f"{t:g}") for t in _ticks(top)]
    return Scatter(w, h, pad, top, path, len(shown), len(points), ticks, within, median)


@dataclass
class Histogram:
    width: int
    height: int
    pad: int
    bars: list[tuple[float, float, float, float, str]]  # x, y, w, h, title
    x_ticks: list[tuple[float, str]]
    y_ticks: list[tuple[float, str]]


def histogram(words: list[int], bins: int = 24) -> Histogram | None:
    if not words:
        return None
    w, h, pad = 560, 300, 48
    top = _nice_max(max(words) + 1)
    width = top / bins
    counts = [0] * bins
    for x in words:
        counts[min(bins - 1, int(x / width))] += 1
    peak = max(counts)
    ytop = _nice_max(peak)
    span_x, span_y = w - 2 * pad, h - 2 * pad
    bars = []
    for i, n in enumerate(counts):
        bh = span_y * n / ytop
        bars.append(
            (
                round(pad + span_x * i / bins, 1),
                round(h - pad - bh, 1),
                round(span_x / bins - 1, 1),
                round(bh, 1),
                f"{int(i * width)}-{int((i + 1) * width)} words: {n}",
            )
        )
    x_ticks = [(round(span_x * t / top, 1), f"{t:g}") for t in _ticks(top, 4)]
    y_ticks = [(round(span_y * t / ytop, 1), f"{t:g}") for t in _ticks(ytop, 4)]
    return Histogram(w, h, pad, bars, x_ticks, y_ticks)


# -- the page --------------------------------------------------------------------------------


def render_report(
    store: Store,
    out_dir: Path,
    manifest: dict[str, Any],
    *,
    scan: ShardScan | None = None,
    text_budget: int = TEXT_BUDGET_BYTES,
    max_points: int = MAX_SCATTER_POINTS,
) -> str:
    collected = collect_samples(store, manifest, text_budget)
    scan = scan or scan_shards(out_dir, manifest)
    summary = build_summary(store)
    samples = collected.samples
    return (
        template_env()
        .get_template("report.html.j2")
        .render(
            title=f"longwriter build report: {out_dir.resolve().name}",
            manifest=manifest,
            summary=summary,
            samples=samples,
            embedded=collected.embedded,
            embedded_mb=round(collected.embedded_bytes / 1e6, 1),
            budget_mb=round(text_budget / 1e6, 1),
            rejections=rejection_groups(store),
            scatter=scatter(collected.points, max_points),
            hist=histogram([s.words for s in samples]),
            languages=dict(scan.languages.most_common()),
            judged=scan.judged,
            quality=sorted(scan.quality.items()),
            page_size=PAGE_SIZE,
        )
    )


def write_report(store: Store, out_dir: Path, manifest: dict[str, Any], **kwargs: Any) -> Path:
    path = out_dir / "report.html"
    atomic_write_text(path, render_report(store, out_dir, manifest, **kwargs))
    return path
