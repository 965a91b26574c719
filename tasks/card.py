"""The dataset card: OUT/README.md, so an export folder is a Hub dataset as it stands.

Run it:   written by `longwriter export` / `longwriter build` after the manifest;
          `python -c "from tasks.card import ..."` is never needed.

YAML metadata (huggingface_hub's DatasetCardData) says what the Hub and `datasets` need:
license, languages found in the samples, task category, tags, size category, that the
annotations are machine-generated, and `configs` pointing at the parquet shards, so
`datasets.load_dataset(OUT)` loads the train split with no `data_files` argument (without
`configs` the loader would also read jsonl/ and load every sample twice). The body is written
for a person deciding whether to use the data: what it is, which model and prompts made it,
the settings, counts, length histogram, rejections by reason, quality scores when the build
judged its samples, known limitations and how to load it.

Everything comes from the manifest, the shards and the store, never from settings that could
hold a secret: the build hands over `BuildSettings.public()` and `_safe_settings` drops any
key that still looks like one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import col, select

from storage.models import LLMCall
from storage.store import Store
from tasks.files import atomic_write_text
from tasks.report_html import template_env, write_report
from tasks.settings import BUILD

# Read from here by older callers (tests): the scan lives with the shard format.
from tasks.shards import ShardScan
from tasks.shards import scan_shards as scan_shards

TAGS = ["synthetic", "long-form", "sft", "longwriter"]
# No license can be inferred: it depends on the generating model's terms and on where the
# instructions came from, which only the person building knows. "unknown" is one of the Hub's
# license identifiers and says exactly that; "other" would claim a custom licence text.
DEFAULT_LICENSE = BUILD.license
# The Hub's size buckets (the `size_categories` values its dataset search filters on).
_SIZE_BUCKETS = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
)
_SECRET_KEY = re.compile(r"(secret|password|passwd|token|api_key$|apikey|credential)", re.I)


def size_category(n: int) -> str:
    for limit, name in _SIZE_BUCKETS:
        if n < limit:
            return name
    return "n>100M"


def _safe_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as published: the build passes a redacted view already; anything whose name
    still says secret is dropped (a key's *name*, like api_key_env, is kept)."""
    return {
        k: v for k, v in sorted(settings.items()) if k.endswith("_env") or not _SECRET_KEY.search(k)
    }


@dataclass(frozen=True)
class PromptText:
    version: str
    source: str | None  # None: the template changed since this version was used


def prompts_used(store: Store | None, manifest: dict[str, Any]) -> list[PromptText]:
    """Every prompt template version behind the samples, with its source when this checkout's
    template still hashes to that version (a template's hash is its version)."""
    from prompts import PROMPTS_DIR, prompt_version

    versions: set[str] = set()
    for combined in manifest.get("prompt_versions", {}):
        versions.update(v for v in combined.split(",") if v)
    if store is not None:
        # Continuations use their own template; the sample's version names plan and write only.
        with store.session() as s:
            versions.update(
                s.exec(
                    select(LLMCall.prompt_version)
                    .where(col(LLMCall.stage).in_(["plan", "write"]))
                    .distinct()
                ).all()
            )
    out = []
    for v in sorted(versions):
        name = v.split("@", 1)[0]
        path = PROMPTS_DIR / f"{name}.j2"
        current = path.is_file() and prompt_version(name) == v
        out.append(PromptText(v, path.read_text(encoding="utf-8") if current else None))
    return out


def card_data(manifest: dict[str, Any], scan: ShardScan, license: str, pretty_name: str) -> Any:
    """The YAML header as huggingface_hub's DatasetCardData."""
    from huggingface_hub import DatasetCardData

    n = manifest["counts"]["samples"]
    return DatasetCardData(
        license=license,
        language=sorted(scan.languages) or ["en"],
        task_categories=["text-generation"],
        tags=list(TAGS),
        size_categories=[size_category(n)],
        annotations_creators=["machine-generated"],
        language_creators=["machine-generated"],
        pretty_name=pretty_name,
        # Only the parquet shards: the jsonl twins hold the same records.
        configs=[
            {
                "config_name": "default",
                "data_files": [{"split": "train", "path": "shards/train-*.parquet"}],
            }
        ],
    )


def card_markdown(
    out_dir: Path,
    manifest: dict[str, Any],
    store: Store | None,
    *,
    license: str | None = None,
    pretty_name: str | None = None,
    scan: ShardScan | None = None,
) -> str:
    """The whole README.md: YAML header and body."""
    from huggingface_hub import DatasetCard

    settings = manifest.get("settings") or {}
    license = license or settings.get("license") or DEFAULT_LICENSE
    pretty_name = (
        pretty_name
        or settings.get("pretty_name")
        or f"LongWriter-format SFT: {out_dir.resolve().name}"
    )
    scan = scan or scan_shards(out_dir, manifest)
    stats = store.stats() if store is not None else None
    hist = manifest.get("length_histogram", {})
    peak = max(hist.values(), default=0)
    body = (
        template_env()
        .get_template("dataset_card.md.j2")
        .render(
            pretty_name=pretty_name,
            license=license,
            license_defaulted=license == DEFAULT_LICENSE,
            manifest=manifest,
            counts=manifest["counts"],
            mean_words=(manifest["counts"]["words"] // manifest["counts"]["samples"])
            if manifest["counts"]["samples"]
            else 0,
            models=manifest.get("models", {}),
            sources=manifest.get("sources", {}),
            languages=dict(scan.languages.most_common()),
            histogram=[(b, n, "█" * round(20 * n / peak) if peak else "") for b, n in hist.items()],
            prompts=prompts_used(store, manifest),
            settings_json=json.dumps(
                _safe_settings(settings), indent=2, ensure_ascii=False, default=str
            ),
            stats=stats,
            rejections=[
                (stage, reason, n)
                for stage, reasons in sorted((stats or {}).get("rejections", {}).items())
                for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])
            ],
            judged=scan.judged,
            quality=sorted(scan.quality.items()),
            has_report=(out_dir / "report.html").is_file(),
        )
    )
    data = card_data(manifest, scan, license, pretty_name)
    card = DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    return str(card)


def write_card(out_dir: Path, manifest: dict[str, Any], store: Store | None, **kwargs: Any) -> Path:
    path = out_dir / "README.md"
    atomic_write_text(path, card_markdown(out_dir, manifest, store, **kwargs))
    return path


def write_card_and_report(store: Store, out_dir: Path, manifest: dict[str, Any]) -> None:
    """The export's last step: report.html, then README.md (which mentions the report). The
    shards are scanned once for both."""
    scan = scan_shards(out_dir, manifest)
    write_report(store, out_dir, manifest, scan=scan)
    write_card(out_dir, manifest, store, scan=scan)
