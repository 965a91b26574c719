"""What the stage tasks share during one run: the store, the LLM client, the settings and the
progress counters. Tasks get a runtime id (a plain string, so Prefect can hash and show task
arguments) and look the runtime up here; the client never becomes a task argument (it would
break Prefect's cache keys and is bound to the flow's event loop).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from storage.models import LLMCall, new_row
from storage.store import Store
from tasks.llm.client import ChatRequest, LLMClient, LLMError
from tasks.settings import BUILD
from tasks.signature_worker import SignatureWorker

# The stages' own configs, from the module that imports no stage: every stage imports this
# runtime, so it must import none of them (issue 14's cycle).
from tasks.stage_config import ContextBudget, FilterConfig, JudgeGate


@dataclass
class Progress:
    """Counters the terminal bar and the Prefect progress artifact read."""

    instructions_total: int = 0
    instructions_done: int = 0
    accepted: int = 0
    rejected: int = 0
    paragraphs: int = 0
    words: int = 0
    # Plans stored and the paragraphs they hold (this run's plus, via
    # flows.monitoring.seed_progress, a resumed build's earlier ones), and paragraphs an
    # earlier run wrote: the UI shows paragraphs written of planned.
    plans: int = 0
    paragraphs_planned: int = 0
    paragraphs_resumed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    cached_calls: int = 0
    started: float = field(default_factory=time.monotonic)

    def tokens_per_s(self) -> float:
        dt = time.monotonic() - self.started
        return self.completion_tokens / dt if dt > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "instructions_total": self.instructions_total,
            "instructions_done": self.instructions_done,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "paragraphs": self.paragraphs,
            "paragraphs_planned": self.paragraphs_planned,
            "words": self.words,
            "calls": self.calls,
            "cached_calls": self.cached_calls,
            "completion_tokens_per_s": round(self.tokens_per_s(), 1),
        }


@dataclass
class StageConfig:
    """Sampling and budget settings of the plan and write stages."""

    # Defaults: BuildSettings' (tasks/settings.py); the build derives it (flows.build).
    min_words: int = BUILD.min_words
    json_plan: bool = BUILD.json_plan
    json_style: str = "json_schema"  # or "llama_cpp" (see tasks.plan.response_format)
    plan_max_tokens: int = BUILD.plan_max_tokens
    plan_temperature: float = BUILD.plan_temperature
    write_temperature: float = BUILD.write_temperature
    max_paragraph_tokens: int = BUILD.max_paragraph_tokens
    max_continuations: int = BUILD.max_continuations
    # A paragraph that loops is written again with another seed up to this many times.
    max_resamples: int = BUILD.max_resamples
    # A plan that fails to parse or validate is asked for again with a new seed this many times.
    max_plan_resamples: int = BUILD.max_plan_resamples
    # Most paragraphs a plan may have (tasks.plan.MAX_STEPS unless capped): a cap bounds
    # the calls and words per sample, for a budget or a quick demo.
    max_plan_steps: int = BUILD.max_paragraphs
    # A paragraph under this share of its planned words is continued (up to max_continuations).
    min_paragraph_share: float = BUILD.min_paragraph_share
    context_window: int = ContextBudget.context_window  # tasks.settings.EMBEDDED_CONTEXT_WINDOW
    # Plan and paragraph quality checks (tasks.quality) on every draft.
    quality_checks: bool = BUILD.quality_checks
    # The write prompt: "paper" (AgentWrite's one message) or "turns" (a conversation, for
    # small models); the build resolves the setting's "auto" from the endpoints.
    write_prompt: str = "paper"
    # Instruction languages the writer is given (empty: all); see tasks.llm.endpoints.
    languages: tuple[str, ...] = ()
    extra_params: dict[str, Any] = field(default_factory=dict)  # e.g. frequency_penalty
    filters: FilterConfig = field(default_factory=FilterConfig)


@dataclass
class BuildRuntime:
    store: Store
    client: LLMClient
    config: StageConfig
    progress: Progress = field(default_factory=Progress)
    # Instruction chains in flight: a chain holds at most one call at a time, so capping chains
    # at the HTTP concurrency finishes samples progressively instead of starting every
    # instruction at once (a crash then leaves whole samples, not thousands of half-written ones).
    chain_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(16))
    budget: ContextBudget = field(default_factory=ContextBudget)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Set when a chain failed on the endpoint: the build is stopping, start no new chain.
    halted: bool = False
    # The optional judge gate (tasks.quality_gate): its settings, its client (None: the
    # writer's), and the judge calls in flight.
    judge_gate: JudgeGate | None = None
    judge_client: LLMClient | None = None
    judge_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(16))
    # Computes each accepted sample's near-duplicate signature beside the build, for the
    # export to read (tasks.signature_worker); None when the build exports nothing.
    signatures: SignatureWorker | None = None


async def in_chain_slot(rt: BuildRuntime, work: Coroutine[Any, Any, bool]) -> bool | None:
    """Run one instruction's chain under a chain slot; None when it was not started because
    another chain had failed on the endpoint. Without this, a slot freed by the failing chain
    let another batch's task start a fresh chain (and send calls) while the error was still
    travelling up to the flow."""
    async with rt.chain_slots:
        if rt.halted:
            work.close()
            return None
        try:
            return await work
        except LLMError:
            rt.halted = True
            # Calls already sent finish and are stored (LLMClient.shielded); none retries.
            rt.client.halt()
            raise


class RegisteredRuntime(Protocol):
    """What every run's shared state has: an id that its stage tasks receive."""

    id: str


R = TypeVar("R", bound=RegisteredRuntime)

# One registry for every command's runtime (build, pairs, eval): a stage task receives a
# runtime id and looks the runtime up by it, typed by the kind it expects.
_RUNTIMES: dict[str, RegisteredRuntime] = {}


def register(rt: RegisteredRuntime) -> str:
    _RUNTIMES[rt.id] = rt
    return rt.id


def unregister(runtime_id: str) -> None:
    _RUNTIMES.pop(runtime_id, None)


def get_runtime(runtime_id: str, kind: type[R]) -> R:
    """The runtime registered under `runtime_id`, checked to be a `kind`."""
    rt = _RUNTIMES.get(runtime_id)
    if rt is None:
        raise RuntimeError(
            f"runtime {runtime_id} is not registered in this process; stage tasks must run "
            "inside the flow that created it"
        )
    if not isinstance(rt, kind):
        raise TypeError(f"runtime {runtime_id} is a {type(rt).__name__}, not a {kind.__name__}")
    return rt


Item = TypeVar("Item")
Outcome = TypeVar("Outcome")


@dataclass(frozen=True)
class Stage(Generic[R, Item, Outcome]):
    """The stage contract: every stage (plan, write, filter, the judge gate, the eval's
    generation and judge, the pairs' variants) is a pure core (build request, parse, check)
    run over the store by this one batch driver. A batch task receives a runtime id and ids;
    the stage reads from the store which of them it still has to do (`todo`: so a rerun skips
    finished work), does each (`one`: store-first calls through `generate`, every outcome
    stored), concurrently, and returns how many outcomes `counts`. flows/stages.py makes
    each stage the Prefect task of its `name`; `task_retry`: the task is retried once on a
    failure that is not an LLM error (a database blip; the client already retried LLM faults)."""

    name: str
    runtime: type[R]
    todo: Callable[[R, list[Any]], Iterable[Item]]
    one: Callable[[R, Item], Awaitable[Outcome]]
    counts: Callable[[Outcome], bool] = bool
    task_retry: bool = True

    async def run_batch(self, runtime_id: str, ids: list[Any]) -> int:
        rt = get_runtime(runtime_id, self.runtime)
        outcomes = await gather_all(self.one(rt, item) for item in self.todo(rt, ids))
        return sum(1 for outcome in outcomes if self.counts(outcome))


def in_chain(
    work: Callable[[BuildRuntime, Item], Coroutine[Any, Any, bool]],
) -> Callable[[BuildRuntime, Item], Coroutine[Any, Any, bool]]:
    """A build stage whose item is an instruction's chain of calls (plan, write): each runs
    under a chain slot (`in_chain_slot`), and one that ends rejected counts as done."""

    async def one(rt: BuildRuntime, item: Item) -> bool:
        ok = await in_chain_slot(rt, work(rt, item))
        if ok is None:
            return False  # not started: the build is stopping
        if not ok:
            rt.progress.rejected += 1
            rt.progress.instructions_done += 1
        return ok

    return one


async def generate(
    store: Store, client: LLMClient, request: ChatRequest, progress: Progress | None = None
) -> LLMCall:
    """The call's stored output if a previous run paid for it, else call and store it before
    anyone uses it (invariant 1)."""
    key = client.key_for(request)
    cached = await store.aget_call(key)
    if cached is not None:
        if progress is not None:
            progress.cached_calls += 1
        return cached
    # Shielded: when the build stops (another chain failed, Ctrl-C), this call, already sent
    # and paid for, still finishes and is stored before the client closes (LLMClient.drain).
    return await client.shielded(_call_and_store(store, client, request, key, progress))


async def _call_and_store(
    store: Store, client: LLMClient, request: ChatRequest, key: str, progress: Progress | None
) -> LLMCall:
    result = await client.chat(request, key)
    call = new_row(
        LLMCall,
        key=key,
        stage=request.stage,
        model=result.model,
        prompt_version=request.prompt_version,
        content=result.content,
        finish_reason=result.finish_reason,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        latency_ms=result.latency_ms,
        attempts=result.attempts,
        endpoint=result.endpoint,
        reasoning=result.reasoning,
        cached_tokens=result.cached_tokens,
        reasoning_tokens=result.reasoning_tokens,
    )
    # Batched with the other chains' writes of this loop turn; returns once committed.
    await store.asave(call)
    if progress is not None:
        progress.calls += 1
        progress.prompt_tokens += result.prompt_tokens
        progress.completion_tokens += result.completion_tokens
    return call


async def gather_all(coros: Iterable[Coroutine[Any, Any, Any]]) -> list[Any]:
    """Run coroutines concurrently; the first fatal error cancels the rest (TaskGroup) and is
    raised as itself: callers match on its type (the CLI's one-line errors, the task retry
    condition that must not retry an LLM error), and a TaskGroup would wrap it in an
    ExceptionGroup that no `except LLMError` catches."""
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(c) for c in coros]
    except BaseExceptionGroup as group:
        raise primary_error(group) from group
    return [t.result() for t in tasks]


def primary_error(group: BaseExceptionGroup) -> BaseException:
    """The error to report from a group: the first LLM error, else the first error."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            stack[:0] = list(exc.exceptions)
        else:
            leaves.append(exc)
    return next((e for e in leaves if isinstance(e, LLMError)), leaves[0])


def retry_unless_llm_error(_task: Any, _run: Any, state: Any) -> bool:
    """Prefect retries a whole task only for non-LLM failures (e.g. a database blip): LLM
    faults were already retried by the client, so attempts never multiply.

    The engine hands over `Failed(data=exc)`; the exception is read from `data` because this
    runs inside the task engine's event loop, where `state.result()` returns an un-awaited
    coroutine instead of raising (so the condition was always False)."""
    exc = getattr(state, "data", None)
    return isinstance(exc, Exception) and not isinstance(exc, LLMError)
