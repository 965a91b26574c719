"""AgentWrite step 1: plan a long piece as paragraphs with main points and word counts.

Pure core: `build_plan_request` (format_input) and `parse_plan` + `validate_plan`
(format_output), testable without a model. The parser always accepts the paper's line format
(`Paragraph N - Main Point: ... - Word Count: N words`), its Chinese variants (段落 / 第N段,
主要内容, 字数), numbered lists and markdown, even when JSON was asked for, because endpoints
that ignore `response_format` are common. A plan that fails becomes a stored rejection with the
raw text, never an exception that stops the batch.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from prompts import prompt_version, render
from storage.models import Instruction, InstructionStatus, LLMCall, new_row
from storage.models import Plan as PlanRow
from tasks.llm import structured
from tasks.llm.client import (
    BadOutputError,
    ChatRequest,
    ContentPolicyError,
    ContextLengthError,
    EndpointDownError,
    FatalLLMError,
    ReasoningBudgetError,
)
from tasks.quality import (
    DUPLICATE_POINT_SIMILARITY,
    expected_language,
    point_similarity,
    review_plan,
)
from tasks.runtime import (
    BuildRuntime,
    Stage,
    generate,
    in_chain,
)
from tasks.settings import BUILD, MAX_PLAN_STEPS
from tasks.wordcount import cjk_share, count_words

MAX_STEPS = MAX_PLAN_STEPS  # the most paragraphs a plan may have (tasks/settings.py)
MIN_STEP_WORDS = 20  # the paper asks for 200-1000; anything below this is not a paragraph
MAX_STEP_WORDS = 5000
# Total planned words over required words: the paper's plans overshoot or undershoot a little;
# outside this band the plan is not for the piece that was asked for.
TOTAL_RATIO_BAND = (0.5, 2.0)


@dataclass(frozen=True)
class PlanStep:
    main_point: str
    word_count: int


class PlanError(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# Paragraphs average about this many words in the paper's plans (200-1000 each); a plan for T
# words needs at least T / this many paragraphs. Small models under-shoot word counts, so
# asking for enough paragraphs is what makes their pieces long.
TYPICAL_STEP_WORDS = 400


def min_steps_for(target_words: int, max_steps: int = MAX_STEPS) -> int:
    return max(1, min(max_steps, -(-target_words // TYPICAL_STEP_WORDS)))


def plan_schema(max_steps: int = MAX_STEPS, min_steps: int = 1) -> dict[str, Any]:
    """JSON schema for the plan; llama.cpp turns it into a grammar, OpenAI into strict JSON."""
    return {
        "type": "object",
        "properties": {
            "paragraphs": {
                "type": "array",
                "minItems": min_steps,
                "maxItems": max_steps,
                "items": {
                    "type": "object",
                    "properties": {
                        "main_point": {"type": "string", "minLength": 10, "maxLength": 400},
                        "word_count": {"type": "integer", "minimum": 200, "maximum": 1000},
                    },
                    "required": ["main_point", "word_count"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["paragraphs"],
        "additionalProperties": False,
    }


def response_format(schema: dict[str, Any], style: str) -> dict[str, Any]:
    """Structured-output request in the endpoint's dialect (tasks.llm.structured): OpenAI and
    vLLM take `json_schema`; llama-cpp-python's server ("llama_cpp": `json_object` with a
    `schema`, it answers 422 to the OpenAI shape) compiles the schema to a grammar."""
    if style == "llama_cpp":
        # llama.cpp's schema-to-grammar drops integer minimum/maximum (SmolLM2 planned a
        # 10-word paragraph); an enum of allowed counts is a grammar it does enforce.
        schema = copy.deepcopy(schema)
        items = schema["properties"]["paragraphs"]["items"]["properties"]
        items["word_count"] = {"type": "integer", "enum": list(range(200, 1001, 50))}
        fmt = "json_object"
    else:
        fmt = "json_schema"
    shape = structured.response_format("plan", schema, fmt)
    assert shape is not None  # a schema format, never "none"
    return shape


# A worked example, shown as an earlier turn of the conversation (the same prompt for another
# instruction, then the answer wanted) before the real request. Small models copy a shown
# answer's shape far better than they follow a described one: on the embedded SmolLM2-135M,
# plans passing validation went from 1 of 9 to 4 of 9 (the three English demo instructions x 3
# seeds; the rest loop, repeating earlier points, and are asked for again). Its main points
# are short and specific on purpose; a plan that copies one of them is rejected
# (plan_copies_example), so the example never leaks into a sample.
PLAN_EXAMPLES: dict[str, tuple[str, tuple[PlanStep, ...]]] = {
    "en": (
        "Write a long, detailed guide to baking sourdough bread at home.",
        (
            PlanStep("What sourdough is and why people bake it at home", 350),
            PlanStep("Making a starter from flour and water, and feeding it", 500),
            PlanStep("Mixing the dough, resting it and folding it", 450),
            PlanStep("Shaping the loaf and proofing it overnight", 400),
            PlanStep("Scoring and baking in a covered pot", 400),
            PlanStep("Reading the crumb and fixing the usual mistakes", 450),
        ),
    ),
    "zh": (
        "写一篇详细的长文，介绍如何在家烤制酸面包。",
        (
            PlanStep("什么是酸面包，人们为什么喜欢在家自己烤", 350),
            PlanStep("用面粉和水培养酵头，以及每天如何喂养它", 500),
            PlanStep("和面、静置与折叠面团的方法", 450),
            PlanStep("面包的整形和冷藏过夜发酵", 400),
            PlanStep("割包和用带盖铸铁锅烘烤", 400),
            PlanStep("观察面包组织，纠正常见的失误", 450),
        ),
    ),
}
# The example turn's own length request: no target, 2000 words at least (5 to 10 paragraphs;
# the prompt asks for 2,500 with the headroom, and the example's plan totals 2,550).
PLAN_EXAMPLE_MIN_WORDS = 2000


def plan_example(instruction: str) -> tuple[str, tuple[PlanStep, ...]]:
    """The worked example in the instruction's language (Chinese for Chinese, else English)."""
    return PLAN_EXAMPLES["zh" if expected_language(instruction) == "zh" else "en"]


# With no required length the prompt asks for this much over --min-words: writers under-shoot
# their plan (SmolLM2 wrote 1,892 words for a 2,050-word plan, rejected as too short), and a
# plan only at the floor leaves no room for it. Validation still checks the floor itself.
PLAN_LENGTH_HEADROOM = 1.25


def _plan_prompt(
    instruction: str, target_words: int | None, min_words: int, json_mode: bool, max_steps: int
) -> tuple[str, dict[str, Any]]:
    """The plan prompt for one instruction, and its schema's step bounds."""
    min_steps = min_steps_for(target_words or min_words, max_steps)
    asked_words = -(-int(min_words * PLAN_LENGTH_HEADROOM) // 100) * 100  # up to a round 100
    # The ceiling follows the target too: with room for 50 items, small models keep appending
    # near-copies of earlier items until the token limit cuts the JSON off.
    ceiling = min(max_steps, max(2 * min_steps, min_steps + 4))
    content = render(
        "plan",
        instruction=instruction,
        target_words=target_words,
        min_words=asked_words,
        json_mode=json_mode,
        min_steps=min_steps,
        max_steps=ceiling,
    )
    return content, {"min_steps": min_steps, "max_steps": ceiling}


def format_plan_answer(steps: Sequence[PlanStep], json_mode: bool) -> str:
    """A plan written the way the plan prompt asks for it (JSON, or the paper's lines)."""
    if json_mode:
        return json.dumps({"paragraphs": [asdict(s) for s in steps]}, ensure_ascii=False)
    return "\n".join(format_step(i, s) for i, s in enumerate(steps, start=1))


def build_plan_request(
    instruction: str,
    target_words: int | None,
    min_words: int,
    *,
    json_mode: bool = True,
    json_style: str = "json_schema",
    max_steps: int = MAX_STEPS,
    max_tokens: int = BUILD.plan_max_tokens,
    temperature: float = BUILD.plan_temperature,
    extra_params: dict[str, Any] | None = None,
) -> ChatRequest:
    """The plan request: the worked example (prompt and answer) as an earlier turn, then the
    same prompt for this instruction as the last message."""
    content, bounds = _plan_prompt(instruction, target_words, min_words, json_mode, max_steps)
    example_instruction, example_steps = plan_example(instruction)
    example_prompt, _ = _plan_prompt(
        example_instruction, None, PLAN_EXAMPLE_MIN_WORDS, json_mode, MAX_STEPS
    )
    messages = [
        {"role": "user", "content": example_prompt},
        {"role": "assistant", "content": format_plan_answer(example_steps, json_mode)},
        {"role": "user", "content": content},
    ]
    params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
    if json_mode:
        params["response_format"] = response_format(
            plan_schema(bounds["max_steps"], bounds["min_steps"]), json_style
        )
    params.update(extra_params or {})
    return ChatRequest.of("plan", messages, prompt_version("plan"), **params)


# -- parsing --------------------------------------------------------------------------------

_NUM = r"(\d[\d,]*)"
_CN_DIGITS = "零一二三四五六七八九十百两"
_HEAD_RE = re.compile(
    r"^[ \t>*#\-]*(?:"
    r"(?:paragraph|para\.?|section|part|step)\s*(?P<en>\d+)\b"
    r"|段落\s*(?P<zh>\d+)"
    rf"|第\s*(?P<zh2>[\d{_CN_DIGITS}]+)\s*(?:段|部分|节)"
    r"|(?P<num>\d+)\s*[.)、:：](?!\d)"
    r")",
    re.IGNORECASE | re.MULTILINE,
)
_COUNT_RE = re.compile(
    r"(?:word\s*count|words?|length|字数|字數|篇幅)\s*[:：]?\s*"
    r"(?:about|approximately|approx\.?|around|~|约|大约|大概)?\s*" + _NUM,
    re.IGNORECASE,
)
_COUNT_TAIL_RE = re.compile(_NUM + r"\s*(?:words?|字)", re.IGNORECASE)
_POINT_RE = re.compile(
    r"(?:main\s*point|主要内容|主要观点|要点|内容)\s*[:：]\s*(?P<point>.*?)"
    r"(?=(?:\s*[-–—|;,，；]?\s*(?:word\s*count|字数|字數)\b)|$)",
    re.IGNORECASE | re.DOTALL,
)
_MD_RE = re.compile(r"\*\*|__|`")


def _to_int(text: str) -> int:
    return int(text.replace(",", ""))


def _extract_json(text: str) -> Any:
    """A JSON value from raw model text: whole, fenced, or the outermost {...} / [...]."""
    candidates = [text.strip()]
    candidates += re.findall(r"```(?:json)?\s*(.*?)```", text, re.DOTALL | re.IGNORECASE)
    for open_, close in (("{", "}"), ("[", "]")):
        start, end = text.find(open_), text.rfind(close)
        if 0 <= start < end:
            candidates.append(text[start : end + 1])
    for c in candidates:
        try:
            # strict=False: grammar-constrained output may hold raw newlines inside strings
            return json.loads(c, strict=False)
        except (json.JSONDecodeError, ValueError):
            continue
    return None


def _steps_from_json(value: Any) -> list[PlanStep] | None:
    if isinstance(value, dict):
        for key in ("paragraphs", "plan", "steps", "outline", "段落"):
            if isinstance(value.get(key), list):
                value = value[key]
                break
    if not isinstance(value, list) or not value:
        return None
    steps: list[PlanStep] = []
    for item in value:
        if not isinstance(item, dict):
            return None
        norm = {re.sub(r"[\s_-]+", "", str(k)).lower(): v for k, v in item.items()}
        point = next(
            (
                norm[k]
                for k in ("mainpoint", "point", "content", "summary", "主要内容")
                if k in norm
            ),
            None,
        )
        count = next((norm[k] for k in ("wordcount", "words", "length", "字数") if k in norm), None)
        if isinstance(count, str):
            m = re.search(_NUM, count)
            count = _to_int(m.group(1)) if m else None
        if not isinstance(count, int | float) or isinstance(count, bool):
            raise PlanError("missing_word_count", f"step {len(steps) + 1} has no word count")
        steps.append(PlanStep(str(point or "").strip(), int(count)))
    return steps


def _steps_from_lines(text: str) -> list[PlanStep]:
    text = _MD_RE.sub("", text)
    heads = list(_HEAD_RE.finditer(text))
    # A bare numbered list ("1. ...") only counts when nothing more specific is there, so the
    # numbers inside "Paragraph 1 - ... 2. ..." sub-bullets do not split a step.
    specific = [h for h in heads if h.group("num") is None]
    heads = specific or heads
    steps: list[PlanStep] = []
    for i, head in enumerate(heads):
        block = text[head.end() : heads[i + 1].start() if i + 1 < len(heads) else len(text)]
        m = _COUNT_RE.search(block) or _COUNT_TAIL_RE.search(block)
        if not m:
            raise PlanError(
                "missing_word_count", f"step {i + 1} has no word count: {block[:120]!r}"
            )
        pm = _POINT_RE.search(block)
        point = pm.group("point") if pm else block[: m.start()]
        point = re.sub(r"^[\s\-–—:：.|]+|[\s\-–—:：,，;；|(（]+$", "", point)
        steps.append(PlanStep(" ".join(point.split()), _to_int(m.group(1))))
    return steps


def parse_plan(text: str) -> list[PlanStep]:
    """Steps from raw model text. Raises PlanError('unparseable' | 'missing_word_count')."""
    if not text or not text.strip():
        raise PlanError("unparseable", "empty plan")
    value = _extract_json(text)
    if value is not None:
        steps = _steps_from_json(value)
        if steps:
            return steps
    steps = _steps_from_lines(text)
    if not steps:
        raise PlanError("unparseable", "no paragraph lines, numbered items or JSON found")
    return steps


def validate_plan(
    steps: list[PlanStep],
    required_words: int | None,
    max_steps: int = MAX_STEPS,
    min_words: int | None = None,
    instruction: str | None = None,
    lang: str | None = None,
) -> None:
    """Raise PlanError when the plan cannot drive the write stage. With no required length,
    the plan prompt asked for at least `min_words` in total: a plan under that cannot give
    a sample the length filter accepts. Given the instruction, the plan quality checks run
    too (tasks.quality: repeated or content-free main points, the instruction pasted back,
    main points in the wrong language)."""
    if not steps:
        raise PlanError("no_steps", "the plan has no paragraphs")
    if len(steps) > max_steps:
        raise PlanError("too_many_steps", f"{len(steps)} paragraphs; at most {max_steps}")
    for i, s in enumerate(steps, start=1):
        if not MIN_STEP_WORDS <= s.word_count <= MAX_STEP_WORDS:
            raise PlanError(
                "bad_word_count",
                f"paragraph {i} asks for {s.word_count} words "
                f"(allowed {MIN_STEP_WORDS}-{MAX_STEP_WORDS})",
            )
    points = [" ".join(s.main_point.lower().split()) for s in steps]
    blank = [i for i, p in enumerate(points, start=1) if len(re.findall(r"\w", p)) < 3]
    if blank:
        raise PlanError("degenerate_plan", f"paragraphs {blank} have no main point")
    if len(steps) > 1 and len(set(points)) <= len(points) // 2:
        raise PlanError(
            "degenerate_plan", f"only {len(set(points))} distinct main points in {len(points)}"
        )
    if instruction is not None:
        verdict = review_plan([s.main_point for s in steps], instruction)
        if not verdict.keep:
            raise PlanError(verdict.reason or "degenerate_plan", verdict.detail)
        _, example = plan_example(instruction)
        for i, s in enumerate(steps, start=1):
            for e in example:
                sim = point_similarity(s.main_point, e.main_point, DUPLICATE_POINT_SIMILARITY)
                if sim >= DUPLICATE_POINT_SIMILARITY:
                    # The prompt's worked example pasted back: a sourdough step in a plan
                    # about bees. Asked for again, like any failing plan.
                    raise PlanError(
                        "plan_copies_example",
                        f"main point {i} copies the prompt's example: {s.main_point[:60]!r}",
                    )
        expected = lang if lang in ("en", "zh") else expected_language(instruction)
        joined = " ".join(s.main_point for s in steps)
        share = cjk_share(joined)
        if count_words(joined) >= 10 and (
            (expected == "zh" and share < 0.5) or (expected == "en" and share > 0.3)
        ):
            # The main points are the writer's brief: a plan in the wrong language is written
            # in the wrong language, so it is asked for again before any paragraph is paid.
            raise PlanError(
                "plan_wrong_language",
                f"instruction is {'Chinese' if expected == 'zh' else 'English'}; "
                f"main points are {share:.0%} Chinese",
            )
    total = sum(s.word_count for s in steps)
    if not required_words and min_words and total < min_words:
        raise PlanError(
            "length_mismatch", f"plan totals {total} words, under the minimum {min_words}"
        )
    if required_words:
        lo, hi = TOTAL_RATIO_BAND
        if not lo <= total / required_words <= hi:
            raise PlanError(
                "length_mismatch",
                f"plan totals {total} words for a required {required_words} "
                f"(ratio {total / required_words:.2f}, allowed {lo}-{hi})",
            )


def steps_to_json(steps: list[PlanStep]) -> str:
    return json.dumps([asdict(s) for s in steps], ensure_ascii=False)


def steps_from_json(blob: str) -> list[PlanStep]:
    return [PlanStep(**d) for d in json.loads(blob)]


def format_step(index: int, step: PlanStep) -> str:
    return (
        f"Paragraph {index} - Main Point: {step.main_point} - Word Count: {step.word_count} words"
    )


# -- stage over the store (its Prefect task is flows.stages.plan_batch) -----------------------


async def _request_plan(
    rt: BuildRuntime, inst: Instruction, seed: int | None
) -> tuple[ChatRequest, LLMCall] | None:
    """One plan call in the first structured-output dialect the endpoint accepts; None when
    the instruction was rejected (reason stored)."""
    assert inst.id is not None
    cfg = rt.config
    extra = cfg.extra_params if seed is None else {**cfg.extra_params, "seed": seed}
    while True:
        request = build_plan_request(
            inst.prompt,
            inst.length,
            cfg.min_words,
            json_mode=cfg.json_plan,
            json_style=cfg.json_style,
            max_steps=cfg.max_plan_steps,
            max_tokens=cfg.plan_max_tokens,
            temperature=cfg.plan_temperature,
            extra_params=extra,
        )
        try:
            return request, await generate(rt.store, rt.client, request, rt.progress)
        except (FatalLLMError, EndpointDownError) as exc:
            if cfg.json_plan and structured.format_refused(exc):
                # Endpoint refuses this structured-output dialect: step down the ladder to
                # llama.cpp's, then to plain line-format plans (the parser reads those anyway).
                current = "json_object" if cfg.json_style == "llama_cpp" else "json_schema"
                lower = structured.next_format(current)
                cfg.json_plan = lower != "none"
                if lower == "json_object":
                    cfg.json_style = "llama_cpp"
                continue
            raise
        except (ContentPolicyError, ReasoningBudgetError) as exc:
            # About this instruction only (a refused prompt, a budget spent thinking): its
            # rejection is stored with that reason and the build goes on.
            await rt.store.areject(inst.id, "plan", exc.reason, str(exc))
            return None
        except BadOutputError as exc:
            await rt.store.areject(inst.id, "plan", "bad_output", str(exc))
            return None
        except ContextLengthError as exc:
            await rt.store.areject(inst.id, "plan", "context_overflow", str(exc))
            return None


async def plan_instruction(rt: BuildRuntime, inst: Instruction) -> bool:
    """Plan one instruction; store the plan or a rejection with the raw text. True if planned.

    A plan that does not parse or validate (repeated main points, counts far from the target)
    is asked for again with another sampling seed, up to `max_plan_resamples` times: one more
    plan call is cheap next to the paragraphs it unlocks, and small models produce a looping
    plan on some seeds only. Each seed is its own stored call, so a rerun re-pays none."""
    assert inst.id is not None
    cfg = rt.config
    if cfg.languages and inst.lang not in cfg.languages:
        # Before any call: the writer model does not write this language (tasks.llm.endpoints).
        await rt.store.areject(
            inst.id,
            "plan",
            "unsupported_language",
            f"instruction is {inst.lang!r}; the writer model is given {', '.join(cfg.languages)}"
            " (--languages)",
        )
        return False
    failures: list[str] = []
    # Greedy decoding ignores the seed: another attempt would repeat the same plan.
    resamples = cfg.max_plan_resamples if cfg.plan_temperature > 0 else 0
    for attempt in range(resamples + 1):
        got = await _request_plan(rt, inst, seed=attempt or None)
        if got is None:
            return False
        request, call = got
        try:
            steps = parse_plan(call.content)
            validate_plan(
                steps,
                inst.length,
                cfg.max_plan_steps,
                cfg.min_words,
                instruction=inst.prompt if cfg.quality_checks else None,
                lang=inst.lang,
            )
        except PlanError as exc:
            failures.append(exc.detail)
            if attempt < resamples:
                continue
            detail = exc.detail
            if len(failures) > 1:
                detail += f" ({len(failures)} plans tried: " + "; ".join(failures[:-1]) + ")"
            await rt.store.areject(inst.id, "plan", exc.reason, detail, raw=call.content)
            return False
        # Batched with the other chains' writes of this loop turn; returns once committed.
        await rt.store.asave(
            new_row(
                PlanRow,
                instruction_id=inst.id,
                call_key=call.key,
                steps_json=steps_to_json(steps),
                n_steps=len(steps),
                total_words=sum(s.word_count for s in steps),
                prompt_version=request.prompt_version,
            ),
            status=(inst.id, InstructionStatus.PLANNED),
        )
        rt.progress.plans += 1
        rt.progress.paragraphs_planned += len(steps)
        return True
    return False


def pending_instructions(rt: BuildRuntime, instruction_ids: list[int]) -> list[Instruction]:
    """The batch's instructions not planned yet (a rerun skips the planned ones)."""
    states = rt.store.load_states(instruction_ids)
    return [s.instruction for s in states if s.instruction.status == InstructionStatus.PENDING]


# Plan every pending instruction of a batch concurrently; counts the planned ones.
PLAN_STAGE = Stage("plan", BuildRuntime, pending_instructions, in_chain(plan_instruction))
