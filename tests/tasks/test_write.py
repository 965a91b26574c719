import pytest

from tasks.plan import PlanStep
from tasks.write import (
    ContextBudget,
    build_continue_request,
    build_continue_turns_request,
    build_write_request,
    clean_paragraph,
    estimate_tokens,
    fit_written_text,
    join_paragraphs,
    needs_continuation,
    trim_to_sentence,
)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Paragraph 3:\nThe city woke slowly.", "The city woke slowly."),
        ("Paragraph 3: The city woke slowly.", "The city woke slowly."),
        ("**Paragraph 2**\n\nRome grew.", "Rome grew."),
        ("## Paragraph 4: The Fall of Rome\nIt fell.", "## The Fall of Rome\nIt fell."),
        (
            "Paragraph 1 - Main Point: intro - Word Count: 400 words\nOnce upon a time.",
            "Once upon a time.",
        ),
        ("段落3：\n长城很长。", "长城很长。"),
        ("段落 2：长城很长。", "长城很长。"),
        ("第三段\n春节到了。", "春节到了。"),
        ("Text body.\n\nWord Count: 412 words", "Text body."),
        ("Section 2 of 6\nBody text.", "Body text."),
        # prose that merely mentions a paragraph is left alone
        (
            "In paragraph 3 of the law, the rule is set.",
            "In paragraph 3 of the law, the rule is set.",
        ),
        ("Part of the reason is cost.", "Part of the reason is cost."),
        ("Paragraph 3:", ""),
        # the prompts' own section tags echoed back
        ("</partial> The island was far.", "The island was far."),
        ("<written>\nShe sailed.\n</written>", "She sailed."),
    ],
)
def test_clean_paragraph_removes_markers(raw, clean):
    assert clean_paragraph(raw) == clean


def test_join_paragraphs_uses_blank_lines_and_skips_empty():
    assert join_paragraphs(["a", " ", "b\n"]) == "a\n\nb"


def test_fit_written_text_keeps_all_when_it_fits():
    paras = ["one two three", "four five"]
    assert fit_written_text(paras, 1000) == "one two three\n\nfour five"


def test_fit_written_text_keeps_opening_and_latest_and_marks_gap():
    paras = [f"P{i} " + "word " * 300 for i in range(1, 11)]
    budget = estimate_tokens(paras[0]) * 4
    text = fit_written_text(paras, budget)
    assert estimate_tokens(text) <= budget
    assert text.startswith("P1 ")
    assert "P10 " in text
    assert "omitted here for length" in text
    assert "P2 " not in text


def test_fit_written_text_when_even_one_paragraph_is_too_big():
    paras = ["A " * 10, "B " * 5000]
    text = fit_written_text(paras, 500)
    assert estimate_tokens(text) <= 520
    assert text.rstrip().endswith("B")
    assert "omitted" in text


def test_write_request_fits_context_window_and_sees_plan_instruction_and_text():
    steps = [PlanStep(f"Point {i}", 800) for i in range(1, 21)]
    written = [f"Sentence number {i} is here. " * 120 for i in range(1, 20)]
    budget = ContextBudget(context_window=8192)
    req = build_write_request("Write a saga", steps, written, 20, lang="en", budget=budget)
    content = req.messages[0][1]
    assert estimate_tokens(content) + req.max_tokens <= 8192
    assert "Write a saga" in content
    assert "Paragraph 20 - Main Point: Point 20" in content
    assert "Now write paragraph 20 of 20" in content
    assert "omitted here for length" in content
    assert written[-1].strip() in content  # the latest paragraph is always kept
    # the same inputs give the same idempotency key
    again = build_write_request("Write a saga", steps, written, 20, lang="en", budget=budget)
    assert again.key("m") == req.key("m")


def test_first_write_request_says_nothing_written_yet():
    req = build_write_request(
        "Write", [PlanStep("Intro", 300)], [], 1, lang="en", budget=ContextBudget()
    )
    assert "nothing yet" in req.messages[0][1]
    assert req.stage == "write"


def test_continue_request_carries_partial():
    req = build_continue_request(
        "Write", PlanStep("Intro", 600), "The story began", lang="en", budget=ContextBudget()
    )
    assert "The story began" in req.messages[0][1]
    assert req.prompt_version.startswith("continue@")


def test_continue_request_for_a_short_paragraph_asks_for_the_missing_words():
    req = build_continue_request(
        "Write",
        PlanStep("Intro", 600),
        "Only a few words here.",
        cut=False,
        lang="en",
        budget=ContextBudget(),
    )
    content = req.messages[0][1]
    assert "about 600 words" in content and "only 5 so far" in content
    assert "length limit" not in content


@pytest.mark.parametrize(
    ("words", "finish", "needed"),
    [(100, "length", True), (450, "length", False), (100, "stop", True), (250, "stop", False)],
)
def test_needs_continuation(words, finish, needed):
    assert needs_continuation("word " * words, finish, 400, 0.5) is needed


def test_trim_to_sentence():
    assert (
        trim_to_sentence("One sentence is here. Two sentences are here! Three is cut")
        == "One sentence is here. Two sentences are here!"
    )
    assert trim_to_sentence("Pi is 3.14 and more. It was cut") == "Pi is 3.14 and more."
    assert trim_to_sentence("他来了。她走了。然后") == "他来了。她走了。"
    assert trim_to_sentence('He said "go now." Then') == 'He said "go now."'
    assert trim_to_sentence("no sentence end at all") is None
    assert trim_to_sentence("Short. " + "x " * 100) is None  # would drop most of the text


def test_turns_prompt_gives_the_same_inputs_as_a_conversation():
    """Instruction and outline in the first ask, each written part as the writer's answer,
    one-line asks; the same key for the same inputs; nothing of the paper prompt's wording."""
    steps = [PlanStep("The queen.", 300), PlanStep("Workers", 400), PlanStep("Winter", 400)]
    written = ["The queen rules.", "Workers work."]
    req = build_write_request(
        "Write about bees", steps, written, 3, lang="en", budget=ContextBudget(), style="turns"
    )
    roles = [role for role, _ in req.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    first = req.messages[1][1]
    assert first.startswith("Write about bees") and "1. The queen\n2. Workers\n3. Winter" in first
    assert "Write part 1: The queen. About 300 words." in first  # no doubled stop
    assert [req.messages[2][1], req.messages[4][1]] == written
    assert req.messages[-1][1] == "Write part 3: Winter. About 400 words."
    assert req.prompt_version.startswith("write_turns@")
    assert not any("Main Point" in c or "Aim for" in c for _, c in req.messages)
    again = build_write_request(
        "Write about bees", steps, written, 3, lang="en", budget=ContextBudget(), style="turns"
    )
    assert again.key("m") == req.key("m")
    more = build_continue_turns_request(
        "Write about bees", steps, written, 3, "Bees cluster.", cut=False,
        budget=ContextBudget(), lang="en",
    )  # fmt: skip
    assert [r for r, _ in more.messages][-2:] == ["assistant", "user"]
    assert more.messages[-2][1] == "Bees cluster." and "part 3" in more.messages[-1][1]


def test_turns_prompt_keeps_the_opening_and_latest_parts_within_the_budget():
    steps = [PlanStep(f"Point {i}", 800) for i in range(1, 21)]
    written = [f"Sentence number {i} is here. " * 120 for i in range(1, 20)]
    budget = ContextBudget(context_window=8192)
    req = build_write_request(
        "Write a saga", steps, written, 20, lang="en", budget=budget, style="turns"
    )
    used = sum(estimate_tokens(c) for _, c in req.messages)
    assert used + req.max_tokens <= 8192
    answers = [c for r, c in req.messages if r == "assistant"]
    assert answers[0] == written[0] and answers[-1] == written[-1]
    assert 2 <= len(answers) < len(written)  # the middle parts left out
    asks = [c for r, c in req.messages if r == "user"]
    assert asks[0].startswith("Write a saga") and asks[-1].startswith("Write part 20:")
    # Each kept answer follows the ask for its own part.
    for i, (role, content) in enumerate(req.messages):
        if role == "assistant":
            n = written.index(content) + 1
            assert f"Write part {n}:" in req.messages[i - 1][1]


def _two_renders(instruction, steps, written, current, budget, max_paragraph_tokens=1024):
    """The paper prompt as it was built before the single render: a skeleton render sizes the
    room, a second render holds the text so far."""
    from prompts import render
    from tasks.write import paragraph_max_tokens

    max_tokens = paragraph_max_tokens(steps[current - 1].word_count, "en", max_paragraph_tokens)
    skeleton = render("write", instruction=instruction, steps=steps, written="", current=current)
    room = budget.prompt_budget(max_tokens) - estimate_tokens(skeleton)
    text = fit_written_text(written, max(room, 0)) if written else ""
    return render("write", instruction=instruction, steps=steps, written=text, current=current)


SLOT_STEPS = [PlanStep(f"Point {i}: the {{{{ keeper }}}} and the sea", 300) for i in range(1, 7)]
SLOT_TEXT = [f"Paragraph {i} text. " * 120 for i in range(1, 7)]


@pytest.mark.parametrize(
    ("instruction", "written", "current", "window"),
    [
        ("Write a saga", [], 1, 8192),  # nothing written yet: the else branch
        ("Write a saga", SLOT_TEXT[:2], 3, 8192),  # everything fits
        ("Write a saga", SLOT_TEXT[:5], 6, 2048),  # the middle left out for length
        ("Write a saga", SLOT_TEXT[:5], 6, 600),  # not even the opening fits
        ("写一篇关于长城的文章 {{ 7*7 }} {% if x %}", SLOT_TEXT[:3], 4, 4096),
        ("Write a saga\n\n(nothing yet: this is the opening paragraph)", SLOT_TEXT[:1], 2, 8192),
        ("Written \x00written-so-far\x00 in the input itself", SLOT_TEXT[:2], 3, 8192),
        ("Write a saga", ["", "  "], 3, 8192),  # only blank paragraphs: nothing to show
    ],
)
def test_write_request_renders_once_and_equals_two_renders(instruction, written, current, window):
    """One render with a placeholder for the text so far gives exactly the prompt the two
    renders gave (same bytes, so the same keys: a store built before resumes without
    re-paying), whatever the input holds, the placeholder itself included."""
    budget = ContextBudget(window)
    req = build_write_request(
        instruction, SLOT_STEPS, written, current, lang="en", budget=budget, style="paper"
    )
    assert req.messages[0][1] == _two_renders(instruction, SLOT_STEPS, written, current, budget)
