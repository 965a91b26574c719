"""`longwriter pairs`: DPO preference pairs from AgentWrite variants, as a Prefect flow.

Run it:   longwriter pairs --db runs/lw.db --out runs/pairs [--variants 4]
              [--base-url URL --model NAME] [--judge-base-url URL --judge-model NAME]
          longwriter train --dpo --data runs/pairs --out runs/dpo

For every instruction of the store with an accepted plan (status accepted, written or
planned), K extra samples are written with AgentWrite on the SAME stored plan and other
sampling (variant v sends seed=v); the accepted build sample is variant 0. A judge (LLM stage
`judge`) rates each variant on LongBench-Write's six dimensions; with the length score S_l
against the instruction's required length (when known) this gives S = (S_q + S_l) / 2, the
paper's total, else S_q. The best clean variant is chosen, a random lower one (at least
--min-margin below) rejected, as in the LongWriter paper's DPO data (see tasks/pairs.py).

Writes OUT/shards/*.parquet and OUT/jsonl/*.jsonl in TRL's conversational preference format
({"prompt": [user], "chosen": [assistant], "rejected": [assistant], "id", "chosen_score",
"rejected_score", ...}) and OUT/manifest.json (counts, skipped instructions by reason,
unscored variants, margins, sha256 of every file). Every variant, verdict and decision is
stored (storage/pair_models.py) and every call goes through the store cache, so rerunning the
same command resumes and never pays twice.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field

# Importing the pair tables registers them on SQLModel's metadata, so the Store(url) opened
# below creates them (Store.__init__ runs create_all).
import storage.pair_models  # noqa: F401
from prompts import prompt_version
from storage.store import Store, redact_db_url
from tasks.endpoints import ConfigError, open_endpoints
from tasks.judge import FORMATS
from tasks.llm_client import LLMClient, LLMError, RetryPolicy
from tasks.pairs import (
    PairsConfig,
    PairsRuntime,
    eligible_ids,
    judge_format_for,
    judge_variants_batch,
    register,
    select_and_export_task,
    skipped_details,
    unregister,
    write_variants_batch,
)
from tasks.runtime import gather_all
from tasks.write import ContextBudget


class PairsSettings(BaseModel):
    """Everything a pairs run needs (a deployment shows it as a form). Holds the *names* of
    API key variables, never keys."""

    model_config = ConfigDict(extra="forbid")

    db_url: str = Field("sqlite:///longwriter.db", description="the build's store")
    out_dir: str = Field("pairs", description="where shards/, jsonl/ and manifest.json go")
    variants: int = Field(4, ge=1, le=64, description="extra AgentWrite samples per instruction")
    base_urls: list[str] = Field(default_factory=list, description="writer /v1 URLs")
    model: str | None = None
    api_key_env: str = "LONGWRITER_API_KEY"
    judge_base_urls: list[str] = Field(default_factory=list, description="judge /v1 URLs")
    judge_model: str | None = None
    judge_api_key_env: str = "LONGWRITER_JUDGE_API_KEY"
    judge_format: str = Field("auto", description="auto | json_schema | json_object | none")
    judge_attempts: int = Field(3, ge=1, le=10)
    judge_max_tokens: int = Field(512, ge=16)
    judge_temperature: float = Field(0.0, ge=0.0, le=2.0)
    judge_context_window: int | None = None
    temperature: float = Field(0.8, ge=0.0, le=2.0, description="variants' write temperature")
    max_paragraph_tokens: int = Field(2048, ge=16)
    max_continuations: int = Field(1, ge=0)
    max_repetition: float = Field(0.3, ge=0.0, le=1.0)
    context_window: int | None = None
    concurrency: int = Field(8, ge=1, le=4096)
    limit: int | None = Field(None, ge=1, description="only the first N eligible instructions")
    batch_size: int = Field(20, ge=1, description="instructions per write/judge task")
    min_margin: float = Field(5.0, ge=0.0, description="least S gap (0-100) chosen - rejected")
    rejected: Literal["random", "worst"] = "random"
    request_timeout_s: float = 600.0
    max_attempts: int = Field(6, ge=1)
    # Client backoff between attempts (capped full jitter; Retry-After wins when given).
    initial_backoff_s: float = Field(0.5, ge=0)
    max_backoff_s: float = Field(30.0, ge=0)

    def public(self) -> dict[str, Any]:
        d = self.model_dump()
        d["db_url"] = redact_db_url(self.db_url)
        return d

    def pairs_config(self, judge_context_window: int) -> PairsConfig:
        return PairsConfig(
            variants=self.variants,
            temperature=self.temperature,
            max_paragraph_tokens=self.max_paragraph_tokens,
            max_continuations=self.max_continuations,
            max_repetition=self.max_repetition,
            judge_attempts=self.judge_attempts,
            judge_max_tokens=self.judge_max_tokens,
            judge_temperature=self.judge_temperature,
            judge_context_window=judge_context_window,
            min_margin=self.min_margin,
            rejected=self.rejected,
        )


async def _run_batches(rt: PairsRuntime, ids: list[int], batch_size: int) -> None:
    """Every batch: write its variants, then judge them; batches run concurrently, so judging
    starts while later instructions are still being written."""
    runtime_id = register(rt)

    async def batch(chunk: list[int]) -> None:
        await write_variants_batch(runtime_id, chunk)
        await judge_variants_batch(runtime_id, chunk)

    try:
        await gather_all(batch(ids[i : i + batch_size]) for i in range(0, len(ids), batch_size))
    finally:
        unregister(runtime_id)


@flow(name="longwriter-pairs", log_prints=True)
async def pairs_flow(settings: PairsSettings) -> dict[str, Any]:
    logger = get_run_logger()
    started = time.monotonic()
    if settings.judge_base_urls and not settings.judge_model:
        raise ConfigError("--judge-model is required with --judge-base-url")
    if settings.judge_format != "auto" and settings.judge_format not in FORMATS:
        raise ConfigError(f"--judge-format must be auto or one of {', '.join(FORMATS)}")
    store = Store(settings.db_url)
    run_id = store.start_run("pairs", settings.public())
    try:
        ids = eligible_ids(store, settings.limit)
        logger.info("%d instructions with an accepted plan", len(ids))
        if not ids:
            raise ConfigError(
                f"no instruction with an accepted plan in {store.redacted_url}; "
                "run longwriter build first"
            )
        policy = RetryPolicy(
            max_attempts=settings.max_attempts,
            read_timeout_s=settings.request_timeout_s,
            initial_backoff_s=settings.initial_backoff_s,
            max_backoff_s=settings.max_backoff_s,
        )
        async with contextlib.AsyncExitStack() as stack:
            gen_eps = await stack.enter_async_context(
                open_endpoints(
                    settings.base_urls,
                    settings.model,
                    settings.api_key_env,
                    settings.concurrency,
                    settings.context_window,
                )
            )
            client = await stack.enter_async_context(
                LLMClient(gen_eps.endpoints, gen_eps.model, policy)
            )
            judge_eps = gen_eps
            judge_client = client  # by default the writer judges its own variants
            if settings.judge_base_urls:
                judge_eps = await stack.enter_async_context(
                    open_endpoints(
                        settings.judge_base_urls,
                        settings.judge_model,
                        settings.judge_api_key_env,
                        settings.concurrency,
                        settings.judge_context_window,
                    )
                )
                judge_client = await stack.enter_async_context(
                    LLMClient(judge_eps.endpoints, judge_eps.model, policy)
                )
            elif settings.judge_model not in (None, gen_eps.model):
                judge_client = await stack.enter_async_context(
                    LLMClient(gen_eps.endpoints, str(settings.judge_model), policy)
                )
            logger.info(
                "writer %s (%s), judge %s; %d variant(s) per instruction",
                gen_eps.model,
                ", ".join(e.base_url for e in gen_eps.endpoints),
                judge_client.model,
                settings.variants,
            )
            judge_window = settings.judge_context_window or judge_eps.context_window
            rt = PairsRuntime(
                store=store,
                client=client,
                judge_client=judge_client,
                config=settings.pairs_config(judge_window),
                judge_format=judge_format_for(settings.judge_format, judge_eps.embedded),
                budget=ContextBudget(gen_eps.context_window),
                slots=asyncio.Semaphore(settings.concurrency),
            )
            await _run_batches(rt, ids, settings.batch_size)
            llm = {
                "write": {
                    "calls": rt.write_progress.calls,
                    "cached": rt.write_progress.cached_calls,
                    "completion_tokens": rt.write_progress.completion_tokens,
                },
                "judge": {
                    "calls": rt.judge_progress.calls,
                    "cached": rt.judge_progress.cached_calls,
                    "final_format": rt.judge_format,
                },
                "variants_this_run": dict(rt.counts),
                "http_requests": client.stats.requests
                + (judge_client.stats.requests if judge_client is not client else 0),
            }
            model, judge_model = client.model, judge_client.model
        meta = {
            "model": model,
            "judge_model": judge_model,
            "judge_prompt_version": prompt_version("judge"),
            "write_prompt_version": prompt_version("write"),
            "score": "S = (S_q + S_l) / 2 when the required length is known, else S_q; "
            "S_q = mean over six judge dimensions of (rating - 1) * 25 (0-100)",
            "selection": f"chosen = best clean variant; rejected = {settings.rejected} lower "
            f"variant with margin >= {settings.min_margin}",
            "settings": settings.public(),
            "store": store.redacted_url,
            "llm": llm,
        }
        manifest = select_and_export_task(
            settings.db_url, ids, judge_model, rt.config, settings.out_dir, meta
        )
        for iid, reason, detail in skipped_details(store, ids)[:20]:
            logger.info("instruction %d skipped: %s (%s)", iid, reason, detail)
        summary = {
            **{k: manifest[k] for k in ("counts", "margins", "model", "judge_model", "llm")},
            "out_dir": str(Path(settings.out_dir).resolve()),
            "wall_s": round(time.monotonic() - started, 2),
        }
        logger.info("pairs: %s", summary["counts"])
        store.finish_run(run_id, "completed", summary)
        return summary
    except BaseException as exc:
        store.finish_run(run_id, "failed", {}, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        store.close()


def run_pairs(settings: PairsSettings) -> dict[str, Any]:
    """Run the flow to completion in this process (the CLI's entry)."""
    return asyncio.run(pairs_flow(settings=settings))


# -- CLI --------------------------------------------------------------------------------------


def add_cli(sub: Any) -> None:
    p = sub.add_parser(
        "pairs",
        help="DPO preference pairs: K AgentWrite variants per plan, judged, best vs lower",
        description=(__doc__ or "").split("\n\n")[0],
    )
    p.add_argument("--db", default=None, help="the build's store URL or SQLite path")
    p.add_argument("--out", required=True, help="directory for shards/, jsonl/, manifest.json")
    p.add_argument("--variants", type=int, default=4, help="extra samples per instruction")
    p.add_argument(
        "--base-url",
        action="append",
        default=None,
        help="writer's OpenAI-compatible /v1 URL (repeatable; env LONGWRITER_BASE_URL; "
        "none: the embedded llama.cpp server)",
    )
    p.add_argument("--model", default=None, help="writer model name (env LONGWRITER_MODEL)")
    p.add_argument("--api-key-env", default="LONGWRITER_API_KEY")
    p.add_argument("--judge-base-url", action="append", default=None, help="judge /v1 URL")
    p.add_argument("--judge-model", default=None, help="judge model name")
    p.add_argument("--judge-api-key-env", default="LONGWRITER_JUDGE_API_KEY")
    p.add_argument("--judge-format", default="auto", choices=("auto", *FORMATS))
    p.add_argument("--judge-attempts", type=int, default=3)
    p.add_argument("--temperature", type=float, default=0.8, help="variants' write temperature")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="only the first N instructions")
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument(
        "--min-margin",
        type=float,
        default=5.0,
        help="least score gap (0-100) between chosen and rejected; smaller: skipped",
    )
    p.add_argument("--rejected", choices=("random", "worst"), default="random")
    p.add_argument(
        "--max-repetition",
        type=float,
        default=0.3,
        help="a variant repeating more 13-grams than this share is never chosen",
    )
    p.add_argument("--context-window", type=int, default=None)
    p.add_argument("--judge-context-window", type=int, default=None)
    p.add_argument("--max-paragraph-tokens", type=int, default=2048)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.set_defaults(handler=cmd_pairs)


def _fail(message: str, code: int = 2) -> int:
    print(f"longwriter: error: {message}", file=sys.stderr)
    return code


def settings_from_args(args: argparse.Namespace) -> PairsSettings:
    from flows.cli import _db_default

    return PairsSettings(
        db_url=args.db or _db_default(),
        out_dir=args.out,
        variants=args.variants,
        base_urls=args.base_url or [],
        model=args.model,
        api_key_env=args.api_key_env,
        judge_base_urls=args.judge_base_url or [],
        judge_model=args.judge_model,
        judge_api_key_env=args.judge_api_key_env,
        judge_format=args.judge_format,
        judge_attempts=args.judge_attempts,
        temperature=args.temperature,
        concurrency=args.concurrency,
        limit=args.limit,
        batch_size=args.batch_size,
        min_margin=args.min_margin,
        rejected=args.rejected,
        max_repetition=args.max_repetition,
        context_window=args.context_window,
        judge_context_window=args.judge_context_window,
        max_paragraph_tokens=args.max_paragraph_tokens,
        request_timeout_s=args.request_timeout,
    )


def has_eligible(db_url: str) -> bool:
    store = Store(db_url)
    try:
        return bool(eligible_ids(store, limit=1))
    finally:
        store.close()


def cmd_pairs(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from flows.cli import start_prefect_api

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        first = exc.errors()[0]
        return _fail(f"--{'-'.join(str(x) for x in first['loc'])}: {first['msg']}")
    try:
        # Checked before the flow starts (and any server with it): an empty store fails in a
        # blink, with one line instead of a flow-run traceback.
        if not has_eligible(settings.db_url):
            raise ConfigError(
                f"no instruction with an accepted plan in {redact_db_url(settings.db_url)}; "
                "run longwriter build first"
            )
        start_prefect_api()
        summary = run_pairs(settings)
    except (ConfigError, LLMError) as exc:
        return _fail(" ".join(str(exc).split()) or type(exc).__name__)
    except KeyboardInterrupt:
        return _fail("interrupted; rerun the same command to resume", code=130)
    print(summary_text(summary))
    return 0


def summary_text(summary: dict[str, Any]) -> str:
    c, m = summary["counts"], summary["margins"]
    skipped = {k: v for k, v in c["decisions"].items() if k != "paired"}
    lines = [
        f"writer {summary['model']}  judge {summary['judge_model']}  wall {summary['wall_s']} s",
        f"pairs {c['pairs']} of {c['instructions']} instruction(s)"
        + (
            f"; margin min/mean/max {m['min']}/{m['mean']}/{m['max']}"
            if m["min"] is not None
            else ""
        ),
        "skipped: " + (", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none"),
        "variants: " + ", ".join(f"{k} {v}" for k, v in sorted(c["variants"].items())),
        f"pairs: {summary['out_dir']}",
    ]
    return "\n".join(lines)
