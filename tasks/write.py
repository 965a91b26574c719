"""AgentWrite step 2: write the planned paragraphs in order, one call each.

Each call sees the instruction, the whole plan, the text so far and the current step, and
returns only the new paragraph. Pure core here: the request (with a context budget that keeps
the plan, the opening and the latest paragraphs when the text so far is too long, and says
what it left out), the marker cleaner, and the continuation request for a paragraph cut by
`finish_reason=length`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from prompts import prompt_version, render
from storage.models import DraftCheck, Instruction, InstructionStatus, Paragraph, new_row
from storage.store import InstructionState, Store
from tasks.flags import derive
from tasks.llm.client import (
    BadOutputError,
    ChatRequest,
    ContentPolicyError,
    ContextLengthError,
    LLMClient,
    ReasoningBudgetError,
)
from tasks.plan import PlanStep, steps_from_json
from tasks.quality import (
    KEEP,
    Cleaning,
    ParagraphContext,
    ParagraphReview,
    Verdict,
    review_paragraph,
)
from tasks.runtime import (
    BuildRuntime,
    Progress,
    Stage,
    generate,
    in_chain,
)
from tasks.settings import BUILD

# Defined in modules that import no stage (the runtime holds a ContextBudget); callers still
# read all three as tasks.write.*.
from tasks.stage_config import ContextBudget
from tasks.wordcount import (
    count_words,
    estimate_from_counts,
    estimate_tokens,
    paragraph_counts,
    repeated_sentence,
    repetition_share,
    text_counts,
)
from tasks.wordcount import join_paragraphs as join_paragraphs

# (characters, CJK characters) of a text (tasks.wordcount.text_counts): every estimate here is
# made from these, added up over the parts of a joined or templated text, so the text so far
# is never read again to size a request (issue 12); estimate_from_counts over the summed
# integers gives exactly estimate_tokens of the whole.
Counts = tuple[int, int]


def _joined_counts(parts: list[Counts]) -> Counts:
    """Counts of the parts joined by blank lines ("\n\n": two characters, no CJK)."""
    return sum(n for n, _ in parts) + 2 * max(len(parts) - 1, 0), sum(c for _, c in parts)


def fit_written_text(paragraphs: list[str], budget_tokens: int, keep_opening: int = 1) -> str:
    """The text so far, joined by blank lines, within `budget_tokens`. When it does not fit,
    keep the opening paragraph(s) and as many of the latest as fit, and mark the gap so the
    model knows text was elided (and does not restart the story)."""
    return _fit_written(paragraphs, budget_tokens, keep_opening)[0]


def _fit_written(
    paragraphs: list[str], budget_tokens: int, keep_opening: int = 1
) -> tuple[str, Counts]:
    """fit_written_text and the counts of the text it returns."""
    counts = [paragraph_counts(p) for p in paragraphs]
    full = _joined_counts(counts)
    if estimate_from_counts(*full) <= budget_tokens or not paragraphs:
        return "\n\n".join(paragraphs), full
    head = paragraphs[:keep_opening]
    head_counts = counts[:keep_opening]
    tail: list[str] = []
    tail_counts: list[Counts] = []
    used = sum(estimate_from_counts(*c) for c in head_counts) + 30
    for p, c in zip(
        reversed(paragraphs[keep_opening:]), reversed(counts[keep_opening:]), strict=True
    ):
        cost = estimate_from_counts(*c)
        if used + cost > budget_tokens:
            break
        tail.insert(0, p)
        tail_counts.insert(0, c)
        used += cost
    if used > budget_tokens or not tail:
        # Even the opening does not fit next to the latest paragraph: keep the latest one,
        # cut to the budget from its end (its end is what the next paragraph follows).
        last = paragraphs[-1]
        keep_chars = max(0, budget_tokens * 3 - 100)
        omitted_all = len(paragraphs) - 1
        note = f"[... {omitted_all} earlier paragraph(s) and the start of the last omitted ...]"
        cut = note + "\n\n" + last[-keep_chars:] if keep_chars else note
        return cut, text_counts(cut)  # a new string, at most a budget long: counted once
    first_omitted = keep_opening + 1
    last_omitted = len(paragraphs) - len(tail)
    if last_omitted >= first_omitted:
        span = (
            f"paragraph {first_omitted}"
            if first_omitted == last_omitted
            else f"paragraphs {first_omitted}-{last_omitted}"
        )
        gap = [f"[... {span} omitted here for length ...]"]
    else:
        gap = []
    parts_counts = head_counts + [text_counts(g) for g in gap] + tail_counts
    return "\n\n".join(head + gap + tail), _joined_counts(parts_counts)


# The paper prompt is rendered once per request with this in place of the text so far, then
# filled in: the skeleton (whose size decides how much text fits) and the request are the same
# page, and rendering it twice was a tenth of the factory's CPU per call (issue 12). The
# result is the very string `render("write", written=...)` gives (tests/tasks/test_write.py).
_WRITTEN_SLOT = "\x00written-so-far\x00"


@functools.cache
def _empty_written() -> str:
    """What prompts/write.j2 puts in place of `written` when nothing is written yet."""
    step = [PlanStep("x", 1)]
    page = render("write", instruction="i", steps=step, written=_WRITTEN_SLOT, current=1)
    empty = render("write", instruction="i", steps=step, written="", current=1)
    head, tail = page.split(_WRITTEN_SLOT)
    assert empty.startswith(head) and empty.endswith(tail), "write.j2's written slot moved"
    return empty[len(head) : len(empty) - len(tail)]


@functools.cache
def _empty_written_counts() -> Counts:
    return text_counts(_empty_written())


def written_slot_page(instruction: str, steps: list[PlanStep], current: int) -> str | None:
    """prompts/write.j2 with `_WRITTEN_SLOT` for the text so far; None when the instruction
    or the plan holds the placeholder itself (then the page is rendered as it is needed)."""
    if _WRITTEN_SLOT in instruction or any(_WRITTEN_SLOT in s.main_point for s in steps):
        return None
    return render(
        "write", instruction=instruction, steps=steps, written=_WRITTEN_SLOT, current=current
    )


def paragraph_max_tokens(word_count: int, lang: str, cap: int) -> int:
    """Token allowance for one paragraph: room for the planned words plus slack, so a
    paragraph that follows its plan never stops at the limit."""
    per_unit = 2.2 if lang == "zh" else 1.6
    return max(64, min(cap, int(word_count * per_unit) + 128))


WRITE_PROMPTS = ("paper", "turns")


def build_write_request(
    instruction: str,
    steps: list[PlanStep],
    written: list[str],
    current: int,
    *,
    lang: str,
    budget: ContextBudget,
    max_paragraph_tokens: int = BUILD.max_paragraph_tokens,
    temperature: float = BUILD.write_temperature,
    extra_params: dict[str, Any] | None = None,
    style: str = "paper",
) -> ChatRequest:
    """Request for paragraph `current` (1-based) given the paragraphs written before it.

    `style` "paper" is the AgentWrite prompt (prompts/write.j2: one message holding the
    instruction, the plan and the text so far); "turns" gives a small model the same inputs as
    a conversation (prompts/write_turns.j2), see `turn_messages`."""
    max_tokens = paragraph_max_tokens(steps[current - 1].word_count, lang, max_paragraph_tokens)
    if style == "turns":
        # `used`: sum(estimate_tokens(m["content"]) for m in messages), from counts.
        messages, used = _turn_messages(
            instruction, steps, written, current, budget.prompt_budget(max_tokens)
        )
        version = prompt_version("write_turns")
    else:
        page = written_slot_page(instruction, steps, current)
        skeleton = (
            page.replace(_WRITTEN_SLOT, _empty_written())
            if page is not None
            else render("write", instruction=instruction, steps=steps, written="", current=current)
        )
        skeleton_counts = text_counts(skeleton)  # instruction and plan: read once per call
        room = budget.prompt_budget(max_tokens) - estimate_from_counts(*skeleton_counts)
        text_so_far, so_far_counts = _fit_written(written, max(room, 0))  # ("", (0, 0)) for []
        if not text_so_far:
            content, counts = skeleton, skeleton_counts
        elif page is not None:
            content = page.replace(_WRITTEN_SLOT, text_so_far)
            # The skeleton and the content are the same pieces of the page joined by the
            # empty-text fill or by the text so far, once per slot: their counts differ by
            # the fills'.
            slots = page.count(_WRITTEN_SLOT)
            empty = _empty_written_counts()
            counts = (
                skeleton_counts[0] + slots * (so_far_counts[0] - empty[0]),
                skeleton_counts[1] + slots * (so_far_counts[1] - empty[1]),
            )
        else:
            content = render(
                "write", instruction=instruction, steps=steps, written=text_so_far, current=current
            )
            counts = text_counts(content)  # the rare page without a slot: read as it is
        messages = [{"role": "user", "content": content}]
        used = estimate_from_counts(*counts)
        version = prompt_version("write")
    # If even the skeleton crowds the window, give the answer what room is left: the server
    # would otherwise reject the call outright.
    spare = budget.context_window - budget.reserve_tokens - used
    max_tokens = max(64, min(max_tokens, spare))
    params = sampling_params(max_tokens, temperature, extra_params)
    return ChatRequest.of("write", messages, version, **params)


def _turn_points(steps: list[PlanStep]) -> list[str]:
    # "Write part 2: <point>. About 400 words.": a point's own closing stop would double up.
    return [s.main_point.strip().rstrip(".。;；:：") for s in steps]


def turn_messages(
    instruction: str,
    steps: list[PlanStep],
    written: list[str],
    current: int,
    budget_tokens: int,
) -> list[dict[str, str]]:
    """The "turns" prompt: a system line; for each written part, the ask for it and the
    paragraph as the writer's own answer; then the ask for part `current`. The first ask
    carries the instruction and the outline. When the text so far does not fit
    `budget_tokens`, part 1 and the latest parts are kept and the middle ones left out (each
    ask names its part, so the gap is visible), as `fit_written_text` does for the paper
    prompt; when not even the latest fits, its end is kept."""
    return _turn_messages(instruction, steps, written, current, budget_tokens)[0]


def _turn_messages(
    instruction: str,
    steps: list[PlanStep],
    written: list[str],
    current: int,
    budget_tokens: int,
) -> tuple[list[dict[str, str]], int]:
    """turn_messages, and the sum of its messages' estimate_tokens, from cached counts: the
    paragraphs are the same strings every call, and the asks the same text rendered again
    (hashing one is far cheaper than scanning it for CJK); only a cut answer is read anew."""
    points = _turn_points(steps)

    def tokens(text: str) -> int:  # estimate_tokens(text), of a text seen call after call
        return estimate_from_counts(*paragraph_counts(text))

    def cost(i: int) -> int:  # part i's paragraph
        return tokens(written[i - 1])

    def ask(i: int, first: bool) -> dict[str, str]:
        content = render(
            "write_turns",
            part="first" if first else "next",
            instruction=instruction,
            points=points,
            current=i,
            words=steps[i - 1].word_count,
        )
        return {"role": "user", "content": content}

    system = {"role": "system", "content": render("write_turns", part="system")}
    done = list(range(1, current))
    first_ask = ask(current, True)  # its size bounds the ask, whichever form it takes
    system_tokens = tokens(system["content"])
    first_ask_tokens = tokens(first_ask["content"])
    used = system_tokens + first_ask_tokens
    used += 20 * (len(done) + 1)  # the one-line asks
    opening: list[int] = []
    if done and used + cost(1) <= budget_tokens:
        opening = [1]  # the opening sets the voice and the story: kept first
        used += cost(1)
    kept: list[int] = []
    for i in reversed(done[1:]):  # then the latest parts: what the next part follows
        if used + cost(i) > budget_tokens:
            break
        kept.insert(0, i)
        used += cost(i)
    if len(done) > 1 and not kept and opening:
        # The latest part does not fit beside the opening: its end matters more.
        used -= cost(1)
        opening = []
    kept = opening + kept
    answers = {i: written[i - 1] for i in kept}
    answer_tokens = {i: cost(i) for i in kept}
    keep_chars = max(0, (budget_tokens - used) * 3)
    if done and not kept and keep_chars:
        last = done[-1]
        kept, answers = [last], {last: written[last - 1][-keep_chars:]}
        answer_tokens = {last: estimate_tokens(answers[last])}  # a new slice: read once
    messages = [system]
    total = system_tokens
    for n, i in enumerate(kept):
        asked = ask(i, n == 0)
        messages += [asked, {"role": "assistant", "content": answers[i]}]
        total += tokens(asked["content"]) + answer_tokens[i]
    final = ask(current, False) if kept else first_ask
    total += tokens(final["content"]) if kept else first_ask_tokens
    return messages + [final], total


def continuation_length(
    step: PlanStep, partial: str, cut: bool, lang: str, max_paragraph_tokens: int
) -> tuple[int, int]:
    """(words still wanted, max_tokens) of a continuation: half the step again when the
    paragraph was cut at max_tokens, else what it lacks of its planned words (50 at least)."""
    missing = step.word_count // 2 if cut else max(step.word_count - count_words(partial), 50)
    return missing, paragraph_max_tokens(missing, lang, max_paragraph_tokens)


def sampling_params(
    max_tokens: int, temperature: float, extra_params: dict[str, Any] | None
) -> dict[str, Any]:
    """A write call's sampling parameters: the budget and temperature, then the extras."""
    return {"max_tokens": max_tokens, "temperature": temperature, **(extra_params or {})}


def build_continue_turns_request(
    instruction: str,
    steps: list[PlanStep],
    written: list[str],
    current: int,
    partial: str,
    *,
    cut: bool,
    budget: ContextBudget,
    lang: str,
    max_paragraph_tokens: int = BUILD.max_paragraph_tokens,
    temperature: float = BUILD.write_temperature,
    extra_params: dict[str, Any] | None = None,
) -> ChatRequest:
    """Continue paragraph `current` in the "turns" prompt: the conversation so far, the
    partial paragraph as the writer's answer, and one line asking it to go on."""
    missing, max_tokens = continuation_length(
        steps[current - 1], partial, cut, lang, max_paragraph_tokens
    )
    room = budget.prompt_budget(max_tokens) - estimate_tokens(partial) - 40
    messages = turn_messages(instruction, steps, written, current, max(room, 0))
    messages += [
        {"role": "assistant", "content": partial},
        {
            "role": "user",
            "content": render("write_turns", part="continue", current=current, more_words=missing),
        },
    ]
    params = sampling_params(max_tokens, temperature, extra_params)
    return ChatRequest.of("write", messages, prompt_version("write_turns"), **params)


def build_continue_request(
    instruction: str,
    step: PlanStep,
    partial: str,
    *,
    cut: bool = True,
    lang: str,
    budget: ContextBudget,
    max_paragraph_tokens: int = BUILD.max_paragraph_tokens,
    temperature: float = BUILD.write_temperature,
    extra_params: dict[str, Any] | None = None,
) -> ChatRequest:
    """Continue a paragraph from where it stopped: `cut` when max_tokens stopped it, else
    because it ended well short of its planned words."""
    words = count_words(partial)
    _, max_tokens = continuation_length(step, partial, cut, lang, max_paragraph_tokens)
    room = budget.prompt_budget(max_tokens) - 400
    partial_fit = partial if estimate_tokens(partial) <= room else partial[-max(room, 64) * 3 :]
    content = render(
        "continue",
        instruction=instruction,
        main_point=step.main_point,
        partial=partial_fit,
        cut=cut,
        planned_words=step.word_count,
        words=words,
    )
    params = sampling_params(max_tokens, temperature, extra_params)
    return ChatRequest.of(
        "write", [{"role": "user", "content": content}], prompt_version("continue"), **params
    )


# -- cleaning -------------------------------------------------------------------------------

_CN_NUM = "零一二三四五六七八九十百两"
# A line that is only a section marker, optionally carrying the plan's fields.
_MARKER_LINE_RE = re.compile(
    r"^[ \t>#*_\-]*(?:"
    r"(?:paragraph|para\.?|section|part)\s*\d+"
    r"|段落\s*\d+"
    rf"|第\s*[\d{_CN_NUM}]+\s*(?:段|部分|节)"
    r")\s*(?:of\s*\d+)?[ \t*_]*[:：.\-–—)]?[ \t*_]*"
    r"(?:(?:main\s*point|主要内容|要点)\s*[:：].*?)?"
    r"(?:[-–—|]\s*(?:word\s*count|字数)\s*[:：].*)?[ \t*_]*$",
    re.IGNORECASE,
)
# A marker that prefixes a title or the paragraph's first sentence: drop only the marker.
_MARKER_PREFIX_RE = re.compile(
    r"^(?P<lead>[ \t>#*_]*)(?:"
    r"(?:paragraph|para\.?|section|part)\s*\d+"
    r"|段落\s*\d+"
    rf"|第\s*[\d{_CN_NUM}]+\s*(?:段|部分|节)"
    r")\s*(?:of\s*\d+)?[ \t*_]*[:：.\-–—)][ \t*_]*",
    re.IGNORECASE,
)
_META_LINE_RE = re.compile(
    r"^[ \t>*_(（\[]*(?:word\s*count|字数|main\s*point|主要内容)\s*[:：].*$", re.IGNORECASE
)


# The write and continue prompts' own section tags; small models echo them ("</partial> The
# island of Elba was ..."), and they must never reach a sample.
_PROMPT_TAG_RE = re.compile(r"</?(?:instruction|plan|written|partial)>[ \t]*", re.IGNORECASE)


def clean_paragraph(text: str) -> str:
    """Remove section markers and plan echoes the model added ("Paragraph 3:", "段落3",
    "Word Count: 600 words", the prompt's own <written> tags), keep any subtitle text that
    followed a marker."""
    lines = _PROMPT_TAG_RE.sub("", text).strip().splitlines()
    out: list[str] = []
    for line in lines:
        if _MARKER_LINE_RE.match(line) or _META_LINE_RE.match(line):
            continue
        m = _MARKER_PREFIX_RE.match(line)
        if m:
            rest = line[m.end() :].strip()
            if not rest:
                continue
            line = m.group("lead") + rest
        out.append(line)
    cleaned = "\n".join(out).strip()
    return re.sub(r"\n{3,}", "\n\n", cleaned)


def needs_continuation(text: str, finish: str | None, planned: int, min_share: float) -> bool:
    """Whether a paragraph needs another call: cut at max_tokens before reaching its planned
    words, or ended (stop) under `min_share` of them. A cut paragraph that already has its
    words is ended at a sentence instead (see trim_to_sentence): continuing it only makes a
    small model ramble on."""
    words = count_words(text)
    if finish == "length":
        return words < planned
    return words < min_share * planned


# Latin sentence ends need a space or the end after them ("3.5" is no end); CJK ones do not.
_SENTENCE_END_RE = re.compile(r"[.!?…][\"'”’）)\]]*(?=\s|$)|[。！？][”’）)\]]*")


def trim_to_sentence(text: str, min_keep: float = 0.6) -> str | None:
    """`text` up to its last complete sentence, or None when that would drop more than
    `1 - min_keep` of it (no sentence boundary near the end)."""
    ends = list(_SENTENCE_END_RE.finditer(text))
    if not ends:
        return None
    cut = text[: ends[-1].end()].rstrip()
    return cut if len(cut) >= min_keep * len(text.rstrip()) else None


# -- stage over the store (its Prefect task is flows.stages.write_batch) ----------------------

_ENDS_CJK = re.compile(r"[\u3400-\u9fff\uff00-\uffef\u3000-\u303f]$")


def join_continuation(partial: str, more: str) -> str:
    partial, more = partial.rstrip(), more.strip()
    sep = "" if _ENDS_CJK.search(partial) else " "
    return partial + sep + more


@dataclass(frozen=True)
class DraftSettings:
    """How one paragraph is drafted; the build and the pairs stage draft the same way."""

    temperature: float = BUILD.write_temperature
    max_paragraph_tokens: int = BUILD.max_paragraph_tokens
    max_continuations: int = BUILD.max_continuations
    # A paragraph under this share of its planned words is continued (up to max_continuations).
    min_paragraph_share: float = BUILD.min_paragraph_share
    extra_params: dict[str, Any] = field(default_factory=dict)
    write_prompt: str = "paper"  # or "turns" (build_write_request)


class DraftingRuntime(Protocol):
    """What drafting needs from a stage's runtime: the store and client for `generate`, and a
    context budget that every chain of the run shares (and may shrink)."""

    store: Store
    client: LLMClient
    budget: ContextBudget


@dataclass(frozen=True)
class Draft:
    """One drafted paragraph: its text after marker removal, continuation and trimming, and
    the stored calls it came from."""

    text: str
    call_key: str
    continuation_keys: tuple[str, ...]
    words: int
    truncated: bool  # still cut at max_tokens after every continuation
    trimmed: bool  # cut, long enough, and ended at its last full sentence
    prompt_version: str


class DraftFailed(Exception):
    """A paragraph that cannot be drafted; `reason` is the stored rejection reason."""

    def __init__(self, reason: str, detail: str, raw: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.raw = raw


def instruction_affinity(inst: Instruction) -> str:
    """Routing key of one instruction's write calls: they share their prompt's prefix
    (instruction, plan, text so far), which the endpoint that served the last one has cached."""
    return f"instruction:{inst.id}"


def paragraph_context(
    inst: Instruction, steps: list[PlanStep], written: list[str], step: int
) -> ParagraphContext:
    """What paragraph `step` is checked against: its instruction, plan and the text so far."""
    return ParagraphContext(
        instruction=inst.prompt,
        lang=inst.lang,
        main_points=tuple(s.main_point for s in steps),
        previous=tuple(written),
        step=step,
    )


def _cleanings_json(cleanings: tuple[Cleaning, ...] | list[Cleaning]) -> str:
    return json.dumps([c.as_dict() for c in cleanings], ensure_ascii=False)


async def write_step(
    rt: BuildRuntime, state: InstructionState, steps: list[PlanStep], written: list[str], step: int
) -> Paragraph | None:
    """Write paragraph `step`; store it and return it, or store a rejection and return None.

    Every draft passes the paragraph checks (tasks.quality) before it is stored as accepted
    text: local defects at its edges are cleaned and the cleaning recorded; a draft that fails
    a check (wrong language, prompt text, markup, restating an earlier paragraph) or loops
    (n-gram repetition over the sample filter's limit, or a long sentence said twice) is
    written again with another seed, up to `max_resamples` times. Every draft's verdict is
    stored (draft_check). When every draft fails, the sample is rejected at write with the
    reasons of all of them (a looping paragraph is not shipped as the least bad one: its
    sample would read as a loop however the rest scores)."""
    cfg = rt.config
    inst = state.instruction
    assert inst.id is not None
    # The stage config's fields of the same names; the write temperature under its own.
    settings = derive(DraftSettings, cfg, temperature=cfg.write_temperature)
    ctx = paragraph_context(inst, steps, written, step)
    best: tuple[Draft, ParagraphReview] | None = None
    failures: list[str] = []
    checks: list[DraftCheck] = []
    # Greedy decoding ignores the seed: another draft would repeat the same paragraph.
    resamples = cfg.max_resamples if cfg.write_temperature > 0 else 0
    for resample in range(resamples + 1):
        try:
            draft = await draft_paragraph(
                rt, inst, steps, written, step, settings, rt.progress, seed=resample or None
            )
        except DraftFailed as exc:
            await rt.store.areject(
                inst.id, "write", exc.reason, exc.detail, raw=exc.raw, extra_rows=checks
            )
            return None
        review = review_paragraph(draft.text, ctx) if cfg.quality_checks else None
        verdict = review.verdict if review is not None else KEEP
        text = review.text if review is not None else draft.text
        share = repetition_share(text, cfg.filters.ngram)
        # A loop also restates what came before it, so that failure counts as the loop; any
        # other failed check stands. A long sentence said twice is a loop too, however low
        # the n-gram share of the paragraph (not in verse, where refrains repeat).
        looped = (
            None if not cfg.quality_checks or ctx.form.verse else repeated_sentence(text, written)
        )
        if verdict.reason in (None, "restated_paragraph"):
            if share > cfg.filters.max_repetition:
                verdict = Verdict(
                    False, "repetition", f"{share:.0%} of {cfg.filters.ngram}-grams repeat"
                )
            elif looped is not None:
                verdict = Verdict(False, "repetition", f"repeats the sentence {looped[:60]!r}")
        checks.append(
            new_row(
                DraftCheck,
                instruction_id=inst.id,
                stage="write",
                step=step,
                attempt=resample,
                call_key=draft.call_key,
                keep=verdict.keep,
                reason=verdict.reason,
                detail=verdict.detail,
                cleanings_json=_cleanings_json(review.cleanings if review else ()),
                reasoning=(review.reasoning or None) if review else None,
            )
        )
        final = review or ParagraphReview(text, (), "", verdict)
        if verdict.keep:
            best = (draft, final)
            break
        failures.append(f"draft {resample + 1}: {verdict.reason} ({verdict.detail})")
    if best is None:  # every draft failed a check (a loop included): the sample goes
        reasons = [c.reason for c in checks if c.reason]
        reason = max(set(reasons), key=reasons.count) if reasons else "rejected"
        await rt.store.areject(
            inst.id,
            "write",
            reason,
            f"paragraph {step}: every draft failed: " + "; ".join(failures),
            extra_rows=checks,
        )
        return None
    assert best is not None
    draft, review = best
    para = new_row(
        Paragraph,
        instruction_id=inst.id,
        step=step,
        call_key=draft.call_key,
        continuation_keys=",".join(draft.continuation_keys),
        text=review.text,
        words=count_words(review.text),
        truncated=draft.truncated,
        trimmed=draft.trimmed,
        prompt_version=draft.prompt_version,
        cleanings_json=_cleanings_json(review.cleanings),
    )
    # Committed as it finishes: a crash loses at most calls in flight.
    await rt.store.asave(para, *checks)
    rt.progress.paragraphs += 1
    rt.progress.words += para.words
    return para


async def draft_paragraph(
    rt: DraftingRuntime,
    inst: Instruction,
    steps: list[PlanStep],
    written: list[str],
    step: int,
    settings: DraftSettings,
    progress: Progress,
    seed: int | None = None,
    affinity: str | None = None,
) -> Draft:
    """One draft of paragraph `step`, continued if it stopped at max_tokens or short of its
    words. Not stored (its LLM calls are); raises DraftFailed with the reason."""
    extra = settings.extra_params if seed is None else {**settings.extra_params, "seed": seed}
    affinity = affinity or instruction_affinity(inst)
    call = None
    for _ in range(2):  # a context-length error shrinks the budget and retries once
        budget = rt.budget
        request = build_write_request(
            inst.prompt,
            steps,
            written,
            step,
            lang=inst.lang,
            budget=budget,
            max_paragraph_tokens=settings.max_paragraph_tokens,
            temperature=settings.temperature,
            extra_params=extra,
            style=settings.write_prompt,
        )
        request = dataclasses.replace(request, affinity=affinity)
        try:
            call = await generate(rt.store, rt.client, request, progress)
            break
        except ContextLengthError:
            # Shrink the budget this request was built with, once: when several chains hit
            # the limit together, shrinking the shared budget once per chain collapsed it
            # (0.75**n) until paragraphs were written with none of the text so far.
            if rt.budget.context_window >= budget.context_window:
                smaller = int(budget.context_window * 0.75)
                rt.budget = ContextBudget(smaller, budget.reserve_tokens)
        except (ContentPolicyError, ReasoningBudgetError) as exc:
            # About this instruction only: stored as its rejection, the build goes on.
            raise DraftFailed(exc.reason, f"paragraph {step}: {exc}") from exc
        except BadOutputError as exc:
            raise DraftFailed("bad_output", f"paragraph {step}: {exc}") from exc
    if call is None:
        raise DraftFailed("context_overflow", f"paragraph {step} does not fit the context")
    text = clean_paragraph(call.content)
    finish = call.finish_reason
    continuation_keys: list[str] = []
    planned = steps[step - 1].word_count
    # Continue a paragraph cut at max_tokens, and one that ended well short of its planned
    # words (small models stop early): the plan's word counts are what make the piece long.
    while (
        needs_continuation(text, finish, planned, settings.min_paragraph_share)
        and len(continuation_keys) < settings.max_continuations
    ):
        shared: dict[str, Any] = {
            "cut": finish == "length",
            "lang": inst.lang,
            "budget": rt.budget,
            "max_paragraph_tokens": settings.max_paragraph_tokens,
            "temperature": settings.temperature,
            "extra_params": extra,
        }
        creq = (
            build_continue_turns_request(inst.prompt, steps, written, step, text, **shared)
            if settings.write_prompt == "turns"
            else build_continue_request(inst.prompt, steps[step - 1], text, **shared)
        )
        creq = dataclasses.replace(creq, affinity=affinity)
        try:
            more = await generate(rt.store, rt.client, creq, progress)
        except (BadOutputError, ContextLengthError, ContentPolicyError):
            break  # stays marked truncated; the filter stage rejects it with that reason
        continuation_keys.append(more.key)
        text = join_continuation(text, clean_paragraph(more.content))
        finish = more.finish_reason
    trimmed = False
    if finish == "length" and count_words(text) >= settings.min_paragraph_share * planned:
        # Still cut, but long enough for its plan step: end it at its last full sentence
        # rather than pass a cut sentence on or lose the sample.
        ended = trim_to_sentence(text)
        if ended is not None:
            text, finish, trimmed = ended, "trimmed", True
    if not text.strip():
        raise DraftFailed("empty", f"paragraph {step} was only markers", raw=call.content)
    return Draft(
        text=text,
        call_key=call.key,
        continuation_keys=tuple(continuation_keys),
        words=count_words(text),
        truncated=finish == "length",
        trimmed=trimmed,
        prompt_version=call.prompt_version,
    )


async def write_instruction(rt: BuildRuntime, state: InstructionState) -> bool:
    """Write every missing paragraph of one planned instruction, in order."""
    assert state.plan is not None and state.instruction.id is not None
    steps = steps_from_json(state.plan.steps_json)
    written = [p.text for p in state.paragraphs]
    try:
        for step in range(len(written) + 1, len(steps) + 1):
            para = await write_step(rt, state, steps, written, step)
            if para is None:
                return False
            written.append(para.text)
    finally:
        rt.client.release_affinity(instruction_affinity(state.instruction))
    await rt.store.asave(status=(state.instruction.id, InstructionStatus.WRITTEN))
    return True


def planned_instructions(rt: BuildRuntime, instruction_ids: list[int]) -> list[InstructionState]:
    """The batch's planned instructions, with what an earlier run already wrote of them."""
    return [
        s
        for s in rt.store.load_states(instruction_ids)
        if s.instruction.status == InstructionStatus.PLANNED
    ]


# Write the planned instructions of a batch, many at once, each one step by step; counts the
# written ones.
WRITE_STAGE = Stage("write", BuildRuntime, planned_instructions, in_chain(write_instruction))
