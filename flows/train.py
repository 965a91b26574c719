"""`longwriter train`: SFT (or DPO) of a base model on the factory's shards, as a Prefect flow.

Stages (Prefect tasks): load + check data (length check, general-data mix) -> train (TRL
SFTTrainer / DPOTrainer) -> save the transformers model and export GGUF. A markdown artifact
`train-report` and OUT/train_report.{md,json} summarise steps, losses and skipped samples.
See tasks/train/ for the training choices (token-averaged loss, leak-free packing, no
truncation).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from flows.console import add_command, start_prefect_api
from tasks.flags import Flag, Flags, SettingsError
from tasks.lineage import write_model_lineage
from tasks.train.config import TrainConfig
from tasks.train.run import (
    LoadedData,
    TrainOutcome,
    TrainReport,
    load_and_check,
    report_markdown,
    run_training,
    save_and_export,
)


@task(name="train-load-data", cache_policy=NO_CACHE, persist_result=False)
def load_data_task(cfg: TrainConfig) -> LoadedData:
    log = get_run_logger()
    data = load_and_check(cfg)
    skipped = data.skipped
    log.info(
        "%d %s sample(s) ready (max_seq_len=%d, base %s)",
        data.samples,
        "DPO" if cfg.dpo else "SFT",
        data.max_seq_len,
        data.ref.gguf_path or data.ref.directory,
    )
    if skipped:
        log.warning(
            "skipped %d sample(s) longer than %d tokens (never truncated): %s",
            len(skipped),
            data.max_seq_len,
            ", ".join(f"{s.id} ({s.tokens})" for s in skipped),
        )
    if data.mix is not None:
        log.info(
            "mixed %d general + %d LongWriter samples (general share %.3f)",
            data.mix.general_used,
            data.mix.longwriter,
            data.mix.ratio_actual,
        )
    return data


@task(name="train-fit", cache_policy=NO_CACHE, persist_result=False)
def train_task(cfg: TrainConfig, data: LoadedData) -> TrainOutcome:
    log = get_run_logger()
    outcome = run_training(cfg, data)
    first = outcome.losses[0][1] if outcome.losses else float("nan")
    last = outcome.losses[-1][1] if outcome.losses else float("nan")
    log.info(
        "trained %d step(s) in %.1f s, loss %.4f -> %.4f (packing %s, %s)",
        outcome.steps,
        outcome.runtime_s,
        first,
        last,
        "on" if outcome.packing else "off",
        outcome.attn_implementation,
    )
    return outcome


@task(name="train-save-export", cache_policy=NO_CACHE, persist_result=False)
def save_task(
    cfg: TrainConfig, data: LoadedData, outcome: TrainOutcome
) -> tuple[Path, Path | None, str | None]:
    log = get_run_logger()
    out, gguf, err = save_and_export(cfg, data, outcome)
    log.info("saved model to %s%s", out, f", GGUF {gguf}" if gguf else f" (GGUF: {err})")
    return out, gguf, err


@flow(name="longwriter-train", log_prints=False)
def train_flow(cfg: TrainConfig) -> dict[str, Any]:
    """Train, save, export, and publish a `train-report` markdown artifact; returns the report."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    # quote(): the payloads hold every tokenized sample; Prefect must not walk them for futures.
    data = load_data_task(cfg)
    outcome = train_task(cfg, quote(data))
    out, gguf, gguf_err = save_task(cfg, quote(data), quote(outcome))
    # After the weights exist, so their sha256 is part of it: shards -> this model.
    lineage = write_model_lineage(
        out,
        cfg.data,
        mode="dpo" if cfg.dpo else "sft",
        base_model=str(data.ref.gguf_path or data.ref.directory),
        general=cfg.general,
        samples=data.samples,
    )
    report = TrainReport(
        mode="dpo" if cfg.dpo else "sft",
        base_model=str(data.ref.gguf_path or data.ref.directory),
        out=str(out),
        samples=data.samples,
        skipped=data.skipped,
        max_seq_len=data.max_seq_len,
        packing=outcome.packing,
        attn_implementation=outcome.attn_implementation,
        losses=outcome.losses,
        steps=outcome.steps,
        runtime_s=outcome.runtime_s,
        mix=data.mix,
        gguf=str(gguf) if gguf else None,
        gguf_error=gguf_err,
        tokens=data.sft.tokens if data.sft else 0,
    )
    md = report_markdown(report)
    (out / "train_report.md").write_text(md, encoding="utf-8")
    result = report.to_json()
    result["lineage"] = lineage
    (out / "train_report.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    create_markdown_artifact(markdown=md, key="train-report", description="longwriter train")
    return result


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    return train_flow(cfg)


# --------------------------------------------------------------------------- CLI


# Every flag from a TrainConfig field (tasks/train/config.py), spelt as the CLI always has.
TRAIN_FLAGS = Flags(
    TrainConfig,
    flags={"dpo_beta": Flag(name="--beta"), "export_gguf": Flag(name="--no-gguf")},
)


def add_cli(sub: Any) -> None:
    add_command(
        sub,
        "train",
        cmd_train,
        TRAIN_FLAGS,
        doc=__doc__,
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TRAIN_FLAGS.settings(args)


def cmd_train(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except SettingsError as exc:
        print(f"longwriter: error: {exc}", file=sys.stderr)
        return 2
    if missing := [m for m in ("torch", "transformers", "trl", "peft") if not _importable(m)]:
        print(
            f"longwriter: error: missing {', '.join(missing)}; "
            "install the train extra (pip install -e '.[train]')",
            file=sys.stderr,
        )
        return 2
    try:
        start_prefect_api()
        report = run_train(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"longwriter: error: {exc}", file=sys.stderr)
        return 2
    losses = report["losses"]
    print(
        f"trained {report['steps']} step(s) on {report['samples']} sample(s) "
        f"({len(report['skipped'])} skipped > {report['max_seq_len']} tokens)"
        + (f", loss {losses[0][1]:.4f} -> {losses[-1][1]:.4f}" if losses else "")
    )
    print(f"model: {report['out']}")
    print(f"gguf:  {report['gguf'] or 'not exported: ' + str(report['gguf_error'])}")
    return 0


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
