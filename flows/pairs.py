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
--min-margin below) rejected, as in the LongWriter paper's DPO data (see tasks/pairs/).

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
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

# Importing the pair tables registers them on SQLModel's metadata, so the Store(url) opened
# below creates them (Store.__init__ runs create_all).
import storage.pair_models  # noqa: F401
from flows.common import (
    http_requests,
    open_judge,
    open_writer,
    recorded_run,
    require_judge_model,
    retry_policy,
)
from flows.console import add_command, fail, start_prefect_api
from flows.stages import judge_variants_batch, select_and_export_task, write_variants_batch
from prompts import prompt_version
from storage.store import Store, redact_db_url
from tasks.eval.judge import judge_format_for
from tasks.flags import SettingsError, derive
from tasks.llm.client import LLMError
from tasks.llm.endpoints import ConfigError
from tasks.pairs.variants import PairsConfig, PairsRuntime, eligible_ids, skipped_details
from tasks.runtime import gather_all, register, unregister
from tasks.settings import PAIRS_FLAGS, PairsSettings
from tasks.write import ContextBudget

__all__ = ["PairsSettings", "pairs_flow", "run_pairs"]


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
    require_judge_model(settings)
    with recorded_run(settings.db_url, "pairs", settings.public()) as run:
        store = run.store
        ids = eligible_ids(store, settings.limit)
        logger.info("%d instructions with an accepted plan", len(ids))
        if not ids:
            raise ConfigError(
                f"no instruction with an accepted plan in {store.redacted_url}; "
                "run longwriter build first"
            )
        policy = retry_policy(settings)
        async with contextlib.AsyncExitStack() as stack:
            writer = await open_writer(stack, settings, settings.concurrency, policy)
            # By default the writer judges its own variants.
            judge = await open_judge(stack, settings, writer, policy, settings.concurrency)
            client, judge_client = writer.client, judge.client
            logger.info(
                "writer %s (%s), judge %s; %d variant(s) per instruction",
                writer.endpoints.model,
                ", ".join(e.base_url for e in writer.endpoints.endpoints),
                judge_client.model,
                settings.variants,
            )
            judge_window = settings.judge_context_window or judge.endpoints.context_window
            rt = PairsRuntime(
                store=store,
                client=client,
                judge_client=judge_client,
                config=derive(PairsConfig, settings, judge_context_window=judge_window),
                judge_format=judge_format_for(settings.judge_format, judge.endpoints.embedded),
                budget=ContextBudget(writer.endpoints.context_window),
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
                "http_requests": http_requests(client, judge_client),
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
        run.summary = summary
    return summary


def run_pairs(settings: PairsSettings) -> dict[str, Any]:
    """Run the flow to completion in this process (the CLI's entry)."""
    return asyncio.run(pairs_flow(settings=settings))


# -- CLI --------------------------------------------------------------------------------------


def add_cli(sub: Any) -> None:
    # Every flag from a PairsSettings field (tasks/settings.py).
    add_command(
        sub,
        "pairs",
        cmd_pairs,
        PAIRS_FLAGS,
        doc=__doc__,
    )


def settings_from_args(args: argparse.Namespace) -> PairsSettings:
    return PAIRS_FLAGS.settings(args)


def has_eligible(db_url: str) -> bool:
    store = Store(db_url)
    try:
        return bool(eligible_ids(store, limit=1))
    finally:
        store.close()


def cmd_pairs(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        return fail(str(exc))
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
        return fail(" ".join(str(exc).split()) or type(exc).__name__)
    except KeyboardInterrupt:
        return fail("interrupted; rerun the same command to resume", code=130)
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
