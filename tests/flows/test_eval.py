"""The eval flow end to end against the fake OpenAI server: every figure of results.json is
checked against values worked out here, independently of tasks.eval.scoring."""

from __future__ import annotations

import asyncio
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from flows.eval import EvalSettings, run_eval_sync
from tasks.wordcount import count_words
from tests.conftest import write_jsonl
from tests.fake_openai import FakeConfig, FakeOpenAIServer, prose

DIMS = [
    "relevance",
    "accuracy",
    "coherence",
    "clarity",
    "breadth_and_depth",
    "reading_experience",
]


def _json(*v: int) -> str:
    return json.dumps(dict(zip(DIMS, v, strict=True)))


# Each prompt: its required length, language, type, how many words the fake model writes
# (None: empty content -> BadOutputError), the judge's answer per attempt (the last repeats),
# the ratings that should be read from it (None: never parses), and S_l worked out by hand.
CASES: list[dict[str, Any]] = [
    dict(
        length=100,
        zh=False,
        type="A",
        out=100,
        judge=[_json(5, 4, 4, 5, 3, 4)],
        ratings=[5, 4, 4, 5, 3, 4],
        s_l=100.0,
    ),
    dict(
        length=400,
        zh=False,
        type="A",
        out=800,
        judge=[
            'My evaluation:\n```json\n{"Relevance": 4, "Accuracy": 4, "Coherence": 3, '
            '"Clarity": 4, "Breadth and Depth": 2, "Reading Experience": 3}\n```\nDone.'
        ],
        ratings=[4, 4, 3, 4, 2, 3],
        s_l=100 * 2 / 3,
    ),  # 2x long: 1 - 1/3
    dict(
        length=300,
        zh=True,
        type="B",
        out=150,
        judge=[
            "{'relevance': '4/5', 'accuracy': '5/5', 'coherence': '4', 'clarity': 3, "
            "'breadth-and-depth': '3 out of 5', 'readingExperience': 4,}"
        ],
        ratings=[4, 5, 4, 3, 3, 4],
        s_l=50.0,
    ),  # half: 1 - (2 - 1)/2
    dict(
        length=1000,
        zh=False,
        type="B",
        out=4000,
        judge=["This response is thorough and well written; I rate it highly."],
        ratings=None,
        s_l=0.0,
    ),  # 4x long; judge never parses in 3 attempts
    dict(
        length=1500,
        zh=False,
        type="C",
        out=None,
        judge=[_json(5, 5, 5, 5, 5, 5)],
        ratings=None,
        s_l=0.0,
    ),  # the answer never comes: empty, not judged
    dict(
        length=2500,
        zh=True,
        type="C",
        out=2500,
        judge=[
            '{"relevance": 4, "accuracy": 4}',
            '{"RELEVANCE": 3, "ACCURACY": 2, '
            '"COHERENCE": 3, "CLARITY": 4, "BREADTH_AND_DEPTH": 2, "READING_EXPERIENCE": 3}',
        ],
        ratings=[3, 2, 3, 4, 2, 3],
        s_l=100.0,
    ),  # parses on the 2nd attempt
    dict(
        length=5000,
        zh=False,
        type="A",
        out=3000,
        judge=[
            json.dumps(
                {
                    "scores": {
                        d: {"score": s, "reason": "ok"}
                        for d, s in zip(DIMS, [2, 3, 4, 4, 2, 3], strict=True)
                    }
                }
            )
        ],
        ratings=[2, 3, 4, 4, 2, 3],
        s_l=100 * 2 / 3,
    ),  # 1 - (5/3 - 1)/2
    dict(
        length=20000,
        zh=False,
        type="B",
        out=10000,
        judge=[
            "Relevance: 5\nAccuracy: 5\nCoherence: 4\nClarity: 4\nBreadth & Depth: 4\n"
            "Reading experience: 5"
        ],
        ratings=[5, 5, 4, 4, 4, 5],
        s_l=50.0,
    ),
    dict(
        length=25000,
        zh=False,
        type="C",
        out=30000,
        judge=[_json(1, 2, 2, 3, 1, 2)],
        ratings=[1, 2, 2, 3, 1, 2],
        s_l=100 * (1 - 0.2 / 3),
    ),  # 1.2x long, judged truncated
]
BUCKET = ["0-500", "0-500", "0-500", "500-2k", "500-2k", "2k-4k", "4k-20k", "4k-20k", "20k+"]
JUDGE_CALLS = [1, 1, 1, 3, 0, 2, 1, 1, 1]


def _prompt(i: int, case: dict[str, Any]) -> str:
    if case["zh"]:
        return f"[[id={i}]] 请写一篇{case['length']}字的文章，介绍中国的茶文化和它的历史。"
    return f"[[id={i}]] Write a {case['length']}-word essay about tea and its history."


def _text(i: int, case: dict[str, Any]) -> str:
    return prose(f"answer {i}", case["out"], chinese=case["zh"]) if case["out"] else ""


def answer(stage: str, body: dict[str, Any], _cfg: FakeConfig) -> str:
    content = body["messages"][-1]["content"]
    i = int(re.search(r"\[\[id=(\d+)\]\]", content).group(1))
    case = CASES[i]
    if stage == "generate":
        assert len(body["messages"]) == 1 and content == _prompt(i, case)  # verbatim
        return _text(i, case)
    assert stage == "judge"
    assert body["response_format"]["type"] == "json_schema"  # asked for JSON (remote: schema)
    answers = case["judge"]
    return answers[min(int(body["seed"]), len(answers) - 1)]


def _write_prompts(path: Path, cases: list[dict[str, Any]] | None = None) -> Path:
    cases = CASES if cases is None else cases
    return write_jsonl(
        path,
        [
            {"prompt": _prompt(i, c), "length": c["length"], "type": c["type"]}
            for i, c in enumerate(cases)
        ],
    )


def _settings(tmp_path: Path, server: FakeOpenAIServer, **kw: Any) -> EvalSettings:
    base = dict(
        prompts=str(tmp_path / "prompts.jsonl"),
        out_dir=str(tmp_path / "out"),
        db_url=str(tmp_path / "eval.db"),
        base_urls=[server.base_url],
        model="fake-model",
        concurrency=4,
        batch_size=4,
        max_attempts=2,
    )
    base.update(kw)
    return EvalSettings(**base)


def _mean(xs: list[float]) -> float:
    return math.fsum(xs) / len(xs)


def _expected_group(idx: list[int]) -> dict[str, Any]:
    """A group's figures from the table above: S_l over every prompt, each dimension
    (mean rating - 1) * 25 over the scored prompts, S_q their mean, S the average."""
    if not idx:
        return {"n": 0, "S_l": None, "S_q": None, "S": None, "scored": 0}
    scored = [CASES[i]["ratings"] for i in idx if CASES[i]["ratings"] is not None]
    s_l = _mean([CASES[i]["s_l"] for i in idx])
    dims = {
        d: (_mean([r[k] for r in scored]) - 1) * 25 if scored else None for k, d in enumerate(DIMS)
    }
    s_q = _mean(list(dims.values())) if scored else None
    outs = [CASES[i]["out"] or 0 for i in idx]
    return {
        "n": len(idx),
        "S_l": s_l,
        "S_q": s_q,
        "S": (s_l + s_q) / 2 if s_q is not None else None,
        "dimensions": dims,
        "scored": len(scored),
        "unscored": len(idx) - len(scored),
        "judge_unparsed": sum(1 for i in idx if CASES[i]["ratings"] is None and CASES[i]["out"]),
        "empty_responses": sum(1 for i in idx if not CASES[i]["out"]),
        "max_response_length": max(outs),
        "mean_response_length": _mean(outs),
        "mean_required_length": _mean([CASES[i]["length"] for i in idx]),
    }


def _check_group(got: dict[str, Any], want: dict[str, Any]) -> None:
    for k, v in want.items():
        if k == "dimensions":
            for d in DIMS:
                assert (
                    got[k][d] == pytest.approx(v[d], abs=1e-3)
                    if v[d] is not None
                    else (got[k][d] is None)
                ), d
        elif v is None:
            assert got[k] is None, k
        else:
            assert got[k] == pytest.approx(v, abs=1e-3), k


def test_eval_flow_every_figure(tmp_path: Path, prefect_api: None) -> None:
    _write_prompts(tmp_path / "prompts.jsonl")
    # Sanity of the fake's texts: lengths are what the table says.
    for i, c in enumerate(CASES):
        assert count_words(_text(i, c)) == (c["out"] or 0)
    with FakeOpenAIServer(FakeConfig(), answer=answer).running() as server:
        results = run_eval_sync(_settings(tmp_path, server))
        by_stage = dict(server.stats.by_stage)
        judge_prompts = [p for s, p in server.stats.prompts if s == "judge"]

    # HTTP: one generate call per prompt, two attempts for the empty one; judge calls per case.
    assert by_stage == {"generate": len(CASES) + 1, "judge": sum(JUDGE_CALLS)}
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))

    n = len(CASES)
    all_idx = list(range(n))
    _check_group(results["overall"], _expected_group(all_idx))
    # Hand arithmetic of the overall length score, as a second check.
    assert results["overall"]["S_l"] == pytest.approx(
        (100 + 200 / 3 + 50 + 0 + 0 + 100 + 200 / 3 + 50 + 280 / 3) / 9, abs=1e-3
    )
    assert results["overall"]["max_response_length"] == 30000
    assert list(results["buckets"]) == ["0-500", "500-2k", "2k-4k", "4k-20k", "20k+"]
    for name in results["buckets"]:
        _check_group(
            results["buckets"][name], _expected_group([i for i in all_idx if BUCKET[i] == name])
        )
    assert set(results["languages"]) == {"en", "zh"}
    for lang in ("en", "zh"):
        _check_group(
            results["languages"][lang],
            _expected_group([i for i in all_idx if CASES[i]["zh"] == (lang == "zh")]),
        )
    assert set(results["types"]) == {"A", "B", "C"}
    for t in ("A", "B", "C"):
        _check_group(
            results["types"][t], _expected_group([i for i in all_idx if CASES[i]["type"] == t])
        )

    c = results["counts"]
    assert c == {
        "prompts": 9,
        "answered": 8,
        "bad_output": 1,
        "context_overflow": 0,
        "empty_responses": 1,
        "scored": 7,
        "unscored": 2,
        "judge_unparsed": 1,
        "judge_errors": 0,
        "not_judged_empty": 1,
        "finish_length": 0,
    }
    assert results["judged"] is True
    assert results["model"] == "fake-model" and results["judge_model"] == "fake-model"
    assert results["llm"]["generate"]["calls"] == 8 and results["llm"]["judge"]["calls"] == sum(
        JUDGE_CALLS
    )

    rows = results["rows"]
    assert len(rows) == n
    for i, (row, case) in enumerate(zip(rows, CASES, strict=True)):
        assert row["prompt"] == _prompt(i, case)
        assert row["length"] == case["length"]
        assert row["type"] == case["type"]
        assert row["lang"] == ("zh" if case["zh"] else "en")
        assert row["bucket"] == BUCKET[i]
        assert row["response_length"] == (case["out"] or 0)
        assert row["S_l"] == pytest.approx(case["s_l"], abs=1e-3)
        if case["ratings"] is None:
            assert row["scores"] is None and row["S_q"] is None
        else:
            assert row["scores"] == dict(zip(DIMS, map(float, case["ratings"]), strict=True))
            assert row["S_q"] == pytest.approx(
                _mean([(r - 1) * 25 for r in case["ratings"]]), abs=1e-3
            )
        assert row["judge_attempts"] == JUDGE_CALLS[i]
    assert [r["judge_status"] for r in rows] == [
        "scored",
        "scored",
        "scored",
        "unparsed",
        "empty_response",
        "scored",
        "scored",
        "scored",
        "scored",
    ]
    assert rows[4]["generation_status"] == "bad_output" and "empty" in rows[4]["generation_error"]
    assert rows[3]["judge_error"] and "no ratings" in rows[3]["judge_error"]
    # The 30,000-word answer does not fit the judge's context: its middle was cut.
    assert rows[8]["judge_truncated"] is True
    assert [r["judge_truncated"] for r in rows[:8]] == [False] * 8
    assert any("omitted" in p and "[[id=8]]" in p for p in judge_prompts)

    out = tmp_path / "out"
    md = (out / "results.md").read_text()
    for name in ("0-500", "500-2k", "2k-4k", "4k-20k", "20k+", "relevance", "| zh "):
        assert name in md
    assert f"{results['overall']['S_l']:.1f}" in md
    assert (out / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    responses = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]
    assert [r["response"] for r in responses] == [_text(i, c) for i, c in enumerate(CASES)]

    artifact = asyncio.run(_artifact("eval-results", must_contain="model `fake-model`"))
    assert "data:image/png;base64," in artifact and "| 20k+" in artifact


async def _artifact(key: str, must_contain: str = "") -> str:
    """The newest artifact under `key` from this test's run: the suite shares one Prefect API,
    and other tests (the closed loop) publish under the same key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async with get_client() as client:
        arts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    mine = sorted((a for a in arts if must_contain in str(a.data)), key=lambda a: a.created)
    assert mine, f"no artifact {key} containing {must_contain!r}"
    return str(mine[-1].data)


def test_rerun_skips_answered_prompts(tmp_path: Path, prefect_api: None) -> None:
    prompts = tmp_path / "prompts.jsonl"
    _write_prompts(prompts, CASES[:5])
    with FakeOpenAIServer(FakeConfig(), answer=answer).running() as server:
        first = run_eval_sync(_settings(tmp_path, server))
        after_first = dict(server.stats.by_stage)
        assert after_first == {"generate": 5 + 1, "judge": sum(JUDGE_CALLS[:5])}

        # Same command again: nothing is requested, the figures are the same.
        second = run_eval_sync(_settings(tmp_path, server))
        assert dict(server.stats.by_stage) == after_first
        for key in ("overall", "buckets", "languages", "types", "rows", "counts"):
            assert second[key] == first[key]

        # A larger prompt set on the same store: only the new prompts are asked and judged
        # (the failed generation and the unparsed verdict are recorded outcomes, not retried).
        _write_prompts(prompts, CASES)
        third = run_eval_sync(_settings(tmp_path, server))
        assert dict(server.stats.by_stage) == {
            "generate": len(CASES) + 1,
            "judge": sum(JUDGE_CALLS),
        }
        assert third["rows"][:5] == first["rows"]
        assert third["counts"]["prompts"] == len(CASES)


def test_cli_no_judge(
    tmp_path: Path, prefect_api: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import main

    _write_prompts(tmp_path / "prompts.jsonl")
    with FakeOpenAIServer(FakeConfig(), answer=answer).running() as server:
        rc = main(
            [
                "eval",
                "--prompts",
                str(tmp_path / "prompts.jsonl"),
                "--base-url",
                server.base_url,
                "--model",
                "fake-model",
                "--out",
                str(tmp_path / "out"),
                "--no-judge",
                "--max-attempts",
                "2",
                "--max-tokens",
                "2048",
                "--temperature",
                "0.5",
                "--concurrency",
                "3",
            ]
        )
        assert server.stats.by_stage["judge"] == 0
    assert rc == 0
    printed = capsys.readouterr().out
    assert "S_l" in printed and "4k-20k" in printed
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (tmp_path / "out" / "eval.db").is_file()  # --db defaults to OUT/eval.db
    assert results["judged"] is False and results["judge_model"] is None
    assert results["overall"]["S_q"] is None and results["overall"]["S"] is None
    assert results["overall"]["S_l"] == pytest.approx(_mean([c["s_l"] for c in CASES]), abs=1e-3)
    assert results["buckets"]["4k-20k"]["S_q"] is None
    assert results["settings"]["max_tokens"] == 2048
    assert all(r["judge_status"] == "skipped" for r in results["rows"])
    assert results["counts"]["unscored"] is None


@pytest.mark.parametrize(("status", "needle"), [(401, "HTTP 401"), (503, "after 2 attempts")])
def test_cli_stops_on_hard_failures_with_one_line(
    tmp_path: Path,
    prefect_api: None,
    capsys: pytest.CaptureFixture[str],
    status: int,
    needle: str,
) -> None:
    from flows.cli import main

    _write_prompts(tmp_path / "prompts.jsonl", CASES[:3])
    cfg = FakeConfig(fail_status=status, retry_after_s=0.01)
    with FakeOpenAIServer(cfg, answer=answer).running() as server:
        rc = main(
            [
                "eval",
                "--prompts",
                str(tmp_path / "prompts.jsonl"),
                "--base-url",
                server.base_url,
                "--model",
                "fake-model",
                "--out",
                str(tmp_path / "out"),
                "--max-attempts",
                "2",
            ]
        )
    assert rc != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("longwriter: error:") and needle in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "results.json").exists()


def test_cli_rejects_bad_prompt_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "length": 100}, {"prompt": "no length"}])
    rc = main(
        [
            "eval",
            "--prompts",
            str(tmp_path / "p.jsonl"),
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--model",
            "m",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 2
    assert "p.jsonl:2" in capsys.readouterr().err


def test_default_prompt_sets_load() -> None:
    from flows.eval import default_prompts_path, load_prompts

    items = load_prompts(default_prompts_path())
    assert len(items) == 120
    assert {i.lang for i in items} == {"en", "zh"}
    ruler = load_prompts(default_prompts_path().with_name("longwrite_ruler.jsonl"))
    assert max(i.length for i in ruler) == 30000


def test_judge_format_resolution() -> None:
    from flows.eval import _resolve_format
    from tasks.llm.endpoints import ConfigError

    # llama-cpp-python's server answers json_schema with HTTP 500: ask it for json_object.
    assert _resolve_format("auto", embedded=True) == "json_object"
    assert _resolve_format("auto", embedded=False) == "json_schema"
    assert _resolve_format("none", embedded=True) == "none"
    with pytest.raises(ConfigError):
        _resolve_format("xml", embedded=False)


@pytest.mark.embedded
@pytest.mark.slow
def test_eval_on_the_embedded_model(tmp_path: Path, prefect_api: None) -> None:
    """No endpoint given: the embedded SmolLM2 server answers and judges itself, the judge
    asked for schema-constrained JSON (json_object + an enum schema), so its verdict parses."""
    write_jsonl(
        tmp_path / "p.jsonl",
        [
            {
                "prompt": "Write a 50-word note thanking a friend for a gift.",
                "length": 50,
                "type": "Functional Writing",
            }
        ],
    )
    settings = EvalSettings(
        prompts=str(tmp_path / "p.jsonl"),
        out_dir=str(tmp_path / "out"),
        max_tokens=96,
        judge_max_tokens=96,
        concurrency=1,
    )
    results = run_eval_sync(settings)
    assert results["model"] == "smollm2-135m-instruct"
    assert results["llm"]["judge"]["final_format"] == "json_object"
    row = results["rows"][0]
    assert row["generation_status"] == "ok" and row["response_length"] > 0
    assert row["judge_status"] == "scored", row
    assert set(row["scores"].values()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert results["overall"]["S"] is not None
