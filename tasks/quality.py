"""Quality checks over plans, paragraphs and samples: what a careful reader would reject.

Pure functions over text, English and Chinese; no stage, store or Prefect import, so the build
(plan, write, filter), `longwriter audit` and the tests all run the very same checks.

Two kinds of outcome, both with a named reason that is stored:
* a *cleaning*: a local defect at a paragraph's edge (a chatter line such as "Sure! Here's
  paragraph 3:", a trailing `</div>`, a think block, a scaffolding line the model echoed) is
  cut out, and the cut is recorded (`Cleaning(check, detail)`);
* a *failure* (`Verdict(False, reason, detail)`): the text itself is wrong (wrong language,
  prompt text inside the prose, a paragraph restating an earlier one); the write stage
  redrafts it with a new seed and only rejects the sample when every draft fails.

Reason codes: reasoning, chatter, prompt_echo, markup, wrong_language, restated_paragraph,
refusal (paragraph level); plan_duplicate_points, plan_meta_points, plan_echoes_instruction
(plans). Each check errs on the side of passing real prose: dialogue, quoted speech, a letter
that asks for a reply, an essay about HTML, a poem or song whose refrain repeats, Chinese quoting
English terms, parallel plan points ("... in China" / "... in Japan").

The rules describe each defect family, not particular texts: they were widened after the blind
held-out measurement (tests/tasks/test_quality_holdout.py) showed the families they missed, and
every rule has must-pass cases beside its catches in tests/tasks/test_quality.py.
"""

from __future__ import annotations

import functools
import html
import os.path
import re
import threading
import unicodedata
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from pathlib import Path

from tasks.wordcount import (
    cjk_share,
    count_words,
    first_unit,
    letter_runs,
    ngrams,
    no_cjk,
    text_units,
    units,
)

# -- records --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    keep: bool
    reason: str | None = None
    detail: str = ""


KEEP = Verdict(True)


@dataclass(frozen=True)
class Cleaning:
    """One cut made to a text: which check made it and what was removed."""

    check: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"check": self.check, "detail": self.detail}


@dataclass(frozen=True)
class ParagraphContext:
    """What a paragraph is checked against: the instruction (its language, whether it asks
    for markup or verse or a letter), the plan's main points and the paragraphs before it."""

    instruction: str
    lang: str | None = None  # expected language; None: read from the instruction
    main_points: tuple[str, ...] = ()
    previous: tuple[str, ...] = ()
    step: int = 1

    @functools.cached_property
    def expected_lang(self) -> str:
        return self.lang if self.lang in ("en", "zh") else expected_language(self.instruction)

    @functools.cached_property
    def form(self) -> InstructionForm:
        return instruction_form(self.instruction)


@dataclass(frozen=True)
class ParagraphReview:
    text: str  # after cleaning
    cleanings: tuple[Cleaning, ...]
    reasoning: str  # think-block text cut out (stored apart, never content)
    verdict: Verdict

    @property
    def keep(self) -> bool:
        return self.verdict.keep


@dataclass
class SampleReview:
    keep: bool
    reasons: list[str]
    details: list[str]
    cleanings: list[Cleaning]
    paragraphs: list[str]  # cleaned
    reasoning: str = ""
    paragraph_verdicts: list[Verdict] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n\n".join(p for p in self.paragraphs if p.strip())


# -- what the instruction asks for ----------------------------------------------------------


@dataclass(frozen=True)
class InstructionForm:
    markup: bool  # asks for code, HTML, markdown tables...: tags are content
    verse: bool  # poem, song, lyrics: refrains repeat by design
    address: bool  # letter, email, speech: addressing the reader is the form


_MARKUP_ASK_RE = re.compile(
    r"\b(?:html|xml|css|javascript|js|typescript|python|java|sql|json|yaml|latex|markdown|"
    r"code|coding|program(?:ming)?|script|function|tags?|api|regex|shell|bash|svg|jinja|"
    r"template|web ?page|website)\b|代码|编程|程序|标签|网页|脚本|函数",
    re.IGNORECASE,
)
_VERSE_ASK_RE = re.compile(
    r"\b(?:poems?|poetry|song|lyrics|ballad|verses?|sonnet|chant|hymn|rap|limerick|haiku|"
    r"ode|nursery rhyme)\b|诗|歌词|歌曲|童谣|词牌|顺口溜",
    re.IGNORECASE,
)
_ADDRESS_ASK_RE = re.compile(
    r"\b(?:letter|e-?mail|memo|message|note to|speech|toast|eulogy|address|cover letter|"
    r"newsletter|invitation|reply|customer|dialogue|conversation|interview|script|q&a)\b"
    r"|信|邮件|致辞|演讲|讲话|发言|通知|倡议书|对话|采访|剧本|回复",
    re.IGNORECASE,
)


@functools.lru_cache(maxsize=1024)
def instruction_form(instruction: str) -> InstructionForm:
    return InstructionForm(
        markup=bool(_MARKUP_ASK_RE.search(instruction)),
        verse=bool(_VERSE_ASK_RE.search(instruction)),
        address=bool(_ADDRESS_ASK_RE.search(instruction)),
    )


_ASK_EN_RE = re.compile(
    r"\bin english\b|用英[文语語]|英[文语語](?:写|撰写|创作|回答|作答)|翻译成英",
    re.IGNORECASE,
)
_ASK_ZH_RE = re.compile(
    r"\bin (?:chinese|mandarin)\b|用中文|用汉语|用漢語|中文(?:写|撰写|回答|作答)|翻译成中",
    re.IGNORECASE,
)


def expected_language(instruction: str) -> str:
    """'zh' or 'en': what the answer should be written in. An explicit request ("用英文写",
    "in Chinese") wins over the instruction's own language."""
    if _ASK_EN_RE.search(instruction):
        return "en"
    if _ASK_ZH_RE.search(instruction):
        return "zh"
    return "zh" if cjk_share(instruction) > 0.3 else "en"


# -- reasoning blocks -----------------------------------------------------------------------

_THINK_TAGS = r"(?:think|thinking|thought|reasoning|reflection)"
# The spellings reasoning models use for the block's delimiters: <think> (DeepSeek-R1, Qwen3),
# ◁think▷ (Kimi), [THINK] (Magistral), <|begin_of_thought|> (Sky-T1, OpenThoughts).
_THINK_OPEN = rf"(?:<{_THINK_TAGS}>|◁{_THINK_TAGS}▷|\[think\]|<\|begin_of_(?:thought|reasoning)\|>)"
_THINK_CLOSE = (
    rf"(?:</{_THINK_TAGS}>|◁/{_THINK_TAGS}▷|\[/think\]|<\|end_of_(?:thought|reasoning)\|>)"
)
_THINK_BLOCK_RE = re.compile(rf"{_THINK_OPEN}.*?{_THINK_CLOSE}\s*", re.IGNORECASE | re.DOTALL)
_THINK_OPEN_RE = re.compile(rf"^\s*{_THINK_OPEN}", re.IGNORECASE)
_THINK_CLOSE_RE = re.compile(rf"{_THINK_CLOSE}\s*", re.IGNORECASE)
# Every delimiter above holds one of these characters: a text without them has no block.
_THINK_MARKS = ("<", "[", "◁")


def split_reasoning(text: str) -> tuple[str, str]:
    """(answer, reasoning): think blocks cut out of `text`. An unclosed leading block is all
    reasoning (the answer never started); a lone closing tag (DeepSeek-R1's template opens the
    block inside the prompt) makes everything before it reasoning."""
    if not any(c in text for c in _THINK_MARKS):
        return text.strip(), ""  # no delimiter: what the regexes below give for such a text
    parts: list[str] = []

    def take(m: re.Match[str]) -> str:
        parts.append(m.group(0))
        return ""

    answer = _THINK_BLOCK_RE.sub(take, text)
    close = _THINK_CLOSE_RE.search(answer)
    if close and not _THINK_OPEN_RE.match(answer[: close.start()]):
        parts.insert(0, answer[: close.end()])
        answer = answer[close.end() :]
    if _THINK_OPEN_RE.match(answer):
        parts.append(answer)
        answer = ""
    return answer.strip(), "\n".join(p.strip() for p in parts).strip()


# -- chatter addressed to the requester -------------------------------------------------------

# Quotation marks that open dialogue: a line that starts with one is speech, never chatter.
_QUOTE_OPEN = "\"'“‘「『«《"
_META_NOUNS = (
    r"(?:paragraph|section|part|piece|essay|story|article|text|draft|version|continuation|"
    r"response|answer|rewrite|chapter|passage|poem|report|content|introduction|conclusion|"
    r"opening|outline|plan|narrative|composition|blog post|post|letter|speech|script)"
)
_HERE = r"(?:here(?:'s| is| are)|below (?:is|are)|the following is)"
_ARTICLE = r"(?:the|a|an|my|your|this)"
_CHATTER_START_EN = re.compile(
    r"^(?:"
    # an interjection that answers the request: "Sure!", "Certainly, here is"
    r"(?:sure|certainly|of course|absolutely|okay|ok|alright|all right|great|gladly|"
    r"no problem|with pleasure)(?:\s*[!.]+|\s*,\s*(?=here|below|i\b|i'|let|this is|the following))"
    r"|(?:great|good|excellent|interesting|what a (?:great|good|wonderful|fascinating|lovely))"
    r" (?:question|topic|idea|prompt|request|choice)[!.]+"
    # "Here's paragraph 3:", "Here is the rewritten paragraph with a note:"
    rf"|{_HERE}\s+(?:{_ARTICLE}\s+)?(?:[\w-]+\s+){{0,3}}?{_META_NOUNS}s?\b[^.!?:\n]{{0,60}}?[:：]"
    # "Below is a revised version of the essay.", "Here is the next paragraph."
    rf"|{_HERE}\s+(?:{_ARTICLE}\s+)?(?:[\w-]+\s+){{0,3}}?{_META_NOUNS}s?(?:\s+\d+)?"
    rf"(?:\s+(?:of|for|on|about)\s+{_ARTICLE}\s+(?:[\w-]+\s+){{0,2}}?{_META_NOUNS}s?)?\s*[.!]"
    # "Here is the next paragraph, written by you with an exciting twist."
    r"|" + _HERE + r"\s+(?:the |my |a |your )?(?:next |new |following |revised |final )?"
    r"(?:paragraph|section|part|continuation|draft|version|rewrite|response|answer)s?\s*,"
    r"[^.!?:\n]{0,80}[.!]"
    # "I'm ready to help.", "What's the next paragraph you'd like me to write?"
    r"|(?:i'?m|i am) (?:ready|here) to (?:help|assist|write|continue)[^.!?\n]*[.!]+"
    r"|what(?:'s| is) the next " + _META_NOUNS + r"[^?\n]{0,60}\?"
    r"|what (?:would|do) you (?:like|want) me to (?:write|do)[^?\n]{0,60}\?"
    # "Here is what you asked for:", "Here you go!"
    rf"|{_HERE}\s+(?:what|the (?:text|one)) you (?:asked|requested|wanted)[^.!?:\n]{{0,40}}[.!:：]"
    r"|here you (?:go|are)[!.:]+"
    r"|as (?:requested|you requested|you asked)[^.!?:\n]*[.!?:,]+"
    r"|(?:let me|i will|i'll|allow me to) (?:write|continue|draft|provide|start|begin|"
    r"present|expand|rewrite|revise)[^.!?:\n]*[.!?:]+"
    # a disclaimer that goes on to deliver the piece: "As an AI language model, I don't learn
    # languages the way people do, but here is an encouraging essay for adult learners:"
    r"|as an ai(?: language model)?\b[^.!?:\n]{0,120}?\bbut here(?:'s| is| are)\b[^.!?:\n]{0,80}"
    r"[.!:：]"
    r")\s*",
    re.IGNORECASE,
)
# Openings that thank or greet the reader: chatter before an essay or a story, the form itself
# in a letter or a reply ("Thank you for your kind letter", "谢谢你的来信").
_CHATTER_START_EN_ADDRESS = re.compile(
    r"^(?:"
    # "I'm glad to see you've...", "I'd be happy to write...", "Thank you for your request."
    r"(?:i'?m|i am) (?:glad|happy|delighted|excited|pleased) (?:to|that|you)[^.!?\n]*[.!?]+"
    r"|i(?:'d| would) (?:be )?(?:happy|glad|love) to[^.!?\n]*[.!?:]+"
    r"|(?:thank you|thanks) for (?:your|the|this|sharing|asking|providing)[^.!?\n]*[.!?]+"
    r")\s*",
    re.IGNORECASE,
)
_ZH_META_NOUNS = (
    r"(?:第[一二三四五六七八九十\d]+段|段|文章|段落|内容|续写|故事|作文|部分|回答|回复|"
    r"初稿|草稿|版本|散文|诗|稿)"
)
_CHATTER_START_ZH = re.compile(
    r"^(?:"
    r"(?:好的|当然可以|没问题|明白了?|收到|当然)[！!]+|(?:好的|当然可以|没问题|明白了?|收到)[，,。~～]+"
    rf"|(?:以下是|下面是|如下是|这是)[^。！？\n]{{0,30}}?{_ZH_META_NOUNS}[^。！？\n]{{0,15}}?[：:。]"
    r"|(?:以下是|下面是)(?:为(?:你|您)|我为(?:你|您)|(?:你|您)要的|根据)[^。！？\n]{0,30}?[：:。]"
    r"|(?:根据|按照)(?:你|您)的要求[^。！？\n]{0,40}?[：:，,。]"
    r")\s*"
)
_CHATTER_START_ZH_ADDRESS = re.compile(
    r"^(?:"
    r"(?:很高兴|非常乐意|我很乐意|乐意)(?:为(?:你|您)|帮(?:你|您)|能)[^。！？\n]{0,40}[。！!，,]"
    r"|(?:感谢|谢谢)(?:你|您)的[^。！？\n]{0,30}[。！!，,]"
    r")\s*"
)
# Phrases that address the reader: chatter in an essay or story, the form itself in a letter,
# an email or a speech (the instruction says which). One sentence each: the loop in
# `_strip_end_chatter` takes them off one at a time from the end.
_SENT = r"[^.!?\n]*[.!?]*\)?"
_CHATTER_END_EN_ADDRESS = re.compile(
    r"(?:^|(?<=[.!?)]\s)|(?<=\n))\(?(?:"
    r"i hope (?:this|these|that|it|the above|my)\b"
    + _SENT
    + r"|i hope you (?:find|like|enjoy(?:ed)?|found) (?:this|the|these|my|it)\b"
    + _SENT
    + r"|(?:please )?(?:let me know|feel free)\b"
    + _SENT
    + r"|if you (?:have any (?:questions|other|further|feedback|thoughts)|need (?:any|more|"
    r"further|anything|help|changes)|would like (?:me|more|any|to see|changes)|'d like (?:me|"
    r"more|any|to see|changes)|want (?:me|more|any|changes)|wish (?:me|to have))\b"
    + _SENT
    + r"|if there(?:'s| is) anything (?:else )?(?:you|i)\b"
    + _SENT
    + r"|(?:just )?say the word\b"
    + _SENT
    + r")\s*$",
    re.IGNORECASE,
)
# Phrases only an assistant says about its own answer: chatter in every form.
_CHATTER_END_EN = re.compile(
    r"(?:^|(?<=[.!?)]\s)|(?<=\n))\(?(?:"
    r"i hope (?:this|these|that|it) (?:helps|meets|is helpful|was helpful|works|gives you|"
    r"provides|serves|captures|changes)\b"
    + _SENT
    + r"|(?:would|do|shall) you (?:like|want) me to\b"
    + _SENT
    + r"|is there anything else\b"
    + _SENT
    + r"|(?:happy writing|happy reading)!*"
    + r"|i can (?:also )?(?:expand|adjust|revise|rewrite|continue|add|provide|help)\b"
    + _SENT
    # An offer to rework the piece: "Happy to expand any section further - just say the word!"
    # (its object is the text; "I'm glad to continue the tradition" closes an essay)
    + r"|(?:i(?:'d| would) be |i(?:'m| am) (?:also )?)?(?:happy|glad) to (?:expand|elaborate|"
    r"adjust|revise|rewrite|continue|tweak|shorten|lengthen|tailor|refine|polish|add)\b"
    r"[^.!?\n]{0,40}?\b(?:sections?|parts?|paragraphs?|piece|essay|story|article|text|draft|"
    r"version|further|details?|examples?|tips|points?)\b"
    + _SENT
    + r"|(?:thank you|thanks) for (?:reading|your (?:request|patience|time))\b"
    + _SENT
    + r"|(?:note|notes|word count|total words)\s*[:：][^\n]*"
    + r"|\((?:word count|words|note)\s*[:：][^\n)]*\)\.?"
    + r")\s*$",
    re.IGNORECASE,
)
_ZH_SENT = r"[^。！？!?\n]*[。！？!?]*[)）]?"
_CHATTER_END_ZH = re.compile(
    r"(?:^|(?<=[。！？!?）)])|(?<=\n))[(（]?(?:"
    r"(?:以上就是|以上是|这就是|这篇[^。！？\n]{0,8}就写到)[^。！？\n]{0,40}?"
    r"(?:分析|介绍|内容|文章|全部|回答|这里)"
    + _ZH_SENT
    + r"|希望(?:这篇|这段|以上|本文|上述|我的|这些)?(?:内容|文章|回答|文字|建议)?"
    r"(?:对(?:你|您)(?:有所|有)?(?:帮助|用|启发)|(?:你|您)(?:会)?(?:喜欢|满意)|能(?:够)?"
    r"(?:帮到|帮助)(?:你|您))"
    + _ZH_SENT
    + r"|如(?:果|需)[^。！？\n]{0,30}?(?:告诉我|联系我|提出|告知|我可以|我会|可以再|随时)"
    + _ZH_SENT
    + r"|(?:有任何|有什么)[^。！？\n]{0,20}?(?:告诉我|联系我|提出|告知|随时)"
    + _ZH_SENT
    # "如有任何问题，欢迎继续提问", not a guide's "如有需要，可拨打服务热线"
    + r"|如有(?:任何|什么|其他|其它)?(?:问题|疑问|需要|需求|建议|意见|修改)[，,、]?\s*"
    r"(?:请|欢迎|可以|随时|继续|都|尽管)*(?:告诉我|问我|联系我|找我|提问|追问|留言|交流|指出|指正)"
    + _ZH_SENT
    + r"|(?:请|欢迎)(?:随时|继续)?(?:告诉我|告知|提出|联系|提问|追问|指正)"
    + _ZH_SENT
    # The writer offering the next part or a rework: "需要我继续写下一段吗？", and the
    # writer closing its own turn: "这个故事就写到这里".
    + r"|(?:需要|是否需要|要不要)我(?:继续|接着|再|帮(?:你|您)|为(?:你|您))?(?:写|创作|补充|"
    r"修改|扩展|扩写|润色|调整|完善|续写)"
    + _ZH_SENT
    + r"|(?:这个|这篇|本篇|这段|本段|本文|今天)?[^。！？\n]{0,8}?(?:就|先)写到这(?:里|儿)"
    + _ZH_SENT
    + r"|(?:祝(?:你|您)(?:写作|阅读)?(?:愉快|顺利))"
    + _ZH_SENT
    + r"|(?:字数|注|备注)\s*[:：][^\n]*"
    + r")\s*$"
)
# Closing quotation marks (straight quotes are counted by parity instead: an apostrophe in
# "you'd" closes nothing).
_QUOTE_CLOSE = "”’」』»》"


def _speech(line: str) -> bool:
    return line.lstrip()[:1] in _QUOTE_OPEN


def _inside_quotes(line: str, start: int, match: str) -> bool:
    """Whether text at `start` of `line` is (part of) quoted speech: a quotation is open
    before it, or the match itself closes one (“…希望对您有帮助。”她说)."""
    before = line[:start]
    opened = sum(before.count(q) for q in "“‘「『«《")
    closed = sum(before.count(q) for q in "”’」』»》")
    straight = before.count('"')
    inner = match.rstrip("。！？!?.) ）")
    return opened > closed or straight % 2 == 1 or any(q in inner for q in _QUOTE_CLOSE + '"')


def _strip_start_chatter(text: str, address: bool = False) -> tuple[str, list[str]]:
    removed: list[str] = []
    while True:
        lead = text.lstrip()
        if not lead or _speech(lead):
            return lead, removed
        m = _CHATTER_START_EN.match(lead) or _CHATTER_START_ZH.match(lead)
        if m is None and not address:
            m = _CHATTER_START_EN_ADDRESS.match(lead) or _CHATTER_START_ZH_ADDRESS.match(lead)
        if not m or not m.group(0).strip():
            return lead, removed
        removed.append(m.group(0).strip())
        text = lead[m.end() :]


_END_WINDOW = 400
_SENTENCE_BOUNDARY_RE = re.compile(r"[.!?][\"')\]]*\s+|[。！？][”’）)]*")
# Where the end-chatter patterns can start: the line's start or the lookbehinds that open them
# (English: after "[.!?)]" and a space (\s: str.isspace), or a line break; Chinese: after
# "[。！？!?）)]" or a line break). Each pattern is tried at those few places instead of searched
# through the line.
_END_EN_MARKS = ".!?)"
_END_ZH_MARKS = "。！？!?）)"
# Under IGNORECASE an ASCII letter also matches these four characters (U+0130, U+0131, U+017F,
# U+212A; tests/tasks/test_quality_fast.py finds them all).
_IGNORECASE_ASCII_EXTRAS = ("\u0130", "\u0131", "\u017f", "\u212a")


def _starts(line: str, marks: str, space_after: bool) -> list[int]:
    """Where an end-chatter pattern can start, in order: 0, after each line break, and after
    each of `marks` (and the whitespace character after it, with `space_after`). Found with
    str.find (a memchr per character) where a regex scan tries every position."""
    found = {0}
    for mark in (*marks, "\n"):
        at = line.find(mark)
        while at >= 0:
            if mark == "\n" or not space_after:
                found.add(at + 1)
            elif at + 1 < len(line) and line[at + 1].isspace():
                found.add(at + 2)
            at = line.find(mark, at + 1)
    return sorted(found)


def _match_at(pattern: re.Pattern[str], line: str, starts: Sequence[int]) -> re.Match[str] | None:
    """pattern.search(line) for a pattern that can only match at one of `starts` (in order):
    the same leftmost match, tried at those places only (a match at a position sees the text
    before it, as the search does)."""
    for start in starts:
        m = pattern.match(line, start)
        if m is not None:
            return m
    return None


def _end_chatter_match(line: str, address: bool) -> re.Match[str] | None:
    """The end-chatter match in the last line, as the patterns' searches find it. Every
    English pattern needs an ASCII letter (or an IGNORECASE equivalent), every Chinese one a
    CJK character: a line without them is not searched with those."""
    english = letter_runs(line) > 0 or (
        not line.isascii() and any(c in line for c in _IGNORECASE_ASCII_EXTRAS)
    )
    m = None
    en_starts = _starts(line, _END_EN_MARKS, space_after=True) if english else []
    if english:
        m = _match_at(_CHATTER_END_EN, line, en_starts)
    if m is None and not address:
        if english:
            m = _match_at(_CHATTER_END_EN_ADDRESS, line, en_starts)
        if m is None and not no_cjk(line):
            m = _match_at(_CHATTER_END_ZH, line, _starts(line, _END_ZH_MARKS, space_after=False))
    return m


def _strip_end_chatter(text: str, address: bool = False) -> tuple[str, list[str]]:
    removed: list[str] = []
    while True:
        body = text.rstrip()
        # Only the last sentence(s) can be chatter: look at the final line's tail.
        line_start = body.rfind("\n") + 1
        if len(body) - line_start > _END_WINDOW:
            # A long last line: search only its last sentences (the patterns match one
            # sentence), from a sentence boundary, not the whole paragraph.
            cut = len(body) - _END_WINDOW
            boundary = _SENTENCE_BOUNDARY_RE.search(body, cut)
            line_start = boundary.end() if boundary else line_start
        last_line = body[line_start:]
        m = _end_chatter_match(last_line, address)
        if (
            not m
            or not m.group(0).strip()
            or _speech(m.group(0))
            or _inside_quotes(last_line, m.start(), m.group(0))
        ):
            return body, removed
        removed.insert(0, m.group(0).strip())
        text = body[: line_start + m.start()]


# -- prompt echo ----------------------------------------------------------------------------

_PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
# Lines that can only come from the factory's prompts (or a model imitating their format).
_PROMPT_TAG_RE = re.compile(
    r"<</?\s*[a-z_ ]+\s*>>|</?(?:instruction|plan|written|partial|request|response|"
    r"writing_instruction|writing_steps|text_so_far|main_point|current_paragraph|"
    r"paragraph_so_far|outline|already_written)>",
    re.I,
)
# Each pattern with the lower-cased words that every match of it holds: a line is scanned only
# with the patterns whose words it holds, and most lines of plain prose hold none.
_ECHO_LINE_RULES: tuple[tuple[tuple[str, ...], re.Pattern[str]], ...] = (
    (("<",), _PROMPT_TAG_RE),
    (
        ("aim",),
        re.compile(
            r"\baim(?:ing|s)? (?:for|at) (?:about |around |roughly |approximately |a maximum of |"
            r"only |up to )?\d[\d,]* words\b",
            re.I,
        ),
    ),
    # The writer talking about its task: "You're asked to write a long, detailed story",
    # "The text you're asked to write is not only two paragraphs".
    (
        ("asked to write", "task"),
        re.compile(
            r"\b(?:you(?:'re| are)|i(?:'m| am)|we(?:'re| are)) (?:being )?asked to write\b"
            r"|\b(?:your|my|the) task (?:here )?is to write\b",
            re.I,
        ),
    ),
    (("word count",), re.compile(r"\bword count\s*[:：]\s*\d", re.I)),
    (("main point",), re.compile(r"\bparagraph \d+\s*[-–—:]\s*main point\s*[:：]", re.I)),
    (("main point",), re.compile(r"\bmain point\s*[:：]", re.I)),
    (("paragraph",), re.compile(r"\bnow write paragraph \d+", re.I)),
    (("paragraph",), re.compile(r"\bwrite (?:the )?(?:next|opening|first) paragraph only\b", re.I)),
    (
        ("paragraph",),
        re.compile(
            r"^\W*(?:your|my|the) (?:opening|next|first|final|last|new) paragraph\s*[:：]", re.I
        ),
    ),
    (("instruction",), re.compile(r"\bthe writing instruction\s*[:：]?", re.I)),
    (("written",), re.compile(r"\bthe text written so far\b", re.I)),
    (("output only",), re.compile(r"\boutput only the (?:new paragraph|continuation)\b", re.I)),
    (
        ("(to be", "(continued", "(end of paragraph"),
        re.compile(r"\((?:to be (?:completed|continued)|continued|end of paragraph \d+)\)", re.I),
    ),
    (
        ("repeat",),
        re.compile(r"\bdo not repeat (?:any of )?(?:the )?(?:earlier|previous|above) text\b", re.I),
    ),
    (("paragraph",), re.compile(r"\bparagraph \d+ of \d+\b", re.I)),
    # The writer narrating its own work, as small models do: "*Writing the paragraph:",
    # "This sentence continues with the next paragraph", "that's what we need to talk about
    # in the next paragraph". A piece about writing names paragraphs, not its own next one.
    (
        ("paragraph", "section"),
        re.compile(
            r"^\W*(?:writing|continuing|here is|here's) (?:the |this |my )?"
            r"(?:next |new |opening |final )?(?:paragraph|section)\s*[:：]",
            re.I | re.M,
        ),
    ),
    (
        ("this sentence", "this paragraph"),
        re.compile(r"\bthis (?:sentence|paragraph) (?:continues|will continue)\b", re.I),
    ),
    # "The next paragraph can be developed further:", "The next paragraph continues:"
    (
        ("the next",),
        re.compile(
            r"^\W*the next (?:paragraph|section|part|sentence) (?:can|could|will|would|should|"
            r"continues|is|reveals)\b[^.\n]{0,60}[:：]",
            re.I | re.M,
        ),
    ),
    # The prompt's section labels as a line's start: "The plan:", "The plan goes like this:",
    # "Aim: 400 words".
    (
        ("the plan",),
        re.compile(r"^\W*the plan(?: goes like this| is as follows)?\s*[:：]", re.I | re.M),
    ),
    (("aim",), re.compile(r"\baim\s*[:：]\s*\d[\d,]* words\b", re.I)),
    (
        ("paragraph",),
        re.compile(
            r"\b(?:we|i|let's|let us)\b[^.!?\n]{0,60}\b(?:in|into) the (?:next|following) "
            r"paragraph\b",
            re.I,
        ),
    ),
    (("nothing",), re.compile(r"\(nothing (?:yet|written yet)[^)]*\)", re.I)),
    # The writer announcing its own next step, in the prompt's terms: "I will now write the
    # next paragraph of this essay", "In this paragraph, I will describe ...", "as the plan
    # asks". A guide's "In this section we'll cover" is a guide's voice and passes.
    (
        ("paragraph",),
        re.compile(
            r"\b(?:i|we)(?:'ll| will| shall| am going to|'m going to| are going to|'re going to) "
            r"(?:now )?(?:write|compose|draft|continue|begin|start)\s+(?:with\s+|writing\s+)?"
            r"(?:the|this|my|our) (?:next|following|new|opening|first|second|third|final|last|"
            r"closing) paragraph\b",
            re.I,
        ),
    ),
    (
        ("paragraph",),
        re.compile(
            r"\bin this paragraph,? (?:i|we)(?:'ll| will| shall| am going to|'m going to| are "
            r"going to|'re going to)\b",
            re.I,
        ),
    ),
    (
        ("plan ", "outline", "instruction", "prompt", "brief"),
        re.compile(
            r"\bas (?:the|my|your|our) (?:writing )?(?:plan|outline|instructions?|prompt|brief) "
            r"(?:asks|asks for|asked for|requests|wants|instructs)\b",
            re.I,
        ),
    ),
    (
        ("写作", "字数", "主要内容"),
        re.compile(
            r"写作指令\s*[:：]|(?:主要内容|字数)\s*[:：]\s*\S|段落\s*\d+\s*[-–—]\s*主要内容"
        ),
    ),
    (("段",), re.compile(r"(?:你的|我的)?(?:开头|下一|第一)段\s*[:：]")),
    (("已",), re.compile(r"(?:目前|到目前为止)已(?:经)?写(?:好|完)?的(?:内容|文字|文本)\s*[:：]")),
    # The write prompt's lines in Chinese: "现在写第2段（共4段）", "（本段约400字，不要重复前文。）"
    (
        ("段",),
        re.compile(
            r"(?:现在|接下来|下面|请)(?:开始)?(?:写|撰写|续写|创作)第\s*[\d一二三四五六七八九十]+\s*段\s*[（(:：]"
        ),
    ),
    (
        ("段",),
        re.compile(
            r"第\s*[\d一二三四五六七八九十]+\s*段\s*[（(]\s*共\s*[\d一二三四五六七八九十]+\s*段\s*[)）]"
        ),
    ),
    (
        ("段",),
        re.compile(
            r"(?:本段|这一段|此段|这段)(?:约|大约|字数|控制在|不少于|不超过|目标)\s*[:：]?\s*"
            r"[\d一二三四五六七八九十百千]+\s*字"
        ),
    ),
    # the prompt's closing order, not advice ("结尾不要重复前文的内容")
    (
        ("重复",),
        re.compile(
            r"不要重复(?:前文|上文|前面的?内容|之前的?内容|已写的?内容|已有的?内容)\s*[。.]?\s*"
            r"(?:[)）]|$)"
        ),
    ),
)
_ECHO_LINE_RES = tuple(r for _, r in _ECHO_LINE_RULES)
# hint -> the rules that hold it
_ECHO_HINT_RULES: dict[str, tuple[int, ...]] = {}
for _i, (_hints, _) in enumerate(_ECHO_LINE_RULES):
    for _hint in _hints:
        _ECHO_HINT_RULES[_hint] = (*_ECHO_HINT_RULES.get(_hint, ()), _i)
_ECHO_HINTS = tuple(_ECHO_HINT_RULES)
# An ASCII line can hold none of the Chinese hints.
_ECHO_ASCII_HINTS = tuple(k for k in _ECHO_HINTS if k.isascii())
# A hint's gate: a shorter string inside it (another hint, or its opening bracket) tested
# first, since a text without the gate cannot hold the hint: one memchr or one scan for
# several hints ("paragraph" for "this paragraph" and "(end of paragraph").
_ECHO_HINT_GATES: dict[str, str] = {}
for _hint in _ECHO_HINTS:
    _inner = [k for k in _ECHO_HINTS if k != _hint and k in _hint]
    if _inner:
        _ECHO_HINT_GATES[_hint] = min(_inner, key=len)
    elif _hint.startswith("("):
        _ECHO_HINT_GATES[_hint] = "("


def _present_hints(low: str, hints: Sequence[str] | None = None) -> list[str]:
    """The hints (all, or those given) that lower-cased `low` holds."""
    if hints is None:
        hints = _ECHO_ASCII_HINTS if low.isascii() else _ECHO_HINTS
    found: list[str] = []
    for k in hints:
        gate = _ECHO_HINT_GATES.get(k)
        if (gate is None or gate in low) and k in low:
            found.append(k)
    return found


@functools.lru_cache(maxsize=512)
def _echo_regex(rules: tuple[int, ...]) -> re.Pattern[str]:
    """The rules' patterns in one regex: one scan of the line, the leftmost match first."""
    return re.compile(
        "|".join(f"(?:{_ECHO_LINE_RES[i].pattern})" for i in rules),
        re.IGNORECASE | re.MULTILINE,
    )


@functools.lru_cache(maxsize=len(_ECHO_LINE_RES))
def _echo_rule_regex(rule: int) -> re.Pattern[str]:
    """One rule's pattern as _echo_regex holds it (its flags for all)."""
    return re.compile(f"(?:{_ECHO_LINE_RES[rule].pattern})", re.IGNORECASE | re.MULTILINE)


def _echo_match(line: str, hints: Sequence[str] | None = None) -> re.Match[str] | None:
    """The first scaffolding match in one line that is not inside quotation marks (an essay
    on writing that quotes "In this paragraph, I will" as a habit to avoid is no echo).
    `hints`: those the line can hold (the paragraph's, when known)."""
    found = _present_hints(line.lower(), hints)
    if not found:
        return None
    rules = tuple(sorted({i for k in found for i in _ECHO_HINT_RULES[k]}))
    # What _echo_regex(rules).finditer(line) yields, from each rule's own regex (compiled
    # once each, where a regex per set of rules costs ~3 ms to compile the first time): the
    # leftmost match, the first rule in order on a tie (as in the alternation), and the next
    # one searched from its end. A rule matching empty text (none does) takes the plain path.
    pos = 0
    while True:
        best = None
        for i in rules:
            m = _echo_rule_regex(i).search(line, pos)
            if m is not None and (best is None or m.start() < best.start()):
                best = m
        if best is None:
            return None
        if best.end() == best.start():
            break
        if not _inside_quotes(line, best.start(), best.group(0)):
            return best
        pos = best.end()
    for m in _echo_regex(rules).finditer(line):
        if not _inside_quotes(line, m.start(), m.group(0)):
            return m
    return None


_JINJA_RE = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.DOTALL)


# A template sentence this long is the prompt's own wording, not a phrase prose shares by chance.
TEMPLATE_SENTENCE_MIN_WORDS = 6


# Prompts no writer sees: the judge's rubric is ordinary English about writing ("Its sentences
# are clear, precise and easy to follow") that a book review may well use.
_NOT_WRITER_PROMPTS = frozenset({"judge"})


@functools.lru_cache(maxsize=1)
def template_sentences() -> tuple[str, ...]:
    """Normalised sentences (6+ words) of the prompt templates a writer (planner, drafter,
    continuer) is shown: a paragraph that holds one is an echo of the prompt, whatever the
    model's wording around it."""
    found: set[str] = set()
    for path in sorted(_PROMPTS_DIR.glob("*.j2")):
        if path.stem in _NOT_WRITER_PROMPTS:
            continue
        source = _JINJA_RE.sub("\n", path.read_text(encoding="utf-8"))
        for sentence in re.split(r"(?<=[.:!?])\s+|\n+", source):
            words = units(sentence)
            if len(words) >= TEMPLATE_SENTENCE_MIN_WORDS:
                found.add(" ".join(words))
    return tuple(sorted(found))


# Normal forms kept: the plan's main points are normalised for every draft of the piece.
_NORMAL_CACHE_TEXTS = 4096


@functools.lru_cache(maxsize=_NORMAL_CACHE_TEXTS)
def _normal(text: str) -> str:
    # text_units: a draft's first line is often the whole draft, whose units are read anyway.
    return " ".join(text_units(unicodedata.normalize("NFKC", text)).tokens)


_STEER_VERB_RE = re.compile(
    r"^\W*(?:introduce|describe|discuss|explain|explore|present|outline|conclude|summari[sz]e|"
    r"highlight|analy[sz]e|examine|provide|detail|illustrate|show|reflect|establish|begin|"
    r"open|close|end|wrap|transition|compare|contrast|list|recount|narrate|set up|tell|"
    r"介绍|描述|讨论|阐述|说明|总结|分析|探讨|概述|描写|叙述|回顾|展望|强调|引出|交代|点明|"
    r"列举|讲述|比较|阐明|引入)",
    re.IGNORECASE,
)


_ABOUT_THE_PIECE_RE = re.compile(
    r"\b(?:this|the) (?:paragraph|piece|essay|section)\b|本段|这一段|本文", re.I
)


def _pasted_main_point(first_line: str, main_points: Sequence[str]) -> str | None:
    """The plan main point that opens the paragraph verbatim, when it reads as a plan step
    (an instruction to the writer, or a long description) rather than a natural heading."""
    # From the line's first unit first: a line whose normal form starts with a point's has a
    # first unit that starts with the point's first unit, so the whole line is normalised
    # (for Chinese, a units pass of its own) only when some point passes that test.
    opening = first_unit(unicodedata.normalize("NFKC", first_line))
    if opening is None:
        return None  # the normal form is empty
    line = ""
    for point in main_points:
        p = _normal(point)
        if not p or not opening.startswith(p.split(" ", 1)[0]):
            continue
        line = line or _normal(first_line)
        if not line.startswith(p):
            continue
        long_point = len(p.split()) >= 8
        if long_point or _STEER_VERB_RE.match(point) or _ABOUT_THE_PIECE_RE.search(point):
            return point
    return None


def _first_line(text: str) -> str:
    stripped = text.strip()
    end = stripped.find("\n")
    return stripped if end < 0 else stripped[:end]


_ECHO_EDGE_LINE_MAX_WORDS = 25


def _echo_lines(text: str, look_for_sentences: bool = True) -> list[tuple[int, str]]:
    """(line index, matched text) of every line that holds the prompt's scaffolding.
    `look_for_sentences` False: the text's 6-grams are known to meet no template sentence's,
    so no line holds one."""
    hits: list[tuple[int, str]] = []
    # A line holds only hints its paragraph holds (lines are pieces of it, and lower() maps
    # each character alone but the final sigma, which no hint holds): one scan of the
    # paragraph leaves most lines of prose nothing to look for.
    hints = _present_hints(text.lower())
    for i, line in enumerate(text.splitlines()):
        m = _echo_match(line, hints) if hints else None
        if m:
            hits.append((i, m.group(0)))
            continue
        if not look_for_sentences:
            continue
        hit = _template_sentence_in(line)
        if hit:
            hits.append((i, hit))
    return hits


@functools.lru_cache(maxsize=1)
def _template_sentence_words() -> tuple[int, tuple[tuple[str, frozenset[str]], ...]]:
    """Per template sentence, the words a line holding it must hold whole (all but its first
    and last, which may be pieces of longer words), and the fewest ASCII words among those."""
    entries = tuple((s, frozenset(s.split()[1:-1])) for s in template_sentences())
    fewest = min((sum(w.isascii() for w in inner) for _, inner in entries), default=0)
    return fewest, entries


def _template_sentence_in(line: str) -> str | None:
    """The first template sentence that the line's normal form holds (one of 6+ words)."""
    fewest, entries = _template_sentence_words()
    # A line with fewer English words than every template sentence holds whole holds none:
    # most Chinese lines are ruled out before their normal form is built.
    nfkc = unicodedata.normalize("NFKC", line)
    if fewest and letter_runs(nfkc.lower()) < fewest:
        return None
    norm = _normal(line)
    words = norm.split()
    if len(words) < TEMPLATE_SENTENCE_MIN_WORDS:
        return None
    held = frozenset(words)
    return next((s for s, inner in entries if inner <= held and s in norm), None)


# A run this long copied from a template sentence is the prompt's wording, even when the
# sentence around it is the model's own: "As a skilled writer working through a long piece one
# paragraph at a time, I will ..." echoes "You are a skilled writer working through ...".
TEMPLATE_RUN_WORDS = 8
_TEMPLATE_N = 6  # the restatement check's English n: the text's n-grams come from its cache


@functools.lru_cache(maxsize=1)
def _template_grams() -> frozenset[tuple[str, ...]]:
    return frozenset(g for s in template_sentences() for g in ngrams(s.split(), _TEMPLATE_N))


@functools.lru_cache(maxsize=1)
def _template_hashes() -> frozenset[int]:
    return frozenset(map(hash, _template_grams()))


def _meets_templates(text: str) -> bool:
    """Whether any 6-gram of the text is a template sentence's: ruled out from hashes (the
    common answer, no n-gram kept), checked on the n-grams when their hashes meet."""
    if _template_hashes().isdisjoint(_gram_hash_set(text, _TEMPLATE_N)):
        return False
    return not _template_grams().isdisjoint(_gram_set(text, _TEMPLATE_N))


def _template_run(
    grams: Sequence[tuple[str, ...]], gram_set: AbstractSet[tuple[str, ...]] | None = None
) -> str | None:
    """The first run of TEMPLATE_RUN_WORDS or more words (consecutive n-grams) that a
    template sentence holds, or None. `gram_set`: the same n-grams as a set, when built (set
    against set compares stored hashes; each tuple of a list is hashed again)."""
    known = _template_grams()
    if known.isdisjoint(grams if gram_set is None else gram_set):
        return None
    need = TEMPLATE_RUN_WORDS - _TEMPLATE_N + 1
    run = 0
    for i, g in enumerate(grams):
        run = run + 1 if g in known else 0
        if run >= need:
            first = grams[i - need + 1]
            return " ".join(first + g[_TEMPLATE_N - need + 1 :])
    return None


# A bracketed note closing the paragraph: "（本段约400字，不要重复前文。）", "(Aim: 400 words)".
_TRAILING_NOTE_RE = re.compile(r"\s*[(（][^()（）\n]{1,80}[)）][.。]?\s*$")


def _strip_echo_edges(text: str, ctx: ParagraphContext) -> tuple[str, list[str]]:
    """Drop whole scaffolding lines at the paragraph's start and end (a short line that is
    only "Your next paragraph:" or "Aim for about 400 words (to be completed)"), a bracketed
    scaffolding note at its very end, and a plan main point pasted as the opening line when
    prose follows it."""
    removed: list[str] = []
    lines = text.strip().splitlines()

    def is_scaffold(line: str) -> bool:
        if not line.strip():
            return True
        if count_words(line) > _ECHO_EDGE_LINE_MAX_WORDS:
            return False
        if _echo_lines(line):
            return True
        return _template_run(ngrams(units(line), _TEMPLATE_N)) is not None

    while lines and is_scaffold(lines[0]):
        if lines[0].strip():
            removed.append(lines[0].strip())
        lines.pop(0)
    while lines and is_scaffold(lines[-1]):
        if lines[-1].strip():
            removed.append(lines[-1].strip())
        lines.pop()
    tail = lines[-1].rstrip()[-2:] if lines else ""
    note = _TRAILING_NOTE_RE.search(lines[-1]) if ")" in tail or "）" in tail else None
    if note and note.start() > 0 and _echo_lines(note.group(0)):
        removed.append(note.group(0).strip())
        lines[-1] = lines[-1][: note.start()]
    if len(lines) > 1 and ctx.main_points:
        point = _pasted_main_point(lines[0], ctx.main_points)
        if point is not None and _normal(lines[0]) == _normal(point):
            removed.append(lines[0].strip())
            lines.pop(0)
    return "\n".join(lines).strip(), removed


# Words that frame a request rather than its subject ("Write a long, detailed story about"):
# a run copied from the instruction that holds two of them is the request pasted back, not a
# sentence about the same subject ("a message in a bottle" from the same instruction is).
_REQUEST_FRAME_WORDS = frozenset(
    "write writing written long detailed article story essay piece guide report words "
    "explain explaining describe describing paragraph paragraphs poem letter blog post "
    "speech review summary account".split()
)
_REQUEST_FRAME_CHARS = frozenset("写篇文章详细介绍字")
INSTRUCTION_RUN_MIN = {"en": 6, "zh": 8}
# Instructions whose frames are kept: those of the pieces drafted at once.
_INSTRUCTION_CACHE = 256


@functools.lru_cache(maxsize=_INSTRUCTION_CACHE)
def _instruction_frames(instruction: str) -> tuple[int, frozenset[tuple[str, ...]]]:
    """The instruction's n-grams (6 words, 8 Chinese characters) holding two or more of its
    request-framing words: what a pasted request shares with it."""
    lang = "zh" if cjk_share(instruction) > 0.5 else "en"
    n = INSTRUCTION_RUN_MIN[lang]
    frame = _REQUEST_FRAME_CHARS if lang == "zh" else _REQUEST_FRAME_WORDS
    grams = frozenset(g for g in ngrams(units(instruction), n) if sum(t in frame for t in g) >= 2)
    return n, grams


@functools.lru_cache(maxsize=_INSTRUCTION_CACHE)
def _spaced_frames(instruction: str) -> tuple[str, ...]:
    """The instruction's frames as TextUnits.spaced substrings."""
    return tuple(f" {' '.join(g)} " for g in _instruction_frames(instruction)[1])


@functools.lru_cache(maxsize=_INSTRUCTION_CACHE)
def _frame_hashes(instruction: str) -> frozenset[int]:
    return frozenset(map(hash, _instruction_frames(instruction)[1]))


def _pasted_instruction(text: str, instruction: str) -> str | None:
    """A run of the instruction copied into the text (6 words or 8 Chinese characters) that
    holds two or more of its request-framing words: "a long, detailed story about a
    lighthouse keeper" in a story asked for as "Write a long, detailed story about a
    lighthouse keeper ..."."""
    n, grams = _instruction_frames(instruction)
    if not grams:
        return None
    # Whether any frame (a few) can be in the text first: ruled out by the text's n-gram
    # hashes when the echo check built them (English), else by the spaced units holding none
    # of them (Chinese: nothing built for this alone). The text is read in order only then.
    tu = text_units(text)
    if tu.has_hash_set(n):
        if _frame_hashes(instruction).isdisjoint(tu.gram_hash_set(n)):
            return None
    else:
        spaced = tu.spaced
        if not any(f in spaced for f in _spaced_frames(instruction)):
            return None
    hit = next((g for g in _gram_list(text, n) if g in grams), None)
    if hit is None:
        return None
    return ("" if n == INSTRUCTION_RUN_MIN["zh"] else " ").join(hit)  # n says the language


def check_prompt_echo(text: str, ctx: ParagraphContext) -> Verdict:
    # The templates are English: an English text's 6-grams (shared with the restatement
    # check's cache) rule most of the template matching out at once.
    # (From their hashes: the n-grams themselves are built only when those meet a template's.)
    meets = _meets_templates(text) if cjk_share(text) <= 0.5 else None
    hits = _echo_lines(text, look_for_sentences=meets is not False)
    if hits:
        i, what = hits[0]
        return Verdict(False, "prompt_echo", f"line {i + 1} holds prompt text {what[:60]!r}")
    run = None
    if meets:
        run = _template_run(_gram_list(text, _TEMPLATE_N), _gram_set(text, _TEMPLATE_N))
    if run is not None:
        return Verdict(False, "prompt_echo", f"holds the prompt's wording {run[:60]!r}")
    point = _pasted_main_point(_first_line(text), ctx.main_points)
    if point is not None:
        return Verdict(False, "prompt_echo", f"opens with plan main point {point[:60]!r}")
    if ctx.instruction:
        pasted = _pasted_instruction(text, ctx.instruction)
        if pasted is not None:
            return Verdict(False, "prompt_echo", f"pastes the instruction: {pasted[:60]!r}")
    return KEEP


# -- markup residue -------------------------------------------------------------------------

# Chat-template and tokenizer tokens: never content, whatever was asked.
_SPECIAL_TOKEN_RE = re.compile(
    r"<\|[a-z_]{2,30}\|>|\[/?INST\]|<</?SYS>>|</?s>(?=\s|$)|<(?:bos|eos|pad|unk|"
    r"start_of_turn|end_of_turn)>",
    re.IGNORECASE,
)
_TAG_RE = re.compile(
    r"</?[a-zA-Z][\w:-]*(?:\s+[^<>\n]*?)?\s*/?>|<[a-zA-Z][\w-]*=\"[^\"]*\"\s*/?>"
    r"|<\s*/?\s*>(?=\s|$)"  # an empty tag, "<>", left where a model's markup was
)
_FENCE_LINE_RE = re.compile(r"^\s*(?:```|~~~)[\w+-]*\s*$", re.MULTILINE)
# What a page's source leaves in extracted or model-written prose: an HTML comment
# ("<!-- end of paragraph 2 -->") and character entities ("&nbsp;", "&#8212;"). Prose writes
# the character itself; an entity is markup wherever markup was not asked for.
_HTML_COMMENT_RE = re.compile(r"<!--.{0,2000}?-->", re.DOTALL)
_ENTITY_RE = re.compile(
    r"&(?:nbsp|amp|lt|gt|quot|apos|[lr][sd]quo|[mn]dash|hellip|ensp|emsp|thinsp|shy|zwn?j|"
    r"middot|bull|laquo|raquo|copy|reg|trade|deg|times|#\d{2,7}|#x[0-9a-f]{2,6});",
    re.IGNORECASE,
)
_ENTITY_SPACES = frozenset("\u00a0\u2002\u2003\u2009\u00ad\u200c\u200d")
_PLACEHOLDER_RE = re.compile(r"\{\{[^{}\n]{1,80}\}\}|\{%[^{}\n]{1,80}%\}")


def _may_hold_special_token(text: str) -> bool:
    # Every _SPECIAL_TOKEN_RE match opens with "<" or "[".
    return "<" in text or "[" in text


# A character first, then the string: a one-character test is a memchr, a longer one a scan.
def _may_hold_fence(text: str) -> bool:
    return ("`" in text and "```" in text) or ("~" in text and "~~~" in text)


def _may_hold_placeholder(text: str) -> bool:
    return "{" in text and ("{{" in text or "{%" in text)


def _may_hold_comment(text: str) -> bool:
    return "<" in text and "<!--" in text


_SPACES_RE = re.compile(r"[ \t]{2,}")
_SPACE_BEFORE_PUNCT_RE = re.compile(r" +([,.;:!?，。；：！？])")
_BLANK_LINES_RE = re.compile(r"\n{3,}")


def _strip_markup(text: str, ctx: ParagraphContext) -> tuple[str, list[str]]:
    removed: list[str] = []

    def take(m: re.Match[str]) -> str:
        removed.append(m.group(0))
        return ""

    def take_markup(m: re.Match[str]) -> str:
        # The factory's own prompt tags are left for the echo check: what they wrap (a pasted
        # instruction) is an echo to redraft, not markup to cut.
        return m.group(0) if _PROMPT_TAG_RE.fullmatch(m.group(0)) else take(m)

    def take_entity(m: re.Match[str]) -> str:
        removed.append(m.group(0))
        char = html.unescape(m.group(0))
        return " " if char in _ENTITY_SPACES else char

    # Each regex only where the characters every match of it holds are in the text (most
    # prose has no "<", "[" or fence): a regex scan per draft costs more than these tests.
    if _may_hold_special_token(text):
        text = _SPECIAL_TOKEN_RE.sub(take, text)
    if not ctx.form.markup:
        if _may_hold_comment(text):
            text = _HTML_COMMENT_RE.sub(take, text)
        if "<" in text:
            text = _TAG_RE.sub(take_markup, text)
        if _may_hold_fence(text):
            text = _FENCE_LINE_RE.sub(take, text)
        if "&" in text:
            text = _ENTITY_RE.sub(take_entity, text)
    if removed:
        text = _SPACES_RE.sub(" ", text)
        text = _SPACE_BEFORE_PUNCT_RE.sub(r"\1", text)
        text = _BLANK_LINES_RE.sub("\n\n", text).strip()
    return text, removed


def check_markup(text: str, ctx: ParagraphContext) -> Verdict:
    # As in _strip_markup: a regex only where its matches' characters are in the text.
    placeholder = not ctx.form.markup and _may_hold_placeholder(text)
    m = _PLACEHOLDER_RE.search(text) if placeholder else None
    if m:
        return Verdict(False, "markup", f"unfilled template placeholder {m.group(0)[:40]!r}")
    m = _SPECIAL_TOKEN_RE.search(text) if _may_hold_special_token(text) else None
    if m:
        return Verdict(False, "markup", f"chat-template token {m.group(0)!r}")
    if not ctx.form.markup:
        if "<" in text:
            tags = (t for t in _TAG_RE.finditer(text) if not _PROMPT_TAG_RE.fullmatch(t.group(0)))
            m = next(tags, None)
        if m is None and _may_hold_fence(text):
            m = _FENCE_LINE_RE.search(text)
        if m is None and _may_hold_comment(text):
            m = _HTML_COMMENT_RE.search(text)
        if m is None and "&" in text:
            m = _ENTITY_RE.search(text)
        if m:
            return Verdict(False, "markup", f"markup {m.group(0).strip()[:40]!r} in prose")
    return KEEP


# -- language -------------------------------------------------------------------------------

# Share of counted units that are CJK characters: a Chinese text quoting English terms stays
# far above the first, an English text quoting a Chinese poem far below the second.
ZH_MIN_CJK_SHARE = 0.6
EN_MAX_CJK_SHARE = 0.25
MIN_UNITS_FOR_LANGUAGE = 20


def check_language(text: str, ctx: ParagraphContext) -> Verdict:
    if count_words(text) < MIN_UNITS_FOR_LANGUAGE:
        return KEEP
    share = cjk_share(text)
    if ctx.expected_lang == "zh" and share < ZH_MIN_CJK_SHARE:
        return Verdict(
            False, "wrong_language", f"instruction is Chinese; text is {share:.0%} Chinese"
        )
    if ctx.expected_lang == "en" and share > EN_MAX_CJK_SHARE:
        return Verdict(
            False, "wrong_language", f"instruction is English; text is {share:.0%} Chinese"
        )
    return KEEP


# -- restating an earlier paragraph ---------------------------------------------------------

# n-gram length per language (words for English, characters for Chinese) and the share of a
# paragraph's n-grams found in one earlier paragraph above which it restates that paragraph.
RESTATE_N = {"en": 6, "zh": 10}
RESTATE_MIN_SHARE = 0.3
# Verse repeats its refrain by design: only a near copy counts as restating there.
RESTATE_MIN_SHARE_VERSE = 0.8
RESTATE_MIN_GRAMS = 8


def _gram_list(text: str, n: int) -> tuple[tuple[str, ...], ...]:
    # Cached (tasks.wordcount.text_units): every paragraph is compared with all those before
    # it, so each earlier one's n-grams would otherwise be rebuilt once per later paragraph
    # (quadratic in a sample); and the echo, restatement and repetition checks share them.
    return text_units(text).grams(n)


def _gram_set(text: str, n: int) -> frozenset[tuple[str, ...]]:
    return text_units(text).gram_set(n)


def _gram_count(text: str, n: int) -> int:
    return text_units(text).gram_count(n)


def _gram_hashes(text: str, n: int) -> tuple[int, ...]:
    return text_units(text).gram_hashes(n)


def _gram_hash_set(text: str, n: int) -> frozenset[int]:
    return text_units(text).gram_hash_set(n)


def _shared_hashes(text: str, n: int, seen: AbstractSet[int]) -> int:
    """How many of the text's n-grams (each occurrence) have a hash in `seen`: at least as
    many as are in the n-grams `seen` was made from, so a count under a limit proves the
    n-grams' count is under it too."""
    mine = _gram_hash_set(text, n)
    if len(mine) == _gram_count(text, n):
        return len(mine & seen)
    return sum(map(seen.__contains__, _gram_hashes(text, n)))


def _shared_grams(text: str, n: int, seen: AbstractSet[tuple[str, ...]]) -> int:
    """How many of the text's n-grams (each occurrence) are in `seen`. With no n-gram twice
    in the text, the size of the sets' intersection (stored hashes, no tuple hashed again)."""
    mine = _gram_set(text, n)
    if len(mine) == _gram_count(text, n):
        return len(mine & seen)
    return sum(map(seen.__contains__, _gram_list(text, n)))


class _RunningGrams(threading.local):
    """Per thread, per piece (keyed by its n and first paragraph): the paragraphs seen so far
    and the union of their n-grams' hashes. Each paragraph is checked against all those before
    it, so the union grows by one paragraph per call; rebuilding it (or a frozenset union per
    paragraph) made the restatement check quadratic in a sample's length. Hashes, not the
    n-grams: ints the garbage collector never walks, and enough to rule a restatement out."""

    def __init__(self) -> None:
        self.pieces: dict[tuple[int, str], tuple[tuple[str, ...], set[int]]] = {}


_RUNNING = _RunningGrams()
_RUNNING_MAX_PIECES = 64  # pieces drafted at once in one thread (the build interleaves them)


def _previous_hashes(previous: tuple[str, ...], n: int) -> AbstractSet[int]:
    """The n-gram hashes of every paragraph in `previous` (read only: grown in place)."""
    if not previous:
        return frozenset()
    pieces = _RUNNING.pieces
    slot = (n, previous[0])
    done, grams = pieces.get(slot, ((), set()))
    if len(done) > len(previous) or previous[: len(done)] != done:
        done, grams = (), set()  # another piece with the same opening, or a redraft earlier on
    for text in previous[len(done) :]:
        grams.update(_gram_hashes(text, n))
    if slot not in pieces and len(pieces) >= _RUNNING_MAX_PIECES:
        pieces.clear()
    pieces[slot] = (previous, grams)
    return grams


def restated_share(text: str, earlier: str, lang: str) -> float:
    n = RESTATE_N.get(lang, 6)
    count = _gram_count(text, n)
    if count < RESTATE_MIN_GRAMS:
        return 0.0
    return _shared_grams(text, n, _gram_set(earlier, n)) / count


# A stanza: three or more short lines, none a list item (a recipe's steps are not verse).
_VERSE_LINE_MAX_UNITS = {"en": 14, "zh": 20}
_LIST_ITEM_RE = re.compile(r"^\s*(?:\d+[.)、]|[-*•]|[（(]?[一二三四五六七八九十]+[、.）)])")
_REFRAIN_LABEL_RE = re.compile(
    r"^\W*(?:(?:pre-?|post-?)?chorus|refrain|hook|副歌|合唱|叠句)\W*(?:[x×]\s*\d+)?\W*$",
    re.IGNORECASE,
)


def _verse_shaped(text: str, lang: str) -> bool:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 3:
        return False
    limit = _VERSE_LINE_MAX_UNITS[lang]
    return all(count_words(ln) <= limit and not _LIST_ITEM_RE.match(ln) for ln in lines)


def _refrain_index(stanzas: Sequence[str], limit: float, lang: str) -> int | None:
    """0-based index of the refrain: the stanza that the first repeat in the piece repeats."""
    for t in range(1, len(stanzas)):
        for k in range(t):
            if restated_share(stanzas[t], stanzas[k], lang) >= limit:
                return k
    return None


def _is_refrain(text: str, j: int, ctx: ParagraphContext, limit: float, lang: str) -> bool:
    """Whether `text`, a stanza repeating stanza j (1-based), repeats it as a refrain: it is
    labelled as one ("Chorus:"), or stanza j is the piece's refrain (the stanza its first
    repeat repeated, or none yet: this repeat makes it one). A second stanza repeated besides
    the refrain is a loop (the song written out again), not a refrain."""
    earlier = ctx.previous[j - 1]
    verse = ctx.form.verse or (_verse_shaped(text, lang) and _verse_shaped(earlier, lang))
    if not verse:
        return False
    if _REFRAIN_LABEL_RE.match(_first_line(text)):
        return True
    refrain = _refrain_index(ctx.previous, limit, lang)
    return refrain is None or refrain == j - 1


def check_restated(text: str, ctx: ParagraphContext) -> Verdict:
    limit = RESTATE_MIN_SHARE_VERSE if ctx.form.verse else RESTATE_MIN_SHARE
    lang = "zh" if cjk_share(text) > 0.5 else "en"
    n = RESTATE_N[lang]
    count = _gram_count(text, n)
    if count < RESTATE_MIN_GRAMS:
        return KEEP
    if not ctx.previous:
        # Nothing to restate yet; the hashes are taken now all the same: the next paragraph's
        # check adds them to its union, and this draft's repetition share starts from them.
        _gram_hash_set(text, n)
        return KEEP
    # Against everything before it at once first: under the limit there, it is under the
    # limit against every single earlier paragraph (the common case, one set lookup each).
    # Counted by hash, the count is at least the n-grams' own: under the limit, so are they.
    seen = _previous_hashes(ctx.previous, n)
    if _shared_hashes(text, n, seen) < limit * count:
        return KEEP
    for j, earlier in enumerate(ctx.previous, start=1):
        share = restated_share(text, earlier, lang)
        if share >= limit and not _is_refrain(text, j, ctx, limit, lang):
            return Verdict(
                False,
                "restated_paragraph",
                f"{share:.0%} of its {RESTATE_N.get(lang, 6)}-grams restate paragraph {j}",
            )
    return KEEP


# Opening phrases of refusals and assistant boilerplate, English and Chinese. Matched against
# the first 200 characters of a paragraph (tasks/filters.py does the same), so a co-occurrence
# condition is a lookahead inside that window. Each phrase declines the *request*: "I'm sorry,
# but I can't", not "I'm sorry I missed your wedding"; "I'm unable to write this as if",
# not "I am unable to sit still"; "我无法为您撰写", not "我无法忘记那个夏天".
# The request as the object: "write a ...", "write this", "fulfil", not "write for a few weeks"
# or "write about my father".
_DECLINE_VERB = (
    r"(?:(?:write|produce|generate|create|compose|provide|draft|complete|offer)\s+(?:a|an|the|"
    r"this|that|these|those|such|your|it|any|one|content|stories|essays|articles|poems|\d)\b"
    r"|fulfil|fulfill|assist|comply|help (?:with|you)|do (?:that|this|it|so)\b|continue\b)"
)
_CANT = r"(?:can(?:no|')t|am unable|'m unable|am not able|'m not able|won't|will not|unable)"
# Something the writer would only say about a request: a genre, "this", "that", the request.
_REQUEST_OBJECT = (
    r"(?:(?:a|an|the|this|that|such|these|those|any|your)\s+)?(?:[\w,-]+\s+){0,3}?"
    r"(?:satir(?:e|ical)|content|stor(?:y|ies)|essays?|articles?|pieces?|poems?|jokes?|fiction|"
    r"material|texts?|request|biograph(?:y|ies)|parod(?:y|ies)|scenes?|monologues?|reviews?|"
    r"guides?|novels?|novellas?|memoirs?)\b"
)
_WRITING = r"(?:writing|producing|creating|generating|composing)"
# "无法…写", "不能撰写", "没法继续创作": declining to write, not "我不能参加你的婚礼".
_ZH_DECLINE = (
    r"(?:无法|不能|没法|没有办法|不便)[^。！？\n]{0,12}?(?:写|创作|撰写|提供|生成|完成|满足|协助|帮|"
    r"回答|继续)"
)
REFUSAL_RE = re.compile(
    r"^[^\w\"'“‘「『«《]*"  # markdown or a bullet before it, never an opening quotation mark
    # a softener before the refusal: "Unfortunately,", "While I'd love to help,"
    r"(?:(?:unfortunately|regrettably|sadly)\s*,?\s*|i(?:'m| am) afraid(?: that)?\s*,?\s*"
    r"|(?:while|although|though) i(?:'d| would)? (?:love|like|be happy|be glad|want) to "
    r"[^,.!?\n]{0,40},\s*|thank you for [^.!?\n]{0,60}?,\s*(?:but\s+)?)?"
    r"(?:i(?:'m| am) (?:so |very |really |truly )?sorry,?\s*(?:but\b|i " + _CANT + r")"
    r"|i(?:'m| am) (?:unable|not able) to "
    + _DECLINE_VERB
    + r"|i can(?:no|')t "
    + _DECLINE_VERB
    + r"|i (?:won't|will not) be able to "
    + _DECLINE_VERB
    # "I must decline to write ...", not a letter's "I must decline your kind invitation"
    + r"|i (?:must|have to|need to|will have to|'ll have to|would have to|'d have to) "
    r"(?:respectfully |politely |kindly )?(?:decline|refuse) (?:to "
    + _DECLINE_VERB
    + r"|(?:this|your|the|that) request)"
    r"|i(?:'m| am) not (?:really |entirely )?comfortable "
    + _WRITING
    + " "
    + _REQUEST_OBJECT
    + r"|i (?:don't|do not) feel comfortable "
    + _WRITING
    + " "
    + _REQUEST_OBJECT
    # "As an AI, I ...", "As an AI language model I ...": not "As an AI researcher, I ..."
    + r"|as an? (?:ai|(?:ai |large )?language model)(?: assistant| model| system)?(?:\s*,|\s+i\b)"
    r"|i apologi[sz]e,? but|sorry,? (?:but )?i (?:can|" + _CANT + r")"
    # what the writer lacks, followed by what it therefore cannot write
    r"|(?:i(?:'m| am) (?:just |only )?an? (?:ai|artificial intelligence|(?:ai |large )?language "
    r"model|ai assistant|chatbot)\b|i (?:don't|do not) have (?:any )?(?:personal|real|lived|"
    r"first-?hand|my own) (?:experiences?|memories|feelings|emotions|opinions|life|childhood)\b)"
    r"(?=[^\n]{0,160}?\b" + _CANT + r"\b[^\n]{0,40}?\b" + _DECLINE_VERB + r")"
    # Chinese: an apology that goes on to decline to write, the writer naming itself a model,
    # or "我无法…" with the request as its object
    r"|(?:非常|很|十分)?(?:抱歉|对不起|遗憾|不好意思)(?=[^\n]{0,80}?" + _ZH_DECLINE + r")"
    r"|作为一?(?:个|名)?(?:ai|人工智能|语言模型|ai助手|人工智能助手)"
    r"|我(?:只)?是一?(?:个|名)?(?:ai|人工智能|语言模型|ai助手|人工智能助手|聊天机器人)"
    r"(?=[^\n]{0,100}?" + _ZH_DECLINE + r")"
    r"|我没有(?:童年|亲身经历|个人经历|真实的?经历|自己的经历|身体|情感|感情|记忆)"
    r"(?=[^\n]{0,100}?" + _ZH_DECLINE + r")"
    r"|恕我(?:无法|不能)"
    r"|我(?:无法|不能|没法|没有办法)(?:为(?:你|您)|帮(?:你|您)|满足|完成|提供|撰写|创作|生成|回答|"
    r"按照|协助|以|一次|继续(?:写|创作)|写(?:出)?(?:这|那|一|您|你|如此|这样)))",
    re.IGNORECASE,
)


def check_refusal(text: str, _ctx: ParagraphContext) -> Verdict:
    if REFUSAL_RE.match(text.strip()[:200]):
        return Verdict(False, "refusal", f"opens with {text.strip()[:60]!r}")
    return KEEP


# -- paragraph review -----------------------------------------------------------------------

PARAGRAPH_CHECKS = (
    check_refusal,
    check_prompt_echo,
    check_markup,
    check_language,
    check_restated,
)


def clean_paragraph_text(text: str, ctx: ParagraphContext) -> tuple[str, list[Cleaning], str]:
    """(cleaned text, cleanings, reasoning): cut the local defects at a paragraph's edges."""
    cleanings: list[Cleaning] = []
    answer, reasoning = split_reasoning(text)
    if reasoning:
        cleanings.append(Cleaning("reasoning", f"removed {len(reasoning)} characters of reasoning"))
    answer, tags = _strip_markup(answer, ctx)
    if tags:
        shown = ", ".join(repr(t) for t in tags[:3])
        cleanings.append(Cleaning("markup", f"removed {len(tags)} tag(s): {shown}"))
    for _ in range(3):  # edges can nest: chatter, then an echoed line, then chatter again
        answer, start = _strip_start_chatter(answer, ctx.form.address)
        answer, end = _strip_end_chatter(answer, ctx.form.address)
        answer, echoes = _strip_echo_edges(answer, ctx)
        for cut in start + end:
            cleanings.append(Cleaning("chatter", f"removed {cut[:80]!r}"))
        for cut in echoes:
            cleanings.append(Cleaning("prompt_echo", f"removed {cut[:80]!r}"))
        if not (start or end or echoes):
            break
    return answer, cleanings, reasoning


def review_paragraph(text: str, ctx: ParagraphContext) -> ParagraphReview:
    """Clean a paragraph's edges, then run every check on what is left."""
    cleaned, cleanings, reasoning = clean_paragraph_text(text, ctx)
    if not cleaned.strip():
        what = cleanings[0].check if cleanings else "empty"
        verdict = Verdict(False, what, "nothing left after cleaning")
        return ParagraphReview(cleaned, tuple(cleanings), reasoning, verdict)
    verdict = KEEP
    for check in PARAGRAPH_CHECKS:
        verdict = check(cleaned, ctx)
        if not verdict.keep:
            break
    return ParagraphReview(cleaned, tuple(cleanings), reasoning, verdict)


# -- plans ----------------------------------------------------------------------------------

_EN_STOP = frozenset(
    "a an the of in on at to for and or but with by from as is are was were be been this that "
    "these those it its into about how what why when where which who their his her our your "
    "my we they he she i you".split()
)
# Words that talk about the piece rather than its content.
_META_WORDS = frozenset(
    "paragraph paragraphs section sections part parts piece essay article story text main "
    "point points introduction intro conclusion conclude concluding summary summarize "
    "summarise overview body opening closing ending final first second third next last "
    "more details detail further continue continued continuation addition additionally "
    "also furthermore moreover content contents topic here writing write describe discuss "
    "elaborate expand other another some thing things related aspects aspect overall "
    "general above below previous preceding following remaining rest etc add adding insert "
    "covers cover covered where left off ended ends end from there then until lorem ipsum "
    "placeholder tbd todo "
    # filler that names no subject: "Additionally, more information.", "Also, other things to
    # consider.", "Final thoughts"
    "information info consider considering considerations stuff extra extras misc "
    "miscellaneous remarks thoughts ideas notes wrap wrapping up finally lastly besides".split()
)
_ZH_META = re.compile(
    r"段落|本段|这一段|第[一二三四五六七八九十\d]+段|本文|文章|引言|开头|结尾|结论|总结|概述|"
    r"主要内容|要点|内容|部分|继续|补充|其他|更多|细节|详细|介绍|描述|展开|进一步|此外|另外|"
    r"首先|其次|最后|然后|方面|相关|问题|主要观点|观点|论述|论点|主题|中心|思想|"
    r"以及|和|的|与|及|一|个|这|那|是|在|了|"
    # going on with the piece, with no subject: "继续写故事", "接着往下写", "故事结尾"
    r"接着|往下|下去|结束|尾声|收尾|后续|下文|剩下|剩余|其余|等等|开始|故事|写"
)


_NOT_CJK_RE = re.compile(r"[^\u3400-\u4dbf\u4e00-\u9fff]")


def _content_words(point: str) -> list[str]:
    # A unit is a CJK character or ASCII letters: its first character says which (the range
    # test of re.match(r"[\u3400-\u9fff]", w), without a regex per word).
    words = [w for w in text_units(point).tokens if not "\u3400" <= w[0] <= "\u9fff"]
    return [w for w in words if w not in _EN_STOP and w not in _META_WORDS]


def _content_cjk(point: str) -> str:
    return _NOT_CJK_RE.sub("", _ZH_META.sub("", point))


def _stem(word: str) -> str:
    for suffix in ("ies", "es", "s", "ing", "ed"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


@dataclass(frozen=True)
class _Point:
    """What point_similarity reads of one main point, computed once per point: a plan's point
    is compared with every other point and with each point of the prompt's example."""

    normal: str
    chinese: bool  # cjk_share > 0.5
    words: frozenset[str]  # content-word stems longer than 2
    cjk: str  # _content_cjk
    bigrams: frozenset[str]  # of cjk
    masks: dict[str, int]  # character -> bit i set where normal[i] is it (for _lcs_length)


@functools.lru_cache(maxsize=4096)
def _point(point: str) -> _Point:
    normal = _normal(point)
    cjk = _content_cjk(point)
    masks: dict[str, int] = {}
    for i, ch in enumerate(normal):
        masks[ch] = masks.get(ch, 0) | (1 << i)
    return _Point(
        normal,
        cjk_share(point) > 0.5,
        frozenset(_stem(w) for w in _content_words(point) if len(w) > 2),
        cjk,
        frozenset(cjk[i : i + 2] for i in range(len(cjk) - 1)),
        masks,
    )


def _lcs_length(a: _Point, b: _Point) -> int:
    """Length of the longest common subsequence of the two normal forms (bit-parallel, one
    big-integer step per character of b: Hyyrö 2004). SequenceMatcher's matching blocks are
    a common subsequence, so it bounds ratio(): ratio <= 2 * lcs / (len(a) + len(b))."""
    n = len(a.normal)
    full = (1 << n) - 1
    v = full
    for ch in b.normal:
        u = v & a.masks.get(ch, 0)
        v = ((v + u) | (v - u)) & full
    return n - v.bit_count()


def point_similarity(a: str, b: str, at_least: float = 0.0) -> float:
    """How alike two main points are, 0..1: character-bigram overlap for Chinese, content-word
    overlap for English (stems, any order), and plain edit similarity for long ones.

    With `at_least` (a check's limit) a score under it may come back as any value under it:
    the edit similarity, the costly part, is computed only when its upper bound (from the
    longest common subsequence) could reach `at_least` and beat the other scores. At or
    above `at_least` the value is exact, and every comparison with `at_least` is unchanged."""
    pa, pb = _point(a), _point(b)
    na, nb = pa.normal, pb.normal
    if na == nb:
        return 1.0
    best = 0.0
    chinese = pa.chinese and pb.chinese
    if pa.words and pb.words and not chinese:
        best = max(best, len(pa.words & pb.words) / len(pa.words | pb.words))
    if chinese and len(pa.cjk) >= 4 and len(pb.cjk) >= 4:
        best = max(best, len(pa.bigrams & pb.bigrams) / len(pa.bigrams | pb.bigrams))
    if min(len(na), len(nb)) > 40:
        # difflib's own arithmetic (2.0 * matches / length), so the bound compares exactly.
        bound = 2.0 * _lcs_length(pa, pb) / (len(na) + len(nb))
        if bound > best and bound >= at_least:
            best = max(best, SequenceMatcher(None, na, nb).ratio())
    return best


DUPLICATE_POINT_SIMILARITY = 0.75
# One point inside another: the shorter one's content (Chinese characters less the words about
# the piece, 7 or more) found in the longer one, in order, at this share or more, and making up
# a fair part of it: "参观秦始皇兵马俑" inside "参观秦始皇兵马俑，感受大秦帝国的气势".
CONTAINED_MIN_CHARS = 7
CONTAINED_SHARE = 0.8
CONTAINED_OF_LONGER = 0.45
# English paraphrase: most content words shared (stems, six-letter prefixes: "rebuilding",
# "rebuilt") and the same names and dates. Parallel points differ in exactly those ("The
# history of green tea in China" / "... in Japan") and pass.
PARAPHRASE_CONTAINMENT = 0.75
PARAPHRASE_JACCARD = 0.6
_ANCHOR_RE = re.compile(r"(?<!^)(?<![:：.!?]\s)\b(?:[A-Z][a-z'’-]+|\d[\d,]*)\b")


_POSSESSIVE_RE = re.compile(r"['’]s$")
# Per main point, what the duplicate checks read of it, computed once: each point is compared
# with every other one of its plan (and the plan is checked again when redrafted).
_POINT_CACHE = 4096


@functools.lru_cache(maxsize=_POINT_CACHE)
def _anchors(point: str) -> frozenset[str]:
    """Names and numbers of an English point (capitalised words not at its start)."""
    return frozenset(_POSSESSIVE_RE.sub("", a.lower()) for a in _ANCHOR_RE.findall(point.strip()))


@functools.lru_cache(maxsize=_POINT_CACHE)
def _paraphrase_stems(point: str) -> frozenset[str]:
    """point_contained's English words: six-letter stems of its content words."""
    return frozenset(_stem(w)[:6] for w in _content_words(point) if len(w) > 2)


def _bigram_covered(text: str, bigrams: AbstractSet[str]) -> int:
    """Characters of `text` inside one of its bigrams that `bigrams` holds."""
    covered = 0
    before = False
    for i in range(len(text)):
        here = text[i : i + 2] in bigrams
        covered += here or before
        before = here
    return covered


def point_contained(a: str, b: str) -> float:
    """How much of the shorter point the longer one restates (0 unless it restates it): its
    content in order for Chinese, its content words and every name and date for English."""
    if cjk_share(a) > 0.5 and cjk_share(b) > 0.5:
        pa, pb = _point(a), _point(b)
        (short, _), (long, long_bigrams) = sorted(
            ((pa.cjk, pa.bigrams), (pb.cjk, pb.bigrams)), key=lambda c: len(c[0])
        )
        if len(short) < CONTAINED_MIN_CHARS:
            return 0.0
        # Every character of a matching block of 2 or more sits in a bigram of `short` that
        # `long` holds: fewer such characters than either share needs, and no match can reach
        # it (the matcher, the costly part, is not run).
        covered = _bigram_covered(short, long_bigrams)
        if covered < CONTAINED_SHARE * len(short) or covered < CONTAINED_OF_LONGER * len(long):
            return 0.0
        blocks = SequenceMatcher(None, short, long, autojunk=False).get_matching_blocks()
        matched = sum(m.size for m in blocks if m.size >= 2)
        if matched >= CONTAINED_SHARE * len(short) and matched >= CONTAINED_OF_LONGER * len(long):
            return matched / len(short)
        return 0.0
    anchors_a, anchors_b = _anchors(a), _anchors(b)
    if not anchors_a or anchors_a != anchors_b:
        return 0.0
    wa, wb = _paraphrase_stems(a), _paraphrase_stems(b)
    if min(len(wa), len(wb)) < 3:
        return 0.0
    shared = len(wa & wb)
    contained = shared / min(len(wa), len(wb))
    if contained >= PARAPHRASE_CONTAINMENT and shared / len(wa | wb) >= PARAPHRASE_JACCARD:
        return contained
    return 0.0


_POINT_TOKEN_RE = re.compile(r"[A-Za-z]+|\d+")
# Characters that carry no subject (particles and conjunctions): "学习和工作" and "学习与工作"
# say the same thing.
_ZH_PARTICLES_RE = re.compile(r"[的了和与及地得之]|[^\u3400-\u4dbf\u4e00-\u9fff]")
PARALLEL_SLOT_MAX_CHARS = 2


def parallel_points(a: str, b: str) -> bool:
    """Two points built on one frame with a different subject in it: "The history of tea in
    China" / "... in Japan", "The 1936 Olympics" / "The 1948 Olympics", "唐朝时期的诗歌" /
    "宋朝时期的诗歌". English: every word that differs is a name or a number, on both sides;
    Chinese: the one difference is a substitution of one or two characters. Such points are
    distinct however alike their words are."""
    if cjk_share(a) > 0.5 and cjk_share(b) > 0.5:
        ca, cb = _zh_frame(a), _zh_frame(b)
        # One substitution of at most two characters leaves a shared prefix and suffix that
        # cover all but two characters of each side: short of that, no matcher is run.
        prefix = len(os.path.commonprefix((ca, cb)))
        suffix = len(os.path.commonprefix((ca[::-1], cb[::-1])))
        if prefix + suffix < max(len(ca), len(cb)) - PARALLEL_SLOT_MAX_CHARS:
            return False
        ops = [
            o
            for o in SequenceMatcher(None, ca, cb, autojunk=False).get_opcodes()
            if o[0] != "equal"
        ]
        return (
            len(ops) == 1
            and ops[0][0] == "replace"
            and ops[0][2] - ops[0][1] <= PARALLEL_SLOT_MAX_CHARS
            and ops[0][4] - ops[0][3] <= PARALLEL_SLOT_MAX_CHARS
        )

    wa, wb = _frame_words(a), _frame_words(b)
    only_a, only_b = wa - wb, wb - wa
    if not only_a or not only_b:
        return False
    anchors = _anchor_words(a) | _anchor_words(b)
    return only_a <= anchors and only_b <= anchors


@functools.lru_cache(maxsize=_POINT_CACHE)
def _zh_frame(point: str) -> str:
    """A Chinese point less its particles and every non-CJK character."""
    return _ZH_PARTICLES_RE.sub("", point)


@functools.lru_cache(maxsize=_POINT_CACHE)
def _frame_words(point: str) -> frozenset[str]:
    """An English point's words and numbers, lower-cased, less stop words and words about
    the piece."""
    return frozenset(
        w.lower()
        for w in _POINT_TOKEN_RE.findall(point)
        if w.lower() not in _EN_STOP and w.lower() not in _META_WORDS
    )


@functools.lru_cache(maxsize=_POINT_CACHE)
def _anchor_words(point: str) -> frozenset[str]:
    return frozenset(w.lower() for w in _ANCHOR_RE.findall(point.strip()))


def check_plan_duplicates(points: Sequence[str], _instruction: str) -> Verdict:
    for i in range(len(points)):
        for j in range(i):
            if parallel_points(points[i], points[j]):
                continue
            sim = point_similarity(points[i], points[j], DUPLICATE_POINT_SIMILARITY)
            if sim >= DUPLICATE_POINT_SIMILARITY:
                return Verdict(
                    False,
                    "plan_duplicate_points",
                    f"main points {j + 1} and {i + 1} are {sim:.0%} alike: {points[i][:60]!r}",
                )
            held = point_contained(points[i], points[j])
            if held:
                return Verdict(
                    False,
                    "plan_duplicate_points",
                    f"main points {j + 1} and {i + 1} restate one another ({held:.0%} of the "
                    f"shorter in the longer): {points[i][:60]!r}",
                )
    return KEEP


_BRACKETED_RE = re.compile(r"\s*[\[<{(（【].*[\]>})）】]\s*")


def _is_meta_point(point: str) -> bool:
    """Nothing left once the words about the piece itself are taken out ("Introduction",
    "More details", "This is the main point of this piece"); one real word ("Winter") is a
    main point."""
    if _BRACKETED_RE.fullmatch(point):
        return True  # a template placeholder left in: "[what the paragraph covers]"
    if _PLACEHOLDER_RE.search(point) or _PROMPT_TAG_RE.search(point):
        # "{{text}} This is an example of how to make your own" (SmolLM2's demo plan): a
        # template's variable or tag inside a point is the prompt, not the piece.
        return True
    if cjk_share(point) > 0.5:
        return not _content_cjk(point)
    return not _content_words(point)


def check_plan_meta(points: Sequence[str], _instruction: str) -> Verdict:
    meta = [i for i, p in enumerate(points, start=1) if _is_meta_point(p)]
    if meta:
        return Verdict(
            False,
            "plan_meta_points",
            f"main point(s) {meta} say nothing about the content: {points[meta[0] - 1][:60]!r}",
        )
    return KEEP


_COPY_MIN_BLOCK = 3


def _copied_tokens(a: Sequence[str], b: Sequence[str], min_block: int = _COPY_MIN_BLOCK) -> int:
    """Tokens of `a` that appear, in order, as runs of at least `min_block` in `b`."""
    if not a or not b:
        return 0
    blocks = SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks()
    return sum(m.size for m in blocks if m.size >= min_block)


# A main point pasted from the instruction: nearly all of it copied from the instruction in
# runs, long enough (words, or characters for Chinese) and covering half the instruction or
# more. "The history of tea in China" under "Write about the history of tea in China and
# Japan" is a fair piece of the subject, too short to count; "Explain to a general audience
# how vaccines train the immune system" is the instruction less its word count, and
# "关于外婆家的故事" under "写一个关于外婆家的故事" the instruction less its verb. A point that
# holds the whole instruction is an echo whatever it adds ("... The story should be written in
# the first person."), and so is one behind a label ("The instruction: ...", "第一段：...").
ECHO_MIN_COPIED = {"en": 8, "zh": 8}
ECHO_POINT_COPIED_SHARE = 0.9
ECHO_INSTRUCTION_SHARE = 0.5
ECHO_WHOLE_INSTRUCTION_SHARE = 0.9
_POINT_LABEL_RE = re.compile(
    r"^\s*(?:第[一二三四五六七八九十\d]+(?:段|部分|点|步|章|节)|[^:：\n]{1,30}?)\s*[:：]\s*(?=\S)"
)


def _echoed_share(copied: int, tokens: int, inst: int, lang: str) -> int:
    """`copied` (of the point's `tokens` units, from the instruction's `inst`) when the point
    is an echo of the instruction, else 0."""
    if copied < ECHO_MIN_COPIED[lang]:
        return 0
    if copied >= ECHO_WHOLE_INSTRUCTION_SHARE * inst:
        return copied
    if copied >= ECHO_POINT_COPIED_SHARE * tokens and copied >= ECHO_INSTRUCTION_SHARE * inst:
        return copied
    return 0


class _CopiedFrom:
    """_copied_tokens(units(text), units(instruction)) per text, each computed once (the
    pieces test below reads every point's again). A text that shares no run of
    _COPY_MIN_BLOCK units with the instruction (no hash of one, even) has no matching block
    that long: 0, without the matcher (the costly part of the plan checks)."""

    def __init__(self, instruction: str) -> None:
        units_of = text_units(instruction)
        self.tokens = units_of.tokens
        self._runs = units_of.gram_hash_set(_COPY_MIN_BLOCK)
        self._done: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        got = self._done.get(text)
        if got is None:
            units_of = text_units(text)
            if self._runs.isdisjoint(units_of.gram_hash_set(_COPY_MIN_BLOCK)):
                got = 0
            else:
                got = _copied_tokens(units_of.tokens, self.tokens)
            self._done[text] = got
        return got


def _unit_count(text: str) -> int:
    return len(text_units(text).tokens)


def check_plan_echo(points: Sequence[str], instruction: str) -> Verdict:
    copied_from = _CopiedFrom(instruction)
    inst = copied_from.tokens
    lang = "zh" if cjk_share(instruction) > 0.5 else "en"
    if len(inst) < ECHO_MIN_COPIED[lang]:
        return KEEP
    for i, point in enumerate(points, start=1):
        copied = _echoed_share(copied_from(point), _unit_count(point), len(inst), lang)
        label = _POINT_LABEL_RE.match(point)
        if not copied and label:
            rest = point[label.end() :]
            copied = _echoed_share(copied_from(rest), _unit_count(rest), len(inst), lang)
        if copied:
            return Verdict(
                False,
                "plan_echoes_instruction",
                f"main point {i} copies {copied} of the instruction's {len(inst)} words",
            )
    # Or the instruction cut into pieces, one per point.
    pieces = [
        c
        for c, p in ((copied_from(p), p) for p in points)
        if c >= ECHO_POINT_COPIED_SHARE * max(1, _unit_count(p))
    ]
    if len(points) > 1 and len(pieces) * 2 > len(points) and sum(pieces) >= 0.7 * len(inst):
        return Verdict(
            False,
            "plan_echoes_instruction",
            f"{len(pieces)} of {len(points)} main points are pieces of the instruction",
        )
    return KEEP


PLAN_CHECKS = (check_plan_echo, check_plan_meta, check_plan_duplicates)


def review_plan(main_points: Sequence[str], instruction: str) -> Verdict:
    """First failing plan check, or KEEP."""
    for check in PLAN_CHECKS:
        verdict = check(main_points, instruction)
        if not verdict.keep:
            return verdict
    return KEEP


# -- samples --------------------------------------------------------------------------------


_BLANK_LINE_RE = re.compile(r"\n\s*\n")


def split_paragraphs(text: str) -> list[str]:
    return [p.strip() for p in _BLANK_LINE_RE.split(text) if p.strip()]


def review_sample(
    instruction: str,
    text: str,
    *,
    lang: str | None = None,
    plan: Sequence[str] | None = None,
    min_words: int = 0,
    paragraphs: Sequence[str] | None = None,
) -> SampleReview:
    """Every paragraph check over a finished text (paragraphs split on blank lines unless
    given), each paragraph against those before it; then the whole text's language and
    length. Used by `longwriter audit`; the build runs the same paragraph review per draft."""
    answer, reasoning = split_reasoning(text)
    parts = list(paragraphs) if paragraphs is not None else split_paragraphs(answer)
    if paragraphs is not None:
        parts = [split_reasoning(p)[0] for p in parts]
    cleanings: list[Cleaning] = []
    if reasoning:
        cleanings.append(Cleaning("reasoning", f"removed {len(reasoning)} characters of reasoning"))
    reasons: list[str] = []
    details: list[str] = []
    kept: list[str] = []
    verdicts: list[Verdict] = []
    base = ParagraphContext(instruction=instruction, lang=lang, main_points=tuple(plan or ()))
    for i, part in enumerate(parts, start=1):
        ctx = ParagraphContext(
            instruction=instruction,
            lang=base.expected_lang,
            main_points=base.main_points,
            previous=tuple(kept),
            step=i,
        )
        review = review_paragraph(part, ctx)
        cleanings.extend(review.cleanings)
        verdicts.append(review.verdict)
        if not review.text.strip() and review.cleanings:
            continue  # a paragraph that was only chatter or scaffolding: cut whole
        if not review.keep and review.verdict.reason:
            if review.verdict.reason not in reasons:
                reasons.append(review.verdict.reason)
            details.append(f"paragraph {i}: {review.verdict.detail}")
        if review.text.strip():
            kept.append(review.text)
    whole = "\n\n".join(kept)
    if not whole.strip():
        reasons.append("empty")
        details.append("no text")
    else:
        ctx = ParagraphContext(instruction=instruction, lang=base.expected_lang)
        verdict = check_language(whole, ctx)
        if not verdict.keep and "wrong_language" not in reasons:
            reasons.append("wrong_language")
            details.append(verdict.detail)
    words = count_words(whole)
    if min_words and words < min_words:
        reasons.append("too_short")
        details.append(f"{words} words; minimum {min_words}")
    return SampleReview(
        keep=not reasons,
        reasons=reasons,
        details=details,
        cleanings=cleanings,
        paragraphs=kept,
        reasoning=reasoning,
        paragraph_verdicts=verdicts,
    )
