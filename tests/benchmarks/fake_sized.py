"""The fake OpenAI server, planning as many paragraphs as the instruction's length asks for.

tests.fake_openai plans a fixed number of paragraphs per server; benchmark 5 needs plans of 5,
10 and 20 paragraphs in one build, so this hook reads the target the plan prompt states
("about N words") and plans N / step_words paragraphs of step_words each.

    python -m tests.benchmarks.fake_sized --port 0 --step-words 300   (prints the port)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import re
from typing import Any

from tests.fake_openai import FakeConfig, FakeOpenAIServer, default_answer

_TARGET_RE = re.compile(r"asks for about (\d+) words")


def sized_answer(stage: str, body: dict[str, Any], cfg: FakeConfig) -> str:
    if stage == "plan":
        prompt = (body.get("messages") or [{}])[-1].get("content", "")
        m = _TARGET_RE.search(prompt)
        if m:
            steps = max(1, round(int(m.group(1)) / cfg.step_words))
            cfg = dataclasses.replace(cfg, plan_steps=steps)
    return default_answer(stage, body, cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--step-words", type=int, default=300)
    args = ap.parse_args()
    server = FakeOpenAIServer(
        FakeConfig(latency_s=args.latency, step_words=args.step_words), answer=sized_answer
    )
    asyncio.run(server.serve(args.port, lambda p: print(p, flush=True)))


if __name__ == "__main__":
    main()
