"""tasks.quality's fast paths (issue 12) against the plain computations they replace: the
cheap tests that skip a regex which cannot match, the end-chatter patterns tried only where
they can start, the scaffolding rules run one by one instead of compiled per set, n-gram
lookups set against set, and the plan checks' bounds that skip the sequence matcher. Every
value must be the plain one, over the corpora's texts, their lines and points, generated
prose, and made-up texts built from the patterns' own pieces."""

from __future__ import annotations

import html
import itertools
import random
import re
import sys
import unicodedata
from difflib import SequenceMatcher

import pytest

from tasks import quality as q
from tasks.wordcount import cjk_share, ngrams, units
from tests.fake_openai import prose
from tests.tasks.quality_corpus import HOLDOUT, load_corpus

_RECORDS = load_corpus() + load_corpus(HOLDOUT)
_PIECES = [
    "<think>",
    "</think>",
    "◁think▷",
    "[THINK]",
    "<|begin_of_thought|>",
    "<|end_of_thought|>",
    "```",
    "~~~",
    "&nbsp;",
    "<!-- x -->",
    "{{x}}",
    "{% y %}",
    "<div>",
    "</s> ",
    "[INST]",
    "<instruction>",
    "Sure! ",
    "I hope this helps!",
    "Let me know if you need changes.",
    "希望对您有帮助。",
    "如有任何问题，欢迎继续提问。",
    "In this paragraph, I will ",
    "paragraph 3 of 5",
    "Main point: ",
    "The plan: ",
    "aim for about 400 words",
    "(to be continued)",
    "现在写第2段（共4段）",
    "（本段约400字，不要重复前文。）",
    "“",
    "”",
    '"',
    "\n",
    "\n\n",
    ". ",
    "。",
    "İ",
    "K",
    "ſ",
    "Thınk",
]


def _texts() -> list[str]:
    found: set[str] = set()
    for r in _RECORDS:
        found.add(r.response)
        found.update(q.split_paragraphs(r.response))
        found.update(r.response.splitlines())
        found.update(r.plan or ())
        found.add(r.instruction)
    found.update(prose(f"fast-{i}", 300, chinese=i % 3 == 2) for i in range(12))
    pieces = sorted(found) + _PIECES
    rng = random.Random(12)
    made = [
        "".join(rng.choice(pieces)[:120] for _ in range(rng.randrange(1, 8))) for _ in range(1500)
    ]
    fences = ["Intro\n~~~\nthe code\n~~~\nend", "```python\nx = 1\n```", "a ~~ b ` c { d"]
    return ["", " ", "a", "。", *fences, *sorted(found), *made]


TEXTS = _texts()
LINES = sorted({line for t in TEXTS for line in t.splitlines()})


def test_the_ignorecase_extras_are_every_other_match_of_an_ascii_letter() -> None:
    letters = re.compile("[a-z]", re.IGNORECASE)
    extras = [chr(c) for c in range(128, sys.maxunicode + 1) if letters.fullmatch(chr(c))]
    assert tuple(extras) == q._IGNORECASE_ASCII_EXTRAS


def plain_split_reasoning(text: str) -> tuple[str, str]:
    parts: list[str] = []

    def take(m: re.Match[str]) -> str:
        parts.append(m.group(0))
        return ""

    answer = q._THINK_BLOCK_RE.sub(take, text)
    close = q._THINK_CLOSE_RE.search(answer)
    if close and not q._THINK_OPEN_RE.match(answer[: close.start()]):
        parts.insert(0, answer[: close.end()])
        answer = answer[close.end() :]
    if q._THINK_OPEN_RE.match(answer):
        parts.append(answer)
        answer = ""
    return answer.strip(), "\n".join(p.strip() for p in parts).strip()


def test_split_reasoning() -> None:
    for text in TEXTS:
        assert q.split_reasoning(text) == plain_split_reasoning(text), text


def _span(m: re.Match[str] | None) -> tuple[int, str] | None:
    return None if m is None else (m.start(), m.group(0))


def test_end_chatter_match_is_the_search() -> None:
    for line in LINES + [t[-400:] for t in TEXTS]:
        for address in (False, True):
            m = q._CHATTER_END_EN.search(line)
            if m is None and not address:
                m = q._CHATTER_END_EN_ADDRESS.search(line) or q._CHATTER_END_ZH.search(line)
            assert _span(q._end_chatter_match(line, address)) == _span(m), line


def test_starts_are_the_lookbehinds_positions() -> None:
    en = re.compile(r"[.!?)]\s|\n")
    zh = re.compile(r"[。！？!?）)\n]")
    rng = random.Random(3)
    alphabet = list("ab .!?)\n\t\u3000\xa0。！？）x")
    for _ in range(20000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randrange(30)))
        assert q._starts(line, q._END_EN_MARKS, True) == sorted(
            {0, *(m.end() for m in en.finditer(line))}
        )
        assert q._starts(line, q._END_ZH_MARKS, False) == sorted(
            {0, *(m.end() for m in zh.finditer(line))}
        )


def plain_echo_match(line: str) -> re.Match[str] | None:
    low = line.lower()
    found = [k for k in q._ECHO_HINTS if k in low]
    if not found:
        return None
    rules = tuple(sorted({i for k in found for i in q._ECHO_HINT_RULES[k]}))
    for m in q._echo_regex(rules).finditer(line):
        if not q._inside_quotes(line, m.start(), m.group(0)):
            return m
    return None


def plain_echo_lines(text: str, grams: frozenset[tuple[str, ...]] | None) -> list[tuple[int, str]]:
    hits: list[tuple[int, str]] = []
    sentences = q.template_sentences()
    look = grams is None or not q._template_grams().isdisjoint(grams)
    for i, line in enumerate(text.splitlines()):
        m = plain_echo_match(line)
        if m:
            hits.append((i, m.group(0)))
            continue
        if not look:
            continue
        norm = " ".join(units(unicodedata.normalize("NFKC", line)))
        if len(norm.split()) >= q.TEMPLATE_SENTENCE_MIN_WORDS:
            hit = next((s for s in sentences if s in norm), None)
            if hit:
                hits.append((i, hit))
    return hits


def test_echo_lines_and_matches() -> None:
    template = list(q.template_sentences())
    made = [t + " " + s.capitalize() + "." for t, s in zip(TEXTS[::7], itertools.cycle(template))]
    for text in TEXTS + made:
        low = text.lower()
        assert q._present_hints(low) == [k for k in q._ECHO_HINTS if k in low]
        assert q._echo_lines(text) == plain_echo_lines(text, None), text
        grams = frozenset(ngrams(units(text), q._TEMPLATE_N))
        meets = not q._template_grams().isdisjoint(grams)
        assert q._meets_templates(text) == meets, text
        assert q._echo_lines(text, meets) == plain_echo_lines(text, grams), text
        verdict = q.check_prompt_echo(text, q.ParagraphContext("Write an essay"))
        assert verdict == plain_check_prompt_echo(text, q.ParagraphContext("Write an essay"))
    for line in LINES:
        assert _span(q._echo_match(line)) == _span(plain_echo_match(line)), line


def plain_check_prompt_echo(text: str, ctx: q.ParagraphContext) -> q.Verdict:
    grams = ngrams(units(text), q._TEMPLATE_N) if cjk_share(text) <= 0.5 else None
    hits = plain_echo_lines(text, None if grams is None else frozenset(grams))
    if hits:
        i, what = hits[0]
        return q.Verdict(False, "prompt_echo", f"line {i + 1} holds prompt text {what[:60]!r}")
    run = q._template_run(grams) if grams is not None else None
    if run is not None:
        return q.Verdict(False, "prompt_echo", f"holds the prompt's wording {run[:60]!r}")
    point = plain_pasted_main_point(q._first_line(text), ctx.main_points)
    if point is not None:
        return q.Verdict(False, "prompt_echo", f"opens with plan main point {point[:60]!r}")
    pasted = plain_pasted_instruction(text, ctx.instruction) if ctx.instruction else None
    if pasted is not None:
        return q.Verdict(False, "prompt_echo", f"pastes the instruction: {pasted[:60]!r}")
    return q.KEEP


def plain_pasted_main_point(first_line: str, points: tuple[str, ...]) -> str | None:
    line = q._normal(first_line)
    if not line:
        return None
    for point in points:
        p = q._normal(point)
        if not p or not line.startswith(p):
            continue
        if (
            len(p.split()) >= 8
            or q._STEER_VERB_RE.match(point)
            or re.search(
                r"\b(?:this|the) (?:paragraph|piece|essay|section)\b|本段|这一段|本文", point, re.I
            )
        ):
            return point
    return None


def plain_pasted_instruction(text: str, instruction: str) -> str | None:
    n, grams = q._instruction_frames(instruction)
    hit = next((g for g in ngrams(units(text), n) if g in grams), None)
    if hit is None:
        return None
    return ("" if n == q.INSTRUCTION_RUN_MIN["zh"] else " ").join(hit)


def test_pasted_main_point_and_instruction() -> None:
    rng = random.Random(5)
    plans = [tuple(r.plan) for r in _RECORDS if r.plan]
    for r in _RECORDS:
        if not r.response:
            continue
        plan = r.plan or rng.choice(plans)
        pasted = [
            r.response,
            rng.choice(plan) + "\n" + r.response,
            r.instruction + " " + r.response,
        ]
        for text in pasted:
            first = q._first_line(text)
            assert q._pasted_main_point(first, plan) == plain_pasted_main_point(first, plan)
            for inst in (r.instruction, rng.choice(_RECORDS).instruction):
                assert q._pasted_instruction(text, inst) == plain_pasted_instruction(text, inst)
                q._gram_hash_set(text, q._TEMPLATE_N)  # what the echo check builds first
                assert q._pasted_instruction(text, inst) == plain_pasted_instruction(text, inst)


def plain_shared(text: str, earlier: str, n: int) -> int:
    seen = set(ngrams(units(earlier), n))
    return sum(map(seen.__contains__, ngrams(units(text), n)))


def test_restated_counts() -> None:
    rng = random.Random(8)
    paragraphs = [p for t in TEXTS for p in q.split_paragraphs(t)]
    for text in paragraphs[:1500]:
        earlier = rng.choice(paragraphs)
        for lang in ("en", "zh"):
            n = q.RESTATE_N[lang]
            grams = ngrams(units(text), n)
            want = plain_shared(text, earlier, n) / len(grams) if len(grams) >= 8 else 0.0
            assert q.restated_share(text, earlier, lang) == want
            assert q.restated_share(text, text, lang) == (1.0 if len(grams) >= 8 else 0.0)


def test_markup_checks_equal_the_plain_regexes() -> None:
    for text in TEXTS:
        for instruction in ("Write an essay", "Write an HTML page"):
            ctx = q.ParagraphContext(instruction)
            removed: list[str] = []

            def take(m: re.Match[str], removed: list[str] = removed) -> str:
                removed.append(m.group(0))
                return ""

            def take_entity(m: re.Match[str], removed: list[str] = removed) -> str:
                removed.append(m.group(0))
                char = html.unescape(m.group(0))
                return " " if char in q._ENTITY_SPACES else char

            plain = q._SPECIAL_TOKEN_RE.sub(take, text)
            if not ctx.form.markup:
                plain = q._HTML_COMMENT_RE.sub(take, plain)
                plain = q._TAG_RE.sub(
                    lambda m: m.group(0) if q._PROMPT_TAG_RE.fullmatch(m.group(0)) else take(m),
                    plain,
                )
                plain = q._FENCE_LINE_RE.sub(take, plain)
                plain = q._ENTITY_RE.sub(take_entity, plain)
            if removed:
                plain = re.sub(r"[ \t]{2,}", " ", plain)
                plain = re.sub(r" +([,.;:!?，。；：！？])", r"\1", plain)
                plain = re.sub(r"\n{3,}", "\n\n", plain).strip()
            assert q._strip_markup(text, ctx) == (plain, removed), text
            verdict = q.check_markup(text, ctx)
            found = (
                (not ctx.form.markup and q._PLACEHOLDER_RE.search(text))
                or q._SPECIAL_TOKEN_RE.search(text)
                or (
                    not ctx.form.markup
                    and (
                        next(
                            (
                                t
                                for t in q._TAG_RE.finditer(text)
                                if not q._PROMPT_TAG_RE.fullmatch(t.group(0))
                            ),
                            None,
                        )
                        or q._FENCE_LINE_RE.search(text)
                        or q._HTML_COMMENT_RE.search(text)
                        or q._ENTITY_RE.search(text)
                    )
                )
            )
            assert verdict.keep == (not found), text


def _point_pairs() -> list[tuple[str, str]]:
    points = sorted({p for r in _RECORDS for p in r.plan or ()})
    rng = random.Random(21)
    pairs = rng.sample(list(itertools.combinations(points, 2)), 3000)
    for p in points:  # near copies and parallel points: what the checks are there for
        i = rng.randrange(len(p))
        pairs += [
            (p, p[:i] + "宋" + p[i + 1 :]),
            (p, p[:i] + "元朝" + p[i:]),
            (p, p + "，以及其他"),
        ]
        pairs += [(p, p.replace("China", "Japan")), (p, " ".join(p.split()[:-1]) or p)]
    return pairs


def plain_point_contained(a: str, b: str) -> float:
    if cjk_share(a) > 0.5 and cjk_share(b) > 0.5:
        short, long = sorted((q._content_cjk(a), q._content_cjk(b)), key=len)
        if len(short) < q.CONTAINED_MIN_CHARS:
            return 0.0
        blocks = SequenceMatcher(None, short, long, autojunk=False).get_matching_blocks()
        matched = sum(m.size for m in blocks if m.size >= 2)
        if matched >= q.CONTAINED_SHARE * len(short) and matched >= q.CONTAINED_OF_LONGER * len(
            long
        ):
            return matched / len(short)
        return 0.0
    anchors_a, anchors_b = q._anchors(a), q._anchors(b)
    if not anchors_a or anchors_a != anchors_b:
        return 0.0
    wa = {q._stem(w)[:6] for w in q._content_words(a) if len(w) > 2}
    wb = {q._stem(w)[:6] for w in q._content_words(b) if len(w) > 2}
    if min(len(wa), len(wb)) < 3:
        return 0.0
    shared = len(wa & wb)
    contained = shared / min(len(wa), len(wb))
    if contained >= q.PARAPHRASE_CONTAINMENT and shared / len(wa | wb) >= q.PARAPHRASE_JACCARD:
        return contained
    return 0.0


def plain_parallel_points(a: str, b: str) -> bool:
    if cjk_share(a) > 0.5 and cjk_share(b) > 0.5:
        ca, cb = q._ZH_PARTICLES_RE.sub("", a), q._ZH_PARTICLES_RE.sub("", b)
        ops = [
            o
            for o in SequenceMatcher(None, ca, cb, autojunk=False).get_opcodes()
            if o[0] != "equal"
        ]
        return (
            len(ops) == 1
            and ops[0][0] == "replace"
            and ops[0][2] - ops[0][1] <= q.PARALLEL_SLOT_MAX_CHARS
            and ops[0][4] - ops[0][3] <= q.PARALLEL_SLOT_MAX_CHARS
        )

    def words(point: str) -> set[str]:
        return {
            w.lower()
            for w in q._POINT_TOKEN_RE.findall(point)
            if w.lower() not in q._EN_STOP and w.lower() not in q._META_WORDS
        }

    wa, wb = words(a), words(b)
    only_a, only_b = wa - wb, wb - wa
    if not only_a or not only_b:
        return False
    anchors = {w.lower() for w in q._ANCHOR_RE.findall(a.strip()) + q._ANCHOR_RE.findall(b.strip())}
    return only_a <= anchors and only_b <= anchors


def test_plan_pair_checks() -> None:
    positives = {"contained": 0, "parallel": 0}
    for a, b in _point_pairs():
        for x, y in ((a, b), (b, a)):
            held = q.point_contained(x, y)
            assert held == plain_point_contained(x, y), (x, y)
            parallel = q.parallel_points(x, y)
            assert parallel == plain_parallel_points(x, y), (x, y)
            positives["contained"] += held > 0
            positives["parallel"] += parallel
    assert min(positives.values()) > 50  # the bounds were put to the test on both sides


def test_copied_tokens_from_the_instruction() -> None:
    for r in _RECORDS:
        texts = [*(r.plan or ()), r.instruction, r.instruction[: len(r.instruction) // 2]]
        copied_from = q._CopiedFrom(r.instruction)
        for text in texts + [f"The instruction: {r.instruction}"]:
            want = q._copied_tokens(units(text), units(r.instruction))
            assert copied_from(text) == want, (text, r.instruction)


class _Meets:
    """A hash set that meets every other: the checks then take their exact paths, as they do
    when two different n-grams share a hash."""

    def isdisjoint(self, other: object) -> bool:
        return False

    def __contains__(self, item: object) -> bool:
        return True


def test_hashes_meeting_by_chance_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every negative answered from hashes is checked on the n-grams when the hashes meet:
    with hashes that always meet, every outcome is the same."""
    rng = random.Random(4)
    paragraphs = [p for t in TEXTS for p in q.split_paragraphs(t)][:600]
    plans = [tuple(r.plan) for r in _RECORDS if r.plan]

    def outcomes() -> list[object]:
        out: list[object] = []
        for k in range(0, len(paragraphs) - 3, 3):
            text = paragraphs[k]
            inst = rng.choice(_RECORDS).instruction
            ctx = q.ParagraphContext(
                inst, None, rng.choice(plans), tuple(paragraphs[k + 1 : k + 3])
            )
            out += [q.check_prompt_echo(text, ctx), q.check_restated(text, ctx)]
            out.append(q._pasted_instruction(text, inst))
        for r in _RECORDS:
            if r.plan:
                out.append(q.check_plan_echo(r.plan, r.instruction))
        return out

    rng.seed(4)
    want = outcomes()
    meets = _Meets()
    monkeypatch.setattr(q, "_template_hashes", lambda: meets)
    monkeypatch.setattr(q, "_frame_hashes", lambda _instruction: meets)
    monkeypatch.setattr(q, "_shared_hashes", lambda text, n, _seen: q._gram_count(text, n))
    monkeypatch.setattr(q._CopiedFrom, "__init__", _copied_from_meeting_everything, raising=True)
    rng.seed(4)
    assert outcomes() == want


def _copied_from_meeting_everything(self: q._CopiedFrom, instruction: str) -> None:
    self.tokens = q.text_units(instruction).tokens
    self._runs = _Meets()  # type: ignore[assignment]
    self._done = {}
