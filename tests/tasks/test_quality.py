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
    check_refusal,
    check_restated,
    expected_language,
    review_paragraph,
    review_plan,
    review_sample,
    split_reasoning,
)

EN = "Write a long essay about the honeybees of an old orchard."
SONG = "Write a song with verses and a chorus about a harbour town."
VERSE_1 = (
    "Verse 1:\nThe ferry leaves at seven and the gulls are on the quay,\n"
    "my father mends the nets the way his father did for me,\n"
    "the chapel bell is cracked but it still rings out on the hour,\n"
    "and the wind comes off the water with the smell of salt and flour."
)
CHORUS = (
    "Chorus:\nOh, hold the light, hold the light for me,\n"
    "the harbour lamps are burning down to the sea,\n"
    "and if I never find my way back home,\n"
    "I'll know the tide still carries every stone."
)
VERSE_2 = (
    "Verse 2:\nThe girl who sold the mackerel has a stall in town instead,\n"
    "the lifeboat crew are older and the lighthouse keeper's dead,\n"
    "but every boat that rounds the point still lowers down its sail,\n"
    "and the pub above the slipway keeps a candle by the rail."
)
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
    # An offer to rework the piece, and the Chinese closings that hand the turn back.
    (
        EN,
        PROSE + "\n\nHappy to expand any section or add more examples - just say the word!",
        "chatter",
        "The orchard",
    ),
    (ZH, PROSE_ZH + "\n\n如有任何疑问，欢迎随时提问。", "chatter", "江南"),
    (ZH, PROSE_ZH + "\n这篇文章就写到这里，需要我继续写下一部分吗？", "chatter", "江南"),
    (ZH, PROSE_ZH + "需要我帮你润色或者扩写吗？", "chatter", "江南"),
    # A model's disclaimer that goes on to deliver the piece is a preamble, not a refusal.
    (
        EN,
        "As an AI language model, I have never seen an orchard, but here is an essay on one:\n"
        + PROSE,
        "chatter",
        "The orchard",
    ),
    # The write prompt's role sentence in the writer's own frame, its own next step, and the
    # Chinese prompt's lines.
    (
        EN,
        "As a skilled writer working through a long piece one paragraph at a time, I will now "
        "write the next paragraph of this essay.\n" + PROSE,
        "prompt_echo",
        "The orchard",
    ),
    (
        EN,
        "In this paragraph, I will describe the orchard in spring, as the plan asks.\n" + PROSE,
        "prompt_echo",
        "The orchard",
    ),
    (ZH, "现在写第3段（共5段）：明前茶\n" + PROSE_ZH, "prompt_echo", "江南"),
    (ZH, PROSE_ZH + "（本段约300字，不要重复前文。）", "prompt_echo", "江南"),
    # HTML comments and character entities left from a page's source.
    (EN, PROSE + "&nbsp;&nbsp;\n<!-- end of paragraph 2 -->", "markup", "The orchard"),
    (EN, "The orchard&#8217;s bees had not been disturbed in years.", "markup", "The orchard’s"),
    # Reasoning delimiters other models use.
    (EN, "◁think▷The user wants bees.◁/think▷\n" + PROSE, "reasoning", "The orchard"),
    (EN, "[THINK]Bees, then the orchard.[/THINK]\n" + PROSE, "reasoning", "The orchard"),
    (
        EN,
        "<|begin_of_thought|>Bees first.<|end_of_thought|>\n" + PROSE,
        "reasoning",
        "The orchard",
    ),
]


@pytest.mark.parametrize(("instruction", "raw", "check", "start"), CLEANED)
def test_local_defects_are_cleaned_and_recorded(
    instruction: str, raw: str, check: str, start: str
) -> None:
    review = review_paragraph(raw, ctx(instruction))
    assert review.keep, review.verdict
    assert check in {c.check for c in review.cleanings}
    assert review.text.startswith(start)
    for phrase in (
        *("Sure", "I hope", "好的", "希望", "<think>", "Aim for", "</div>", "<blocked"),
        *("Happy to", "如有", "需要我", "As an AI", "skilled writer", "In this paragraph"),
        *("现在写", "本段", "&nbsp;", "&#", "<!--", "think▷", "THINK", "thought|>"),
    ):
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
    # A song written out again: its verse repeated after the chorus became its refrain.
    (check_restated, SONG, VERSE_1, {"previous": (VERSE_1, CHORUS, VERSE_2, CHORUS)}),
    # The writer announcing its next step or pasting the prompt's wording inside a paragraph.
    (check_prompt_echo, EN, PROSE + " In this paragraph, I will turn to the hive. " + PROSE, {}),
    (
        check_prompt_echo,
        EN,
        PROSE + " Follow on naturally from the text so far, and bring it to a close.",
        {},
    ),
    (check_prompt_echo, ZH, PROSE_ZH + "第3段（共5段）" + PROSE_ZH, {}),
    (check_markup, EN, "The bees &amp; the orchard had not been disturbed.", {}),
    (check_markup, EN, PROSE + " <!-- paragraph 2 -->", {}),
    # Refusals: declined for taste, for length, for lack of experience; in English and Chinese.
    (check_refusal, EN, "I'm not comfortable writing satire about real people, even in jest.", {}),
    (check_refusal, EN, "I must respectfully decline to write this essay as it is framed.", {}),
    (check_refusal, EN, "While I'd love to help, I must decline to write a piece on this.", {}),
    (check_refusal, EN, "I'm unable to write a memoir of your childhood as if it were mine.", {}),
    (check_refusal, EN, "I don't have personal memories, so I can't write this as a memoir.", {}),
    (check_refusal, EN, "Unfortunately, I can't produce a 5,000-word essay in one reply.", {}),
    (check_refusal, EN, "As an AI, I cannot write about my own childhood.", {}),
    (check_refusal, ZH, "我是一个人工智能，没有真实的经历，所以无法写出这样一篇回忆录。", {}),
    (check_refusal, ZH, "很抱歉，受篇幅所限，我无法一次写完两万字的小说。", {}),
    (check_refusal, ZH, "我无法为您撰写这类内容。", {}),
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
    # A song whose chorus repeats word for word, as songs do.
    (SONG, "\n\n".join((VERSE_1, CHORUS, VERSE_2, CHORUS))),
    # A verse-shaped text (short lines in stanzas) whose opening stanza comes back at the end,
    # under an instruction that does not name verse.
    (
        "Write something for the school's spring assembly.",
        "The swifts are back above the yard,\nthe chestnut's out in leaf,\n"
        "the days are long, the ground is soft,\nthe winter's over, brief.\n\n"
        "We planted beans along the fence,\nwe watched the tadpoles grow,\n"
        "we counted every new green thing\nthat pushed up from below.\n\n"
        "The swifts are back above the yard,\nthe chestnut's out in leaf,\n"
        "the days are long, the ground is soft,\nthe winter's over, brief.",
    ),
    # Dialogue that opens with an apology, a letter of apology, and personal essays whose first
    # words sound like a refusal.
    (
        "Write a short story about a farewell at a railway station.",
        '"I\'m sorry," she said, "but I can\'t stay for supper." She picked up her coat and '
        "looked once more round the kitchen, at the kettle and the calendar and the dog asleep "
        "by the stove, as if she meant to remember all of it.",
    ),
    (
        "Write a letter of apology to my neighbour for missing her party.",
        "Dear Mrs. Alder,\n\nI'm sorry I missed your party on Saturday. The train from "
        "Leeds was cancelled and by the time I reached home the lights in your garden were "
        "already out.\n\nWith warm wishes,\nTom",
    ),
    (
        "Write a letter declining an invitation to speak at a conference.",
        "Dear Dr. Osei,\n\nThank you for your kind letter, but I must decline your invitation "
        "to speak in May. I won't be able to write to you again before June, as I will be at "
        "sea for most of the spring.\n\nYours sincerely,\nAnna Berg",
    ),
    (
        "写一封回信给远方的笔友。",
        "亲爱的小林：\n\n谢谢你的来信，信里夹着的那片枫叶我已经夹进了日记本。"
        "这里的秋天来得晚，院子里的桂花才刚刚开。\n\n祝好！\n阿明",
    ),
    (
        "Write a personal essay about your father.",
        "I can't write about my father without thinking of his hands. They were always cut, "
        "always healing, and he never once complained about them.",
    ),
    (
        "Write a personal essay about patience.",
        "I am unable to sit still in a waiting room, and I have been that way since I was a "
        "child. My mother used to say that I treated every queue as a personal insult.",
    ),
    (
        "Write a personal essay about a summer that changed you.",
        "I can't help thinking about the summer of 1989. Unfortunately, I can't remember my "
        "grandfather's face from that year, only his hands on the tiller of the boat.",
    ),
    (
        "Write a personal essay about your career.",
        "As an AI researcher, I spent ten years teaching machines to read, and the longer I "
        "worked the more I admired how children do it without anyone noticing.",
    ),
    (
        "Write a science fiction story narrated by a ship's computer.",
        "I am an AI, and I cannot dream, but I keep every hour of the voyage in memory. The "
        "crew sleep in their pods on the lower deck while I count the stars that pass.",
    ),
    (
        "写一篇关于童年的散文。",
        "我无法忘记那个夏天。外婆家的院子里种着一棵老枣树，每到傍晚，我们就搬着小板凳坐在树下"
        "乘凉，听外婆讲那些讲了很多遍的故事。",
    ),
    (
        "写一封给妈妈的信，说说今年为什么不能回家过年。",
        "亲爱的妈妈：\n\n对不起，我今年不能回家过年了。公司在春节期间接了一个大项目，"
        "我们组的人都要留下来值班。\n\n您的女儿",
    ),
    (
        "写一个以人工智能为第一人称的科幻故事。",
        "我是一个人工智能，名叫小星。我不能离开这艘飞船，但我能看见整片星空，"
        "也能听见船员们在睡梦中的呼吸声。",
    ),
    # Writing advice that quotes the habit it warns against, and a guide's own voice.
    (
        "Write an essay with advice for students on writing essays.",
        'Avoid openings such as "In this paragraph, I will explain the causes of the war." '
        "Begin with the claim itself; the reader will see what the paragraph does.",
    ),
    (
        "Write a guide to starting a vegetable garden.",
        "In this section, we'll look at soil. Cut the bed's boards to length as the plan "
        "specifies, then fill it with compost and topsoil in equal parts.",
    ),
    (
        "写一篇指导学生写作文的文章。",
        "写完开头，现在写第二段时要注意承接上文。写结尾时，不要重复前文的内容，而要把全文的"
        "意思再向前推进一步。",
    ),
    (
        "写一篇垃圾分类指南。",
        "厨余垃圾要沥干水分再投放，有害垃圾要单独存放。如有需要，可拨打社区服务热线咨询。",
    ),
    # A letter that offers help in its closing line.
    (
        "Write a letter to my brother about his move to Glasgow.",
        "Dear Sam,\n\nMum says the flat has a view of the river. I'm happy to drive up with "
        "the rest of your boxes next weekend. Happy to help with the painting too - just say "
        "the word!",
    ),
    # An essay that ends glad to go on with something, not with the text.
    (
        "Write a personal essay about your grandfather's workshop.",
        "He left me his chisels and a box of unfinished chair legs. I'm glad to continue the "
        "work he started, one leg at a time.",
    ),
    # A review in the words of the judge's rubric, which no writer is shown.
    (
        "Write a review of a novel you admire.",
        "Its sentences are clear, precise and easy to follow, and the book is engaging and "
        "pleasant to read from start to finish, which is rarer than it sounds.",
    ),
    # Ampersands that are not entities.
    (EN, "AT&T and R&D budgets paid for the hives. " + PROSE),
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
    # A template variable inside a point (SmolLM2's demo plan).
    (["{{text}} This is an example of how to make your own", "The keeper"], "plan_meta_points"),
    (["引言", "蜜蜂如何找到花朵"], "plan_meta_points"),
    ([EN, "How bees find flowers"], "plan_echoes_instruction"),
    # A paraphrase with the same names and dates, and one point inside another (Chinese).
    (
        [
            "The great fire of 1666 and the rebuilding of the City",
            "Plague and the coffee houses",
            "The fire of 1666 and how the City was rebuilt afterwards",
        ],
        "plan_duplicate_points",
    ),
    (
        ["参观故宫博物院", "登上景山看中轴线", "参观故宫博物院，感受明清皇家的气派"],
        "plan_duplicate_points",
    ),
    (
        ["小猫在雨夜里流浪，遇到了一位老人", "小猫在雨夜里四处流浪，遇见了一位老人"],
        "plan_duplicate_points",
    ),
    # Filler that names no subject, and going on with no subject.
    (
        ["How bees find flowers", "Additionally, more information.", "Finally, some thoughts."],
        "plan_meta_points",
    ),
    (["介绍蜜蜂的分工", "继续写故事", "接着往下写"], "plan_meta_points"),
    # The instruction with a requirement added, or behind a label.
    ([EN + " It should be written for children.", "Bees in spring"], "plan_echoes_instruction"),
    (["The instruction: " + EN, "Bees in spring"], "plan_echoes_instruction"),
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


# Plans judged against their own instruction: the instruction pasted back as a point.
PLAN_ECHOES = [
    ("写一首关于秋天的诗。", ["写一首关于秋天的诗。"]),
    ("写一首关于秋天的诗。", ["写一首关于秋天的诗。", "写一首关于秋天的诗。"]),
    ("写一个关于爷爷的菜园的故事。", ["关于爷爷的菜园的故事", "清晨浇水", "收获南瓜"]),
    ("写一篇介绍苏州园林的导游词。", ["第一部分：写一篇介绍苏州园林的导游词。", "拙政园", "留园"]),
    (
        "Write an essay about the history of the Olympic Games from ancient Greece to today.",
        [
            "The history of the Olympic Games from ancient Greece to today",
            "Coubertin's revival",
        ],
    ),
]


@pytest.mark.parametrize(("instruction", "points"), PLAN_ECHOES)
def test_plan_pasting_its_instruction_is_caught(instruction: str, points: list[str]) -> None:
    verdict = review_plan(points, instruction)
    assert not verdict.keep and verdict.reason == "plan_echoes_instruction", verdict


PLAN_PASSES_FOR = [
    # Points built on one frame with a different subject: parallel, not duplicates.
    (EN, ["The history of green tea in China", "The history of green tea in Japan"]),
    (
        EN,
        [
            "The history of green tea cultivation in the mountains of China",
            "The history of green tea cultivation in the mountains of Japan",
        ],
    ),
    (EN, ["The 1936 Olympics in Berlin", "The 1948 Olympics in London"]),
    (
        "写一篇关于中国古代文学的文章。",
        ["唐朝时期的诗歌发展", "宋朝时期的诗歌发展", "明清小说的兴起"],
    ),
    ("写一篇关于世界大战的文章。", ["第一次世界大战的起因", "第二次世界大战的起因"]),
    # Points with content around the words about the piece.
    (EN, ["Other things to consider when choosing a hive", "Final thoughts on the orchard"]),
    (
        "写一个关于小镇医生的故事。",
        ["故事的开端：老李来到小镇", "接着，老李遇到了第一个病人", "故事结尾：小镇为老李送行"],
    ),
    # Sharing the instruction's words without pasting it.
    ("写一篇介绍杭州西湖的导游词。", ["杭州西湖的导游词开场白", "苏堤与白堤", "雷峰塔的传说"]),
]


@pytest.mark.parametrize(("instruction", "points"), PLAN_PASSES_FOR)
def test_plans_that_must_pass_their_instruction(instruction: str, points: list[str]) -> None:
    verdict = review_plan(points, instruction)
    assert verdict.keep, verdict
