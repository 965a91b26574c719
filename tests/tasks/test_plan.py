import json

import pytest

from tasks.plan import (
    PLAN_EXAMPLES,
    PlanError,
    PlanStep,
    build_plan_request,
    parse_plan,
    plan_schema,
    validate_plan,
)
from tasks.quality import review_plan

PAPER = """Paragraph 1 - Main Point: Introduce the history of the Roman Empire - Word Count: 400 words
Paragraph 2 - Main Point: Describe the rise of Augustus - Word Count: 600 words
Paragraph 3 - Main Point: Explain the fall of the West - Word Count: 800 words"""

CASES = [
    ("paper line format", PAPER, [400, 600, 800], "Describe the rise of Augustus"),
    (
        "JSON",
        json.dumps(
            {
                "paragraphs": [
                    {"main_point": "Intro to cats", "word_count": 300},
                    {"main_point": "Cat history", "word_count": 500},
                ]
            }
        ),
        [300, 500],
        "Cat history",
    ),
    (
        "fenced JSON in prose",
        'Here is the plan:\n```json\n[{"main point": "Intro", "word count": "450 words"},'
        '{"main point": "Body of it", "word count": 550}]\n```\nHope it helps!',
        [450, 550],
        "Body of it",
    ),
    (
        "Chinese 段落/字数",
        "段落1 - 主要内容：介绍长城的历史背景 - 字数：500字\n段落2 - 主要内容：描述长城的建筑特点 - 字数：700字",
        [500, 700],
        "描述长城的建筑特点",
    ),
    (
        "Chinese 第N段",
        "第一段：介绍春节的起源，字数：400字\n第二段：春节的习俗，字数：600字",
        [400, 600],
        "春节的习俗",
    ),
    (
        "markdown bold + bullets",
        "## Plan\n\n**Paragraph 1** - **Main Point:** Set the scene - **Word Count:** 300 words\n"
        "**Paragraph 2** - **Main Point:** Rising action - **Word Count:** 700 words\n",
        [300, 700],
        "Rising action",
    ),
    (
        "numbered list",
        "1. Opening: why sleep matters (300 words)\n2. The science of REM sleep (500 words)\n"
        "3. Practical advice for better rest (400 words)",
        [300, 500, 400],
        "The science of REM sleep",
    ),
    (
        "multi-line blocks",
        "Paragraph 1\nMain Point: The origins of tea\nWord Count: 350 words\n\n"
        "Paragraph 2\nMain Point: Tea in Britain\nWord Count: 650 words",
        [350, 650],
        "Tea in Britain",
    ),
    (
        "comma thousands",
        "Paragraph 1 - Main Point: A very long opening - Word Count: 1,000 words",
        [1000],
        "A very long opening",
    ),
]


@pytest.mark.parametrize(
    ("name", "text", "counts", "second_point"), CASES, ids=[c[0] for c in CASES]
)
def test_parse_plan_formats(name, text, counts, second_point):
    steps = parse_plan(text)
    assert [s.word_count for s in steps] == counts
    assert steps[min(1, len(steps) - 1)].main_point == second_point


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "unparseable"),
        ("I think this should be a great essay with many ideas.", "unparseable"),
        (
            "Paragraph 1 - Main Point: Intro\nParagraph 2 - Main Point: Body - Word Count: 300 words",
            "missing_word_count",
        ),
        ('{"paragraphs": [{"main_point": "x"}]}', "missing_word_count"),
    ],
)
def test_parse_plan_failures(text, reason):
    with pytest.raises(PlanError) as info:
        parse_plan(text)
    assert info.value.reason == reason


def steps(*counts, point="A distinct point"):
    return [PlanStep(f"{point} {i}", c) for i, c in enumerate(counts)]


@pytest.mark.parametrize(
    ("plan", "required", "reason"),
    [
        ([], None, "no_steps"),
        (steps(*([300] * 51)), None, "too_many_steps"),
        (steps(300, 5), None, "bad_word_count"),
        (steps(300, 99999), None, "bad_word_count"),
        ([PlanStep("", 300), PlanStep("Body", 300)], None, "degenerate_plan"),
        ([PlanStep("same", 300)] * 4, None, "degenerate_plan"),
        (steps(300, 300), 5000, "length_mismatch"),
        (steps(1000, 1000, 1000), 1000, "length_mismatch"),
    ],
)
def test_validate_plan_rejects(plan, required, reason):
    with pytest.raises(PlanError) as info:
        validate_plan(plan, required)
    assert info.value.reason == reason


def test_validate_plan_accepts_sensible_plan():
    validate_plan(steps(400, 600, 800), 2000)
    validate_plan(steps(400), None)


def test_plan_request_asks_for_json_schema_and_carries_instruction_literally():
    inst = "Write about {{ 7*7 }} and {% for x in y %} loops"
    req = build_plan_request(inst, 3000, 2000)
    assert req.stage == "plan"
    assert req.response_format["type"] == "json_schema"
    # 3,000 words need at least 8 paragraphs of the typical 400 words, and at most twice that
    assert req.response_format["json_schema"]["schema"] == plan_schema(16, min_steps=8)
    assert "at least 8 and at most 16" in req.messages[-1][1]
    llama = build_plan_request(inst, 3000, 2000, json_style="llama_cpp")
    assert llama.response_format["type"] == "json_object"
    llama_items = llama.response_format["schema"]["properties"]["paragraphs"]
    assert (llama_items["minItems"], llama_items["maxItems"]) == (8, 16)
    assert llama_items["items"]["properties"]["word_count"]["enum"][::8] == [200, 600, 1000]
    # long targets are capped by the absolute limit
    long = build_plan_request(inst, 40000, 2000).response_format["json_schema"]["schema"]
    assert long["properties"]["paragraphs"]["maxItems"] == 50
    content = req.messages[-1][1]
    assert inst in content and "49" not in content
    assert "3000" in content
    assert req.prompt_version.startswith("plan@")
    no_json = build_plan_request(inst, None, 2000, json_mode=False)
    assert no_json.response_format is None
    assert "Paragraph 1 - Main Point" in no_json.messages[-1][1]
    assert no_json.key("m") != req.key("m")
    assert req.key("m") == build_plan_request(inst, 3000, 2000).key("m")


def test_a_paragraph_cap_bounds_the_schema_the_prompt_and_validation():
    """--max-paragraphs caps the plan: the schema's item bounds and the prompt's range follow
    it, and a plan over it (from an endpoint that ignores schemas) is rejected."""
    req = build_plan_request("Write a long story", None, 2000, max_steps=6)
    items = req.response_format["json_schema"]["schema"]["properties"]["paragraphs"]
    assert (items["minItems"], items["maxItems"]) == (5, 6)
    assert "at least 5 and at most 6" in req.messages[-1][1]
    tight = build_plan_request("Write a long story", 8000, 2000, max_steps=4)
    items = tight.response_format["json_schema"]["schema"]["properties"]["paragraphs"]
    assert (items["minItems"], items["maxItems"]) == (4, 4)
    validate_plan(steps(400, 400, 400, 400, 400, 400), 2000, max_steps=6)
    with pytest.raises(PlanError) as info:
        validate_plan(steps(*[300] * 7), 2000, max_steps=6)
    assert info.value.reason == "too_many_steps"


def test_a_plan_without_a_required_length_must_reach_the_minimum_words():
    """The plan prompt asks for at least min_words in total; a plan under it could only give a
    sample the length filter rejects, so it is a rejection (and a resample) at once."""
    with pytest.raises(PlanError) as info:
        validate_plan(steps(300, 300, 300), None, min_words=1000)
    assert info.value.reason == "length_mismatch" and "under the minimum 1000" in info.value.detail
    validate_plan(steps(400, 300, 300), None, min_words=1000)
    validate_plan(steps(300, 300, 300), None)  # no minimum given: no check
    validate_plan(steps(300, 300, 300), 1000, min_words=2000)  # a required length rules


def test_plan_request_shows_a_worked_example_in_the_instructions_language():
    """The example turn is the same prompt for another instruction, then its answer in the
    format asked for; the real prompt is the last message."""
    req = build_plan_request("Write a long story about a fox", None, 2000)
    roles = [role for role, _ in req.messages]
    assert roles == ["user", "assistant", "user"]
    example_prompt, example_answer = req.messages[0][1], req.messages[1][1]
    assert "sourdough" in example_prompt and "a fox" not in example_prompt
    # Writers under-shoot their plans: with no required length the ask is above the floor.
    assert "at least 2500 words in total" in req.messages[-1][1]
    assert "a fox" in req.messages[-1][1]
    steps = parse_plan(example_answer)
    assert steps == list(PLAN_EXAMPLES["en"][1])
    validate_plan(steps, None, min_words=2000)  # the example passes what it demonstrates
    assert review_plan([s.main_point for s in steps], PLAN_EXAMPLES["en"][0]).keep
    lines = build_plan_request("Write a long story about a fox", None, 2000, json_mode=False)
    assert lines.messages[1][1].startswith("Paragraph 1 - Main Point: What sourdough is")
    zh = build_plan_request("写一篇关于狐狸的长篇故事", None, 2000)
    assert "酸面包" in zh.messages[0][1] and "酵头" in zh.messages[1][1]


@pytest.mark.parametrize(
    ("point", "copies"),
    [
        ("Making a starter from flour and water, and feeding it", True),
        ("making a starter from flour and water and feeding it daily", True),
        ("How the queen founds the colony and lays her eggs", False),
        # Same subject as the example, own words: a plan for a bread guide may cover starters.
        ("Why a young starter smells sour and what to feed it in its first week", False),
    ],
)
def test_a_plan_that_copies_the_prompts_example_is_rejected(point, copies):
    steps = [
        PlanStep("How the queen founds the colony", 400),
        PlanStep(point, 400),
        PlanStep("Drones and the mating flight", 400),
        PlanStep("The waggle dance and the forage map", 400),
        PlanStep("Winter in the cluster", 400),
    ]
    instruction = "Write a long essay about honeybees"
    if copies:
        with pytest.raises(PlanError) as err:
            validate_plan(steps, None, min_words=2000, instruction=instruction)
        assert err.value.reason == "plan_copies_example"
    else:
        validate_plan(steps, None, min_words=2000, instruction=instruction)
