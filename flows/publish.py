"""`longwriter publish`: upload a build's OUT folder to the Hugging Face Hub as a dataset repo.

Run it:   HF_TOKEN=hf_... longwriter publish --out runs/out --repo user/my-longwriter [--private]
          longwriter publish --out runs/out --repo user/my-longwriter --dry-run  (sends nothing)

What goes: the dataset card (README.md), manifest.json, report.html, the length histogram and
every shard the manifest lists (parquet and jsonl), after checking each against its sha256, in
one commit. Shards of an earlier publish that the manifest no longer lists are deleted in the
same commit: the card's `configs` glob would otherwise load them with the new ones.

The token comes from the environment (HF_TOKEN) and only from there: never from a cached
login, never stored, and every message this command prints is scrubbed of it. HF_ENDPOINT
points at another Hub (a mirror, a private deployment); the tests use a loopback fake.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKEN_ENV = "HF_TOKEN"
# Besides the shards: what makes the folder readable on the Hub. Anything else in OUT (a
# store, temporary files) stays home.
EXTRA_FILES = ("README.md", "manifest.json", "report.html", "length_histogram.png")
STALE_PREFIXES = ("shards/", "jsonl/")


class PublishError(Exception):
    """A one-line reason the folder cannot go (yet)."""


@dataclass(frozen=True)
class PlannedFile:
    path: str  # relative to OUT, the same path in the repo
    bytes: int


def planned_files(out: Path) -> list[PlannedFile]:
    """What would be uploaded, after checking the folder is a complete, intact export."""
    from tasks.export import verify_manifest

    if not (out / "manifest.json").is_file():
        raise PublishError(f"{out}: no manifest.json (run longwriter build or export first)")
    if not (out / "README.md").is_file():
        raise PublishError(f"{out}: no README.md dataset card (re-run longwriter export)")
    if problems := verify_manifest(out):
        raise PublishError(f"{out}: the shards do not match manifest.json: {'; '.join(problems)}")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    rels = [f["path"] for f in manifest["files"]] + [n for n in EXTRA_FILES if (out / n).is_file()]
    return [PlannedFile(rel, (out / rel).stat().st_size) for rel in sorted(set(rels))]


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def publish(
    out: Path,
    repo_id: str,
    *,
    token: str,
    private: bool = False,
    endpoint: str | None = None,
    message: str | None = None,
) -> dict[str, Any]:
    """Create the dataset repo if needed and upload the folder in one commit."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    files = planned_files(out)
    api = HfApi(endpoint=endpoint, token=token)
    # Without --private: None, so an organisation whose default is private keeps it. The Hub
    # applies it only when the repo is created; an existing repo keeps its visibility.
    repo = api.create_repo(repo_id, repo_type="dataset", private=private or None, exist_ok=True)
    keep = {f.path for f in files}
    remote = api.list_repo_files(repo_id, repo_type="dataset")
    stale = sorted(r for r in remote if r.startswith(STALE_PREFIXES) and r not in keep)
    ops: list[Any] = [CommitOperationAdd(f.path, str(out / f.path)) for f in files]
    ops += [CommitOperationDelete(path) for path in stale]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    commit = api.create_commit(
        repo_id,
        ops,
        commit_message=message or f"longwriter publish: {manifest['counts']['samples']} samples",
        repo_type="dataset",
    )
    return {
        "repo_url": str(repo),
        "commit_url": commit.commit_url,
        "uploaded": [f.path for f in files],
        "deleted": stale,
        "bytes": sum(f.bytes for f in files),
    }


# --------------------------------------------------------------------------- CLI


def add_cli(sub: Any) -> None:
    from tasks.settings import PUBLISH_FLAGS

    p = sub.add_parser(
        "publish",
        help="upload OUT (card, manifest, report, shards) to the Hugging Face Hub",
        description=(__doc__ or "").split("\n\n")[0],
    )
    # Every flag from tasks.settings.PublishSettings, where its description lives.
    PUBLISH_FLAGS.add_to(p)
    p.set_defaults(handler=cmd_publish)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def cmd_publish(args: argparse.Namespace) -> int:
    from tasks.flags import SettingsError
    from tasks.settings import PUBLISH_FLAGS

    try:
        settings = PUBLISH_FLAGS.settings(args)
    except SettingsError as exc:
        print(f"longwriter: error: {exc}", file=sys.stderr)
        return 2
    out = Path(settings.out_dir)
    token = os.environ.get(TOKEN_ENV) or None
    try:
        files = planned_files(out)
        if settings.dry_run:
            visibility = "private" if settings.private else "public"
            print(
                f"dry run: would upload {len(files)} file(s) to dataset {settings.repo} "
                f"({visibility})"
            )
            for f in files:
                print(f"  {f.path}  {_human(f.bytes)}")
            print(f"total {_human(sum(f.bytes for f in files))}")
            print(
                f"token: {TOKEN_ENV} {'is set' if token else 'is NOT set (needed to upload)'}; "
                "remote shards the manifest no longer lists would be deleted"
            )
            return 0
        if not token:
            raise PublishError(f"set {TOKEN_ENV} to a Hub token with write access")
        result = publish(
            out,
            settings.repo,
            token=token,
            private=settings.private,
            endpoint=os.environ.get("HF_ENDPOINT") or None,
            message=settings.message,
        )
    except PublishError as exc:
        print(f"longwriter: error: {_scrub(str(exc), token)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - any Hub/HTTP failure: one line, token scrubbed
        reason = " ".join(str(exc).split()) or type(exc).__name__
        print(f"longwriter: error: publish failed: {_scrub(reason, token)}", file=sys.stderr)
        return 1
    print(
        f"published {len(result['uploaded'])} file(s), {_human(result['bytes'])}"
        + (f", deleted {len(result['deleted'])} stale" if result["deleted"] else "")
    )
    print(f"repo:   {_scrub(result['repo_url'], token)}")
    print(f"commit: {_scrub(result['commit_url'] or '-', token)}")
    return 0
