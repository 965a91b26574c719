"""The CLI imports only what the command it runs needs: the commands that run no flow
(`--help`, `stats`, `export`, `build --dry-run`; `audit` in tests/tasks/test_audit.py) import
neither Prefect nor torch. Each runs in a fresh interpreter, and what it imported is read from
`sys.modules` after the command returns (no timings: they depend on the machine's load)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from flows.cli import COMMANDS, build_parser
from storage.store import Store
from tests.conftest import write_jsonl

HEAVY = ("prefect", "torch", "transformers")

_RUN = """
import json, sys
from flows.cli import main
try:
    code = main(json.loads(sys.argv[1]))
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("RESULT " + json.dumps({{"code": code, "heavy": heavy}}))
"""


def run_cli(args: list[str], cwd: Path) -> dict[str, Any]:
    """`longwriter ARGS` in a fresh interpreter: its exit code, output and heavy imports."""
    done = subprocess.run(
        [sys.executable, "-c", _RUN.format(heavy=HEAVY), json.dumps(args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_env(),
        timeout=300,
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"no result from {args}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return {**json.loads(lines[-1][7:]), "stdout": done.stdout, "stderr": done.stderr}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    env.pop("LONGWRITER_DB_URL", None)
    return env


def test_help_lists_every_command_and_imports_no_flow(tmp_path: Path) -> None:
    out = run_cli(["--help"], tmp_path)
    assert out["code"] == 0
    assert out["heavy"] == []
    for name, (_module, help_line) in COMMANDS.items():
        assert name in out["stdout"]
        assert help_line.split()[0] in out["stdout"]


def test_stats_imports_neither_prefect_nor_torch(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    Store(f"sqlite:///{db}").close()
    out = run_cli(["stats", "--db", str(db), "--json"], tmp_path)
    assert out["code"] == 0, out["stderr"][-2000:]
    assert out["heavy"] == []
    stats = json.loads(out["stdout"].split("RESULT ")[0])
    assert stats["instructions"]["total"] == 0  # the command really ran against the store


def test_export_and_dry_run_import_neither_prefect_nor_torch(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    instructions = tmp_path / "in.jsonl"
    write_jsonl(instructions, [{"prompt": "Write a 3000-word story about a lighthouse."}])
    dry = run_cli(
        ["build", "--dry-run", "--instructions", str(instructions), "--db", str(db)], tmp_path
    )
    assert dry["code"] == 0, dry["stderr"][-2000:]
    assert "nothing was sent to a model" in dry["stdout"]
    assert dry["heavy"] == []
    export = run_cli(["export", "--db", str(db), "--out", str(tmp_path / "out")], tmp_path)
    assert export["code"] == 0, export["stderr"][-2000:]
    assert (tmp_path / "out" / "manifest.json").is_file()
    assert export["heavy"] == []


def test_a_flow_command_does_import_prefect(tmp_path: Path) -> None:
    """The positive control: the probe sees Prefect when a command does import it."""
    out = run_cli(["pairs", "--help"], tmp_path)
    assert out["code"] == 0
    assert "prefect" in out["heavy"]


def test_command_table_matches_what_each_module_registers() -> None:
    """`longwriter --help` shows COMMANDS' lines without importing the modules: each must be
    the help its module gives when it registers the command."""
    parser = build_parser()  # no argv: every module imported, every command set up
    sub = _subcommands(parser)
    registered = {a.dest: a.help for a in sub._choices_actions}
    assert registered == {name: help_line for name, (_m, help_line) in COMMANDS.items()}


def test_only_the_chosen_command_is_set_up() -> None:
    parser = build_parser(["stats", "--json"])
    sub = _subcommands(parser)
    flags = {name: {a.dest for a in p._actions} for name, p in sub.choices.items()}
    assert {"db", "json", "lineage"} <= flags["stats"]
    assert flags["build"] == {"help"}  # listed by name and help line only
    assert parser.parse_args(["stats", "--json"]).json is True


def _subcommands(parser: argparse.ArgumentParser) -> Any:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
