"""What a person watching a build in the Prefect UI sees: run and task-run names, the log
lines (batches, rejections, retries), the live progress artifacts and the summary's run facts.

The build flow only calls in here; every piece is a plain function or small class so it can
be tested without a Prefect server. Three rules shape it:

* The same lines reach the API whichever way a build runs (the CLI against a server, a
  deployment on a worker, the CLI's temporary API): the CLI keeps its terminal quiet by
  raising the *console handlers'* level, never the run loggers' level (`quiet_console`),
  because a logger's level also filters what its API handler ships.
* The UI is a view: nothing here may fail a build; artifact updates swallow their errors.
* No secrets: URLs are shown without userinfo or query values (`redact_url`).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:  # only types: importing the store or the client here would add cycles
    from storage.store import Store
    from tasks.llm.client import ClientStats
    from tasks.runtime import Progress

# Seconds between refreshes of the live progress artifacts (and the terminal bar). A few
# seconds keeps the UI moving without one API write per paragraph.
REFRESH_S = float(os.environ.get("LONGWRITER_UI_REFRESH_S", "2.0"))
MAX_LOGGED_REJECTIONS = 20  # per batch (and per ingested file): the store has them all
# Retry warnings: over one watch window, at least this many requests, and a retry share or a
# 429 share at or above these. Below the floor a handful of requests make noisy percentages.
RETRY_WARN_SHARE = 0.10
THROTTLE_WARN_SHARE = 0.05
WARN_MIN_REQUESTS = 20
RETRY_LOG_EVERY_S = 10.0  # at most one "retries so far" line per this many seconds


# -- logging -------------------------------------------------------------------------------

# Console handlers of Prefect 3's logging.yml (prefect/logging/logging.yml): `console` on the
# root and `prefect` loggers, and the run loggers' own console handlers. Their levels are set
# through Prefect's PREFECT_LOGGING_HANDLERS_<NAME>_LEVEL overrides, read at setup_logging().
CONSOLE_HANDLERS = ("console", "console_flow_runs", "console_task_runs")


def quiet_console(environ: dict[str, str] | os._Environ[str], level: str = "WARNING") -> None:
    """The CLI's terminal shows warnings and errors only, while run logs still reach the API
    at INFO: set the console handlers' level, leave PREFECT_LOGGING_LEVEL (the loggers' level,
    which gates the API handler too) alone. A user's own settings win."""
    for name in CONSOLE_HANDLERS:
        environ.setdefault(f"PREFECT_LOGGING_HANDLERS_{name.upper()}_LEVEL", level)


class DropRoutineStates(logging.Filter):
    """Drops Prefect's "Finished in state Completed()" line of each task run: it was ~40 % of
    a build's log and says what the task-run list already shows (every task run's state).
    Any other final state (Failed, Crashed, Cancelled) and the flow run's own line stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        return not msg.startswith("Finished in state Completed(")


_FILTER = DropRoutineStates()


def install_log_filters() -> None:
    """Attach the filter to the task-run logger (idempotent). Prefect's engine logs through
    `prefect.task_runs`; a logger filter sees records created on that logger, before any of
    its handlers (console or API), so it works however logging was configured."""
    logger = logging.getLogger("prefect.task_runs")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)


# -- names -----------------------------------------------------------------------------------

# Prefect's generated flow-run names: two lowercase words (coolname), e.g. "crimson-kangaroo".
_GENERATED_NAME = re.compile(r"^[a-z]+-[a-z]+$")


def default_run_name(settings: Any, now: datetime | None = None) -> str:
    """`<input file stem>-<UTC date and time>`, e.g. `prompts-2026-12-02-0300`; a partition
    run gets `-p1of4`. Two nightly builds differ by date, two inputs by name."""
    if isinstance(settings, Mapping):
        instructions = settings.get("instructions")
        partition, partitions = settings.get("partition"), settings.get("partitions", 1)
    else:
        instructions = getattr(settings, "instructions", None)
        partition = getattr(settings, "partition", None)
        partitions = getattr(settings, "partitions", 1)
    stem = Path(str(instructions)).stem if instructions else "resume"
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%d-%H%M")
    name = f"{stem}-{stamp}"
    if partition is not None:
        name += f"-p{partition}of{partitions}"
    return name


def build_run_name() -> str:
    """The flow's `flow_run_name`: Prefect calls it when a run starts. A name somebody chose
    (the CLI's --run-name, a partition parent's `partition-1-of-2`, a name typed in the UI)
    is kept; only Prefect's generated two-word names are replaced."""
    from prefect.runtime import flow_run

    current = str(flow_run.name or "")
    if current and not _GENERATED_NAME.match(current):
        return current
    settings = (flow_run.parameters or {}).get("settings") or {}
    return default_run_name(settings)


def batch_label(ids: Sequence[int]) -> str:
    """`#1-#50`: the batch's first and last instruction row ids (what the batch log line and
    `longwriter stats` use)."""
    return f"#{ids[0]}-#{ids[-1]}" if len(ids) > 1 else f"#{ids[0]}"


def redact_url(url: str) -> str:
    """A URL fit for a log line or an artifact: no user:password@, no query values (some
    gateways take the key as `?key=`)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    if parts.username or parts.password:
        host = "***@" + host
    query = "&".join(
        f"{kv.partition('=')[0]}=***" if "=" in kv else kv for kv in parts.query.split("&") if kv
    )
    return urlunsplit((parts.scheme, host, parts.path, query, ""))


# -- rejections ------------------------------------------------------------------------------


def _where(uid: str | None, source: str | None, line_no: int | None) -> str:
    """How a person finds the record: the input's own id, and its file and line."""
    at = (
        f"{Path(source).name}:{line_no}"
        if source and line_no
        else (Path(source).name if source else "")
    )
    own = uid if uid and not uid.startswith("sha-") else None  # sha-: no id in the input
    if own and at:
        return f"{own} ({at})"
    return own or at or "?"


def batch_rejections(store: Store, instruction_ids: Sequence[int]) -> tuple[str, int, list[str]]:
    """For a batch's log: which inputs it holds (`ids a..b` or `in.jsonl lines 2-51`), how
    many of its instructions were rejected, and one line per rejection, oldest row first,
    with the input's id (or file and line), the stage, reason code and detail; capped, with
    a count of the rest."""
    from sqlmodel import col, select

    from storage.models import Instruction, Rejection

    ids = list(instruction_ids)
    with store.session() as s:
        insts = s.exec(
            select(Instruction).where(col(Instruction.id).in_(ids)).order_by(col(Instruction.id))
        ).all()
        rows = s.exec(
            select(Rejection, Instruction)
            .join(Instruction, col(Instruction.id) == col(Rejection.instruction_id))
            .where(col(Rejection.instruction_id).in_(ids))
            .order_by(col(Rejection.instruction_id), col(Rejection.id))
        ).all()
    lines = [
        f"instruction {_where(inst.uid, inst.input_file, inst.line_no)} rejected at "
        f"{r.stage}: {r.reason}{_detail(r.detail)}"
        for r, inst in rows
    ]
    return _inputs(insts), len({r.instruction_id for r, _ in rows}), _capped(lines)


def _inputs(insts: Sequence[Any]) -> str:
    """The batch's inputs as a person would look them up: the input ids' range when the
    records had ids, else the file and line range."""
    if not insts:
        return "no inputs"
    first, last = insts[0], insts[-1]
    if not first.uid.startswith("sha-") and not last.uid.startswith("sha-"):
        return f"ids {first.uid}..{last.uid}" if len(insts) > 1 else f"id {first.uid}"
    if first.input_file and first.line_no:
        where = Path(first.input_file).name
        if len(insts) > 1 and last.line_no and last.input_file == first.input_file:
            return f"{where} lines {first.line_no}-{last.line_no}"
        return f"{where}:{first.line_no}"
    return f"{len(insts)} inputs"


def ingest_rejection_lines(store: Store, after_id: int) -> list[str]:
    """The records this ingest refused (rows after `after_id`), with file, line and reason."""
    from sqlmodel import col, select

    from storage.models import Rejection

    with store.session() as s:
        rows = s.exec(
            select(Rejection)
            .where(Rejection.stage == "ingest", col(Rejection.id) > after_id)
            .order_by(col(Rejection.id))
        ).all()
    lines = [
        f"input {_where(None, r.source, r.line_no)} rejected at ingest: "
        f"{r.reason}{_detail(r.detail)}"
        for r in rows
    ]
    return _capped(lines)


def last_rejection_id(store: Store) -> int:
    from sqlalchemy import func
    from sqlmodel import select

    from storage.models import Rejection

    with store.session() as s:
        return int(s.exec(select(func.max(Rejection.id))).one() or 0)


def _detail(detail: str | None) -> str:
    return f": {' '.join(detail.split())[:200]}" if detail else ""


def _capped(lines: list[str]) -> list[str]:
    if len(lines) <= MAX_LOGGED_REJECTIONS:
        return lines
    rest = len(lines) - MAX_LOGGED_REJECTIONS
    return lines[:MAX_LOGGED_REJECTIONS] + [f"... and {rest} more (longwriter stats)"]


# -- progress --------------------------------------------------------------------------------


def seed_progress(store: Store, ids: Sequence[int], progress: Progress) -> None:
    """What a resumed build had already done for its instructions (plans and paragraphs
    stored by an earlier run), so "paragraphs written of planned" starts where it is."""
    from sqlalchemy import func
    from sqlmodel import col, select

    from storage.models import Paragraph, Plan

    plans = steps = paragraphs = 0
    with store.session() as s:
        for i in range(0, len(ids), 500):  # SQLite caps bound parameters per statement
            chunk = list(ids[i : i + 500])
            n, total = s.exec(
                select(func.count(), func.coalesce(func.sum(Plan.n_steps), 0)).where(
                    col(Plan.instruction_id).in_(chunk)
                )
            ).one()
            plans += int(n)
            steps += int(total)
            paragraphs += int(
                s.exec(select(func.count()).where(col(Paragraph.instruction_id).in_(chunk))).one()
            )
    progress.plans += plans
    progress.paragraphs_planned += steps
    progress.paragraphs_resumed += paragraphs


def paragraphs_written(progress: Progress) -> int:
    return progress.paragraphs_resumed + progress.paragraphs


def percent_done(progress: Progress) -> float:
    """Share of the build's work done, in LLM-call-sized units: one plan per instruction plus
    its paragraphs. Instructions not planned yet count the average plan's paragraphs, so the
    bar moves with every paragraph instead of only when whole instructions finish."""
    total = progress.instructions_total
    if total <= 0:
        return 100.0
    avg_steps = progress.paragraphs_planned / progress.plans if progress.plans else 0.0
    unplanned = max(0, total - progress.plans - progress.rejected)
    est_paragraphs = progress.paragraphs_planned + unplanned * avg_steps
    units = total + est_paragraphs
    done = min(total, progress.plans + progress.rejected) + paragraphs_written(progress)
    by_work = 100.0 * done / units if units else 0.0
    by_items = 100.0 * progress.instructions_done / total
    return round(min(100.0, max(by_work, by_items)), 1)


def progress_line(progress: Progress) -> str:
    """The progress artifact's description: the numbers behind the bar."""
    return (
        f"paragraphs {paragraphs_written(progress)}/{progress.paragraphs_planned} planned · "
        f"words {progress.words} · accepted {progress.accepted} · rejected {progress.rejected}"
        f" · instructions {progress.instructions_done}/{progress.instructions_total}"
    )


def progress_table(
    progress: Progress, stats: ClientStats | None, started: float
) -> list[dict[str, Any]]:
    """The live table artifact: one row per figure, so the UI shows a two-column table."""
    rows: list[tuple[str, Any]] = [
        ("instructions finished", f"{progress.instructions_done} / {progress.instructions_total}"),
        ("plans", progress.plans),
        (
            "paragraphs written / planned",
            f"{paragraphs_written(progress)} / {progress.paragraphs_planned}",
        ),
        ("words written", progress.words),
        ("accepted", progress.accepted),
        ("rejected", progress.rejected),
        ("LLM calls (new / from store)", f"{progress.calls} / {progress.cached_calls}"),
        ("completion tokens/s", round(progress.tokens_per_s(), 1)),
    ]
    if stats is not None:
        faults = {k: v for k, v in sorted(stats.by_status.items()) if k != "200"}
        rows += [
            ("HTTP requests", stats.requests),
            ("retries", stats.retries),
            ("HTTP errors", ", ".join(f"{k}×{v}" for k, v in faults.items()) or "none"),
        ]
    rows.append(("elapsed", f"{time.monotonic() - started:.0f} s"))
    return [{"metric": k, "value": str(v)} for k, v in rows]


# -- retries ---------------------------------------------------------------------------------


@dataclass
class RetryWatch:
    """Turns the client's running counters into log lines as faults happen: an INFO line at
    most every RETRY_LOG_EVERY_S while retries grow, and a WARNING when, over a window of at
    least `min_requests` requests, the retry share or the 429 share reaches its threshold
    (once per crossing: it re-arms when a later window falls back below)."""

    stats: ClientStats
    retry_share: float = RETRY_WARN_SHARE
    throttle_share: float = THROTTLE_WARN_SHARE
    min_requests: int = WARN_MIN_REQUESTS
    every_s: float = RETRY_LOG_EVERY_S
    _last: tuple[int, int, dict[str, int]] = (0, 0, {})  # at the last INFO line
    _window: tuple[int, int, int] = (0, 0, 0)  # requests, retries, 429s at the window's start
    _last_t: float = field(default_factory=lambda: float("-inf"))
    _warned_retry: bool = False
    _warned_429: bool = False

    def check(self, now: float | None = None, final: bool = False) -> list[tuple[int, str]]:
        """(level, message) pairs to log now; `final` flushes whatever has not been said."""
        now = time.monotonic() if now is None else now
        if not final and now - self._last_t < self.every_s:
            return []
        req0, ret0, by0 = self._last
        req, ret, by = self.stats.requests, self.stats.retries, dict(self.stats.by_status)
        d_req, d_ret = req - req0, ret - ret0
        if d_ret <= 0:
            return []
        self._last, self._last_t = (req, ret, by), now
        delta = {k: v - by0.get(k, 0) for k, v in by.items() if k != "200"}
        delta = {k: v for k, v in sorted(delta.items()) if v > 0}
        other = max(0, d_ret - sum(delta.values()))
        kinds = [f"HTTP {k}×{v}" for k, v in delta.items()]
        if other:
            kinds.append(f"connection/timeout/bad body ×{other}")
        out: list[tuple[int, str]] = [
            (
                logging.INFO,
                f"LLM retries: {d_ret} in the last {d_req} requests ({', '.join(kinds)}); "
                f"{ret} retries in {req} requests so far",
            )
        ]
        return out + self._warnings(req, ret, by.get("429", 0))

    def _warnings(self, req: int, ret: int, throttled: int) -> list[tuple[int, str]]:
        w_req, w_ret, w_429 = self._window
        n = req - w_req
        if n < self.min_requests:
            return []  # too few requests for a share to mean anything: the window grows
        self._window = (req, ret, throttled)
        out: list[tuple[int, str]] = []
        share, share_429 = (ret - w_ret) / n, (throttled - w_429) / n
        if share >= self.retry_share and not self._warned_retry:
            out.append(
                (
                    logging.WARNING,
                    f"LLM retry rate {share:.0%} over the last {n} requests (threshold "
                    f"{self.retry_share:.0%}): the endpoint is failing calls; the build goes "
                    "on, slower",
                )
            )
        if share_429 >= self.throttle_share and not self._warned_429:
            out.append(
                (
                    logging.WARNING,
                    f"HTTP 429 on {share_429:.0%} of the last {n} requests (threshold "
                    f"{self.throttle_share:.0%}): the endpoint is rate-limiting; lower "
                    "--concurrency",
                )
            )
        self._warned_retry = share >= self.retry_share
        self._warned_429 = share_429 >= self.throttle_share
        return out


# -- summary ---------------------------------------------------------------------------------


def run_facts(store: Store, out_dir: str | None) -> dict[str, Any]:
    """Summary fields a person checks first (the flow adds the wall time): the models and
    endpoints that made the stored calls (redacted), the output folder and the build report
    when there is one."""
    from sqlalchemy import func
    from sqlmodel import select

    from storage.models import LLMCall

    with store.session() as s:
        models = s.exec(select(LLMCall.model, func.count()).group_by(LLMCall.model)).all()
        endpoints = s.exec(select(LLMCall.endpoint, func.count()).group_by(LLMCall.endpoint)).all()
    report = Path(out_dir) / "report.html" if out_dir else None
    by_endpoint: dict[str, int] = {}
    for e, n in endpoints:
        if e:  # two raw URLs can redact to one: add their counts
            by_endpoint[redact_url(str(e))] = by_endpoint.get(redact_url(str(e)), 0) + int(n)
    return {
        "models": {str(m): int(n) for m, n in models},
        "endpoints": by_endpoint,
        "out_dir": str(Path(out_dir).resolve()) if out_dir else None,
        "report_html": str(report.resolve()) if report and report.is_file() else None,
    }
