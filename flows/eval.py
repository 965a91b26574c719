"""`longwriter eval`: LongBench-Write (LongWriter paper, arXiv 2408.07055) as a Prefect flow.

Run it:   longwriter eval --out runs/eval                      (embedded SmolLM2, judged by itself)
          longwriter eval --base-url URL --model NAME --out DIR \\
                          [--judge-base-url URL --judge-model NAME | --no-judge]

Every prompt of the set ({"prompt","length","type"} records; default: the 120 LongBench-Write
prompts shipped in the package) is sent verbatim, as the only user message, to the evaluated
model (LLM stage `generate`); a judge (stage `judge`) rates each answer on six dimensions.
Scores follow the paper (`tasks.eval.scoring`): S_l from required vs output length, S_q from the
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
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

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
from flows.stages import eval_generate_batch, eval_judge_batch
from prompts import prompt_version

# Importing the eval tables registers them on SQLModel's metadata, so the Store(url) the flow
# opens later creates them (Store.__init__ runs create_all).
from tasks.eval.judge import FORMATS, judge_format_for

# Re-exported: the eval's settings and prompt set live in tasks/settings.py.
from tasks.eval.prompts import PromptItem, generation_max_tokens, generation_request, load_prompts
from tasks.eval.results import build_results, collect_rows, summary_text, write_outputs
from tasks.eval.stages import EvalRuntime
from tasks.flags import SettingsError
from tasks.lineage import LINEAGE_FILE, eval_lineage, record_evaluation
from tasks.llm.client import (
    ChatRequest,
    LLMClient,
    LLMError,
)
from tasks.llm.endpoints import ConfigError
from tasks.runtime import gather_all, register, unregister
from tasks.settings import EVAL_FLAGS, EvalSettings, default_prompts_path

__all__ = ["EvalSettings", "default_prompts_path", "eval_flow", "run_eval_sync"]


async def run_eval(rt: EvalRuntime, keys: list[str]) -> None:
    """Fan out: each batch is generated, then judged; batches run concurrently, so judging
    starts while later prompts are still being answered."""
    register(rt)

    async def batch(chunk: list[str]) -> None:
        await eval_generate_batch(rt.id, chunk)
        if rt.judge_client is not None:
            await eval_judge_batch(rt.id, chunk)

    size = rt.settings.batch_size
    try:
        await gather_all(batch(keys[i : i + size]) for i in range(0, len(keys), size))
    finally:
        unregister(rt.id)


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
    """The judge's structured-output format (tasks.eval.judge.judge_format_for), refused in one
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
