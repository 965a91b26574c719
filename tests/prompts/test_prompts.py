import hashlib
from pathlib import Path

import pytest
from jinja2.exceptions import UndefinedError

import prompts
from prompts import PROMPTS_DIR, prompt_version, render
from tasks.plan import build_plan_request


def test_user_text_is_data_not_template():
    out = render(
        "continue",
        instruction="{{ 7*7 }} {% for x in y %}",
        main_point="m",
        partial="p",
        cut=True,
        planned_words=400,
        words=1,
    )
    assert "{{ 7*7 }} {% for x in y %}" in out
    assert "49" not in out


def test_missing_variable_is_an_error():
    with pytest.raises(UndefinedError):
        render("continue", instruction="x")


def test_version_is_hash_of_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    v = prompt_version("plan")
    assert v.startswith("plan@") and len(v.split("@")[1]) == 12
    assert {p.stem for p in PROMPTS_DIR.glob("*.j2")} >= {"plan", "write", "continue"}
    source = (PROMPTS_DIR / "plan.j2").read_bytes()
    assert v == "plan@" + hashlib.sha256(source).hexdigest()[:12]
    # A copy of the template: the same bytes give the same version, one changed word another,
    # and with it another key for every call that uses the template.
    copy = tmp_path / "plan.j2"
    copy.write_bytes(source)
    monkeypatch.setattr(prompts, "PROMPTS_DIR", tmp_path)
    prompt_version.cache_clear()
    try:
        assert prompt_version("plan") == v
        edited = source.replace(b"words", b"Words", 1)
        assert edited != source
        copy.write_bytes(edited)
        prompt_version.cache_clear()
        changed = prompt_version("plan")
        request = build_plan_request("Write a story.", 3000, 2000)
    finally:
        monkeypatch.undo()
        prompt_version.cache_clear()
    assert changed.startswith("plan@") and changed != v
    assert request.prompt_version == changed
    assert request.key("m") != build_plan_request("Write a story.", 3000, 2000).key("m")


def _every_prompt() -> list[tuple[tuple[str, str], ...]]:
    """The messages of every kind of request the stages build from the templates."""
    from tasks.eval.judge import build_judge_request
    from tasks.plan import PlanStep
    from tasks.write import (
        ContextBudget,
        build_continue_request,
        build_continue_turns_request,
        build_write_request,
    )

    steps = [PlanStep(f"Point {i}: the keeper's {{{{ lamp }}}} and 海", 300) for i in range(1, 5)]
    written = ["The first paragraph. " * 40, "第二段。" * 50]
    budget = ContextBudget(8192)
    tricky = "Write about {{ 7*7 }} and {% raw %} <written> 长城"
    requests = [
        build_plan_request(tricky, 3000, 2000),
        build_plan_request("写一篇关于长城的文章", None, 2000),
        build_judge_request(tricky, "A response. " * 50)[0],
    ]
    for style in ("paper", "turns"):
        for current in (1, 3):
            requests.append(
                build_write_request(
                    tricky,
                    steps,
                    written[: current - 1],
                    current,
                    lang="en",
                    budget=budget,
                    style=style,
                )
            )
    requests.append(
        build_continue_request(tricky, steps[0], "cut off mid", cut=True, lang="en", budget=budget)
    )
    requests.append(
        build_continue_turns_request(
            tricky, steps, written, 3, "short", cut=False, budget=budget, lang="zh"
        )
    )
    return [r.messages for r in requests]


def test_prompts_are_the_same_bytes_as_under_the_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    """The templates render without jinja2's sandbox (it only checked our own template code,
    at 4x the cost): every prompt is byte for byte what the sandboxed environment gave, so
    every stored call's key stays the same."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    plain = _every_prompt()
    env = prompts._ENV
    sandboxed = ImmutableSandboxedEnvironment(
        loader=env.loader,
        undefined=env.undefined,
        autoescape=env.autoescape,
        keep_trailing_newline=env.keep_trailing_newline,
        trim_blocks=env.trim_blocks,
        lstrip_blocks=env.lstrip_blocks,
    )
    monkeypatch.setattr(prompts, "_ENV", sandboxed)
    assert _every_prompt() == plain
    assert any("{{ 7*7 }}" in content for messages in plain for _, content in messages)
