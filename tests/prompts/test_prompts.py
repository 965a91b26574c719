import pytest
from jinja2.exceptions import UndefinedError

from prompts import PROMPTS_DIR, prompt_version, render


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


def test_version_is_hash_of_source():
    v = prompt_version("plan")
    assert v.startswith("plan@") and len(v.split("@")[1]) == 12
    assert {p.stem for p in PROMPTS_DIR.glob("*.j2")} >= {"plan", "write", "continue"}
