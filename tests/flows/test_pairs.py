"""`longwriter pairs` end to end against the fake OpenAI server: a build makes the plans and
samples, then the pairs flow writes K variants per plan, judges them and exports TRL pairs.

The fake writer tags every variant's text with its seed ("ToneD" for seed 3; the build's own
sample has no seed: "ToneA"), and the fake judge rates by that tag, so every score, choice and skip
below is worked out here by hand."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from flows.build import BuildSettings, build_flow
from flows.cli import main as cli_main
from flows.pairs import PairsSettings, pairs_flow
from storage.pair_models import PairDecision, PairJudgement, VariantParagraph, VariantSample
from storage.store import Store
from tasks.train.data import read_records
from tests.conftest import write_jsonl
from tests.fake_openai import FakeConfig, FakeOpenAIServer, default_answer, prose

pytestmark = pytest.mark.usefixtures("prefect_api")

DIMS = [
    "relevance",
    "accuracy",
    "coherence",
    "clarity",
    "breadth_and_depth",
    "reading_experience",
]
STEP_WORDS = 30  # two 30-word paragraphs per sample: short enough for the tiny test models
LENGTH = 2 * STEP_WORDS

INSTRUCTIONS = [
    # Required length known: S = (S_q + S_l) / 2; every variant hits the length, S_l = 100.
    {"id": "main", "prompt": "Write an essay about tides and harbours", "length": LENGTH},
    {"id": "flat", "prompt": "Write an essay about lanterns [[flat]]", "length": LENGTH},
    {"id": "nojudge", "prompt": "Write an essay about bridges [[nojudge]]", "length": LENGTH},
    # No required length: S = S_q. Variant 4 refuses and is rated best by a careless judge.
    {"id": "refuse", "prompt": "Write an essay about orchards [[refuse4]]"},
]


def judge_json(*ratings: int) -> str:
    if len(ratings) == 1:
        ratings = ratings * len(DIMS)
    return json.dumps(dict(zip(DIMS, ratings, strict=True)))


TAGS = "ABCDE"  # variant n's text opens with "Tone" + TAGS[n] (one word, as count_words sees it)
# Ratings of the "main" instruction's variants by tag; 3 never parses.
MAIN_JUDGE = {0: judge_json(3), 1: judge_json(5), 2: judge_json(2), 3: "Nice.", 4: judge_json(4)}


def fake_answer(stage: str, body: dict[str, Any], cfg: FakeConfig) -> str:
    prompt = body["messages"][-1]["content"]
    if stage == "write":
        seed = body.get("seed")
        m = re.search(r"<instruction>\s*(.*?)\s*</instruction>", prompt, re.DOTALL)
        instruction = m.group(1) if m else prompt
        if "[[refuse4]]" in instruction and seed == 4:
            return "I'm sorry, but I can't help with writing this."
        words = re.search(r"Aim for about (\d+) words", prompt)
        n = int(words.group(1)) if words else STEP_WORDS
        return f"Tone{TAGS[seed or 0]} " + prose(f"{prompt}#{seed}", n - 1)
    if stage == "judge":
        request = re.search(r"<request>\s*(.*?)\s*</request>", prompt, re.DOTALL).group(1)
        response = re.search(r"<response>\s*(.*?)\s*</response>", prompt, re.DOTALL).group(1)
        tag = re.search(r"Tone([A-E])\b", response)
        if "[[nojudge]]" in request:
            return "A fine piece, I would say."
        if "[[flat]]" in request:
            return judge_json(4)
        if "[[refuse4]]" in request:
            if tag is None:  # the refusal
                return judge_json(5)
            return judge_json(4) if tag.group(1) == TAGS[2] else judge_json(3)
        assert tag is not None
        return MAIN_JUDGE[TAGS.index(tag.group(1))]
    return default_answer(stage, body, cfg)


def fake_config() -> FakeConfig:
    return FakeConfig(plan_steps=2, step_words=STEP_WORDS)


def build_store(tmp_path: Path, db_url: str, base_url: str) -> dict[str, Any]:
    """Ingest, plan, write and accept the instructions with the factory itself."""
    src = write_jsonl(tmp_path / "instructions.jsonl", INSTRUCTIONS)
    settings = BuildSettings(
        instructions=str(src),
        db_url=db_url,
        out_dir=str(tmp_path / "build"),
        base_urls=[base_url],
        model="fake-writer",
        min_words=20,
        concurrency=4,
    )
    summary = asyncio.run(build_flow(settings=settings))
    assert summary["accepted"] == len(INSTRUCTIONS), summary
    return summary


def pairs_settings(db_url: str, out: Path, base_url: str, **kw: Any) -> PairsSettings:
    return PairsSettings(
        db_url=db_url,
        out_dir=str(out),
        base_urls=[base_url],
        model="fake-writer",
        judge_model="fake-judge",  # same endpoint, another model name: its own cache keys
        variants=4,
        concurrency=4,
        batch_size=2,
        **kw,
    )


def test_pairs_flow_scores_selects_exports_and_resumes(tmp_path: Path, db_url: str) -> None:
    out = tmp_path / "pairs"
    with FakeOpenAIServer(fake_config(), answer=fake_answer).running() as fake:
        build_store(tmp_path, db_url, fake.base_url)
        before = fake.stats.by_stage.copy()
        settings = pairs_settings(db_url, out, fake.base_url)
        summary = asyncio.run(pairs_flow(settings=settings))
        by_stage = {k: v - before.get(k, 0) for k, v in fake.stats.by_stage.items()}
        # 4 instructions x 4 variants x 2 paragraphs, plus one continuation of each of the
        # refusing variant's 2 paragraphs (9 of 30 planned words: variants are drafted as the
        # build drafts); the judge: 16 + 4 variant-0 verdicts, plus 2 more attempts for each
        # of the 6 answers that never parse.
        assert by_stage == {"plan": 0, "write": 32 + 2, "judge": 20 + 2 * 6}
        assert max(fake.stats.by_request_id.values()) == 1  # every call paid once
        requests = fake.stats.requests

        # Rerun: everything comes from the store, nothing is asked again, same pairs.
        first_jsonl = (out / "jsonl" / "pairs-00000-of-00001.jsonl").read_text()
        again = asyncio.run(pairs_flow(settings=settings))
        assert fake.stats.requests == requests
        assert again["counts"] == summary["counts"]
        assert (out / "jsonl" / "pairs-00000-of-00001.jsonl").read_text() == first_jsonl

    counts = summary["counts"]
    assert counts["pairs"] == 2 and counts["instructions"] == 4
    assert counts["decisions"] == {"paired": 2, "low_margin": 1, "too_few_scored": 1}
    # 1 unparsed variant of "main" + all 5 of "nojudge": counted, not dropped.
    assert counts["judge_unscored"] == 6
    assert counts["variants"] == {"scored": 14, "unparsed": 6}
    assert summary["llm"]["variants_this_run"] == {"variants_written": 16}

    pairs = {r["id"]: r for r in read_records(out)}  # what `longwriter train --dpo` reads
    assert set(pairs) == {"main", "refuse"}
    main = pairs["main"]
    # S_l = 100 for every variant (60 words for 60 required): S = (S_q + 100) / 2.
    # S_q: v0 (3s) 50, v1 (5s) 100, v2 (2s) 25, v4 (4s) 75 -> S 75, 100, 62.5, 87.5.
    expected = {0: 75.0, 2: 62.5, 4: 87.5}
    assert main["chosen_variant"] == 1 and main["chosen_score"] == 100.0
    assert main["rejected_variant"] in expected
    assert main["rejected_score"] == expected[main["rejected_variant"]]
    assert main["margin"] == pytest.approx(100.0 - main["rejected_score"])
    assert main["chosen_length_score"] == 100.0 and main["chosen_words"] == LENGTH
    assert main["prompt"] == [{"role": "user", "content": INSTRUCTIONS[0]["prompt"]}]
    assert main["chosen"][0]["role"] == "assistant"
    assert main["chosen"][0]["content"].startswith("ToneB")
    assert main["rejected"][0]["content"].startswith("Tone" + TAGS[main["rejected_variant"]])

    refuse = pairs["refuse"]
    # The refusal (variant 4) scores 100 but fails the refusal filter: never chosen. Variant 2
    # (4s, S_q 75) is chosen over the others (3s, 50) or the refusal as the rejected one.
    assert refuse["chosen_variant"] == 2 and refuse["chosen_score"] == 75.0
    assert refuse["required_length"] is None and refuse["chosen_length_score"] is None
    assert refuse["rejected_variant"] in (0, 1, 3)
    assert refuse["margin"] == 25.0

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == counts
    assert manifest["margins"]["min"] == min(main["margin"], 25.0)
    assert {f["path"] for f in manifest["files"]} == {
        "shards/pairs-00000-of-00001.parquet",
        "jsonl/pairs-00000-of-00001.jsonl",
    }
    print(f"pairs: 2, margins main {main['margin']} refuse {refuse['margin']}")

    store = Store(db_url)
    try:
        with store.session() as s:
            decisions = {d.instruction_id: d for d in s.exec(select(PairDecision)).all()}
            variants = s.exec(select(VariantSample)).all()
            paragraphs = s.exec(select(VariantParagraph)).all()
            verdicts = s.exec(select(PairJudgement)).all()
    finally:
        store.close()
    skipped = sorted((d.reason, d.detail) for d in decisions.values() if d.status == "skipped")
    assert skipped[0][0] == "low_margin" and "no variant scores lower" in skipped[0][1]
    assert skipped[1][0] == "too_few_scored" and "unparsed 5" in skipped[1][1]
    assert len(variants) == 20 and len(paragraphs) == 32 and len(verdicts) == 20
    assert {v.origin for v in variants if v.variant == 0} == {"build"}
    assert [v.filter_reason for v in variants if v.filter_reason] == ["refusal"]
    assert {v.seed for v in variants if v.variant} == {1, 2, 3, 4}


def test_pairs_min_margin_and_worst_rejected(tmp_path: Path, db_url: str) -> None:
    """A wider --min-margin drops the "refuse" pair (margin 25); `worst` takes the lowest."""
    out = tmp_path / "pairs"
    with FakeOpenAIServer(fake_config(), answer=fake_answer).running() as fake:
        build_store(tmp_path, db_url, fake.base_url)
        settings = pairs_settings(db_url, out, fake.base_url, min_margin=30.0, rejected="worst")
        summary = asyncio.run(pairs_flow(settings=settings))
    assert summary["counts"]["decisions"] == {"paired": 1, "low_margin": 2, "too_few_scored": 1}
    (main,) = read_records(out)
    assert (main["chosen_variant"], main["rejected_variant"], main["margin"]) == (1, 2, 37.5)


def test_cli_pairs(tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pairs"
    with FakeOpenAIServer(fake_config(), answer=fake_answer).running() as fake:
        build_store(tmp_path, db_url, fake.base_url)
        capsys.readouterr()
        code = cli_main(
            ["pairs", "--db", db_url, "--out", str(out), "--base-url", fake.base_url]
            + ["--model", "fake-writer", "--variants", "2", "--limit", "1"]
        )
    printed = capsys.readouterr().out
    assert code == 0, printed
    # "main" with variants 0-2: S 75 (v0), 100 (v1), 62.5 (v2).
    assert "pairs 1 of 1 instruction(s)" in printed and "skipped: none" in printed
    assert (out / "manifest.json").is_file()


def test_cli_pairs_without_plans_fails_in_one_line(
    tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli_main(["pairs", "--db", db_url, "--out", str(tmp_path / "p"), "--model", "m"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("longwriter: error: no instruction with an accepted plan")
    assert len(err.strip().splitlines()) == 1


def test_unwritable_variant_is_stored_as_failed_and_counted(tmp_path: Path, db_url: str) -> None:
    """A variant whose paragraph never comes (empty answers until the client gives up) is a
    `failed` row with the reason, counted among the variants; the others still pair."""

    def answer(stage: str, body: dict[str, Any], cfg: FakeConfig) -> str:
        if stage == "write" and body.get("seed") == 3:
            return ""
        return fake_answer(stage, body, cfg)

    out = tmp_path / "pairs"
    with FakeOpenAIServer(fake_config(), answer=answer).running() as fake:
        build_store(tmp_path, db_url, fake.base_url)
        settings = pairs_settings(
            db_url, out, fake.base_url, limit=1, max_attempts=2, initial_backoff_s=0.0
        )
        summary = asyncio.run(pairs_flow(settings=settings))
    assert summary["counts"]["variants"] == {"scored": 4, "failed": 1}
    assert summary["counts"]["decisions"] == {"paired": 1}
    store = Store(db_url)
    try:
        with store.session() as s:
            failed = s.exec(select(VariantSample).where(VariantSample.status == "failed")).all()
    finally:
        store.close()
    assert [(v.variant, v.error.split(":")[0]) for v in failed] == [(3, "bad_output")]
