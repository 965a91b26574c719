import pytest

from tasks.plan import PlanStep
from tasks.write import (
    ContextBudget,
    build_continue_request,
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
