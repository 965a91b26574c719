"""The write requests sized from cached (length, CJK) counts equal the requests sized by
estimating every joined text again (issue 12): same prompt bytes and max_tokens, so the same
call keys, and stores built before resume without re-paying.

The oracle below is the code as it was before the counts, with a plain regex estimate."""

from __future__ import annotations

import random
import re
from typing import Any

import pytest

from prompts import prompt_version, render
from tasks.llm.client import ChatRequest
from tasks.plan import PlanStep
from tasks.stage_config import ContextBudget
from tasks.wordcount import estimate_from_counts, estimate_tokens, paragraph_counts, text_counts
from tasks.write import (
    _WRITTEN_SLOT,
    _empty_written,
    _fit_written,
    _turn_messages,
    _turn_points,
    build_continue_turns_request,
    build_write_request,
    fit_written_text,
    paragraph_max_tokens,
    sampling_params,
    turn_messages,
    written_slot_page,
)

# -- the oracle: the computation before the counts ---------------------------------------------

_PLAIN_CJK_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def plain_estimate(text: str) -> int:
    cjk = len(_PLAIN_CJK_RE.findall(text))
    return int((len(text) - cjk) / 3 + cjk * 1.5) + 1


def plain_fit(paragraphs: list[str], budget_tokens: int, keep_opening: int = 1) -> str:
    full = "\n\n".join(paragraphs)
    if plain_estimate(full) <= budget_tokens or not paragraphs:
        return full
    head = paragraphs[:keep_opening]
    tail: list[str] = []
    used = sum(plain_estimate(p) for p in head) + 30
    for p in reversed(paragraphs[keep_opening:]):
        cost = plain_estimate(p)
        if used + cost > budget_tokens:
            break
        tail.insert(0, p)
        used += cost
    if used > budget_tokens or not tail:
        last = paragraphs[-1]
        keep_chars = max(0, budget_tokens * 3 - 100)
        omitted_all = len(paragraphs) - 1
        note = f"[... {omitted_all} earlier paragraph(s) and the start of the last omitted ...]"
        return note + "\n\n" + last[-keep_chars:] if keep_chars else note
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
    return "\n\n".join(head + gap + tail)


def plain_turn_messages(
    instruction: str, steps: list[PlanStep], written: list[str], current: int, budget_tokens: int
) -> list[dict[str, str]]:
    points = _turn_points(steps)

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
    first_ask = ask(current, True)
    used = plain_estimate(system["content"]) + plain_estimate(first_ask["content"])
    used += 20 * (len(done) + 1)
    opening: list[int] = []
    if done and used + plain_estimate(written[0]) <= budget_tokens:
        opening = [1]
        used += plain_estimate(written[0])
    kept: list[int] = []
    for i in reversed(done[1:]):
        cost = plain_estimate(written[i - 1])
        if used + cost > budget_tokens:
            break
        kept.insert(0, i)
        used += cost
    if len(done) > 1 and not kept and opening:
        used -= plain_estimate(written[0])
        opening = []
    kept = opening + kept
    answers = {i: written[i - 1] for i in kept}
    keep_chars = max(0, (budget_tokens - used) * 3)
    if done and not kept and keep_chars:
        last = done[-1]
        kept, answers = [last], {last: written[last - 1][-keep_chars:]}
    messages = [system]
    for n, i in enumerate(kept):
        messages += [ask(i, n == 0), {"role": "assistant", "content": answers[i]}]
    return messages + [ask(current, False) if kept else first_ask]


def plain_write_request(
    instruction: str,
    steps: list[PlanStep],
    written: list[str],
    current: int,
    *,
    lang: str,
    budget: ContextBudget,
    max_paragraph_tokens: int = 1024,
    temperature: float = 0.7,
    extra_params: dict[str, Any] | None = None,
    style: str = "paper",
) -> ChatRequest:
    max_tokens = paragraph_max_tokens(steps[current - 1].word_count, lang, max_paragraph_tokens)
    if style == "turns":
        messages = plain_turn_messages(
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
        room = budget.prompt_budget(max_tokens) - plain_estimate(skeleton)
        text_so_far = plain_fit(written, max(room, 0)) if written else ""
        if not text_so_far:
            content = skeleton
        elif page is not None:
            content = page.replace(_WRITTEN_SLOT, text_so_far)
        else:
            content = render(
                "write", instruction=instruction, steps=steps, written=text_so_far, current=current
            )
        messages = [{"role": "user", "content": content}]
        version = prompt_version("write")
    used = sum(plain_estimate(m["content"]) for m in messages)
    spare = budget.context_window - budget.reserve_tokens - used
    max_tokens = max(64, min(max_tokens, spare))
    params = sampling_params(max_tokens, temperature, extra_params)
    return ChatRequest.of("write", messages, version, **params)


# -- inputs ------------------------------------------------------------------------------------

_EN = (
    "The harbour was quiet in the early morning, and the keeper walked along the stone wall "
    "to check the ropes. “Years of weather” had worn the steps smooth — yet every family "
    "remembered who built them. "
)
_ZH = "清晨的港口很安静，守塔人沿着石墙检查缆绳。多年的风雨把台阶磨得光滑，镇上的人仍记得。"
# Characters at and around the edges of the counted CJK ranges, and others of the same UTF-8
# lead bytes (CJK punctuation, kana, Hangul, fullwidth forms): counted exactly or not at all.
_EDGES = "\u33ff\u3400\u4dbf\u4dc0\u4e00\u9fff\ua000\uf8ff\uf900\ufaff\ufb00、。カ한ＡＢ😀é\u3000"


def _paragraph(rng: random.Random, lang: str, size: int) -> str:
    if lang == "en":
        return (_EN * (size // len(_EN) + 1))[: max(size, 1)].strip() or "x"
    if lang == "zh":
        return (_ZH * (size // len(_ZH) + 1))[: max(size, 1)]
    # mixed: English and Chinese runs and the range edges, shuffled in chunks
    pool = [_EN[rng.randrange(0, 60) :][:20], _ZH[rng.randrange(0, 20) :][:8], _EDGES]
    out = "".join(rng.choice(pool) for _ in range(size // 12 + 1))
    return out[:size] if size else ""


def _cases() -> list[tuple[str, list[PlanStep], list[str], int, ContextBudget, str]]:
    rng = random.Random(12)
    cases = []
    for lang in ("en", "zh", "mixed"):
        for n in (1, 2, 6, 20):
            inst = {
                "en": "Write a long essay about the harbour",
                "zh": "写一篇关于长城的长文",
                "mixed": "写一篇 essay about 长城 and the sea",
            }[lang]
            steps = [
                PlanStep(f"Part {i}: " + _paragraph(rng, lang, rng.randrange(10, 120)), 300)
                for i in range(1, n + 1)
            ]
            written = [_paragraph(rng, lang, rng.randrange(0, 2400)) for _ in range(n - 1)]
            for current in sorted({1, max(1, n // 2), n}):
                for window in (300, 600, 1200, 2048, 4096, 8192, 32768):
                    budget = ContextBudget(window, rng.choice((0, 256)))
                    cases.append((inst, steps, written[: current - 1], current, budget, lang))
    # A last paragraph far longer than the budget (only its end is kept), blank paragraphs,
    # and an instruction holding the slot placeholder (the page rendered as needed).
    big = [_EN * 3, _ZH * 200]
    cases.append(("Write", [PlanStep("a", 300)] * 3, big, 3, ContextBudget(4096), "zh"))
    cases.append(("Write", [PlanStep("a", 300)] * 3, ["", "  "], 3, ContextBudget(4096), "en"))
    slot = f"Written {_WRITTEN_SLOT} in the input"
    cases.append((slot, [PlanStep("a", 300)] * 3, big, 3, ContextBudget(2048), "en"))
    cases.append((slot, [PlanStep("a", 300)] * 3, big[:1], 2, ContextBudget(8192), "en"))
    return cases


def _boundary_cases() -> list[tuple[str, list[PlanStep], list[str], int, ContextBudget, str]]:
    """Windows one token either side of where the whole text so far just fits (the paper
    prompt's threshold and the turns prompt's): an estimate off by one token changes the
    request there."""
    rng = random.Random(21)
    cases = []
    for lang in ("en", "zh", "mixed"):
        n = 8
        steps = [PlanStep(f"Part {i}: " + _paragraph(rng, lang, 40), 300) for i in range(1, n + 1)]
        written = [_paragraph(rng, lang, rng.randrange(200, 1500)) for _ in range(n - 1)]
        inst = "Write a piece"
        max_tokens = paragraph_max_tokens(300, "zh" if lang == "zh" else "en", 1024)
        skeleton = render("write", instruction=inst, steps=steps, written="", current=n)
        paper = plain_estimate("\n\n".join(written)) + plain_estimate(skeleton)
        points = _turn_points(steps)
        first = render(
            "write_turns", part="first", instruction=inst, points=points, current=n, words=300
        )
        system = render("write_turns", part="system")
        turns = plain_estimate(system) + plain_estimate(first) + 20 * n
        turns += sum(plain_estimate(p) for p in written)
        for threshold in (paper, turns):
            for window in range(threshold + max_tokens - 3, threshold + max_tokens + 4):
                cases.append((inst, steps, written, n, ContextBudget(window, 0), lang))
    return cases


CASES = _cases() + _boundary_cases()


# -- tests -------------------------------------------------------------------------------------


def test_counts_estimate_equals_the_plain_estimate() -> None:
    rng = random.Random(7)
    texts = [_paragraph(rng, lang, rng.randrange(0, 3000)) for lang in ("en", "zh", "mixed")] * 20
    texts += ["", "\n\n", _EDGES, *_EDGES, "\ud800 lone surrogate", _ZH * 300, _EN * 200]
    for text in texts:
        assert estimate_tokens(text) == plain_estimate(text), text
        plain_counts = (len(text), len(_PLAIN_CJK_RE.findall(text)))
        assert paragraph_counts(text) == text_counts(text) == plain_counts, text
        assert estimate_from_counts(*text_counts(text)) == plain_estimate(text)


def test_joined_counts_add_up_to_the_joined_estimate() -> None:
    # The premise of the counts: a joined text's estimate comes from its parts' counts.
    rng = random.Random(3)
    for _ in range(200):
        parts = [_paragraph(rng, "mixed", rng.randrange(0, 400)) for _ in range(rng.randrange(6))]
        counts = [text_counts(p) for p in parts]
        total = (sum(n for n, _ in counts) + 2 * max(len(parts) - 1, 0), sum(c for _, c in counts))
        assert estimate_from_counts(*total) == plain_estimate("\n\n".join(parts))


def test_fit_written_text_equals_the_plain_fit_and_counts_its_text() -> None:
    rng = random.Random(5)
    for lang in ("en", "zh", "mixed"):
        paras = [_paragraph(rng, lang, rng.randrange(0, 2000)) for _ in range(12)]
        for n in range(len(paras) + 1):
            full = plain_estimate("\n\n".join(paras[:n]))
            for budget in (0, 20, 50, 200, 700, 1500, 4000, 100_000, full - 1, full):
                for keep in (1, 2):
                    want = plain_fit(paras[:n], budget, keep)
                    assert fit_written_text(paras[:n], budget, keep) == want, (lang, n, budget)
                    # The counts the request is sized from are the returned text's own.
                    assert _fit_written(paras[:n], budget, keep) == (want, text_counts(want))


@pytest.mark.parametrize("style", ["paper", "turns"])
def test_write_request_equals_the_plain_request(style: str) -> None:
    """Same messages, max_tokens and key over English, Chinese and mixed text, nothing
    written, everything fitting, the middle left out and only the latest paragraph's end."""
    elided = 0
    for inst, steps, written, current, budget, lang in CASES:
        kw: dict[str, Any] = {"lang": "zh" if lang == "zh" else "en", "budget": budget}
        got = build_write_request(inst, steps, written, current, style=style, **kw)
        want = plain_write_request(inst, steps, written, current, style=style, **kw)
        assert got.messages == want.messages, (inst, current, budget)
        assert got.max_tokens == want.max_tokens, (inst, current, budget)
        assert got == want and got.key("m") == want.key("m")
        joined = "\n\n".join(c for _, c in got.messages)
        elided += bool(written) and not all(p in joined for p in written)
    assert elided >= 10  # the cases reach the budget's cuts, not only texts that fit


def test_turns_continuation_equals_the_plain_messages() -> None:
    for inst, steps, written, current, budget, lang in CASES[::3]:
        partial = _paragraph(random.Random(current), lang, 500)
        req = build_continue_turns_request(
            inst, steps, written, current, partial, cut=True, budget=budget, lang="en"
        )
        room = budget.prompt_budget(req.max_tokens or 0) - plain_estimate(partial) - 40
        want = plain_turn_messages(inst, steps, written, current, max(room, 0))
        assert req.messages[: len(want)] == tuple((m["role"], m["content"]) for m in want)
        assert turn_messages(inst, steps, written, current, max(room, 0)) == want


def test_turn_messages_total_is_the_sum_of_its_estimates() -> None:
    for inst, steps, written, current, budget, _ in CASES:
        for room in (0, 100, budget.prompt_budget(400)):
            messages, total = _turn_messages(inst, steps, written, current, max(room, 0))
            assert total == sum(plain_estimate(m["content"]) for m in messages)
