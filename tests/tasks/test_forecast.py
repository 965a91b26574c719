"""The dry-run forecast: plan sizes, exact prompt counts, quadratic growth, stored plans,
and a dry run that reads without writing."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from storage.models import Instruction, Paragraph, Plan
from storage.store import Store
from tasks.forecast import (
    ForecastConfig,
    PendingInstruction,
    _write_calls,
    add_dry_run_arguments,
    expected_steps,
    forecast,
    format_forecast,
    pending_from_file,
    pending_from_store,
    placeholder_text,
    run_dry_run,
)
from tasks.plan import PlanStep, build_plan_request, steps_to_json
from tasks.wordcount import count_words
from tasks.write import ContextBudget, build_write_request, estimate_tokens
from tests.conftest import write_jsonl

CFG = ForecastConfig(min_words=1000, paragraph_words=300, context_window=32768)


def test_expected_steps_from_length_and_default() -> None:
    assert expected_steps(1800, CFG) == [300] * 6
    assert sum(expected_steps(1000, CFG)) == 1000 and len(expected_steps(1000, CFG)) == 4
    # No length: the piece is min_words long (what the plan prompt asks for at least).
    assert sum(expected_steps(None, CFG)) == 1000
    assert sum(expected_steps(None, ForecastConfig(min_words=1000, default_words=5000))) == 5000
    assert len(expected_steps(10**6, CFG)) == 50  # never more than MAX_STEPS
    capped = ForecastConfig(min_words=1000, paragraph_words=300, max_steps=3)
    assert expected_steps(1800, capped) == [600] * 3  # --max-paragraphs 3


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_placeholder_text_has_the_words_asked(lang: str) -> None:
    assert count_words(placeholder_text(437, lang)) == 437


def test_forecast_equals_the_real_prompts_summed() -> None:
    """The fast path (shape with an empty instruction + the instruction's size) counts
    exactly what rendering every prompt with the instruction counts."""
    prompt = "Write a long story about a lighthouse keeper and the sea, in detail."
    fc = forecast([PendingInstruction(prompt, 1800, "en")], CFG)
    words = expected_steps(1800, CFG)
    plan_req = build_plan_request(prompt, 1800, CFG.min_words)
    assert fc.plan.calls == 1
    assert fc.plan.prompt_tokens == estimate_tokens(plan_req.messages[-1][1])
    from tasks.forecast import _main_point

    steps = [PlanStep(_main_point(i, "en"), w) for i, w in enumerate(words, 1)]
    budget = ContextBudget(CFG.context_window)
    expected = 0
    written: list[str] = []
    for k in range(1, len(steps) + 1):
        req = build_write_request(prompt, steps, written, k, lang="en", budget=budget)
        expected += estimate_tokens(req.messages[-1][1])
        written.append(placeholder_text(steps[k - 1].word_count, "en"))
    assert fc.write.calls == 6
    assert fc.write.prompt_tokens == expected


def test_input_grows_quadratically_with_plan_size() -> None:
    ratios = []
    for n in (5, 10, 20):
        fc = forecast([PendingInstruction("Write a story about a ferry.", n * 300)], CFG)
        assert fc.calls == 1 + n
        ratios.append(fc.prompt_tokens / fc.completion_tokens)
    assert ratios[0] < ratios[1] < ratios[2]
    assert ratios[2] / ratios[1] > 1.6  # about doubling with the plan size


def test_small_context_window_renders_trimmed_prompts() -> None:
    cfg = ForecastConfig(min_words=1000, paragraph_words=400, context_window=4096)
    fc = forecast([PendingInstruction("Write a history of canals. " * 20, 8000)], cfg)
    assert fc.write.calls == 20
    # The budget keeps every prompt inside the window (no prompt of the whole text so far).
    per_call_max = max(
        c
        for c, *_ in _write_calls(
            "Write a history of canals. " * 20,
            [PlanStep("p", 400)] * 20,
            (),
            "en",
            cfg,
        )
    )
    assert per_call_max / 3 < cfg.context_window
    assert fc.write.prompt_tokens < 20 * cfg.context_window


def test_stored_plan_and_paragraphs_are_used() -> None:
    steps = (PlanStep("one", 300), PlanStep("two", 300), PlanStep("three", 300))
    fc = forecast([PendingInstruction("x", None, "en", steps, ("first paragraph",))], CFG)
    assert fc.plan.calls == 0
    assert fc.write.calls == 2
    assert fc.words == 600


def test_cost_from_prices() -> None:
    cfg = ForecastConfig(min_words=1000, paragraph_words=300, price_in=2.0, price_out=10.0)
    fc = forecast([PendingInstruction("Write about bees.", 900)], cfg)
    assert fc.cost == pytest.approx(
        fc.prompt_tokens * 2.0 / 1e6 + fc.completion_tokens * 10.0 / 1e6
    )
    assert forecast([], CFG).cost is None


def test_pending_from_store_reads_without_creating(tmp_path: Path) -> None:
    missing = tmp_path / "none.db"
    assert pending_from_store(str(missing)) == ([], 0, 0)
    assert not missing.exists()
    store = Store(str(tmp_path / "s.db"))
    rows = [
        Instruction(uid=f"u{i}", prompt=f"Write piece {i}.", norm_hash=f"h{i}", status=s)
        for i, s in enumerate(["pending", "planned", "accepted", "written"], start=1)
    ]
    store.add_all(rows)
    from storage.models import LLMCall

    store.save(LLMCall(key="k", stage="plan", model="m", prompt_version="v", content="{}"))
    store.save(
        Plan(
            instruction_id=2,
            call_key="k",
            steps_json=steps_to_json([PlanStep("a", 300), PlanStep("b", 300)]),
            n_steps=2,
            total_words=600,
            prompt_version="v",
        ),
        Paragraph(instruction_id=2, step=1, call_key="k", text="done", words=1, prompt_version="v"),
    )
    store.close()
    pending, no_calls_left, in_scope = pending_from_store(str(tmp_path / "s.db"))
    assert (no_calls_left, in_scope) == (2, 4)
    assert [p.plan is not None for p in pending] == [False, True]
    assert pending[1].written == ("done",)
    # --limit 1 scopes the first instruction by id only.
    assert len(pending_from_store(str(tmp_path / "s.db"), 1)[0]) == 1


def test_pending_from_file_applies_ingest_rules(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"prompt": "Write a story about a glass factory.", "length": 900},
            {"prompt": "Write a story about a glass factory."},  # duplicate
            {"nope": 1},
        ],
    )
    pending, rejected = pending_from_file(path, decontaminate=False)
    assert [p.length for p in pending] == [900]
    assert rejected == 2


def test_dry_run_prints_forecast_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"prompt": f"Write a long story about orchard number {i}.", "length": 1200}
            for i in range(3)
        ],
    )
    p = argparse.ArgumentParser()
    p.add_argument("--instructions")
    p.add_argument("--base-url", action="append")
    p.add_argument("--min-words", type=int, default=1000)
    add_dry_run_arguments(p)
    args = p.parse_args(
        ["--instructions", str(path), "--dry-run", "--price-in", "3", "--price-out", "15"]
    )
    db = tmp_path / "store.db"
    assert run_dry_run(args, str(db)) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing was sent" in out
    assert "instructions to build  3" in out
    assert "LLM calls              12 (plan 3, write 9)" in out  # 400 words a paragraph
    assert "$" in out
    assert not db.exists()


def test_cached_prefixes_are_forecast_and_priced() -> None:
    """Each write prompt of an instruction shares the instruction, plan and text so far with
    the one before: over OpenAI's 1,024-token minimum that prefix is cached input."""
    cfg = ForecastConfig(min_words=1000, price_in=1.0, price_out=1.0, price_cached_in=0.1)
    fc = forecast([PendingInstruction("Write a history of canals.", 6000)], cfg)
    assert 0 < fc.cached_prompt_tokens < fc.prompt_tokens
    full = ForecastConfig(min_words=1000, price_in=1.0, price_out=1.0)
    fc_full = forecast([PendingInstruction("Write a history of canals.", 6000)], full)
    assert fc_full.cached_prompt_tokens == fc.cached_prompt_tokens
    assert fc.cost_in is not None and fc_full.cost_in is not None
    assert fc.cost_in < fc_full.cost_in  # cached input priced at a tenth
    assert fc_full.cost_in == fc_full.prompt_tokens / 1e6
    text = format_forecast(fc, cfg)
    assert "cacheable input" in text and "cached at $0.1/M" in text
