"""Create (or update) the factory's Prefect deployments on a process work pool.

    python deploy/deployments.py --instructions data/instructions.jsonl \\
        --db postgresql://user@db-host/longwriter --out /data/longwriter/out \\
        --base-url http://gpu1:8000/v1 --base-url http://gpu2:8000/v1 --model my-model

Deployments (flow name/deployment name):
  longwriter-build/nightly                  the whole build in one flow run, on a cron schedule
  longwriter-build/partition                one partition of a build; started by the parent below
  longwriter-partitioned-build/partitioned  ingest, N partition runs on the pool, export
  longwriter-export/export                  shards + manifest from the store, on demand
  longwriter-eval/eval                      LongBench-Write evaluation, on demand

Every deployment pulls its code by changing into the repository directory (`--source`,
default: this checkout), so each worker machine needs the repository at that path with the
package installed (`pip install -e .`). The API key is never a parameter: workers read it from
their own environment (the variable named by `api_key_env`, default LONGWRITER_API_KEY).
Run again with other flags to change parameters or the schedule; runs already made are kept.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# Run as a script, Python puts deploy/ on sys.path, not the repository: without this the
# settings would be validated by whatever `flows` the environment has installed (another
# checkout's, under an editable install), not the code the deployments point workers at.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
DEFAULT_POOL = "longwriter"
DEFAULT_CRON = "0 3 * * *"
ZOMBIE_AUTOMATION = "longwriter: crash zombie flow runs"


def absolute_db_url(db: str) -> str:
    """A bare SQLite path made absolute: flow runs start in the repository directory, not in
    the directory this script ran from."""
    if "://" in db:
        if db.startswith("sqlite:///") and not db.startswith("sqlite:////"):
            return "sqlite:///" + str(Path(db.removeprefix("sqlite:///")).resolve())
        return db
    return str(Path(db).expanduser().resolve())


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs for any other BuildSettings field; VALUE is JSON when it parses."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def build_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The `settings` parameter of the build deployments, validated now so a typo fails here
    and not at 3 a.m."""
    from flows.build import BuildSettings

    raw: dict[str, Any] = {
        "instructions": str(Path(args.instructions).expanduser().resolve())
        if args.instructions
        else None,
        "db_url": absolute_db_url(args.db),
        "out_dir": str(Path(args.out).expanduser().resolve()),
        "base_urls": args.base_url or [],
        "model": args.model,
        **parse_settings(args.set or []),
    }
    return BuildSettings(**raw).model_dump(mode="json", exclude_defaults=True)


def eval_settings(args: argparse.Namespace, build: dict[str, Any]) -> dict[str, Any]:
    """The `settings` parameter of the eval deployment (EvalSettings, validated now): the
    build's endpoint unless --eval-base-url/--eval-model name another, results beside OUT."""
    from tasks.settings import EvalSettings

    raw: dict[str, Any] = {
        "out_dir": str(Path(build["out_dir"]).parent / "eval"),
        "base_urls": args.eval_base_url or build.get("base_urls", []),
        "model": args.eval_model or build.get("model"),
    }
    if args.judge_base_url:
        raw.update(judge_base_urls=args.judge_base_url, judge_model=args.judge_model)
    return EvalSettings(**raw).model_dump(mode="json", exclude_defaults=True)


def partitions_default() -> int:
    """The partitioned build's own default, so the flag cannot disagree with the flow."""
    import inspect

    from flows.partition import partitioned_build

    return inspect.signature(partitioned_build.fn).parameters["partitions"].default


async def ensure_pool(name: str) -> bool:
    """Create the process work pool unless it exists; True when it was created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    async with get_client() as client:
        try:
            await client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        try:
            await client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            return False
        return True


async def create_zombie_automation(within_s: int) -> str:
    """An automation that marks a flow run Crashed when its heartbeats stop (a killed worker or
    machine), so `partitioned_build` can start the partition again and the UI shows the truth.
    Flow runs send a heartbeat every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (default 180);
    `within_s` must be comfortably larger. Recipe from Prefect's docs ("detect zombie flows")."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    automation = Automation(
        name=ZOMBIE_AUTOMATION,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {within_s} s: worker or machine lost",
            )
        ],
    )
    from prefect import get_client

    async with get_client() as client:
        for old in await client.read_automations_by_name(ZOMBIE_AUTOMATION):
            await client.delete_automation(old.id)
    created = await automation.acreate()
    return str(created.id)


def deploy_all(args: argparse.Namespace) -> dict[str, str]:
    """Create or update every deployment; returns {"flow/deployment": id}."""
    from prefect import flow
    from prefect.client.schemas.schedules import CronSchedule

    source = str(Path(args.source).resolve())
    settings = build_settings(args)
    ids: dict[str, str] = {}

    def deploy(entrypoint: str, name: str, **kwargs: Any) -> None:
        # from_source records the pull step (cd into `source`) and reads the flow's parameter
        # schema, which the UI turns into a form; apply() raises on any error.
        f = flow.from_source(source=source, entrypoint=entrypoint)
        # Deployment tags land on every flow run it creates (filterable in the UI's runs list).
        tags = ["longwriter", *(t for t in args.tag or [] if t != "longwriter")]
        deployment = f.to_deployment(name=name, tags=tags, **kwargs)
        ids[f"{f.name}/{name}"] = str(deployment.apply(work_pool_name=args.pool))

    schedules = [] if args.no_schedule else [CronSchedule(cron=args.cron, timezone=args.timezone)]
    deploy(
        "flows/build.py:build_flow",
        "nightly",
        schedules=schedules,
        parameters={"settings": settings},
        description="The whole AgentWrite build in one flow run; reruns resume from the store.",
    )
    deploy(
        "flows/build.py:build_flow",
        "partition",
        parameters={"settings": settings},
        description="One partition of a build (started by longwriter-partitioned-build).",
    )
    deploy(
        "flows/partition.py:partitioned_build",
        "partitioned",
        parameters={"settings": settings, "partitions": args.partitions},
        description="Ingest, one longwriter-build/partition run per partition, export.",
    )
    deploy(
        "flows/partition.py:export_flow",
        "export",
        parameters={"db_url": settings["db_url"], "out_dir": settings["out_dir"]},
        description="Shards + manifest.json from the store.",
    )
    if (Path(source) / "flows" / "eval.py").is_file():
        deploy(
            "flows/eval.py:eval_flow",
            "eval",
            parameters={"settings": eval_settings(args, settings)},
            description="LongBench-Write evaluation of a model endpoint.",
        )
    return ids


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="create the longwriter Prefect deployments on a process work pool",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--pool", default=DEFAULT_POOL, help="process work pool (created if missing)")
    p.add_argument("--source", default=str(REPO), help="repository directory workers run from")
    p.add_argument("--instructions", help="instruction file the nightly build ingests")
    p.add_argument("--db", default="sqlite:///runs/longwriter.db", help="store URL or SQLite path")
    p.add_argument("--out", default="runs/out", help="output directory for shards + manifest")
    p.add_argument("--base-url", action="append", help="OpenAI-compatible /v1 URL (repeat)")
    p.add_argument("--model", help="model name at the endpoints")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any other BuildSettings field, e.g. --set concurrency=32 --set limit=100",
    )
    p.add_argument(
        "--tag",
        action="append",
        help="tag on the deployments and their flow runs, besides `longwriter` (repeat)",
    )
    p.add_argument("--cron", default=DEFAULT_CRON, help="schedule of longwriter-build/nightly")
    p.add_argument("--timezone", default="UTC")
    p.add_argument("--no-schedule", action="store_true", help="deploy without a schedule")
    p.add_argument(
        "--partitions",
        type=int,
        default=partitions_default(),
        help="default for the partitioned build (default: %(default)s)",
    )
    p.add_argument("--eval-base-url", action="append", help="endpoint of the evaluated model")
    p.add_argument("--eval-model")
    p.add_argument("--judge-base-url", action="append")
    p.add_argument("--judge-model")
    p.add_argument(
        "--zombie-automation",
        type=int,
        metavar="SECONDS",
        default=None,
        help="also create the automation that marks runs without a heartbeat for SECONDS "
        "Crashed (needs SECONDS > PREFECT_FLOWS_HEARTBEAT_FREQUENCY of the workers, default "
        "180, at least 30)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if asyncio.run(ensure_pool(args.pool)):
        print(f"created process work pool {args.pool!r}")
    ids = deploy_all(args)
    for name, dep_id in ids.items():
        print(f"deployed {name}  ({dep_id})")
    if args.zombie_automation:
        auto_id = asyncio.run(create_zombie_automation(args.zombie_automation))
        print(f"automation {ZOMBIE_AUTOMATION!r} ({auto_id})")
    print(f"start a worker:  prefect worker start --pool {args.pool}")
    print("run one now:     prefect deployment run longwriter-build/nightly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
