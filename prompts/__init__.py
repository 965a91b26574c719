"""Prompt templates: code under version control, rendered in a sandbox.

Only files in this folder are ever templates. Instructions and model text are passed in as
variables, so `{{ 7*7 }}` inside a user's instruction reaches the model literally. A template's
version is the hash of its source: change a word and every affected LLM call gets a new key.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import FileSystemLoader, StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

PROMPTS_DIR = Path(__file__).resolve().parent

_ENV = ImmutableSandboxedEnvironment(
    loader=FileSystemLoader(str(PROMPTS_DIR)),
    undefined=StrictUndefined,  # a missing variable is a bug, not an empty string
    autoescape=False,
    keep_trailing_newline=False,
    trim_blocks=True,
    lstrip_blocks=True,
)


@cache
def prompt_version(name: str) -> str:
    """`name@<12 hex of sha256(template source)>`."""
    source = (PROMPTS_DIR / f"{name}.j2").read_bytes()
    return f"{name}@{hashlib.sha256(source).hexdigest()[:12]}"


def render(name: str, **variables: Any) -> str:
    return _ENV.get_template(f"{name}.j2").render(**variables).strip()
