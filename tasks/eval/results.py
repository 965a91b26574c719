"""The eval's results: rows scored as the paper does, results.json / results.md, the scatter
plot and the terminal summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlmodel import col, select

# Importing the eval tables registers them on SQLModel's metadata, so the Store(url) the flow
# opens later creates them (Store.__init__ runs create_all).
from storage.eval_models import EvalGeneration, EvalJudgement
from storage.store import Store

# Re-exported: the eval's settings and prompt set live in tasks/settings.py.
from tasks.eval.prompts import PromptItem
from tasks.eval.scoring import DIMENSIONS, ScoredRow, report

# -- results ----------------------------------------------------------------------------------


def collect_rows(
    store: Store,
    items: list[PromptItem],
    keys: list[str],
    judge_model: str | None,
    judge_version: str,
) -> list[ScoredRow]:
    """One ScoredRow per prompt (file order), from the stored answers and verdicts."""
    with store.session() as s:
        gens = {
            g.key: g
            for g in s.exec(select(EvalGeneration).where(col(EvalGeneration.key).in_(keys))).all()
        }
        verdicts: dict[str, EvalJudgement] = {}
        if judge_model is not None:
            verdicts = {
                j.generation_key: j
                for j in s.exec(
                    select(EvalJudgement).where(
                        col(EvalJudgement.generation_key).in_(keys),
                        EvalJudgement.judge_model == judge_model,
                        EvalJudgement.prompt_version == judge_version,
                    )
                ).all()
            }
    rows: list[ScoredRow] = []
    for item, key in zip(items, keys, strict=True):
        gen = gens.get(key)
        if gen is None:
            raise RuntimeError(f"prompt {item.index} has no stored answer after the run")
        verdict = verdicts.get(key)
        ratings: dict[str, float] | None = None
        if judge_model is None:
            status = "skipped"
        elif not gen.response.strip():
            status = "empty_response"
        elif verdict is None:
            status = "missing"
        else:
            status = verdict.status
            if verdict.status == "scored" and verdict.scores_json:
                ratings = {d: float(v) for d, v in json.loads(verdict.scores_json).items()}
        rows.append(
            ScoredRow(
                prompt=item.prompt,
                length=item.length,
                type=item.type,
                lang=item.lang,
                response_length=gen.response_length,
                ratings=ratings,
                judge_status=status,
                generation_status=gen.status,
                extra={
                    "index": item.index,
                    "finish_reason": gen.finish_reason,
                    "generation_error": gen.error,
                    "judge_attempts": verdict.attempts if verdict else 0,
                    "judge_truncated": verdict.truncated if verdict else False,
                    "judge_error": verdict.error if verdict else None,
                },
            )
        )
    return rows


def build_results(rows: list[ScoredRow], judged: bool, meta: dict[str, Any]) -> dict[str, Any]:
    figures = report(rows, judged)
    gen_status = [r.generation_status for r in rows]
    judge_status = [r.judge_status for r in rows]
    counts = {
        "prompts": len(rows),
        "answered": gen_status.count("ok"),
        "bad_output": gen_status.count("bad_output"),
        "context_overflow": gen_status.count("context_overflow"),
        "empty_responses": sum(r.response_length == 0 for r in rows),
        "scored": judge_status.count("scored"),
        "unscored": (len(rows) - judge_status.count("scored")) if judged else None,
        "judge_unparsed": judge_status.count("unparsed") if judged else None,
        "judge_errors": judge_status.count("error") if judged else None,
        "not_judged_empty": judge_status.count("empty_response") if judged else None,
        "finish_length": sum(r.extra.get("finish_reason") == "length" for r in rows),
    }
    return {**meta, "judged": judged, "counts": counts, **figures}


_TABLE_COLUMNS = [
    ("n", "n"),
    ("S_l", "S_l"),
    ("S_q", "S_q"),
    ("S", "S"),
    ("scored", "scored"),
    ("unscored", "unscored"),
    ("empty_responses", "empty"),
    ("mean_required_length", "required (mean)"),
    ("mean_response_length", "output (mean)"),
    ("max_response_length", "output (max)"),
]


def _cell(value: Any) -> str:
    """Figures as text: pandas would turn a missing figure into NaN and ints into floats."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _table(records: list[dict[str, Any]]) -> str:
    import pandas as pd

    df = pd.DataFrame([{k: _cell(v) for k, v in r.items()} for r in records])
    # Right-align every figure column; the first column holds names.
    align = ["left"] + ["right"] * (len(df.columns) - 1)
    return df.to_markdown(index=False, disable_numparse=True, colalign=align)


def _group_table(title: str, groups: dict[str, dict[str, Any]]) -> str:
    return _table(
        [
            {title: name, **{label: g[k] for k, label in _TABLE_COLUMNS}}
            for name, g in groups.items()
        ]
    )


def results_markdown(results: dict[str, Any]) -> str:
    judged = results["judged"]
    o = results["overall"]
    c = results["counts"]
    lines = [
        "# LongBench-Write evaluation",
        "",
        f"model `{results['model']}`; judge "
        + (f"`{results['judge_model']}`" if judged else "off (--no-judge)")
        + f"; prompts `{results['prompts']}` ({c['prompts']}); wall time {results['wall_s']} s",
        "",
        _group_table("set", {"overall": o}),
        "",
        f"Unanswered (empty, S_l = 0): {c['empty_responses']} "
        f"(bad output {c['bad_output']}, over context {c['context_overflow']}); "
        f"cut by max_tokens: {c['finish_length']}.",
    ]
    if judged:
        lines.append(
            f"Judged: {c['scored']} scored, {c['unscored']} unscored ({c['judge_unparsed']} "
            f"never parsed, {c['judge_errors']} judge errors, {c['not_judged_empty']} empty)."
        )
    lines += ["", "## By required length", "", _group_table("bucket", results["buckets"])]
    lines += ["", "## By output language", "", _group_table("language", results["languages"])]
    lines += ["", "## By type", "", _group_table("type", results["types"])]
    if judged:
        dims = [{"dimension": d, "score (0-100)": o["dimensions"][d]} for d in DIMENSIONS]
        lines += ["", "## Quality dimensions (overall)", "", _table(dims)]
    return "\n".join(lines) + "\n"


def scatter_png(rows: list[ScoredRow], path: Path) -> Path:
    """Required vs output length, log-log, with y = x. Empty outputs sit at y = 1 (log scale
    has no 0) with their own marker so they stay visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5.5), dpi=110)
    for lang, color in (("en", "tab:blue"), ("zh", "tab:red")):
        pts = [(r.length, r.response_length) for r in rows if r.lang == lang and r.response_length]
        if pts:
            ax.scatter(
                *zip(*pts, strict=True), s=18, alpha=0.7, color=color, label=f"{lang} prompts"
            )
    empty = [r.length for r in rows if not r.response_length]
    if empty:
        ax.scatter(empty, [1] * len(empty), marker="x", color="black", label="empty (plotted at 1)")
    lo = 1
    hi = max([r.length for r in rows] + [r.response_length for r in rows] + [10]) * 1.5
    ax.plot([lo, hi], [lo, hi], "--", color="gray", linewidth=1, label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(max(1, min(r.length for r in rows) / 1.5), hi)
    ax.set_ylim(0.7, hi)
    ax.set_xlabel("required length (words; CJK characters)")
    ax.set_ylabel("output length (words; CJK characters)")
    ax.set_title("LongBench-Write: required vs output length")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_outputs(
    out_dir: Path, results: dict[str, Any], rows: list[ScoredRow], store: Store, keys: list[str]
) -> tuple[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(
        json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    md = results_markdown(results)
    (out_dir / "results.md").write_text(md, encoding="utf-8")
    png = scatter_png(rows, out_dir / "scatter.png")
    with store.session() as s:
        gens = {
            g.key: g
            for g in s.exec(select(EvalGeneration).where(col(EvalGeneration.key).in_(keys))).all()
        }
    with (out_dir / "responses.jsonl").open("w", encoding="utf-8") as fh:
        for row, key in zip(rows, keys, strict=True):
            rec = {
                "prompt": row.prompt,
                "length": row.length,
                "type": row.type,
                "response": gens[key].response,
                "response_length": row.response_length,
            }
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return md, png


def summary_text(results: dict[str, Any]) -> str:
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    o, c = results["overall"], results["counts"]
    lines = [
        f"model {results['model']}  judge {results['judge_model'] or 'off'}  "
        f"prompts {c['prompts']}  wall {results['wall_s']} s",
        f"overall  S_l {f(o['S_l'])}  S_q {f(o['S_q'])}  S {f(o['S'])}  "
        f"max output {o['max_response_length']}",
    ]
    for name, g in results["buckets"].items():
        lines.append(
            f"  {name:<7} n={g['n']:<4} S_l {f(g['S_l'])}  S_q {f(g['S_q'])}  S {f(g['S'])}"
        )
    lines.append(
        f"empty responses {c['empty_responses']}"
        + (
            f"; unscored {c['unscored']} (unparsed {c['judge_unparsed']})"
            if results["judged"]
            else ""
        )
    )
    lines.append(f"results: {Path(results['settings']['out_dir']).resolve() / 'results.json'}")
    return "\n".join(lines)
