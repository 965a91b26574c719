"""The evaluation prompt set and the request that sends one prompt verbatim."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Importing the eval tables registers them on SQLModel's metadata, so the Store(url) the flow
# opens later creates them (Store.__init__ runs create_all).
from tasks.llm.client import (
    ChatRequest,
)
from tasks.llm.endpoints import ConfigError
from tasks.wordcount import detect_lang
from tasks.write import estimate_tokens

# Re-exported: the eval's settings and prompt set live in tasks/settings.py.
GENERATE_STAGE = "generate"
# The prompt goes out verbatim (no template), so this names the convention, not a file hash.
GENERATE_VERSION = "eval-verbatim@1"
PROMPT_RESERVE_TOKENS = 256  # chat template tokens + estimate error, kept free of max_tokens


# -- prompts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptItem:
    index: int  # position in the prompt file (reports keep this order)
    prompt: str
    length: int
    type: str
    lang: str


def load_prompts(path: Path, limit: int | None = None) -> list[PromptItem]:
    """{"prompt","length","type"} records; any malformed line stops with its line number."""
    if not path.is_file():
        raise ConfigError(f"prompts file not found: {path}")
    items: list[PromptItem] = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                prompt = rec["prompt"]
                length = int(rec["length"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(
                    f"{path}:{line_no}: need a JSON object with 'prompt' and integer 'length' "
                    f"({type(exc).__name__})"
                ) from None
            if not isinstance(prompt, str) or not prompt.strip() or length <= 0:
                raise ConfigError(f"{path}:{line_no}: empty prompt or non-positive length")
            items.append(
                PromptItem(
                    index=len(items),
                    prompt=prompt,
                    length=length,
                    type=str(rec.get("type") or "unknown"),
                    lang=detect_lang(prompt),
                )
            )
            if limit is not None and len(items) >= limit:
                break
    if not items:
        raise ConfigError(f"no prompts in {path}")
    return items


def generation_request(prompt: str, max_tokens: int, temperature: float) -> ChatRequest:
    """The prompt verbatim as the single user message (as LongBench-Write does)."""
    return ChatRequest.of(
        GENERATE_STAGE,
        [{"role": "user", "content": prompt}],
        GENERATE_VERSION,
        max_tokens=max_tokens,
        temperature=temperature,
    )


def generation_max_tokens(prompt: str, max_tokens: int, context_window: int) -> int:
    """max_tokens clipped so prompt + answer fit the context (llama.cpp refuses otherwise)."""
    return min(max_tokens, context_window - estimate_tokens(prompt) - PROMPT_RESERVE_TOKENS)
