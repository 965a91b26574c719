"""A default stands in one place: its command's settings model (tasks/settings.py, and
TrainConfig for train).

Two checks prove it:
- every flag of `build`, `export`, `eval`, `pairs`, `train`, `audit`, `serve`, `publish` and of
  deploy/deployments.py is made from a settings field (tasks.flags), carries no argparse
  default of its own (absent: the model's default is used, or the value the command says it
  uses instead) and shows the field's description and default in `--help`;
- `test_no_settings_default_is_copied` scans the product code's AST: no literal equal to a
  settings default is bound to that setting's name (a dataclass field, a function parameter
  default, a keyword argument, `getattr(args, name, default)`, `add_argument(default=)`)
  outside the model that declares it, and no distinctive value (a number of 100 or more, a
  string of 10 or more characters) of a settings default appears anywhere else unless listed
  in UNRELATED with why it is another quantity. Lower layers name the source instead:
  `max_paragraph_tokens: int = BUILD.max_paragraph_tokens` (tasks.settings).
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import tasks.settings as settings_module
from tasks.flags import Flags, derive, field_default
from tasks.settings import BUILD_FLAGS, BuildSettings

REPO = Path(__file__).resolve().parents[2]
PRODUCT = ("flows", "tasks", "storage", "prompts", "deploy")
OWN_COMMANDS = ("build", "export", "eval", "pairs", "train", "audit", "serve", "publish")
# Flags of the commands above that set no settings field: inputs and outputs of one audit run,
# and refused options (audit's judge flags). None carries a default value.
PLUMBING = {("audit", f) for f in ("data", "out", "workers", "json")} | {
    ("audit", f) for f in ("judge_base_url", "judge_model", "min_quality")
}

# Other names a setting goes by in the stage configs and the functions they feed.
ALIASES: dict[str, tuple[str, ...]] = {
    "max_paragraphs": ("max_plan_steps", "max_steps"),
    "write_temperature": ("temperature",),
    "plan_temperature": ("temperature",),
    "plan_max_tokens": ("max_tokens",),
    "judge_max_tokens": ("max_tokens",),
    "judge_attempts": ("attempts",),
    "judge_temperature": ("temperature",),
    "request_timeout_s": ("read_timeout_s", "timeout_s"),
    "db_url": ("url",),
}

# Values (or names bound to a value) that stand in product code as another quantity, with why.
UNRELATED: dict[tuple[str, object], str] = {
    ("tasks/train/gguf.py", 2048): "a checkpoint's context length when its config gives none",
    ("tasks/export.py", 2000): "an edge of the length histogram's bins",
    ("tasks/shards.py", 2000): "an edge of the length histogram's bins",
    ("tasks/eval/scoring.py", 2000): "LongBench-Write's length bucket edges",
    ("tasks/plan.py", 2000): "the worked example's own length request",
    ("tasks/plan.py", 1000): "the most words one plan step may ask for",
    ("tasks/llm/client.py", 1000): "milliseconds in a second (1000.0 too: equal keys)",
    ("tasks/llm/client.py", 512): "prompts shorter than this are not checked for truncation",
    ("tasks/llm/client.py", "temperature"): "ChatRequest's own default; every stage sets one",
    ("tasks/card.py", 1000): "the Hub's size category edges",
    ("tasks/llm/llama_server.py", 512): "the embedded server's batch size",
    ("tasks/quality.py", 512): "characters a quality check reads",
    ("flows/prefect_api.py", 2000): "characters of the API server's output shown on failure",
    ("tasks/llm/client.py", 120.0): "the longest Retry-After the client waits out",
    ("tasks/wordcount.py", 8192): "paragraphs whose (length, CJK) counts are cached",
}
# "longwriter" (DeploySettings.pool) is also the product's name wherever else it stands.
UNRELATED.update(
    {
        (rel, "longwriter"): "the product's name (program, tag, cache folder, data source)"
        for rel in (
            "deploy/deployments.py",  # the tag every deployment carries
            "flows/cli.py",
            "flows/partition.py",
            "tasks/card.py",
            "tasks/lineage.py",
            "tasks/llm/llama_server.py",
            "tasks/train/data.py",
            "tasks/train/run.py",
        )
    }
)

# Copies of a settings default that still stand in a module outside the change that made the
# setting (issue 14 item 1: serve's defaults moved into ServeSettings while these files were
# being edited by others). Each should name its source (tasks.settings.SERVE.<field>,
# tasks.settings.EMBEDDED_CONTEXT_WINDOW); the test fails on an entry that no longer matches,
# so a fixed file takes its entry with it.
NOT_YET_NAMED: dict[tuple[str, object], str] = {}


def settings_models() -> list[type[BaseModel]]:
    from tasks.train.config import TrainConfig

    found = [
        v
        for v in vars(settings_module).values()
        if isinstance(v, type) and issubclass(v, BaseModel) and v.__module__ == "tasks.settings"
    ]
    return [*found, TrainConfig]


def declared_defaults() -> dict[str, set[Any]]:
    """Setting name (and its aliases) -> the defaults declared for it."""
    out: dict[str, set[Any]] = {}
    for model in settings_models():
        for name, info in model.model_fields.items():
            if info.is_required():
                continue
            value = field_default(info)
            if value is None or isinstance(value, bool) or value in ("", [], {}):
                continue
            if isinstance(value, int) and value in (0, 1):
                continue  # 0 and 1 are choices (off, once) wherever they stand, not copies
            for n in (name, *ALIASES.get(name, ())):
                out.setdefault(n, set()).add(value)
    return out


def _const(node: ast.AST | None) -> Any:
    if isinstance(node, ast.Constant) and not isinstance(node.value, bool):
        return node.value
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant)
    ):
        return -node.operand.value
    return None


def _is_default(value: Any, defaults: set[Any], exact: bool = False) -> bool:
    """`value` is one of `defaults` (600 for a float 600.0 too, unless `exact`)."""
    return value is not None and any(
        type(value) is type(d) or (not exact and {type(value), type(d)} == {int, float})
        for d in defaults
        if d == value
    )


def _settings_class_bodies(tree: ast.Module, rel: str) -> set[int]:
    """Lines of the one place: tasks/settings.py, and TrainConfig's body in tasks/train/config.py."""
    names = {m.__name__ for m in settings_models()}
    lines: set[int] = set()
    if rel == "tasks/settings.py":
        return set(range(1, len(ast.unparse(tree).splitlines()) + 10_000))
    if rel != "tasks/train/config.py":
        return lines
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name in names:
            lines |= set(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return lines


def bound_copies(tree: ast.Module, rel: str, defaults: dict[str, set[Any]]) -> list[str]:
    """`name = <default literal>` in any of its forms, outside the declaring model."""
    skip = _settings_class_bodies(tree, rel)
    hits: list[str] = []

    def check(name: str, value_node: ast.AST | None, line: int) -> None:
        key = name.lower().removeprefix("default_")
        value = _const(value_node)
        if (rel, name) in UNRELATED:
            return
        if line not in skip and key in defaults and _is_default(value, defaults[key]):
            hits.append(f"{rel}:{line}: {name} = {value!r}")

    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            check(node.target.id, node.value, node.lineno)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    check(t.id, node.value, node.lineno)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            a = node.args
            positional = [*a.posonlyargs, *a.args]
            for arg, d in zip(
                positional[len(positional) - len(a.defaults) :], a.defaults, strict=True
            ):
                check(arg.arg, d, node.lineno)
            for arg, d in zip(a.kwonlyargs, a.kw_defaults, strict=True):
                if d is not None:
                    check(arg.arg, d, node.lineno)
        elif isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg:
                    check(kw.arg, kw.value, node.lineno)
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if fname == "getattr" and len(node.args) == 3:
                attr = _const(node.args[1])
                if isinstance(attr, str):
                    check(attr, node.args[2], node.lineno)
            if fname == "add_argument" and node.args:
                flag = _const(node.args[0])
                default = next((k.value for k in node.keywords if k.arg == "default"), None)
                if isinstance(flag, str) and flag.startswith("--"):
                    check(flag[2:].replace("-", "_"), default, node.lineno)
    return hits


def distinctive_copies(tree: ast.Module, rel: str, defaults: dict[str, set[Any]]) -> list[str]:
    """A distinctive settings default standing anywhere outside the declaring models."""
    values = {
        v
        for vs in defaults.values()
        for v in vs
        if (isinstance(v, int | float) and abs(v) >= 100) or (isinstance(v, str) and len(v) >= 10)
    }
    skip = _settings_class_bodies(tree, rel)
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and n.body
        and isinstance(n.body[0], ast.Expr)
    }
    hits = []
    for node in ast.walk(tree):
        value = _const(node)
        if value is None or id(node) in docstrings or node.lineno in skip:
            continue
        if isinstance(value, str) and value not in values:
            continue
        if not isinstance(value, str) and not _is_default(value, values, exact=True):
            continue
        if (rel, value) not in UNRELATED:
            hits.append(f"{rel}:{node.lineno}: {value!r}")
    return hits


def product_trees() -> list[tuple[str, ast.Module]]:
    out = []
    for package in PRODUCT:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = str(path.relative_to(REPO))
            out.append((rel, ast.parse(path.read_text(encoding="utf-8"))))
    return out


def test_no_settings_default_is_copied() -> None:
    defaults = declared_defaults()
    assert defaults["max_paragraph_tokens"] == {2048}  # the check reads what it should
    hits = []
    for rel, tree in product_trees():
        hits += bound_copies(tree, rel, defaults)
        hits += distinctive_copies(tree, rel, defaults)

    def pending(hit: str, key: tuple[str, object]) -> bool:
        return hit.startswith(f"{key[0]}:") and hit.endswith(f" {key[1]!r}")

    stale = [k for k in NOT_YET_NAMED if not any(pending(h, k) for h in hits)]
    assert not stale, f"copies named since: remove from NOT_YET_NAMED: {stale}"
    hits = [h for h in hits if not any(pending(h, k) for k in NOT_YET_NAMED)]
    assert not hits, (
        "settings defaults written again (name them: tasks.settings.BUILD.<field>):\n"
        + "\n".join(sorted(set(hits)))
    )


def test_the_scan_finds_a_copy() -> None:
    """Positive control: each form of a copy is found."""
    source = (
        "from dataclasses import dataclass\n"
        "@dataclass\n"
        "class StageConfig:\n"
        "    max_paragraph_tokens: int = 2048\n"
        "def request(max_tokens: int = 2048) -> None: ...\n"
        "request(max_plan_steps=50)\n"
        "x = getattr(args, 'min_words', 2000)\n"
        "p.add_argument('--concurrency', type=int, default=16)\n"
        "DEFAULT_LICENSE = 'unknown'\n"
        "URL = 'sqlite:///longwriter.db'\n"
    )
    tree = ast.parse(source)
    defaults = declared_defaults()
    bound = bound_copies(tree, "x.py", defaults)
    assert len(bound) == 7, bound  # URL: db_url by its alias
    assert sorted(distinctive_copies(tree, "x.py", defaults)) == [
        "x.py:10: 'sqlite:///longwriter.db'",
        "x.py:4: 2048",
        "x.py:5: 2048",
        "x.py:7: 2000",
    ]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from flows.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("command", OWN_COMMANDS)
def test_every_flag_comes_from_a_settings_field(command: str) -> None:
    check_flags(_subparsers()[command], command)


def _deployments() -> Any:
    """deploy/deployments.py (a script, not a package) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("deployments", REPO / "deploy/deployments.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_deploy_flag_comes_from_a_settings_field() -> None:
    check_flags(_deployments().parser(), "deploy")


def check_flags(parser: argparse.ArgumentParser, command: str) -> None:
    models = {m.__name__: m for m in settings_models()}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        origin = getattr(action, "settings_field", None)
        if origin is None:
            assert (command, action.dest) in PLUMBING, f"{command} {action.option_strings}"
            assert action.default in (None, False, argparse.SUPPRESS) or action.required
            continue
        model, field = origin
        info = models[model].model_fields[field]
        # No copy of the default in argparse: an absent flag leaves the model's default.
        assert action.default is argparse.SUPPRESS or action.required, action.option_strings
        assert action.help and info.description
        assert info.description.replace("%", "%%") in action.help
        default = None if info.is_required() or action.required else field_default(info)
        shown = default not in (None, [], {}, "") and not isinstance(default, bool)
        # A flag whose absence means a value of the command's own says which one.
        if action.absent_help:
            assert f"(default: {action.absent_help})" in action.help, (command, action.help)
        elif shown:
            assert f"{default})" in action.help, (command, action.help)


def test_no_flags_give_the_models_defaults() -> None:
    parser = _subparsers()["build"]
    args = parser.parse_args([])
    assert BUILD_FLAGS.settings(args, progress=False) == BuildSettings(progress=False)


def _other_value(model: type[BaseModel], name: str) -> Any:
    """A value of field `name` unlike its default that the model accepts."""
    info = model.model_fields[name]
    d = field_default(info)
    origin = getattr(info.annotation, "__args__", ())
    candidates: list[Any]
    if isinstance(d, bool):
        candidates = [not d]
    elif isinstance(d, float):
        candidates = [d + 0.25, d / 2, 0.05]
    elif isinstance(d, int):
        candidates = [d + 1, d - 1]
    elif isinstance(d, str):
        candidates = [*(a for a in origin if isinstance(a, str) and a != d), "other-value"]
    elif isinstance(d, list):
        candidates = [["http://127.0.0.1:1/v1"]]
    elif isinstance(d, dict):
        candidates = [{"seed_extra": 1}]
    else:  # None: an int, a float, a string or a list field
        candidates = [0, 3, 0.5, "x", ["en"]]
    for c in candidates:
        try:
            if getattr(model.model_validate({name: c}), name) == c:
                return c
        except ValueError:
            continue
    raise AssertionError(f"no other value for {model.__name__}.{name}")


def _argv(flags: Flags, name: str, value: Any) -> list[str]:
    flag = flags.flag(name)
    if isinstance(value, bool):
        if flags.spec(name).both:
            return [flag if value else "--no-" + flag.removeprefix("--")]
        return [flag]
    if isinstance(value, list):
        return [x for v in value for x in (flag, v)]
    if isinstance(value, dict):
        import json

        return [flag, json.dumps(value)]
    return [flag, str(value)]


def test_every_build_flag_reaches_its_setting() -> None:
    """A value given on the command line arrives in BuildSettings, for every field a flag
    sets (a generated flag cannot be wired to the wrong field)."""
    parser = _subparsers()["build"]
    for name in BUILD_FLAGS.fields:
        value = _other_value(BuildSettings, name)
        args = parser.parse_args(_argv(BUILD_FLAGS, name, value))
        got = getattr(BUILD_FLAGS.settings(args), name)
        assert got == value, (name, value, got)


def test_stage_configs_are_derived_from_the_settings() -> None:
    from tasks.filters import FilterConfig

    s = BuildSettings(min_words=777, max_repetition=0.2, min_length_score=40.0)
    cfg = derive(FilterConfig, s)
    assert (cfg.min_words, cfg.max_repetition, cfg.min_length_score) == (777, 0.2, 40.0)
    with pytest.raises(TypeError, match="no field"):
        derive(FilterConfig, s, not_a_field=1)


def test_help_shows_defaults_and_descriptions(capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    with pytest.raises(SystemExit):
        main(["build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--concurrency CONCURRENCY LLM calls in flight at once (default: 16)" in text
    assert re.search(r"--max-paragraph-tokens \S+ max tokens of one paragraph call .*2048", text)


def test_deployments_take_the_commands_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """deploy/deployments.py's parameters: BuildSettings and EvalSettings from the build's and
    the eval's own flags; --db/--out absent: the build's defaults under runs/ (made absolute),
    the eval's results beside OUT under the eval's own default folder."""
    from tasks.settings import DEPLOY, EVAL

    deployments = _deployments()
    monkeypatch.chdir(tmp_path)
    args = deployments.parser().parse_args([])
    assert deployments.build_settings(args) == {
        "db_url": f"sqlite:///{tmp_path}/runs/longwriter.db",
        "out_dir": f"{tmp_path}/runs/out",
    }
    assert deployments.eval_settings(args, deployments.build_settings(args)) == {
        "out_dir": f"{tmp_path}/runs/{EVAL.out_dir}"
    }
    options = deployments.deploy_flags().settings(args)
    assert (options.pool, options.cron, options.schedule) == (DEPLOY.pool, DEPLOY.cron, True)
    assert (options.source, options.partitions) == (
        str(REPO),
        deployments.partitions_default(),
    )

    argv = [
        "--instructions", "in.jsonl", "--db", "x.db", "--base-url", "http://a/v1",
        "--model", "m", "--set", "min_words=200", "--set", "db_url=postgresql://h/db",
        "--eval-model", "em", "--judge-base-url", "http://j/v1", "--judge-model", "jm",
        "--no-schedule", "--partitions", "5", "--tag", "t",
    ]  # fmt: skip
    args = deployments.parser().parse_args(argv)
    build = deployments.build_settings(args)
    assert build == {
        "instructions": f"{tmp_path}/in.jsonl",
        "db_url": "postgresql://h/db",  # --set wins
        "out_dir": f"{tmp_path}/runs/out",
        "base_urls": ["http://a/v1"],
        "model": "m",
        "min_words": 200,
    }
    assert deployments.eval_settings(args, build) == {
        "out_dir": f"{tmp_path}/runs/eval",
        "base_urls": ["http://a/v1"],
        "model": "em",
        "judge_base_urls": ["http://j/v1"],
        "judge_model": "jm",
    }
    options = deployments.deploy_flags().settings(args)
    assert (options.schedule, options.partitions, options.tag) == (False, 5, ["t"])


def test_one_embedded_context_window() -> None:
    """The embedded model's window is written once (tasks.settings.EMBEDDED_CONTEXT_WINDOW):
    `serve --n-ctx` and the stage configs read it."""
    from dataclasses import fields

    from tasks.runtime import StageConfig
    from tasks.settings import EMBEDDED_CONTEXT_WINDOW, SERVE
    from tasks.stage_config import ContextBudget, JudgeGate

    def default(cls: type) -> Any:
        return next(f.default for f in fields(cls) if f.name == "context_window")

    assert SERVE.n_ctx == EMBEDDED_CONTEXT_WINDOW
    assert {default(c) for c in (StageConfig, ContextBudget, JudgeGate)} == {SERVE.n_ctx}


@pytest.mark.parametrize("command", ["serve", "publish"])
def test_serve_and_publish_help_show_defaults(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    if command == "serve":
        assert "--n-ctx N_CTX context window in tokens (default: 8192)" in text
        assert "--host HOST listen address (default: 127.0.0.1)" in text
        assert "--model-path GGUF" in text
    else:
        assert "--out OUT the build's output folder" in text
        assert "--dry-run list what would go; send nothing" in text
