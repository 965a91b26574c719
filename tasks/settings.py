"""Every command's settings: the one place each default and its description live.

A settings model is what a command takes from its flags (tasks.flags generates them from the
fields, so `--help` shows these defaults and descriptions), what a Prefect deployment takes
as its parameter (the UI shows the fields as a form) and what the stage configs are derived
from (`tasks.flags.derive`). Lower layers whose own defaults must equal one of these (a
dataclass field, a function parameter) read it with `tasks.flags.default_of` instead of
repeating the value; tests/tasks/test_settings.py fails on a copy.

Field groups that several commands share (the writer's endpoint, the judge, the HTTP
policy, drafting) are mixins, so `--judge-max-tokens` has one default for build, eval and
pairs. The models hold the *names* of API key variables, never keys.

This module imports no stage and no database code (only pydantic), so every stage module,
pure cores included, can read its defaults from here without an import cycle or SQLAlchemy.
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.flags import Defaults, Flag, Flags

DEFAULT_DB_URL = "sqlite:///longwriter.db"
# The most paragraphs a plan may have (tasks.plan.MAX_STEPS): the plan schema's limit and the
# default of --max-paragraphs.
MAX_PLAN_STEPS = 50
# The embedded llama.cpp model's context window in tokens: what `longwriter serve --n-ctx`
# starts it with and what a stage config assumes when it is told no other window.
EMBEDDED_CONTEXT_WINDOW = 8192
# Where a deployment (deploy/deployments.py) keeps its store and output when --db/--out are
# not given: the build's own defaults, one folder down (made absolute where it runs).
DEPLOY_RUNS_DIR = "runs"

DEFAULT_PROMPTS = "longbench_write.jsonl"


def default_prompts_path() -> Path:
    """The 120 LongBench-Write prompts shipped in the package."""
    return Path(str(resources.files("tasks").joinpath("data", DEFAULT_PROMPTS)))


# Structured-output formats of the judge (tasks.eval.judge.FORMATS), plus auto.
JudgeFormat = Literal["auto", "json_schema", "json_object", "none"]


class WriterEndpoint(BaseModel):
    """The model that writes (or, in eval, is evaluated)."""

    base_urls: list[str] = Field(
        default_factory=list,
        description="OpenAI-compatible /v1 URLs, each may be a comma-separated list (env "
        "LONGWRITER_BASE_URL; none: the embedded llama.cpp server)",
    )
    model: str | None = Field(None, description="model name (env LONGWRITER_MODEL)")
    api_key_env: str = Field(
        "LONGWRITER_API_KEY", description="name of the environment variable holding the API key"
    )
    context_window: int | None = Field(
        None,
        description=f"model context in tokens (default: {EMBEDDED_CONTEXT_WINDOW} embedded, "
        "else 32768)",
    )


class JudgeEndpoint(BaseModel):
    """The judge that rates samples on LongBench-Write's six dimensions."""

    judge_base_urls: list[str] = Field(
        default_factory=list,
        description="judge /v1 URLs, each may be a comma-separated list (none: the writer's)",
    )
    judge_model: str | None = Field(None, description="judge model (default: the writer's)")
    judge_api_key_env: str = Field(
        "LONGWRITER_JUDGE_API_KEY",
        description="name of the environment variable holding the judge's API key",
    )
    judge_format: JudgeFormat = Field(
        "auto",
        description="how the judge is asked for JSON (auto: json_object on the embedded "
        "server, json_schema elsewhere; falls back when refused)",
    )
    judge_context_window: int | None = Field(
        None, description="judge model context in tokens (default: as the writer's)"
    )
    judge_attempts: int = Field(
        3, ge=1, le=10, description="judge calls per answer (each varied) until one parses"
    )
    judge_max_tokens: int = Field(512, ge=16, description="max tokens of a judge answer")
    judge_temperature: float = Field(
        0.0, ge=0.0, le=2.0, description="judge temperature (raised 0.3 per retry)"
    )


class ClientPolicy(BaseModel):
    """The HTTP client's retry policy (tasks.llm.client.RetryPolicy)."""

    request_timeout_s: float = Field(
        600.0, gt=0, description="seconds to wait for one answer before it counts as failed"
    )
    max_attempts: int = Field(6, ge=1, description="HTTP attempts per call")
    # Client backoff between attempts (capped full jitter; Retry-After wins when given).
    initial_backoff_s: float = Field(
        0.5, ge=0, description="first backoff between attempts in seconds (doubles, jittered)"
    )
    max_backoff_s: float = Field(30.0, ge=0, description="longest backoff between attempts")
    # aiohttp under httpx's API (httpx-aiohttp, as the OpenAI SDK offers it) costs about half
    # the CPU per request of httpx's own httpcore pools (tests/benchmarks/bench_http_pool.py);
    # httpcore stays for a setup where aiohttp misbehaves.
    http_transport: Literal["aiohttp", "httpcore"] = Field(
        "aiohttp",
        description="HTTP transport under the client: aiohttp (less CPU per call) or httpcore "
        "(httpx's own)",
    )


class RepetitionCheck(BaseModel):
    """The sample filters' repetition check (tasks.filters)."""

    max_repetition: float = Field(
        0.3, ge=0, le=1, description="reject text whose share of repeated 13-grams is above this"
    )
    ngram: int = Field(13, ge=2, description="n of the n-grams the repetition check counts")


class Drafting(RepetitionCheck):
    """How a paragraph is drafted and checked: the build and the pairs variants alike."""

    max_paragraph_tokens: int = Field(
        2048, ge=16, description="max tokens of one paragraph call (clipped to the context)"
    )
    min_paragraph_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="continue a paragraph that ends under this share of its planned words (0-1)",
    )


class BuildSettings(WriterEndpoint, JudgeEndpoint, ClientPolicy, Drafting):
    """Everything a build needs. A Prefect deployment takes it as its parameter (the UI shows a
    form); it holds the *name* of the API key variable, never the key."""

    # A misspelt setting (in a deployment's parameters, say) must fail, not be ignored.
    model_config = ConfigDict(extra="forbid")

    instructions: str | None = Field(
        None, description="instruction file (jsonl, json, parquet, csv)"
    )
    db_url: str = Field(DEFAULT_DB_URL, description="store URL or SQLite path")
    out_dir: str = Field("out", description="output directory for shards + manifest")
    concurrency: int = Field(16, ge=1, le=4096, description="LLM calls in flight at once")
    min_words: int = Field(2000, ge=0, description="least words of an accepted sample")
    limit: int | None = Field(None, ge=1, description="build only the first N instructions")
    batch_size: int = Field(50, ge=1, description="instructions per plan/write/filter task")
    embedded_replicas: int | None = Field(
        None,
        ge=1,
        le=16,
        description="embedded llama.cpp servers when no --base-url (default: one per core, "
        "up to 4)",
    )
    plan_max_tokens: int = Field(2048, ge=16, description="max tokens of a plan call")
    plan_temperature: float = Field(0.5, ge=0, le=2, description="temperature of plan calls")
    write_temperature: float = Field(0.7, ge=0, le=2, description="temperature of paragraph calls")
    # None: the endpoint's default, or for the embedded model tasks.llm.endpoints.EMBEDDED_SAMPLING
    frequency_penalty: float | None = Field(
        None,
        description="frequency_penalty of every call (default: the endpoint's; the "
        "embedded model's tuned one)",
    )
    presence_penalty: float | None = Field(
        None,
        description="presence_penalty of every call (default: the endpoint's; the "
        "embedded model's tuned one)",
    )
    json_plan: bool = Field(True, description="JSON plans (off: line-format plans)")
    decontaminate: bool = Field(
        True, description="drop instructions that match a benchmark prompt (LongBench-Write)"
    )
    export: bool = Field(True, description="write shards and manifest.json at the end")
    shard_size: int = Field(1000, ge=1, description="samples per parquet/jsonl shard")
    # Written into the dataset card (OUT/README.md). No default can be right: it depends on the
    # generator's terms and the instructions' source; "unknown" says so on the Hub.
    license: str = Field(
        "unknown",
        description="licence for the dataset card, a Hub licence id (apache-2.0, cc-by-4.0, "
        "...); unknown: check the generator model's terms and the instructions' source",
    )
    max_continuations: int = Field(
        2, ge=0, description="continuation calls per paragraph (cut at max_tokens or short)"
    )
    max_paragraphs: int = Field(
        MAX_PLAN_STEPS,
        ge=1,
        le=MAX_PLAN_STEPS,
        description="most paragraphs per plan, 1-50: bounds the calls and words of each sample",
    )
    max_plan_resamples: int = Field(
        2, ge=0, description="new plans (new seed) asked for when a plan fails validation"
    )
    max_resamples: int = Field(
        2, ge=0, description="rewrites (new seed) of a paragraph that loops; best one kept"
    )
    languages: list[str] | None = Field(
        None,
        description="an instruction language the writer model is given (en, zh); others are "
        "rejected at plan as unsupported_language before any call (default: en for the "
        "embedded model, which writes English only; every language otherwise)",
    )
    write_prompt: Literal["auto", "paper", "turns"] = Field(
        "auto",
        description="write prompt: paper (AgentWrite's one message: instruction, plan, text so "
        "far), turns (the same as a conversation with one-line asks, for small models that "
        "copy instruction sentences), auto (turns for the embedded model, else paper)",
    )
    quality_checks: bool = Field(
        True,
        description="the plan and paragraph quality checks on every draft (echo, chatter, "
        "markup, language, restated paragraphs; tasks.quality); the sample filters always run",
    )
    # The judge gate: every accepted sample scored on LongBench-Write's six dimensions.
    min_quality: float | None = Field(
        None,
        ge=0,
        le=100,
        description="judge gate: score every accepted sample on LongBench-Write's six "
        "dimensions and reject those with S_q (0-100) under this (judge: --judge-base-url, "
        "else the writer)",
    )
    min_length_score: float = Field(
        0.0,
        ge=0,
        le=100,
        description="reject samples whose length score S_l (0-100, LongBench-Write's formula) "
        "against the instruction's required length is below this",
    )
    progress: bool = Field(False, description="terminal progress bar")
    # Real endpoints (tasks/llm/client.py): fields sent with every request, part of each key.
    reasoning_effort: str | None = Field(
        None,
        description="reasoning_effort sent with every call (OpenAI reasoning models: "
        "low/medium/high)",
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description='extra request fields sent with every call, e.g. \'{"chat_template_kwargs": '
        '{"enable_thinking": false}}\' (vLLM/SGLang Qwen3)',
    )
    api_dialect: Literal["auto", "chat", "openai-reasoning"] = Field(
        "auto",
        description="parameter names: auto learns max_completion_tokens / no temperature from "
        "the endpoint's 400s; chat never switches; openai-reasoning starts switched",
    )
    rpm: float | None = Field(None, gt=0, description="requests per minute to stay under")
    tpm: float | None = Field(None, gt=0, description="tokens per minute (prompt + max_tokens)")
    max_throttle_wait_min: float = Field(
        10.0,
        ge=0,
        description="minutes one call may wait out 429s before the build stops (rerun resumes)",
    )
    stream: bool = Field(
        False,
        description="stream answers (SSE); proxies that cut silent long calls (524/504) pass them",
    )
    # Scale-out: several flow runs (workers, machines) share one store and each builds the
    # instruction ids with id % partitions == partition. Ingest and export happen once, in the
    # parent flow (flows/partition.py), so a partition run does neither.
    partition: int | None = Field(
        None,
        ge=0,
        description="build only instructions with id % PARTITIONS == PARTITION (one machine's "
        "share of a build over a shared PostgreSQL store; ingest and export run separately)",
    )
    partitions: int = Field(1, ge=1, description="number of partitions (used with --partition)")

    @model_validator(mode="after")
    def _partition_in_range(self) -> BuildSettings:
        if self.partition is not None and self.partition >= self.partitions:
            raise ValueError(
                f"partition {self.partition} must be below partitions {self.partitions}"
            )
        return self

    def in_partition(self, instruction_id: int) -> bool:
        return self.partition is None or instruction_id % self.partitions == self.partition

    @property
    def exports(self) -> bool:
        """Whether this run writes shards (a partition run leaves that to its parent)."""
        return self.export and self.partition is None

    @property
    def judges(self) -> bool:
        """Whether the build has a judge gate (--min-quality or a judge URL)."""
        return self.min_quality is not None or bool(self.judge_base_urls)

    def public(self) -> dict[str, Any]:
        """Settings safe to store and publish: the DB password hidden, no key values."""
        d = self.model_dump()
        d["db_url"] = _redact(self.db_url)
        return d


class PairsSettings(WriterEndpoint, JudgeEndpoint, ClientPolicy, Drafting):
    """Everything a pairs run needs (a deployment shows it as a form). Holds the *names* of
    API key variables, never keys."""

    model_config = ConfigDict(extra="forbid")

    db_url: str = Field(DEFAULT_DB_URL, description="the build's store URL or SQLite path")
    out_dir: str = Field("pairs", description="directory for shards/, jsonl/, manifest.json")
    variants: int = Field(4, ge=1, le=64, description="extra AgentWrite samples per instruction")
    temperature: float = Field(0.8, ge=0.0, le=2.0, description="variants' write temperature")
    max_continuations: int = Field(
        1, ge=0, description="continuation calls per variant paragraph (cut at max_tokens)"
    )
    concurrency: int = Field(8, ge=1, le=4096, description="LLM calls in flight at once")
    limit: int | None = Field(None, ge=1, description="only the first N eligible instructions")
    batch_size: int = Field(20, ge=1, description="instructions per write/judge task")
    min_margin: float = Field(
        5.0,
        ge=0.0,
        description="least score gap (0-100) between chosen and rejected; smaller: skipped",
    )
    rejected: Literal["random", "worst"] = Field(
        "random", description="which lower variant is the rejected one"
    )

    def public(self) -> dict[str, Any]:
        d = self.model_dump()
        d["db_url"] = _redact(self.db_url)
        return d


class EvalSettings(WriterEndpoint, JudgeEndpoint, ClientPolicy):
    """Everything an evaluation needs (a Prefect deployment shows it as a form). Holds the
    *names* of API key variables, never keys."""

    prompts: str | None = Field(
        None,
        description="jsonl of {prompt, length, type} (default: the packaged LongBench-Write "
        f"prompts, tasks/data/{DEFAULT_PROMPTS})",
    )
    out_dir: str = Field("eval", description="directory for results.json/.md, scatter.png")
    db_url: str | None = Field(None, description="store URL or SQLite path (default OUT/eval.db)")
    judge: bool = Field(True, description="judge the answers (off: length score only, S_q null)")
    max_tokens: int = Field(
        16384, ge=1, description="answer limit (clipped to fit the context window)"
    )
    temperature: float = Field(0.5, ge=0.0, le=2.0, description="answer temperature")
    concurrency: int = Field(8, ge=1, le=4096, description="LLM calls in flight at once")
    batch_size: int = Field(20, ge=1, description="prompts per generate/judge task")
    limit: int | None = Field(None, ge=1, description="evaluate only the first N prompts")
    # Long answers (16k tokens) from a slow endpoint: a longer wait than a build's paragraph.
    request_timeout_s: float = Field(
        1800.0, gt=0, description="seconds to wait for one answer before it counts as failed"
    )
    progress: bool = Field(False, description="a status line on stderr every few seconds")
    model_dir: str | None = Field(
        None,
        description="the evaluated model's folder (longwriter train --out): its lineage (which "
        "shards trained it) goes into results.json and this run into MODEL_DIR/evaluations.jsonl",
    )

    def store_url(self) -> str:
        return self.db_url or str(Path(self.out_dir) / "eval.db")

    def prompts_path(self) -> Path:
        return Path(self.prompts) if self.prompts else default_prompts_path()

    def public(self) -> dict[str, Any]:
        d = self.model_dump()
        d["db_url"] = _redact(self.store_url())
        d["prompts"] = str(self.prompts_path())
        return d


class RunLabels(BaseModel):
    """How a CLI build's flow run is named and tagged in Prefect (not part of its settings)."""

    run_name: str | None = Field(
        None,
        description="Prefect flow-run name (default: the input file's name and the UTC date "
        "and time)",
    )
    tag: list[str] = Field(
        default_factory=list,
        description="Prefect tag on the flow run and its task runs",
    )


class DryRunSettings(BaseModel):
    """The forecast's own flags of `longwriter build` (the build's settings say the rest)."""

    model_config = ConfigDict(extra="forbid")

    dry_run: bool = Field(
        False,
        description="forecast LLM calls, tokens and cost, then stop (sends nothing, stores "
        "nothing)",
    )
    price_in: float | None = Field(None, ge=0, description="USD per million input tokens")
    price_out: float | None = Field(None, ge=0, description="USD per million output tokens")
    price_cached_in: float | None = Field(
        None, ge=0, description="USD per million cached input tokens (default: priced as input)"
    )
    expect_words: int | None = Field(
        None,
        ge=1,
        description="dry run: words of a piece whose instruction gives no length (default "
        "--min-words)",
    )
    json_output: bool = Field(False, description="with --dry-run: print JSON")


class AuditSettings(RepetitionCheck):
    """The rule checks of `longwriter audit` (tasks.audit)."""

    model_config = ConfigDict(frozen=True)

    # Audit keeps any length by default: a public set's lengths are its own.
    min_words: int = Field(
        0,
        ge=0,
        description="reject samples shorter than this (CJK characters + English words); 0: "
        "keep any length",
    )


class ServeSettings(BaseModel):
    """`longwriter serve`: the embedded llama.cpp server run in the foreground
    (tasks.llm.llama_server.LlamaServer)."""

    model_config = ConfigDict(extra="forbid")

    model_path: Path | None = Field(
        None, description="GGUF file to serve (default: the embedded SmolLM2-135M-Instruct)"
    )
    host: str = Field("127.0.0.1", description="listen address")
    port: int | None = Field(None, description="listen port (default: a free one)")
    n_ctx: int = Field(EMBEDDED_CONTEXT_WINDOW, description="context window in tokens")
    n_threads: int | None = Field(None, description="generation threads (default: half the cores)")
    n_threads_batch: int | None = Field(
        None, description="prompt-processing threads (default: all cores)"
    )
    prompt_cache_mb: int = Field(
        512, description="MiB of RAM for cached prompt states, resumed by longest prefix (0: off)"
    )
    model_alias: str = Field("smollm2-135m-instruct", description="model name clients send")
    ready_timeout: float = Field(120.0, description="seconds to wait for the model load")


class PublishSettings(BaseModel):
    """`longwriter publish`: a build's OUT folder uploaded to the Hugging Face Hub."""

    model_config = ConfigDict(extra="forbid")

    out_dir: str = Field(description="the build's output folder")
    repo: str = Field(description="dataset repo id, e.g. user/my-longwriter")
    private: bool = Field(
        False, description="create the repo private (an existing one keeps its own)"
    )
    dry_run: bool = Field(False, description="list what would go; send nothing")
    message: str | None = Field(None, description="commit message")


class DeploySettings(BaseModel):
    """The flags of deploy/deployments.py that are no build or eval setting: the work pool, the
    schedule, tags. The deployments' parameters are BuildSettings and EvalSettings, made from
    those models' own flags (--db, --out, --base-url, --eval-model, ...)."""

    model_config = ConfigDict(extra="forbid")

    pool: str = Field("longwriter", description="process work pool (created if missing)")
    source: str | None = Field(None, description="repository directory workers run from")
    overrides: list[str] = Field(
        default_factory=list,
        description="any other BuildSettings field, e.g. --set concurrency=32 --set limit=100",
    )
    tag: list[str] = Field(
        default_factory=list,
        description="tag on the deployments and their flow runs, besides `longwriter`",
    )
    cron: str = Field("0 3 * * *", description="schedule of longwriter-build/nightly")
    timezone: str = Field("UTC", description="time zone of --cron")
    schedule: bool = Field(True, description="the schedule of longwriter-build/nightly")
    # None: the partitioned_build flow's own default (deploy/deployments.py reads it).
    partitions: int | None = Field(None, description="default for the partitioned build")
    zombie_automation: int | None = Field(
        None,
        description="also create the automation that marks runs without a heartbeat for "
        "SECONDS Crashed (needs SECONDS > PREFECT_FLOWS_HEARTBEAT_FREQUENCY of the workers, "
        "default 180, at least 30)",
    )


# The defaults by model, for lower layers: `max_paragraph_tokens: int = BUILD.max_paragraph_tokens`.
BUILD = Defaults(BuildSettings)
PAIRS = Defaults(PairsSettings)
EVAL = Defaults(EvalSettings)
SERVE = Defaults(ServeSettings)
DEPLOY = Defaults(DeploySettings)


def _redact(url: str) -> str:
    # Imported here: the store's module pulls in SQLAlchemy, which the stages' pure cores
    # (and `--help`) that read this module's defaults must not pay for.
    from storage.store import redact_db_url

    return redact_db_url(url)


def _on_a_terminal() -> bool:
    return sys.stderr.isatty()


# How fields are spelt on the command line where not `--field-name` (tasks.flags.Flag).
DB_FLAG = Flag(name="--db", env="LONGWRITER_DB_URL")
FLAGS: dict[str, Flag] = {
    "db_url": DB_FLAG,
    "out_dir": Flag(name="--out"),
    "base_urls": Flag(name="--base-url"),
    "judge_base_urls": Flag(name="--judge-base-url"),
    "request_timeout_s": Flag(name="--request-timeout"),
    "initial_backoff_s": Flag(name="--initial-backoff"),
    "max_backoff_s": Flag(name="--max-backoff"),
    "max_throttle_wait_min": Flag(name="--max-throttle-wait", metavar="MIN"),
    "stream": Flag(both=True),
    "progress": Flag(both=True, absent=_on_a_terminal, absent_help="on when stderr is a terminal"),
    "extra_body": Flag(metavar="JSON"),
}
OUT_REQUIRED = {"out_dir": Flag(name="--out", required=True)}


# ngram is no flag: a command line that changed it would make its repetition check another
# check than the build's (the settings field is there for a deployment that means to).
BUILD_FLAGS = Flags(BuildSettings, exclude=("ngram",), flags=FLAGS)
# `longwriter export` writes what a build's export step writes.
EXPORT_FLAGS = Flags(
    BuildSettings,
    only=("db_url", "out_dir", "shard_size", "license"),
    flags={**FLAGS, **OUT_REQUIRED},
)
RUN_LABEL_FLAGS = Flags(RunLabels)
DRY_RUN_FLAGS = Flags(DryRunSettings, flags={"json_output": Flag(name="--json")})
PAIRS_FLAGS = Flags(PairsSettings, exclude=("ngram",), flags={**FLAGS, **OUT_REQUIRED})
# eval's --db has no environment variable: its store defaults to OUT/eval.db.
EVAL_FLAGS = Flags(EvalSettings, flags={**FLAGS, **OUT_REQUIRED, "db_url": Flag(name="--db")})
SERVE_FLAGS = Flags(ServeSettings, flags={"model_path": Flag(metavar="GGUF")})
PUBLISH_FLAGS = Flags(PublishSettings, flags=FLAGS)
# deploy/deployments.py adds its own spellings (--set, --no-schedule and the absent values
# that only it knows: this checkout, the flow's partitions).
DEPLOY_SPECS: dict[str, Flag] = {
    "overrides": Flag(name="--set", metavar="KEY=VALUE"),
    "zombie_automation": Flag(metavar="SECONDS"),
}


def db_url_from_env() -> str:
    """The store of a command whose --db is absent: $LONGWRITER_DB_URL, else the default."""
    return os.environ.get(DB_FLAG.env or "") or DEFAULT_DB_URL
