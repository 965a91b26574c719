"""`longwriter eval`: LongBench-Write (LongWriter paper, arXiv 2408.07055) as a Prefect flow.

Run it:   longwriter eval --out runs/eval                      (embedded SmolLM2, judged by itself)
          longwriter eval --base-url URL --model NAME --out DIR \\
                          [--judge-base-url URL --judge-model NAME | --no-judge]

Every prompt of the set ({"prompt","length","type"} records; default: the 120 LongBench-Write
prompts shipped in the package) is sent verbatim, as the only user message, to the evaluated
model (LLM stage `generate`); a judge (stage `judge`) rates each answer on six dimensions.
Scores follow the paper (`tasks.scoring`): S_l from required vs output length, S_q from the
judge, S = (S_l + S_q) / 2, overall and per length bucket, output language and prompt type.

Every answer and verdict is stored (`storage.eval_models`) before it is used, and every call goes
through the store cache (`tasks.runtime.generate`), so rerunning the same command resumes: an
answered prompt is never requested again. A prompt whose answer never comes is recorded as an
empty response with the reason (S_l = 0); a judge answer that never parses is reported as
unscored, with a count. A dead endpoint or a request the endpoint refuses (EndpointDownError,
FatalLLMError) stops the run with a one-line reason.

Writes OUT/results.json (every figure, one row per prompt), OUT/results.md (tables),
OUT/scatter.png (required vs output length), OUT/responses.jsonl (the answers) and the same
table and picture as Prefect artifacts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from sqlmodel import col, select

from flows.common import (
    ProgressArtifact,
    http_requests,
    image_markdown,
    open_judge,
    open_writer,
    publish_markdown,
    recorded_run,
    require_judge_model,
    retry_policy,
    ticking,
)
from flows.console import add_command, fail
from prompts import prompt_version

# Importing the eval tables registers them on SQLModel's metadata, so the Store(url) the flow
# opens later creates them (Store.__init__ runs create_all).
from storage.eval_models import EvalGeneration, EvalJudgement
from storage.store import Store
from tasks.endpoints import ConfigError
from tasks.flags import SettingsError
from tasks.judge import FORMATS, judge_answer, judge_format_for
from tasks.lineage import LINEAGE_FILE, eval_lineage, record_evaluation
from tasks.llm_client import (
    BadOutputError,
    ChatRequest,
    ContextLengthError,
    LLMClient,
    LLMError,
)
from tasks.runtime import Progress, gather_all, generate
from tasks.scoring import DIMENSIONS, ScoredRow, report
from tasks.settings import EVAL_FLAGS, EvalSettings, default_prompts_path
from tasks.wordcount import count_words, detect_lang
from tasks.write import estimate_tokens

# Re-exported: the eval's settings and prompt set live in tasks/settings.py.
__all__ = ["EvalSettings", "default_prompts_path", "eval_flow", "run_eval_sync"]

GENERATE_STAGE = "generate"
# The prompt goes out verbatim (no template), so this names the convention, not a file hash.
GENERATE_VERSION = "eval-verbatim@1"
PROMPT_RESERVE_TOKENS = 256  # chat template tokens + estimate error, kept free of max_tokens


# -- prompts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptItem:
    index: int  # position in the prompt file (reports keep this order)
    prompt: str
    length: int
    type: str
    lang: str


def load_prompts(path: Path, limit: int | None = None) -> list[PromptItem]:
    """{"prompt","length","type"} records; any malformed line stops with its line number."""
    if not path.is_file():
        raise ConfigError(f"prompts file not found: {path}")
    items: list[PromptItem] = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                prompt = rec["prompt"]
                length = int(rec["length"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(
                    f"{path}:{line_no}: need a JSON object with 'prompt' and integer 'length' "
                    f"({type(exc).__name__})"
                ) from None
            if not isinstance(prompt, str) or not prompt.strip() or length <= 0:
                raise ConfigError(f"{path}:{line_no}: empty prompt or non-positive length")
            items.append(
                PromptItem(
                    index=len(items),
                    prompt=prompt,
                    length=length,
                    type=str(rec.get("type") or "unknown"),
                    lang=detect_lang(prompt),
                )
            )
            if limit is not None and len(items) >= limit:
                break
    if not items:
        raise ConfigError(f"no prompts in {path}")
    return items


def generation_request(prompt: str, max_tokens: int, temperature: float) -> ChatRequest:
    """The prompt verbatim as the single user message (as LongBench-Write does)."""
    return ChatRequest.of(
        GENERATE_STAGE,
        [{"role": "user", "content": prompt}],
        GENERATE_VERSION,
        max_tokens=max_tokens,
        temperature=temperature,
    )


def generation_max_tokens(prompt: str, max_tokens: int, context_window: int) -> int:
    """max_tokens clipped so prompt + answer fit the context (llama.cpp refuses otherwise)."""
    return min(max_tokens, context_window - estimate_tokens(prompt) - PROMPT_RESERVE_TOKENS)


# -- runtime ----------------------------------------------------------------------------------


@dataclass
class EvalRuntime:
    """What the eval tasks share in one run; tasks get its id (see tasks.runtime)."""

    store: Store
    client: LLMClient
    judge_client: LLMClient | None
    settings: EvalSettings
    context_window: int
    judge_context_window: int
    judge_format: str
    items: dict[str, list[PromptItem]]  # generation key -> prompts (duplicates share a key)
    requests: dict[str, ChatRequest]  # generation key -> its request
    gen_progress: Progress = field(default_factory=Progress)
    judge_progress: Progress = field(default_factory=Progress)
    generated: int = 0
    judged: int = 0
    slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(8))
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def judge_version(self) -> str:
        return prompt_version("judge")


_RUNTIMES: dict[str, EvalRuntime] = {}


def _runtime(runtime_id: str) -> EvalRuntime:
    try:
        return _RUNTIMES[runtime_id]
    except KeyError:
        raise RuntimeError(f"eval runtime {runtime_id} is not registered in this process") from None


# -- generation -------------------------------------------------------------------------------


async def generate_one(rt: EvalRuntime, key: str) -> EvalGeneration:
    """The stored answer to one prompt, or ask for it and store it (also when it fails)."""
    with rt.store.session() as s:
        existing = s.get(EvalGeneration, key)
    if existing is not None:
        rt.generated += 1  # answered by an earlier run: counts as done
        return existing
    item = rt.items[key][0]
    request = rt.requests[key]
    row = EvalGeneration(
        key=key,
        model=rt.client.model,
        prompt=item.prompt,
        length=item.length,
        type=item.type,
        lang=item.lang,
        max_tokens=request.max_tokens,
        temperature=request.temperature,
    )
    if request.max_tokens is not None and request.max_tokens <= 0:
        row.status, row.error = "context_overflow", "prompt leaves no room in the context window"
    else:
        try:
            async with rt.slots:
                call = await generate(rt.store, rt.client, request, rt.gen_progress)
        except BadOutputError as exc:
            row.status, row.error = "bad_output", str(exc)
        except ContextLengthError as exc:
            row.status, row.error = "context_overflow", str(exc)
        else:
            row.response = call.content
            row.response_length = count_words(call.content)
            row.finish_reason = call.finish_reason
            row.call_key = call.key
    rt.store.save(row)
    rt.generated += 1
    return row


@task(name="eval-generate", cache_policy=NO_CACHE, persist_result=False)
async def generate_batch(runtime_id: str, keys: list[str]) -> int:
    """Answer every prompt of a batch concurrently; returns how many were answered now."""
    rt = _runtime(runtime_id)
    before = rt.gen_progress.calls
    await gather_all(generate_one(rt, k) for k in keys)
    return rt.gen_progress.calls - before


# -- judging ----------------------------------------------------------------------------------


async def judge_one(rt: EvalRuntime, key: str) -> EvalJudgement | None:
    """The stored verdict on one answer, or up to `judge_attempts` judge calls (each a varied
    request) until one parses; None for an empty answer (nothing to judge)."""
    assert rt.judge_client is not None
    judge_model = rt.judge_client.model
    version = rt.judge_version
    with rt.store.session() as s:
        gen = s.get(EvalGeneration, key)
        existing = s.get(EvalJudgement, (key, judge_model, version))
    if existing is not None:
        rt.judged += 1
        return existing
    if gen is None or not gen.response.strip():
        return None
    row = EvalJudgement(
        generation_key=key, judge_model=judge_model, prompt_version=version, status="unparsed"
    )
    await judge_answer(
        row,
        gen.prompt,
        gen.response,
        store=rt.store,
        client=rt.judge_client,
        progress=rt.judge_progress,
        slots=rt.slots,
        formats=rt,
        attempts=rt.settings.judge_attempts,
        max_tokens=rt.settings.judge_max_tokens,
        temperature=rt.settings.judge_temperature,
        context_window=rt.judge_context_window,
    )
    rt.store.save(row)
    rt.judged += 1
    return row


@task(name="eval-judge", cache_policy=NO_CACHE, persist_result=False)
async def judge_batch(runtime_id: str, keys: list[str]) -> int:
    rt = _runtime(runtime_id)
    results = await gather_all(judge_one(rt, k) for k in keys)
    return sum(1 for r in results if r is not None and r.status == "scored")


async def run_eval(rt: EvalRuntime, keys: list[str]) -> None:
    """Fan out: each batch is generated, then judged; batches run concurrently, so judging
    starts while later prompts are still being answered."""
    _RUNTIMES[rt.id] = rt

    async def batch(chunk: list[str]) -> None:
        await generate_batch(rt.id, chunk)
        if rt.judge_client is not None:
            await judge_batch(rt.id, chunk)

    size = rt.settings.batch_size
    try:
        await gather_all(batch(keys[i : i + size]) for i in range(0, len(keys), size))
    finally:
        _RUNTIMES.pop(rt.id, None)


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


# -- flow -------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _status_line(rt: EvalRuntime, total: int, show: bool) -> AsyncIterator[None]:
    """A progress artifact in Prefect and, with `show`, one stderr line every 15 s."""
    artifact = await ProgressArtifact.create("eval-progress", "prompts answered")

    def line() -> str:
        judged = f", judged {rt.judged}" if rt.judge_client is not None else ""
        return (
            f"eval: answered {rt.generated}/{total}{judged}; "
            f"{rt.gen_progress.tokens_per_s():.1f} tok/s generated"
        )

    async def tick() -> None:
        if show:
            # Not print(): log_prints turns prints into INFO logs, which the CLI hides.
            sys.stderr.write(line() + "\n")
            sys.stderr.flush()
        await artifact.update(100.0 * rt.generated / max(1, total))

    async def final() -> None:
        await artifact.update(100.0)

    async with ticking(15, tick, final):
        yield


def _resolve_format(setting: str, embedded: bool) -> str:
    """The judge's structured-output format (tasks.judge.judge_format_for), refused in one
    line (ConfigError) when it names none."""
    try:
        return judge_format_for(setting, embedded)
    except ValueError:
        raise ConfigError(f"--judge-format must be auto or one of {', '.join(FORMATS)}") from None


@flow(name="longwriter-eval", log_prints=True)
async def eval_flow(settings: EvalSettings) -> dict[str, Any]:
    logger = get_run_logger()
    started = time.monotonic()
    items = load_prompts(settings.prompts_path(), settings.limit)
    require_judge_model(settings)
    with recorded_run(settings.store_url(), "eval", settings.public()) as run:
        store = run.store
        async with contextlib.AsyncExitStack() as stack:
            policy = retry_policy(settings)
            writer = await open_writer(stack, settings, settings.concurrency, policy)
            gen_eps, client = writer.endpoints, writer.client
            judge_client: LLMClient | None = None
            judge_eps = gen_eps
            if settings.judge:
                # Without a judge of its own, the evaluated model judges itself.
                judge = await open_judge(stack, settings, writer, policy, settings.concurrency)
                judge_eps, judge_client = judge.endpoints, judge.client
            logger.info(
                "evaluating %s on %d prompts from %s; judge %s",
                gen_eps.model,
                len(items),
                settings.prompts_path(),
                judge_client.model if judge_client else "off",
            )
            keys: list[str] = []
            by_key: dict[str, list[PromptItem]] = {}
            requests: dict[str, ChatRequest] = {}
            for item in items:
                req = generation_request(
                    item.prompt,
                    generation_max_tokens(item.prompt, settings.max_tokens, gen_eps.context_window),
                    settings.temperature,
                )
                key = req.key(client.model)
                keys.append(key)
                requests[key] = req
                by_key.setdefault(key, []).append(item)
            rt = EvalRuntime(
                store=store,
                client=client,
                judge_client=judge_client,
                settings=settings,
                context_window=gen_eps.context_window,
                judge_context_window=settings.judge_context_window or judge_eps.context_window,
                judge_format=_resolve_format(settings.judge_format, judge_eps.embedded),
                items=by_key,
                requests=requests,
                slots=asyncio.Semaphore(settings.concurrency),
            )
            unique = list(by_key)
            async with _status_line(rt, len(unique), settings.progress):
                await run_eval(rt, unique)
            llm = {
                "generate": {
                    "calls": rt.gen_progress.calls,
                    "cached": rt.gen_progress.cached_calls,
                    "completion_tokens": rt.gen_progress.completion_tokens,
                    "completion_tokens_per_s": round(rt.gen_progress.tokens_per_s(), 2),
                },
                "judge": {
                    "calls": rt.judge_progress.calls,
                    "cached": rt.judge_progress.cached_calls,
                    "final_format": rt.judge_format if judge_client else None,
                },
                "http_requests": http_requests(client, judge_client),
            }
            judge_model = judge_client.model if judge_client else None
            model = client.model
        rows = collect_rows(store, items, keys, judge_model, prompt_version("judge"))
        meta = {
            "model": model,
            "judge_model": judge_model,
            "judge_prompt_version": prompt_version("judge") if judge_model else None,
            "prompts": str(settings.prompts_path()),
            "settings": settings.public(),
            "llm": llm,
            "wall_s": round(time.monotonic() - started, 2),
            # shards -> model -> this score: the model folder's lineage.json, when named.
            "lineage": eval_lineage(Path(settings.model_dir)) if settings.model_dir else None,
        }
        results = build_results(rows, judge_model is not None, meta)
        md, png = write_outputs(Path(settings.out_dir), results, rows, store, keys)
        if settings.model_dir and (Path(settings.model_dir) / LINEAGE_FILE).is_file():
            record_evaluation(
                Path(settings.model_dir), Path(settings.out_dir) / "results.json", results
            )
        await publish_markdown(
            md + image_markdown("required vs output length", png),
            "eval-results",
            "LongBench-Write",
        )
        run.summary = {k: results[k] for k in ("overall", "counts", "wall_s")}
    return results


def run_eval_sync(settings: EvalSettings) -> dict[str, Any]:
    """Run the flow to completion in this process (the CLI's entry)."""
    return asyncio.run(eval_flow(settings=settings))


# -- CLI --------------------------------------------------------------------------------------


def add_cli(sub: Any) -> None:
    # Every flag from an EvalSettings field (tasks/settings.py).
    add_command(
        sub,
        "eval",
        cmd_eval,
        EVAL_FLAGS,
        doc=__doc__,
    )


def cmd_eval(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    given = EVAL_FLAGS.values(args)
    if given.get("judge") is False and (given.get("judge_base_urls") or given.get("judge_model")):
        return fail("--no-judge cannot be combined with --judge-base-url/--judge-model")
    try:
        settings = EVAL_FLAGS.settings(args)
    except SettingsError as exc:
        return fail(str(exc))
    try:
        # Checked before the flow starts (and any server with it): a bad file fails in a blink.
        load_prompts(settings.prompts_path(), settings.limit)
        require_judge_model(settings)
        results = run_eval_sync(settings)
    except (ConfigError, LLMError) as exc:
        return fail(" ".join(str(exc).split()) or type(exc).__name__)
    except KeyboardInterrupt:
        return fail("interrupted; rerun the same command to resume", code=130)
    print(summary_text(results))
    return 0


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
