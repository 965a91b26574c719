"""The whole build against the fake OpenAI-compatible server on loopback."""

import asyncio
import json
import re

import pytest
from sqlmodel import select

from flows.build import BuildSettings, build_flow
from flows.cli import main as cli_main
from storage.models import Paragraph, Plan, Rejection, Sample
from storage.store import Store
from tasks.export import verify_manifest
from tasks.wordcount import count_words
from tests.conftest import write_jsonl
from tests.fake_openai import FakeConfig, FakeOpenAIServer, default_answer

pytestmark = pytest.mark.usefixtures("prefect_api")

GOOD = [
    {"prompt": f"Write a long report about river system number {i}", "id": f"r{i}"}
    for i in range(8)
]
SPECIAL = [
    {"prompt": "写一篇关于黄河文化的长篇散文", "id": "zh"},
    {"prompt": "Write a story, [[markers]] please", "id": "markers"},
    {"prompt": "Write a story [[refuse]]", "id": "refuse"},
    {"prompt": "Write a plan [[garbage-plan]]", "id": "garbage"},
    {"prompt": "Write briefly [[short]]", "id": "short"},
    {"prompt": "Write a loop [[repeat]]", "id": "repeat"},
    {"prompt": "Write an essay [[error-text]]", "id": "errtext"},
]
BAD_LINES = [
    "{broken",
    '"just a string"',
    {"prompt": ""},
    {"prompt": "Write a 1000-word China travel guide"},
]


def run(settings: BuildSettings) -> dict:
    return asyncio.run(build_flow(settings=settings))


def test_full_build_against_fake_server(tmp_path, db_url):
    src = write_jsonl(tmp_path / "in.jsonl", GOOD + SPECIAL + BAD_LINES)
    out = tmp_path / "out"
    with FakeOpenAIServer(FakeConfig(latency_s=0.01)).running() as fake:
        settings = BuildSettings(
            instructions=str(src),
            db_url=db_url,
            out_dir=str(out),
            base_urls=[fake.base_url],
            model="fake-model",
            concurrency=8,
            batch_size=4,
        )
        summary = run(settings)
        first_requests = fake.stats.requests
        assert fake.stats.missing_headers == 0
        assert set(fake.stats.by_stage) == {"plan", "write"}
        # Every logical call was sent once (no faults injected): ids are idempotency keys.
        assert max(fake.stats.by_request_id.values()) == 1

        # Rerunning the same command resumes: nothing left to do, nothing requested again.
        again = run(settings)
        assert fake.stats.requests == first_requests
        assert again["accepted"] == summary["accepted"]

    assert summary["accepted"] == 10  # 8 English, the Chinese one, the one with markers
    rej = summary["rejections"]
    assert rej["plan"] == {"unparseable": 1}
    assert rej["filter"] == {"too_short": 1, "error_text": 1}
    # A refusal or a loop is caught as it is drafted (tasks.quality), redrafted with new
    # seeds, and the sample rejected at write when every draft fails.
    assert rej["write"] == {"refusal": 1, "repetition": 1}
    assert rej["ingest"] == {
        "invalid_json": 1,
        "not_an_object": 1,
        "blank_prompt": 1,
        "eval_overlap": 1,
    }

    store = Store(db_url)
    with store.session() as s:
        samples = s.exec(select(Sample)).all()
        for row in samples:
            iid = row.instruction_id
            plan = s.get(Plan, iid)
            paras = s.exec(
                select(Paragraph).where(Paragraph.instruction_id == iid).order_by(Paragraph.step)
            ).all()
            assert [p.step for p in paras] == list(range(1, plan.n_steps + 1))
            assert row.text == "\n\n".join(p.text for p in paras)  # in plan order
            assert count_words(row.text) >= 2000
            assert not re.search(r"(?im)^\s*paragraph\s*\d+\s*:", row.text)
            assert "Max tries" not in row.text
    assert verify_manifest(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["samples"] == 10
    ids = {json.loads(line)["id"] for f in (out / "jsonl").iterdir() for line in f.open()}
    assert ids == {f"r{i}" for i in range(8)} | {"zh", "markers"}

    stats = store.stats()
    (source,) = stats["sources"]
    assert source["records"] == len(GOOD + SPECIAL + BAD_LINES)
    assert source["records"] == source["instructions"] + source["ingest_rejections"]
    store.close()


def test_cli_build_and_stats(tmp_path, db_url, capsys):
    src = write_jsonl(
        tmp_path / "in.jsonl",
        GOOD[:3]
        + [
            {"prompt": "Write a long essay about kites [[chatter]]", "id": "chatty"},
            {"prompt": "Write a long story the writer refuses [[refuse]]", "id": "refused"},
            "{bad",
        ],
    )
    with FakeOpenAIServer(FakeConfig()).running() as fake:
        code = cli_main(
            [
                "build",
                "--instructions",
                str(src),
                "--db",
                db_url,
                "--out",
                str(tmp_path / "out"),
                "--base-url",
                fake.base_url,
                "--model",
                "fake",
                "--concurrency",
                "4",
                "--no-progress",
            ]
        )
    assert code == 0
    printed = capsys.readouterr().out
    assert "accepted samples" in printed
    # The summary shows the quality checks at work: each refused draft (redrafted, then the
    # sample rejected) and each chatter cleaning on the kept paragraphs, by reason.
    failed = re.search(r"failed draft at write: refusal\s+(\d+)", printed)
    assert failed and int(failed.group(1)) == 3, printed  # the first draft and 2 redrafts
    cleaned = re.search(r"cleaned: chatter\s+(\d+)", printed)
    # One cleaning per phrase removed: "Sure!", "Here is the next paragraph:", "I hope this
    # helps!" on each of the kites sample's paragraphs.
    assert cleaned and int(cleaned.group(1)) == 3 * FakeConfig().plan_steps, printed
    assert re.search(r"rejected at write: refusal\s+1\b", printed), printed
    assert cli_main(["stats", "--db", db_url]) == 0
    text = capsys.readouterr().out
    assert "quality checks:" in text and "cleaned: chatter:" in text, text
    assert cli_main(["stats", "--db", db_url, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["samples"]["accepted"] == 4
    assert stats["rejections"]["ingest"] == {"invalid_json": 1}
    assert stats["rejections"]["write"] == {"refusal": 1}
    assert cli_main(["export", "--db", db_url, "--out", str(tmp_path / "out2")]) == 0
    assert verify_manifest(tmp_path / "out2") == []


def test_cli_config_errors_are_one_line(tmp_path, db_url, capsys):
    assert cli_main(["build", "--instructions", str(tmp_path / "nope.jsonl"), "--db", db_url]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("longwriter: error:")
    src = write_jsonl(tmp_path / "in.jsonl", GOOD[:1])
    code = cli_main(
        ["build", "--instructions", str(src), "--db", db_url, "--base-url", "http://127.0.0.1:9/v1"]
    )
    assert code != 0
    assert "--model" in capsys.readouterr().err


def test_plan_falls_back_to_llama_cpp_json_dialect(tmp_path, db_url):
    """llama-cpp-python answers the OpenAI json_schema shape with HTTP 500; the build switches
    to its json_object+schema dialect once and goes on."""
    src = write_jsonl(tmp_path / "in.jsonl", GOOD[:3])
    cfg = FakeConfig(llama_cpp_json=True)
    with FakeOpenAIServer(cfg).running() as fake:
        summary = run(
            BuildSettings(
                instructions=str(src),
                db_url=db_url,
                out_dir=str(tmp_path / "out"),
                base_urls=[fake.base_url],
                model="m",
                concurrency=1,
                initial_backoff_s=0.01,
                max_backoff_s=0.02,
            )
        )
        plan_prompts = fake.stats.by_stage["plan"]
    assert summary["accepted"] == 3
    assert summary["rejections"] == {}
    # one plan call exhausted its retries on the 500, then every plan used the other dialect
    assert plan_prompts == 6 + 3


def test_a_degenerate_plan_is_asked_for_again_with_new_seeds(tmp_path, db_url):
    """A plan that fails validation is re-requested with another seed (the fake repeats one main
    point when asked without a seed); a plan that never validates is rejected with every
    attempt's reason, after exactly 1 + max_plan_resamples calls."""
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [{"prompt": "Write it [[flaky-plan]]", "id": "flaky"}, SPECIAL[3]],
    )
    settings = BuildSettings(
        instructions=str(src),
        db_url=db_url,
        out_dir=str(tmp_path / "out"),
        base_urls=["http://unused/v1"],
        model="m",
        min_words=500,
        max_plan_resamples=2,
    )
    with FakeOpenAIServer(FakeConfig()).running() as fake:
        settings.base_urls = [fake.base_url]
        summary = run(settings)
        plan_calls = fake.stats.by_stage["plan"]
        first_requests = fake.stats.requests
        run(settings)  # a rerun re-pays no plan attempt
        assert fake.stats.requests == first_requests
    assert summary["accepted"] == 1
    assert plan_calls == 2 + 3  # flaky: unseeded + seed 1; garbage: unseeded + seeds 1, 2
    store = Store(db_url)
    with store.session() as s:
        rejection = s.exec(select(Rejection)).one()
    store.close()
    assert rejection.stage == "plan" and rejection.reason == "unparseable"
    assert "3 plans tried" in rejection.detail


def test_greedy_decoding_is_not_resampled(tmp_path, db_url):
    """At temperature 0 a new seed gives the same answer: a failed plan is rejected after one
    call, and a looping paragraph sinks its sample after one draft."""
    src = write_jsonl(tmp_path / "in.jsonl", [SPECIAL[3], SPECIAL[5]])  # garbage plan, loop
    with FakeOpenAIServer(FakeConfig(plan_steps=2)).running() as fake:
        summary = run(
            BuildSettings(
                instructions=str(src),
                db_url=db_url,
                out_dir=str(tmp_path / "out"),
                base_urls=[fake.base_url],
                model="m",
                min_words=500,
                plan_temperature=0.0,
                write_temperature=0.0,
            )
        )
        calls = dict(fake.stats.by_stage)
    assert calls == {"plan": 2, "write": 1}
    assert summary["rejections"] == {"plan": {"unparseable": 1}, "write": {"repetition": 1}}


def test_short_paragraphs_are_continued_to_their_planned_length(tmp_path, db_url):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Write it [[terse]]", "id": "terse"}])
    with FakeOpenAIServer(FakeConfig()).running() as fake:
        summary = run(
            BuildSettings(
                instructions=str(src),
                db_url=db_url,
                out_dir=str(tmp_path / "out"),
                base_urls=[fake.base_url],
                model="m",
                min_words=1500,  # 6 paragraphs x (100 + 200 continued) words
            )
        )
        writes = fake.stats.by_stage["write"]
    assert summary["accepted"] == 1
    store = Store(db_url)
    with store.session() as s:
        paras = s.exec(select(Paragraph)).all()
    assert len(paras) == 6 and writes == 12  # each 100-word answer continued once (+200)
    assert all(p.continuation_keys and p.words >= 200 and not p.truncated for p in paras)
    store.close()


def test_looping_paragraphs_are_resampled_then_rejected(tmp_path, db_url):
    """A paragraph over the repetition limit is rewritten with new seeds (new idempotency
    keys) before the sample is given up."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Loop [[repeat]]", "id": "loop"}])
    with FakeOpenAIServer(FakeConfig(plan_steps=2)).running() as fake:
        summary = run(
            BuildSettings(
                instructions=str(src),
                db_url=db_url,
                out_dir=str(tmp_path / "out"),
                base_urls=[fake.base_url],
                model="m",
                max_resamples=2,
                min_words=500,
            )
        )
        writes = fake.stats.by_stage["write"]
        ids = len(fake.stats.by_request_id)
    # Every draft of paragraph 1 loops: the sample is rejected there, paragraph 2 never paid.
    assert summary["rejections"]["write"] == {"repetition": 1}
    assert writes == 3  # paragraph 1 drafted three times (no seed, seed 1, seed 2)
    assert ids == 1 + writes  # every draft had its own key


def test_languages_the_writer_is_not_given_are_rejected_before_any_call(tmp_path, db_url):
    """--languages en (the embedded model's default): a Chinese instruction is rejected at plan
    as unsupported_language, with no LLM call for it; the English ones are built."""
    src = write_jsonl(tmp_path / "in.jsonl", GOOD[:2] + [SPECIAL[0]])
    with FakeOpenAIServer(FakeConfig()).running() as fake:
        summary = run(
            BuildSettings(
                instructions=str(src),
                db_url=db_url,
                out_dir=str(tmp_path / "out"),
                base_urls=[fake.base_url],
                model="m",
                languages=["en"],
            )
        )
        plan_prompts = fake.stats.by_stage["plan"]
    assert summary["accepted"] == 2
    assert summary["rejections"]["plan"] == {"unsupported_language": 1}
    assert plan_prompts == 2  # none for the Chinese instruction
    store = Store(db_url)
    with store.session() as s:
        (rej,) = s.exec(select(Rejection)).all()
    store.close()
    assert "'zh'" in rej.detail and "en" in rej.detail


def test_turns_prompt_builds_and_continues_short_paragraphs(tmp_path, db_url):
    """--write-prompt turns against a remote endpoint: each paragraph asked for as a turn of
    the conversation (the earlier parts as the writer's answers), a short one continued."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Write it [[terse]]", "id": "terse"}])
    bodies: list[dict] = []

    def answer(stage: str, body: dict, cfg: FakeConfig) -> str:
        bodies.append(body)
        return default_answer(stage, body, cfg)

    with FakeOpenAIServer(FakeConfig(), answer=answer).running() as fake:
        summary = run(
            BuildSettings(
                instructions=str(src),
                db_url=db_url,
                out_dir=str(tmp_path / "out"),
                base_urls=[fake.base_url],
                model="m",
                min_words=1500,
                write_prompt="turns",
            )
        )
        writes = fake.stats.by_stage["write"]
    assert summary["accepted"] == 1
    assert writes == 12  # each 100-word answer continued once
    writes_bodies = [b for b in bodies if b["messages"][0]["role"] == "system"]
    last = writes_bodies[-1]["messages"]
    assert [m["role"] for m in last[-3:]] == ["user", "assistant", "user"]
    assert last[-1]["content"].startswith("Go on with part 6")
    assert sum(m["role"] == "assistant" for m in last) == 6  # parts 1-5 and part 6 so far
