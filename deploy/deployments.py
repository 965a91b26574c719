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
# The project's modules are imported inside the functions below, once that path is set.

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


def under_runs(default: str) -> str:
    """A build default (a SQLite URL or a path) one folder down, in DEPLOY_RUNS_DIR:
    sqlite:///longwriter.db -> sqlite:///runs/longwriter.db, out -> runs/out."""
    from tasks.settings import DEPLOY_RUNS_DIR

    scheme, sep, path = default.rpartition(":///")
    return f"{scheme}{sep}{DEPLOY_RUNS_DIR}/{path}"


def partitions_default() -> int:
    """The partitioned build's own default, so the flag cannot disagree with the flow."""
    import inspect

    from flows.partition import partitioned_build

    return inspect.signature(partitioned_build.fn).parameters["partitions"].default


def deploy_flags() -> Any:
    """The deploy-only flags (tasks.settings.DeploySettings)."""
    from tasks.flags import Flag, Flags
    from tasks.settings import DEPLOY_SPECS, DeploySettings

    return Flags(
        DeploySettings,
        flags={
            **DEPLOY_SPECS,
            "source": Flag(absent=lambda: str(REPO), absent_help=f"this checkout, {REPO}"),
            "partitions": Flag(absent=partitions_default, absent_help=str(partitions_default())),
        },
    )


def build_flags() -> Any:
    """The build deployments' settings that have a flag here (any other: --set KEY=VALUE),
    spelt and described as `longwriter build` has them; the store and output under runs/."""
    from tasks.flags import Flag, Flags
    from tasks.settings import BUILD, FLAGS, BuildSettings

    return Flags(
        BuildSettings,
        only=("instructions", "db_url", "out_dir", "base_urls", "model"),
        flags={
            **FLAGS,
            "db_url": Flag(
                name="--db",
                absent=lambda: under_runs(BUILD.db_url),
                absent_help=under_runs(BUILD.db_url),
            ),
            "out_dir": Flag(
                name="--out",
                absent=lambda: under_runs(BUILD.out_dir),
                absent_help=under_runs(BUILD.out_dir),
            ),
        },
    )


def eval_flags() -> Any:
    """The eval deployment's endpoints; absent: the build's (the judge: none unless given)."""
    from tasks.flags import Flag, Flags
    from tasks.settings import FLAGS, EvalSettings

    return Flags(
        EvalSettings,
        only=("base_urls", "model", "judge_base_urls", "judge_model"),
        flags={
            **FLAGS,
            "base_urls": Flag(name="--eval-base-url", absent_help="the build's --base-url"),
            "model": Flag(name="--eval-model", absent_help="the build's --model"),
        },
    )


def build_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The `settings` parameter of the build deployments (BuildSettings, what `longwriter
    build` takes), validated now so a typo fails here and not at 3 a.m."""
    from tasks.settings import BuildSettings

    given = build_flags().values(args)
    raw: dict[str, Any] = {
        **given,
        "db_url": absolute_db_url(given["db_url"]),
        "out_dir": str(Path(given["out_dir"]).expanduser().resolve()),
    }
    if given.get("instructions"):
        raw["instructions"] = str(Path(given["instructions"]).expanduser().resolve())
    raw.update(parse_settings(deploy_flags().values(args).get("overrides", [])))
    return BuildSettings(**raw).model_dump(mode="json", exclude_defaults=True)


def eval_settings(args: argparse.Namespace, build: dict[str, Any]) -> dict[str, Any]:
    """The `settings` parameter of the eval deployment (EvalSettings, validated now): the
    build's endpoint unless --eval-base-url/--eval-model name another, results beside OUT."""
    from tasks.settings import EVAL, EvalSettings

    given = eval_flags().values(args)
    raw: dict[str, Any] = {
        "out_dir": str(Path(build["out_dir"]).parent / EVAL.out_dir),
        "base_urls": given.get("base_urls") or build.get("base_urls", []),
        "model": given.get("model") or build.get("model"),
    }
    if given.get("judge_base_urls"):
        raw.update(judge_base_urls=given["judge_base_urls"], judge_model=given.get("judge_model"))
    return EvalSettings(**raw).model_dump(mode="json", exclude_defaults=True)


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

    options = deploy_flags().settings(args)
    assert options.source is not None and options.partitions is not None  # their absent values
    source = str(Path(options.source).resolve())
    settings = build_settings(args)
    ids: dict[str, str] = {}

    def deploy(entrypoint: str, name: str, **kwargs: Any) -> None:
        # from_source records the pull step (cd into `source`) and reads the flow's parameter
        # schema, which the UI turns into a form; apply() raises on any error.
        f = flow.from_source(source=source, entrypoint=entrypoint)
        # Deployment tags land on every flow run it creates (filterable in the UI's runs list).
        tags = ["longwriter", *(t for t in options.tag if t != "longwriter")]
        deployment = f.to_deployment(name=name, tags=tags, **kwargs)
        ids[f"{f.name}/{name}"] = str(deployment.apply(work_pool_name=options.pool))

    schedules = (
        [CronSchedule(cron=options.cron, timezone=options.timezone)] if options.schedule else []
    )
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
        parameters={"settings": settings, "partitions": options.partitions},
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
    # Every flag from a settings model (tasks/settings.py), where its default and description
    # live: the build's and the eval's own fields, then the deploy-only ones.
    build_flags().add_to(p)
    eval_flags().add_to(p, title="the eval deployment (longwriter-eval/eval)")
    deploy_flags().add_to(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    options = deploy_flags().settings(args)
    if asyncio.run(ensure_pool(options.pool)):
        print(f"created process work pool {options.pool!r}")
    ids = deploy_all(args)
    for name, dep_id in ids.items():
        print(f"deployed {name}  ({dep_id})")
    if options.zombie_automation:
        auto_id = asyncio.run(create_zombie_automation(options.zombie_automation))
        print(f"automation {ZOMBIE_AUTOMATION!r} ({auto_id})")
    print(f"start a worker:  prefect worker start --pool {options.pool}")
    print("run one now:     prefect deployment run longwriter-build/nightly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
