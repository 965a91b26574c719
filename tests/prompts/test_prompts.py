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
