"""Tables of cases for every quality check (tasks/quality.py): texts that must be caught, and
texts that must pass (dialogue, letters, an essay about HTML, verse with a refrain, Chinese
quoting English terms, a heading that names its plan step on purpose)."""

from __future__ import annotations

import pytest

from tasks.quality import (
    ParagraphContext,
    check_language,
    check_markup,
    check_prompt_echo,
    check_restated,
    expected_language,
    review_paragraph,
    review_plan,
    review_sample,
    split_reasoning,
)

EN = "Write a long essay about the honeybees of an old orchard."
ZH = "写一篇关于江南茶文化的长文。"
PROSE = (
    "The orchard had not been pruned in twenty years, and the bees had made it their own. "
    "Every April the old trees broke into blossom at once, and the hum rose from the grass "
    "like heat, steady and unhurried, until the petals fell and the work moved to the clover."
)
PROSE_ZH = (
    "江南的茶，从来不只是一种饮品。清明前后，山间的茶农背着竹篓上山，"
    "把最嫩的芽叶一片片摘下，带回家中用铁锅慢慢炒制，满屋都是清香。"
)


def ctx(instruction: str = EN, **kw: object) -> ParagraphContext:
    return ParagraphContext(instruction=instruction, **kw)  # type: ignore[arg-type]


# -- cleaning: chatter and reasoning at the edges -------------------------------------------

CLEANED = [
    # (instruction, raw draft, check that cleaned it, text that must remain at the start)
    (EN, "Sure! Here's paragraph 3:\n\n" + PROSE, "chatter", "The orchard"),
    (EN, "Certainly, here is the next part of the essay.\n" + PROSE, "chatter", "The orchard"),
    (EN, PROSE + "\n\nI hope this helps! Let me know if you'd like any changes.", "chatter", "The"),
    (EN, PROSE + " If there's anything else you'd like me to know, just ask.", "chatter", "The"),
    (
        EN,
        "I'm glad to see you've taken the time to create a new piece of writing. " + PROSE,
        "chatter",
        "The orchard",
    ),
    (EN, "Here is the rewritten paragraph with a note:\n" + PROSE, "chatter", "The orchard"),
    (ZH, "好的，以下是第二段：\n" + PROSE_ZH, "chatter", "江南"),
    (ZH, PROSE_ZH + "\n希望对你有帮助！如果需要修改请告诉我。", "chatter", "江南"),
    (EN, "<think>The user wants bees. Plan: orchard.</think>\n" + PROSE, "reasoning", "The"),
    (EN, "Your next paragraph:\n" + PROSE, "prompt_echo", "The orchard"),
    (EN, PROSE + "\nAim for about 400 words (to be completed)", "prompt_echo", "The orchard"),
    (EN, "*Writing the paragraph:\n" + PROSE, "prompt_echo", "The orchard"),
    (EN, "Aiming for 400 words.\n" + PROSE, "prompt_echo", "The orchard"),
    (
        EN,
        "I'm ready to help. What's the next paragraph you'd like me to write?\n" + PROSE,
        "chatter",
        "The orchard",
    ),
    (
        EN,
        "Here is the next paragraph, written with an exciting twist.\n\n" + PROSE,
        "chatter",
        "The orchard",
    ),
    (EN, PROSE + " <>", "markup", "The orchard"),
    (EN, PROSE + "</div>", "markup", "The orchard"),
    (EN, 'The orchard <blocked=""/> had not been pruned in years.', "markup", "The orchard"),
]


@pytest.mark.parametrize(("instruction", "raw", "check", "start"), CLEANED)
def test_local_defects_are_cleaned_and_recorded(
    instruction: str, raw: str, check: str, start: str
) -> None:
    review = review_paragraph(raw, ctx(instruction))
    assert review.keep, review.verdict
    assert check in {c.check for c in review.cleanings}
    assert review.text.startswith(start)
    for phrase in ("Sure", "I hope", "好的", "希望", "<think>", "Aim for", "</div>", "<blocked"):
        assert phrase not in review.text


def test_reasoning_is_split_from_the_answer() -> None:
    assert split_reasoning("<think>plan it</think>Answer.") == ("Answer.", "<think>plan it</think>")
    # DeepSeek-R1's template opens the block inside the prompt: only the closing tag arrives.
    answer, reasoning = split_reasoning("first I weigh the options</think>\nAnswer.")
    assert answer == "Answer." and "weigh" in reasoning
    # An unclosed leading block: the answer never started.
    assert split_reasoning("<think>still thinking when the budget ran out")[0] == ""
    assert split_reasoning(PROSE) == (PROSE, "")


# -- failures: what a redraft must replace --------------------------------------------------

FAILED = [
    (check_prompt_echo, EN, "The bees <instruction>Write a long essay</instruction> flew.", {}),
    (check_prompt_echo, EN, PROSE + " Aim for 100 words, do not repeat earlier text: more.", {}),
    (
        check_prompt_echo,
        EN,
        "Paragraph 2 - Main Point: the hive in winter - Word Count: 400 words\nThe hive sleeps.",
        {},
    ),
    (
        check_prompt_echo,
        EN,
        "Describe how the colony survives the winter by clustering around the queen. " + PROSE,
        {
            "main_points": (
                "Describe how the colony survives the winter by clustering around the queen",
            )
        },
    ),
    (check_prompt_echo, ZH, "写作指令：写一篇关于茶的文章。" + PROSE_ZH, {}),
    # The request pasted back, or the writer talking about its task (SmolLM2 in the demo).
    (
        check_prompt_echo,
        "Write a long, detailed story about a lighthouse keeper who finds a message.",
        "Write a long, detailed story about a lighthouse keeper who found the bottle. " + PROSE,
        {},
    ),
    (check_prompt_echo, EN, "You're asked to write a long essay on bees. " + PROSE, {}),
    (check_prompt_echo, ZH, "写一篇关于江南茶文化的长文，介绍它的历史。" + PROSE_ZH, {}),
    (check_prompt_echo, EN, PROSE + "\nThe next paragraph can be developed further: more.", {}),
    (check_prompt_echo, EN, PROSE + "\nThe plan goes like this:\n1) A new paragraph", {}),
    (check_prompt_echo, EN, PROSE + "\nAim: 400 words\n" + PROSE, {}),
    # The writer narrating its own work (SmolLM2 in the demo).
    (
        check_prompt_echo,
        EN,
        PROSE + " But that's what we need to talk about in the next paragraph. " + PROSE,
        {},
    ),
    (check_prompt_echo, EN, PROSE + "\nThis sentence continues with the next one. " + PROSE, {}),
    (check_markup, EN, "The bees {{ main_point }} returned at dusk.", {}),
    (check_markup, EN, PROSE + " <|im_end|>", {}),
    (check_markup, EN, "The bees returned.\n```\nThe hive hummed.", {}),
    (check_language, ZH, PROSE, {}),
    (check_language, EN, PROSE_ZH * 2, {}),
    (check_restated, EN, PROSE.replace("twenty", "thirty"), {"previous": (PROSE,)}),
    (check_restated, ZH, PROSE_ZH, {"previous": ("开头。" + PROSE_ZH,)}),
]


@pytest.mark.parametrize(("check", "instruction", "text", "extra"), FAILED)
def test_checks_catch(check: object, instruction: str, text: str, extra: dict) -> None:
    verdict = check(text, ctx(instruction, **extra))  # type: ignore[operator]
    assert not verdict.keep
    assert verdict.reason and verdict.detail


# -- texts that must pass -------------------------------------------------------------------

PASSING = [
    # The instruction's subject in the story's own words: shared nouns are not an echo.
    (
        "Write a long, detailed story about a lighthouse keeper on a remote island who "
        "discovers a message in a bottle that changes her life.",
        "The lighthouse keeper on the remote island found a message in a bottle one grey "
        "morning, wedged between two rocks below the lamp room. She had kept the light for "
        "eleven years, and in all that time the sea had given her nothing but driftwood.",
    ),
    # An essay about writing names paragraphs, just not its own next one.
    (
        "Write a long essay on how to write a good school essay.",
        "A strong essay links its ideas. In the next paragraph of your essay, the reader "
        "expects evidence, and a topic sentence tells them which. I always tell students "
        "that the next paragraph should answer the question the last one raised.",
    ),
    # A character says "Let me know" and "I hope this helps" in dialogue.
    (
        "Write a short story about two neighbours.",
        '"Let me know when the parcel comes," Mrs. Hale said, leaning over the fence.\n\n'
        "Tom nodded and went back to his roses. The afternoon was long and warm, and the "
        "street was quiet except for the bees.\n\n"
        '"I hope this helps," he said later, handing her the box. "Let me know if it is '
        'the wrong one."',
    ),
    # A letter the instruction asked for ends by asking for a reply.
    (
        "Write a letter to my grandmother about my first year at university.",
        "Dear Grandma,\n\nThe first year is over, and I finally have time to tell you about "
        "it properly. The library became my second home, and the river walk at dawn my "
        "favourite hour of the week.\n\nLet me know what you think of the photos. I hope you "
        "are well.",
    ),
    # An essay about HTML names its tags.
    (
        "Write an essay explaining how HTML structures a web page.",
        "Every page begins with the <html> element, and inside it the <head> and <body> "
        "divide what the browser needs to know from what the reader sees. A <div> groups "
        "content without meaning anything, while <p> marks a paragraph and <h1> a title.",
    ),
    # Chinese quoting English terms.
    (
        "写一篇介绍人工智能发展的文章。",
        "近年来，机器学习（machine learning）与深度学习（deep learning）迅速发展，"
        "以 GPT 和 BERT 为代表的模型改变了人们处理语言的方式。许多公司把这些技术用于客服、"
        "翻译和写作辅助，也带来了关于数据与隐私的新讨论。",
    ),
    # A poem with a refrain (stanzas repeat by design).
    (
        "Write a poem about the sea with a refrain.",
        "The tide comes in, the tide goes out,\nThe gulls go wheeling round about,\n"
        "And still the harbour lamps burn on,\nLong after all the boats are gone.\n\n"
        "The nets are mended on the quay,\nThe children run to meet the sea,\n"
        "And still the harbour lamps burn on,\nLong after all the boats are gone.",
    ),
    # A heading that names its plan step, on purpose.
    (
        "Write a guide to starting a vegetable garden.",
        "Choosing the Right Soil\nGood soil is dark, crumbly and full of life. Before you "
        "plant anything, dig a spade's depth and look: worms are a good sign, and so is a "
        "smell of earth after rain.",
    ),
    # Anaphora: short phrases repeated for rhythm.
    (
        "Write a speech for a school graduation.",
        "We came here unsure. We came here curious. We came here with more questions than "
        "answers, and we leave with better questions. We leave with friends who will outlast "
        "every exam, and with teachers whose patience we will only understand years from now.",
    ),
    # A tutorial that was asked for code keeps its code block.
    (
        "Write a Python tutorial on reading CSV files.",
        "Python's csv module reads a file row by row:\n\n```python\nimport csv\n"
        "with open('data.csv') as f:\n    for row in csv.reader(f):\n        print(row)\n```\n\n"
        "Each row arrives as a list of strings, so numbers need converting before use.",
    ),
    # English text quoting a Chinese line of poetry.
    (
        "Write an essay about Li Bai's moon poems.",
        "Li Bai's most famous couplet, 床前明月光，疑是地上霜, is taught to almost every child "
        "in China. In translation it becomes moonlight before the bed, mistaken for frost on "
        "the ground, and the homesickness that follows it has travelled well across languages "
        "and centuries, which is why readers in many countries still know these lines today.",
    ),
    # Beginning with "Certainly," as an adverb in real prose.
    (
        EN,
        "Certainly, the orchard was older than anyone in the village could remember. " + PROSE,
    ),
    # An instruction in Chinese that asks for English.
    ("请用英文写一篇关于长城的文章。", PROSE),
]


@pytest.mark.parametrize(("instruction", "text"), PASSING)
def test_real_prose_passes(instruction: str, text: str) -> None:
    review = review_sample(instruction, text)
    assert review.keep, (review.reasons, review.details)
    assert not review.cleanings, review.cleanings
    assert review.text == text.strip()


def test_expected_language() -> None:
    assert expected_language(ZH) == "zh"
    assert expected_language(EN) == "en"
    assert expected_language("请用英文写一篇关于长城的文章。") == "en"
    assert expected_language("Write about the Great Wall in Chinese.") == "zh"


def test_sample_review_cleans_each_paragraph_against_those_before() -> None:
    text = "Sure! Here's the essay:\n\n" + PROSE + "\n\n" + PROSE + "\n\nI hope this helps!"
    review = review_sample(EN, text)
    assert not review.keep and review.reasons == ["restated_paragraph"]
    # "Sure!", "Here's the essay:" and "I hope this helps!", each recorded
    assert [c.check for c in review.cleanings] == ["chatter"] * 3
    assert review.paragraphs[0].startswith("The orchard")


# -- plans ----------------------------------------------------------------------------------

PLAN_FAILS = [
    (["Introduce the hive life of bees", "Introduce the bees' hive life"], "plan_duplicate_points"),
    (
        ["The orchard in spring bloom", "The orchard in spring blooms", "Winter"],
        "plan_duplicate_points",
    ),
    (["介绍蜜蜂的生活习性", "介绍蜜蜂的生活和习性"], "plan_duplicate_points"),
    (["This is the main point of this piece", "The hive in winter"], "plan_meta_points"),
    (["In addition", "How bees find flowers"], "plan_meta_points"),
    (["Paragraph 3", "How bees find flowers"], "plan_meta_points"),
    (["引言", "蜜蜂如何找到花朵"], "plan_meta_points"),
    ([EN, "How bees find flowers"], "plan_echoes_instruction"),
]


@pytest.mark.parametrize(("points", "reason"), PLAN_FAILS)
def test_plan_checks_catch(points: list[str], reason: str) -> None:
    verdict = review_plan(points, EN)
    assert not verdict.keep and verdict.reason == reason, verdict


PLAN_PASSES = [
    ["The history of tea in China", "The history of tea in Japan", "How tea is brewed today"],
    [
        "Introduction: why the orchard matters",
        "Bees at work in spring",
        "Conclusion: what we owe them",
    ],
    ["江南茶的历史渊源", "日本茶道的形成", "今天的饮茶方式"],
    ["The honeybees of the old orchard in April", "Swarming season and the beekeeper's year"],
]


@pytest.mark.parametrize("points", PLAN_PASSES)
def test_plans_that_must_pass(points: list[str]) -> None:
    assert review_plan(points, EN).keep
