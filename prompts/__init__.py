"""Prompt templates: code under version control.

Only files in this folder are ever templates. Instructions and model text are passed in as
variables, so `{{ 7*7 }}` inside a user's instruction reaches the model literally: data is
never parsed as a template. No sandbox: it checks what a template's own code may touch, and
the only template code is these reviewed files; its checks on every attribute a template
reads (each plan step's point and count) made a render 4x slower (0.10 -> 0.025 ms for the
write prompt), on every LLM call (issue 12); the prompts are the same bytes either way
(tests/prompts/test_prompts.py). A template's version is the hash of its source: change a
word and every affected LLM call gets a new key.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined

PROMPTS_DIR = Path(__file__).resolve().parent

_ENV = Environment(
    loader=FileSystemLoader(str(PROMPTS_DIR)),
    undefined=StrictUndefined,  # a missing variable is a bug, not an empty string
    autoescape=False,
    keep_trailing_newline=False,
    trim_blocks=True,
    lstrip_blocks=True,
    # The templates are read once: with auto_reload every render stat()s its file (on every
    # LLM call), and a template edited mid-run would render new text under the version
    # (`prompt_version`, cached) of the old one.
    auto_reload=False,
)


@cache
def prompt_version(name: str) -> str:
    """`name@<12 hex of sha256(template source)>`."""
    source = (PROMPTS_DIR / f"{name}.j2").read_bytes()
    return f"{name}@{hashlib.sha256(source).hexdigest()[:12]}"


def render(name: str, **variables: Any) -> str:
    return _ENV.get_template(f"{name}.j2").render(**variables).strip()
