"""`longwriter build --dry-run`: forecast the calls, tokens and cost of a build before anything
is spent.

Pure core: for each instruction still to build, the expected plan (its `length`, or a default
piece size, cut into paragraphs of a typical size), then the real prompts the factory would
send, rendered with placeholder text of the expected size standing in for the plan and the
paragraphs written so far, and counted with the factory's own `estimate_tokens`. AgentWrite
re-sends the text so far at every step, so input tokens grow with the square of the number of
paragraphs; rendering the real prompts (context budget included) is what makes that exact.
Instructions already planned use their stored plan and paragraphs.

The token estimate is the factory's conservative one (about 3 characters per token for Latin
text, 1.5 tokens per CJK character): real BPE tokenizers count about a quarter fewer tokens on
English prose, so the forecast errs on the expensive side. Not modelled: continuations of
paragraphs cut at max_tokens, retries, and plans a model makes longer or shorter than asked.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from storage.models import InstructionStatus
from tasks.flags import derive
from tasks.llm.endpoints import EMBEDDED_CONTEXT_WINDOW, REMOTE_CONTEXT_WINDOW, split_urls
from tasks.plan import (
    TYPICAL_STEP_WORDS,
    PlanStep,
    build_plan_request,
    format_step,
    min_steps_for,
    steps_from_json,
)
from tasks.settings import BUILD, BUILD_FLAGS, DRY_RUN_FLAGS, BuildSettings, DryRunSettings
from tasks.wordcount import estimate_from_counts, text_counts
from tasks.write import (
    ContextBudget,
    build_write_request,
    estimate_tokens,
    paragraph_max_tokens,
)

# Placeholder prose of ordinary English shape (about 6 characters per word with spaces and
# punctuation) and of common Chinese characters: only its size matters.
_EN_TEXT = (
    "The harbour was quiet in the early morning, and the keeper walked along the stone wall "
    "to check the ropes before the boats went out. Years of weather had worn the steps "
    "smooth, yet every family in the town still remembered who had built them and why. "
)
_ZH_TEXT = (
    "清晨的港口很安静，守塔人沿着石墙检查缆绳，然后渔船才出海。"
    "多年的风雨把台阶磨得光滑，镇上的每户人家仍记得是谁修建了它们以及为什么。"
)
_EN_WORDS = _EN_TEXT.split()
_CJK_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def placeholder_text(words: int, lang: str) -> str:
    """Text of `words` words (CJK characters for Chinese), the size of a real paragraph."""
    if words <= 0:
        return ""
    if lang == "zh":
        reps = words // len(_CJK_RE.findall(_ZH_TEXT)) + 1
        out: list[str] = []
        n = 0
        for ch in _ZH_TEXT * reps:
            out.append(ch)
            n += bool(_CJK_RE.match(ch))
            if n >= words:
                break
        return "".join(out)
    reps = words // len(_EN_WORDS) + 1
    return " ".join((_EN_WORDS * reps)[:words])


def _main_point(index: int, lang: str) -> str:
    if lang == "zh":
        return f"第{index}部分：" + placeholder_text(30, "zh")
    return f"Part {index}: " + placeholder_text(24, "en")


# -- configuration and results ----------------------------------------------------------------


@dataclass(frozen=True)
class ForecastConfig:
    """What the forecast assumes; `forecast_config` derives it from a build's settings."""

    min_words: int = BUILD.min_words
    # Words of a piece whose instruction gives no length (None: min_words, what the plan
    # prompt asks for at least).
    default_words: int | None = None
    paragraph_words: int = TYPICAL_STEP_WORDS
    context_window: int = REMOTE_CONTEXT_WINDOW
    max_paragraph_tokens: int = BUILD.max_paragraph_tokens
    json_plan: bool = BUILD.json_plan
    json_style: str = "json_schema"
    max_steps: int = BUILD.max_paragraphs
    price_in: float | None = None  # USD per million input (prompt) tokens
    price_out: float | None = None  # USD per million output (completion) tokens
    # USD per million cached input tokens (OpenAI: a prefix of 1,024+ tokens seen recently);
    # None: cached tokens are priced as input.
    price_cached_in: float | None = None


# OpenAI caches a prompt prefix of at least this many tokens, in steps of 128 (openai-cookbook
# Prompt_Caching_201): AgentWrite's write calls of one instruction share the instruction, the
# plan and the text so far, so most of their input is such a prefix.
CACHE_MIN_TOKENS = 1024
CACHE_STEP_TOKENS = 128


def cached_tokens(shared_tokens: int) -> int:
    """Tokens of a shared prefix that an OpenAI-style prefix cache serves."""
    if shared_tokens < CACHE_MIN_TOKENS:
        return 0
    return shared_tokens // CACHE_STEP_TOKENS * CACHE_STEP_TOKENS


@dataclass(frozen=True)
class PendingInstruction:
    """What the forecast needs of one instruction still to build."""

    prompt: str
    length: int | None
    lang: str = "en"
    plan: tuple[PlanStep, ...] | None = None  # stored plan, when already planned
    written: tuple[str, ...] = ()  # stored paragraphs, when partly written


@dataclass
class StageTotals:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, calls: int, prompt: int, completion: int) -> None:
        self.calls += calls
        self.prompt_tokens += prompt
        self.completion_tokens += completion


@dataclass
class Forecast:
    instructions: int = 0
    paragraphs: int = 0
    words: int = 0
    plan: StageTotals = field(default_factory=StageTotals)
    write: StageTotals = field(default_factory=StageTotals)
    price_in: float | None = None
    price_out: float | None = None
    price_cached_in: float | None = None
    # Input tokens a prefix cache would serve: each write prompt's prefix shared with the
    # instruction's previous write prompt (the plan call shares too little to count).
    cached_prompt_tokens: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return self.plan.calls + self.write.calls

    @property
    def prompt_tokens(self) -> int:
        return self.plan.prompt_tokens + self.write.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self.plan.completion_tokens + self.write.completion_tokens

    @property
    def cost_in(self) -> float | None:
        if self.price_in is None:
            return None
        if self.price_cached_in is None:
            return self.prompt_tokens * self.price_in / 1e6
        fresh = self.prompt_tokens - self.cached_prompt_tokens
        return (fresh * self.price_in + self.cached_prompt_tokens * self.price_cached_in) / 1e6

    @property
    def cost_out(self) -> float | None:
        return None if self.price_out is None else self.completion_tokens * self.price_out / 1e6

    @property
    def cost(self) -> float | None:
        parts = [c for c in (self.cost_in, self.cost_out) if c is not None]
        return sum(parts) if parts else None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            calls=self.calls,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cost_in_usd=self.cost_in,
            cost_out_usd=self.cost_out,
            cost_usd=self.cost,
        )
        return d


# -- the forecast -----------------------------------------------------------------------------


def expected_steps(length: int | None, cfg: ForecastConfig) -> list[int]:
    """Word counts of the plan the factory asks for: the target cut into paragraphs of about
    `paragraph_words`, never fewer than the plan prompt's minimum."""
    target = length or cfg.default_words or cfg.min_words or cfg.paragraph_words
    n = max(min_steps_for(target), math.ceil(target / max(cfg.paragraph_words, 1)))
    n = max(1, min(cfg.max_steps, n))
    base, extra = divmod(target, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


@lru_cache(maxsize=4096)
def _plan_shape(
    length: int | None, lang: str, cfg: ForecastConfig
) -> tuple[int, int, int, tuple[int, ...]]:
    """(prompt chars, prompt CJK chars, completion tokens, step words) of the plan call with
    an empty instruction; the instruction's own counts are added per instruction."""
    words = tuple(expected_steps(length, cfg))
    req = build_plan_request(
        "",
        length,
        cfg.min_words,
        json_mode=cfg.json_plan,
        json_style=cfg.json_style,
        max_steps=cfg.max_steps,
    )
    chars, cjk = text_counts(req.messages[-1][1])
    steps = [PlanStep(_main_point(i, lang), w) for i, w in enumerate(words, start=1)]
    if cfg.json_plan:
        answer = json.dumps(
            {
                "paragraphs": [
                    {"main_point": s.main_point, "word_count": s.word_count} for s in steps
                ]
            },
            ensure_ascii=False,
        )
    else:
        answer = "\n".join(format_step(i, s) for i, s in enumerate(steps, start=1))
    return chars, cjk, estimate_tokens(answer), words


def _write_calls(
    instruction: str,
    steps: Sequence[PlanStep],
    written: Sequence[str],
    lang: str,
    cfg: ForecastConfig,
) -> list[tuple[int, int, int, int, int]]:
    """Per remaining paragraph: (prompt chars, prompt CJK, completion tokens, tokens of room
    left before the context budget would trim the text so far, tokens of the prefix shared
    with the previous write prompt), from the real write prompts with placeholder
    paragraphs."""
    budget = ContextBudget(cfg.context_window)
    text = list(written)
    out = []
    previous = ""
    for step in range(len(text) + 1, len(steps) + 1):
        req = build_write_request(
            instruction,
            list(steps),
            text,
            step,
            lang=lang,
            budget=budget,
            max_paragraph_tokens=cfg.max_paragraph_tokens,
        )
        content = req.messages[-1][1]
        chars, cjk = text_counts(content)
        paragraph = placeholder_text(steps[step - 1].word_count, lang)
        completion = min(estimate_tokens(paragraph), req.max_tokens or 1 << 30)
        asked = paragraph_max_tokens(steps[step - 1].word_count, lang, cfg.max_paragraph_tokens)
        room = budget.prompt_budget(asked) - estimate_from_counts(chars, cjk)
        shared = os.path.commonprefix([previous, content]) if previous else ""
        out.append((chars, cjk, completion, room, estimate_tokens(shared) if shared else 0))
        previous = content
        text.append(paragraph)
    return out


@lru_cache(maxsize=4096)
def _write_shape(words: tuple[int, ...], lang: str, cfg: ForecastConfig) -> tuple[Any, ...]:
    steps = [PlanStep(_main_point(i, lang), w) for i, w in enumerate(words, start=1)]
    return tuple(_write_calls("", steps, (), lang, cfg))


def forecast(instructions: Iterable[PendingInstruction], cfg: ForecastConfig) -> Forecast:
    """Calls and tokens of building `instructions`: plan (unless stored) and every paragraph
    not yet written."""
    fc = Forecast(
        price_in=cfg.price_in, price_out=cfg.price_out, price_cached_in=cfg.price_cached_in
    )
    for inst in instructions:
        fc.instructions += 1
        i_chars, i_cjk = text_counts(inst.prompt)
        if inst.plan is None:
            p_chars, p_cjk, p_out, words = _plan_shape(inst.length, inst.lang, cfg)
            fc.plan.add(1, estimate_from_counts(p_chars + i_chars, p_cjk + i_cjk), p_out)
            shape = _write_shape(words, inst.lang, cfg)
            # The instruction adds its size to every prompt, unless a prompt is so long that
            # the context budget would start trimming the text so far: render those exactly.
            i_tokens = estimate_from_counts(i_chars, i_cjk)
            if all(room - i_tokens > 4 for *_, room, _shared in shape):
                # The instruction sits in the shared prefix of every write prompt after the
                # first, so it adds to the shared part too.
                calls = [
                    (c + i_chars, k + i_cjk, out, shared + i_tokens if shared else 0)
                    for c, k, out, _, shared in shape
                ]
            else:
                steps = [PlanStep(_main_point(i, inst.lang), w) for i, w in enumerate(words, 1)]
                calls = [
                    (c, k, out, shared)
                    for c, k, out, _, shared in _write_calls(inst.prompt, steps, (), inst.lang, cfg)
                ]
            fc.words += sum(words)
        else:
            calls = [
                (c, k, out, shared)
                for c, k, out, _, shared in _write_calls(
                    inst.prompt, inst.plan, inst.written, inst.lang, cfg
                )
            ]
            fc.words += sum(s.word_count for s in inst.plan[len(inst.written) :])
        fc.paragraphs += len(calls)
        fc.write.add(
            len(calls),
            sum(estimate_from_counts(c, k) for c, k, *_ in calls),
            sum(o for _, _, o, _ in calls),
        )
        fc.cached_prompt_tokens += sum(cached_tokens(shared) for *_, shared in calls)
    return fc


def format_forecast(fc: Forecast, cfg: ForecastConfig) -> str:
    def m(n: int) -> str:
        return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"

    lines = [
        "dry run: nothing was sent to a model",
        f"instructions to build  {fc.instructions:,}",
        f"LLM calls              {fc.calls:,} (plan {fc.plan.calls:,}, write {fc.write.calls:,})",
        f"tokens in / out        {m(fc.prompt_tokens)} / {m(fc.completion_tokens)}"
        f"  ({fc.prompt_tokens / max(fc.completion_tokens, 1):.1f} in per out)",
        f"expected words         {fc.words:,} in {fc.paragraphs:,} paragraphs",
        f"cacheable input        {m(fc.cached_prompt_tokens)} "
        f"({fc.cached_prompt_tokens / max(fc.prompt_tokens, 1):.0%} of input: prefixes of "
        f"{CACHE_MIN_TOKENS}+ tokens shared with the previous write call)",
    ]
    if fc.cost is not None:
        parts = []
        if fc.cost_in is not None:
            cached = (
                f", cached at ${cfg.price_cached_in}/M" if cfg.price_cached_in is not None else ""
            )
            parts.append(f"${fc.cost_in:,.2f} in (at ${cfg.price_in}/M{cached})")
        if fc.cost_out is not None:
            parts.append(f"${fc.cost_out:,.2f} out (at ${cfg.price_out}/M)")
        lines.append(f"cost                   ${fc.cost:,.2f} = " + " + ".join(parts))
    else:
        lines.append("cost                   (give --price-in/--price-out in USD per M tokens)")
    default = cfg.default_words or cfg.min_words
    lines.append(
        f"assumes                ~{cfg.paragraph_words} words per paragraph, {default} words "
        "when an instruction gives no length, the factory's token estimate (~3 chars per "
        "token: errs high), no continuations or retries"
    )
    lines += fc.notes
    return "\n".join(lines)


# -- instructions from a file and the store (reads only) ---------------------------------------


def pending_from_store(
    db_url: str, limit: int | None = None
) -> tuple[list[PendingInstruction], int, int]:
    """What an existing store still has to build, as the build scopes it (`--limit N` takes
    the first N instructions by id, finished or not): the unfinished instructions with their
    stored plan and paragraphs, how many in scope have no calls left, and how many are in scope. A
    store that does not exist yet holds nothing (and is not created)."""
    from storage.store import Store, normalize_db_url

    url = normalize_db_url(db_url)
    if url.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        path = make_url(url).database
        if path and path != ":memory:" and not Path(path).expanduser().exists():
            return [], 0, 0
    store = Store(url)
    try:
        scope = store.instruction_ids(list(InstructionStatus), limit)
        in_scope = set(scope)
        todo = [
            i
            for i in store.instruction_ids((InstructionStatus.PENDING, InstructionStatus.PLANNED))
            if i in in_scope
        ]
        out = []
        for st in store.load_states(todo):
            plan = tuple(steps_from_json(st.plan.steps_json)) if st.plan else None
            out.append(
                PendingInstruction(
                    st.instruction.prompt,
                    st.instruction.length,
                    st.instruction.lang,
                    plan,
                    tuple(p.text for p in st.paragraphs) if plan else (),
                )
            )
        # Written instructions only wait for the filter: in scope, no calls left.
        return out, len(scope) - len(todo), len(scope)
    finally:
        store.close()


def pending_from_file(
    path: Path, known_hashes: set[str] | None = None, decontaminate: bool = True
) -> tuple[list[PendingInstruction], int]:
    """Instructions ingest would accept from `path` (nothing is stored) and how many it would
    reject."""
    from tasks.ingest import Decontaminator, ingest_records, read_records

    known = {h: (0, "") for h in known_hashes or set()}
    decon = Decontaminator.from_files() if decontaminate else None
    result = ingest_records(read_records(path), str(path.resolve()), known, decon)
    return (
        [PendingInstruction(r.prompt, r.length, r.lang) for r in result.instructions],
        len(result.rejections),
    )


# -- the `--dry-run` of `longwriter build` -----------------------------------------------------


def add_dry_run_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `longwriter build` for the forecast (the build parser adds these)."""
    DRY_RUN_FLAGS.add_to(p)


def forecast_config(settings: BuildSettings, dry: DryRunSettings) -> ForecastConfig:
    """The forecast of the build these settings describe: the build's fields of the same
    names, the context window and JSON dialect its endpoints would get, the prices."""
    urls = split_urls(settings.base_urls) or split_urls([os.environ.get("LONGWRITER_BASE_URL", "")])
    remote = bool(urls)
    return derive(
        ForecastConfig,
        settings,
        default_words=dry.expect_words,
        context_window=settings.context_window
        or (REMOTE_CONTEXT_WINDOW if remote else EMBEDDED_CONTEXT_WINDOW),
        json_style="json_schema" if remote else "llama_cpp",
        max_steps=settings.max_paragraphs,
        price_in=dry.price_in,
        price_out=dry.price_out,
        price_cached_in=dry.price_cached_in,
    )


def config_from_args(args: argparse.Namespace) -> ForecastConfig:
    """The forecast config of a `longwriter build --dry-run ...` command line."""
    return forecast_config(BUILD_FLAGS.settings(args), DRY_RUN_FLAGS.settings(args))


def run_dry_run(args: argparse.Namespace, db_url: str) -> int:
    """`longwriter build --dry-run ...`: print the forecast; exit 0. Reads the instruction
    file and the store (if it exists) and writes nothing. The command line is read as the
    build reads it (BuildSettings), so the forecast is of the build that would run."""
    settings = BUILD_FLAGS.settings(args)
    dry = DRY_RUN_FLAGS.settings(args)
    cfg = forecast_config(settings, dry)
    limit = settings.limit
    pending, no_calls_left, in_scope = pending_from_store(db_url, limit)
    notes = []
    if settings.instructions:
        known: set[str] = set()
        if in_scope:
            from storage.store import Store

            store = Store(db_url)
            try:
                known = set(store.known_instructions())
            finally:
                store.close()
        new, rejected = pending_from_file(
            Path(settings.instructions), known, settings.decontaminate
        )
        notes.append(
            f"from {settings.instructions}: {len(new):,} new, {rejected:,} rejected at ingest"
        )
        if limit is not None:
            new = new[: max(0, limit - in_scope)]
        pending += new
    if no_calls_left:
        notes.append(f"in the store with no calls left (finished or written): {no_calls_left:,}")
    fc = forecast(pending, cfg)
    fc.notes += notes
    if dry.json_output:
        print(json.dumps(fc.as_dict(), indent=2))
    else:
        print(format_forecast(fc, cfg))
    return 0
