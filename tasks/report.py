"""Run summaries: the numbers a user checks after a build (accepted, rejected by reason, words
p10/p50/p90, tokens in and out), as a dict, a markdown table and a length histogram image."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `longwriter stats` imports this module for quality_rows: no SQLAlchemy
    from storage.store import Store


def word_percentiles(words: list[int]) -> dict[str, int]:
    """p10 / p50 / p90 of the sample lengths, truncated to int. numpy's linear quantile is
    what pandas' Series.quantile computes (it calls np.quantile with method="linear" on the
    float64 values; a NOT NULL column has no missing value for it to skip), without the
    ~0.35 s of CPU importing pandas costs a build, which imports it nowhere else."""
    import numpy as np

    if not words:
        return {"p10": 0, "p50": 0, "p90": 0}
    values = np.asarray(words, dtype=np.float64)
    return {f"p{q}": int(np.quantile(values, q / 100)) for q in (10, 50, 90)}


def build_summary(store: Store) -> dict[str, Any]:
    stats = store.stats()
    pct = word_percentiles(store.accepted_sample_words())
    calls = stats["llm_calls"]
    return {
        "accepted": stats["samples"]["accepted"],
        "rejected": sum(sum(r.values()) for r in stats["rejections"].values()),
        "rejections": stats["rejections"],
        "instructions": stats["instructions"],
        "words": {"total": stats["samples"]["words"], **pct},
        "tokens": {
            "prompt": sum(c["prompt_tokens"] for c in calls.values()),
            "completion": sum(c["completion_tokens"] for c in calls.values()),
        },
        "llm_calls": {k: v["calls"] for k, v in calls.items()},
        "http_attempts": sum(c["http_attempts"] for c in calls.values()),
        "quality": stats.get("quality") or {},
    }


def quality_rows(quality: dict[str, Any]) -> list[tuple[str, str]]:
    """What the quality checks did, as (label, value) rows for the build summary, its
    artifact and `longwriter stats`: drafts that failed a check (redrafted, or sinking their
    sample) by stage and reason, cleanings on accepted paragraphs by check, and the accepted
    samples' mean length score (S_l) and plan fidelity."""
    rows: list[tuple[str, str]] = []
    if quality.get("length_score_mean") is not None:
        rows.append(("length score S_l (mean)", f"{quality['length_score_mean']}"))
    if quality.get("plan_fidelity_mean") is not None:
        rows.append(("plan fidelity (mean)", f"{quality['plan_fidelity_mean']}"))
    for stage, reasons in sorted((quality.get("failed_drafts") or {}).items()):
        for reason, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])):
            rows.append((f"failed draft at {stage}: {reason}", str(n)))
    for check, n in sorted((quality.get("cleanings") or {}).items(), key=lambda kv: -kv[1]):
        rows.append((f"cleaned: {check}", str(n)))
    return rows


def summary_markdown(summary: dict[str, Any], title: str = "longwriter build") -> str:
    lines = [
        f"# {title}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| accepted samples | {summary['accepted']} |",
        f"| rejected | {summary['rejected']} |",
        f"| words p10 / p50 / p90 | {summary['words']['p10']} / {summary['words']['p50']} / "
        f"{summary['words']['p90']} |",
        f"| words total | {summary['words']['total']} |",
        f"| tokens in / out | {summary['tokens']['prompt']} / {summary['tokens']['completion']} |",
        f"| LLM calls (stored) | {sum(summary['llm_calls'].values())} |",
        *_run_rows(summary),
        "",
    ]
    if summary["rejections"]:
        lines += [
            "## Rejected, by stage and reason",
            "",
            "| stage | reason | count |",
            "|---|---|---|",
        ]
        for stage, reasons in sorted(summary["rejections"].items()):
            for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
                lines.append(f"| {stage} | {reason} | {n} |")
    quality = quality_rows(summary.get("quality") or {})
    if quality:
        lines += [
            "",
            "## Quality checks (failed drafts are redrafted; cleanings are kept on the paragraph)",
            "",
            "| check | count or mean |",
            "|---|---|",
            *(f"| {label} | {value} |" for label, value in quality),
        ]
    return "\n".join(lines) + "\n"


def _run_rows(summary: dict[str, Any]) -> list[str]:
    """Rows for the run's facts when the flow added them (flows.monitoring.run_facts): wall
    time, models and endpoints with their stored calls (URLs already redacted), output."""

    def counted(d: dict[str, int]) -> str:
        items = sorted(d.items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"`{k}` ({n} calls)" for k, n in items[:5])
        return shown + (f", and {len(items) - 5} more" if len(items) > 5 else "")

    rows = []
    if summary.get("wall_s") is not None:
        rows.append(f"| wall time | {summary['wall_s']} s |")
    if summary.get("models"):
        rows.append(f"| model(s) | {counted(summary['models'])} |")
    if summary.get("endpoints"):
        rows.append(f"| endpoint(s) | {counted(summary['endpoints'])} |")
    if summary.get("out_dir"):
        rows.append(f"| output folder | `{summary['out_dir']}` |")
    if summary.get("report_html"):
        rows.append(f"| build report | `{summary['report_html']}` |")
    return rows


def length_histogram_png(store: Store, path: Path) -> Path | None:
    """A histogram of accepted sample lengths; None when there is nothing to plot."""
    words = store.accepted_sample_words()
    if not words:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(words, bins=min(30, max(5, len(words) // 3)), color="#3b6ea8")
    ax.set_xlabel("words (CJK characters + English words)")
    ax.set_ylabel("samples")
    ax.set_title(f"Accepted sample lengths (n={len(words)})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
