"""Lineage: which shards trained which model, and how that model scored.

`longwriter train` writes MODEL/lineage.json (the training data's manifest.json sha256, every
data file's sha256 as read, the base model, the weights' sha256), the same short form into
MODEL/config.json under `longwriter_lineage` (it travels with the weights wherever
transformers copies them) and a MODEL/README.md model card. `longwriter eval --model-dir
MODEL` copies that lineage into results.json (key `lineage`) and appends one line per run to
MODEL/evaluations.jsonl, so a model folder knows its scores. `longwriter stats --lineage PATH`
(a model folder, an eval folder or its results.json) prints the chain and re-checks every hash:
a shard or manifest changed after training shows as CHANGED.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.files import atomic_write_text, sha256_file

LINEAGE_FILE = "lineage.json"
EVALUATIONS_FILE = "evaluations.jsonl"
CONFIG_KEY = "longwriter_lineage"
WEIGHT_FILES = ("model.safetensors", "model.gguf", "pytorch_model.bin")


def _manifest_of(data: Path) -> Path | None:
    """The export's manifest.json for a data path (the OUT folder, its shards/ or a shard)."""
    for d in [data, *data.parents][:3]:
        if d.is_dir() and (d / "manifest.json").is_file():
            return d / "manifest.json"
    return None


def data_lineage(data: Path) -> dict[str, Any]:
    """The training data as `longwriter train` reads it: the files (same selection as
    tasks.train) with their sha256 now, and the export manifest they belong to, if any."""
    from tasks.train.data import data_files  # the exact files train reads, so the hashes are those

    data = Path(data).resolve()
    files = data_files(data)
    manifest_path = _manifest_of(data if data.is_dir() else data.parent)
    listed: dict[str, str] = {}
    manifest: dict[str, Any] | None = None
    root = manifest_path.parent if manifest_path else (data if data.is_dir() else data.parent)
    if manifest_path is not None:
        m = json.loads(manifest_path.read_text(encoding="utf-8"))
        listed = {f["path"]: f["sha256"] for f in m.get("files", []) if "sha256" in f}
        manifest = {
            "path": str(manifest_path),
            "sha256": sha256_file(manifest_path),
            "created_at": m.get("created_at"),
            "format": m.get("format"),
            "samples": (m.get("counts") or {}).get("samples", m.get("samples")),
        }
    out_files = []
    for f in files:
        rel = str(f.resolve().relative_to(root)) if f.resolve().is_relative_to(root) else str(f)
        digest = sha256_file(f)
        entry: dict[str, Any] = {"path": rel, "sha256": digest}
        if rel in listed:
            # A shard edited after export would train a model its manifest does not describe.
            entry["matches_manifest"] = listed[rel] == digest
        out_files.append(entry)
    return {"path": str(data), "root": str(root), "manifest": manifest, "files": out_files}


def write_model_lineage(
    model_dir: Path,
    data: Path,
    *,
    mode: str,
    base_model: str,
    general: Path | None = None,
    samples: int | None = None,
) -> dict[str, Any]:
    """MODEL/lineage.json, config.json's `longwriter_lineage` and a README.md model card."""
    lineage = {
        "kind": "longwriter-model",
        "trained_at": datetime.now(UTC).isoformat(),
        "mode": mode,
        "base_model": base_model,
        "samples": samples,
        "data": data_lineage(data),
        "general": data_lineage(general) if general is not None else None,
        "weights": [
            {"path": name, "sha256": sha256_file(model_dir / name)}
            for name in WEIGHT_FILES
            if (model_dir / name).is_file()
        ],
    }
    atomic_write_text(model_dir / LINEAGE_FILE, json.dumps(lineage, indent=2, ensure_ascii=False))
    config = model_dir / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text(encoding="utf-8"))
        d = lineage["data"]
        cfg[CONFIG_KEY] = {
            "manifest_sha256": d["manifest"]["sha256"] if d["manifest"] else None,
            "shards": [{"path": f["path"], "sha256": f["sha256"]} for f in d["files"]],
        }
        atomic_write_text(config, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    atomic_write_text(model_dir / "README.md", model_card(lineage))
    return lineage


def model_card(lineage: dict[str, Any]) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        library_name="transformers",
        tags=["longwriter", "sft" if lineage["mode"] == "sft" else "dpo"],
    )
    d = lineage["data"]
    rows = "\n".join(f"| `{f['path']}` | `{f['sha256']}` |" for f in d["files"])
    manifest = (
        f"manifest `{d['manifest']['path']}` sha256 `{d['manifest']['sha256']}` "
        f"({d['manifest']['samples']} samples, exported {d['manifest']['created_at']})"
        if d["manifest"]
        else "no manifest (the data is not a longwriter export)"
    )
    body = (
        f"# longwriter {lineage['mode'].upper()} model\n\n"
        f"Trained {lineage['trained_at']} from `{lineage['base_model']}` on "
        f"{lineage['samples']} samples of `{d['path']}`: {manifest}.\n\n"
        "## Training data (sha256 of every file as read)\n\n"
        f"| file | sha256 |\n|---|---|\n{rows}\n\n"
        "`lineage.json` holds the full record; `longwriter stats --lineage <this folder>` "
        "re-checks it and lists the evaluations.\n"
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def eval_lineage(model_dir: Path) -> dict[str, Any]:
    """What results.json records about the evaluated model (its lineage.json as written)."""
    path = Path(model_dir).resolve() / LINEAGE_FILE
    if not path.is_file():
        return {"model_dir": str(path.parent), "lineage": None, "note": "no lineage.json"}
    return {
        "model_dir": str(path.parent),
        "lineage_sha256": sha256_file(path),
        "lineage": json.loads(path.read_text(encoding="utf-8")),
    }


def record_evaluation(model_dir: Path, results_path: Path, results: dict[str, Any]) -> None:
    """One line in MODEL/evaluations.jsonl per eval run: the chain's forward pointer."""
    o = results.get("overall") or {}
    line = {
        "at": datetime.now(UTC).isoformat(),
        "results": str(Path(results_path).resolve()),
        "model": results.get("model"),
        "prompts": (results.get("counts") or {}).get("prompts"),
        "S_l": o.get("S_l"),
        "S_q": o.get("S_q"),
        "S": o.get("S"),
    }
    with (Path(model_dir) / EVALUATIONS_FILE).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(line, ensure_ascii=False) + "\n")


def _check(path: Path, expected: str | None) -> str:
    if expected is None:
        return ""
    if not path.is_file():
        return "MISSING"
    return "ok" if sha256_file(path) == expected else "CHANGED since training"


def lineage_chain(path: Path) -> list[str]:
    """The chain for a model folder, an eval folder or results.json, every hash re-checked:
    scores <- model <- manifest <- shards."""
    path = Path(path)
    lines: list[str] = []
    model_dir = path
    results_file = path / "results.json" if path.is_dir() else path
    if (
        results_file.is_file()
        and results_file.suffix == ".json"
        and not (path / LINEAGE_FILE).is_file()
    ):
        res = json.loads(results_file.read_text(encoding="utf-8"))
        lin = res.get("lineage")
        o = res.get("overall") or {}
        lines.append(
            f"eval    {results_file.resolve()}: model {res.get('model')}, S_l {o.get('S_l')}, "
            f"S_q {o.get('S_q')}, S {o.get('S')}"
        )
        if not lin or not lin.get("model_dir"):
            lines.append("  no lineage recorded (evaluate with --model-dir MODEL)")
            return lines
        model_dir = Path(lin["model_dir"])
        if lin.get("lineage_sha256"):
            state = _check(model_dir / LINEAGE_FILE, lin["lineage_sha256"])
            lines.append(f"  evaluated model {model_dir} (lineage.json {state})")
    lin_path = model_dir / LINEAGE_FILE
    if not lin_path.is_file():
        lines.append(f"model   {model_dir}: no {LINEAGE_FILE} (not trained by longwriter train?)")
        return lines
    lin = json.loads(lin_path.read_text(encoding="utf-8"))
    lines.append(
        f"model   {model_dir.resolve()}: {lin['mode']} from {lin['base_model']}, "
        f"{lin.get('samples')} samples, trained {lin['trained_at']}"
    )
    for w in lin.get("weights", []):
        state = _check(model_dir / w["path"], w["sha256"])
        lines.append(f"  weights {w['path']} sha256 {w['sha256'][:16]}… {state}")
    evals = model_dir / EVALUATIONS_FILE
    if evals.is_file():
        for raw in evals.read_text(encoding="utf-8").splitlines():
            e = json.loads(raw)
            lines.append(
                f"  scored  S_l {e['S_l']}  S_q {e['S_q']}  S {e['S']} on {e['prompts']} prompts "
                f"({e['at']}): {e['results']}"
            )
    for role in ("data", "general"):
        d = lin.get(role)
        if not d:
            continue
        root = Path(d["root"])
        m = d.get("manifest")
        if m:
            state = _check(Path(m["path"]), m["sha256"])
            lines.append(
                f"  {role}    {root}: manifest.json sha256 {m['sha256'][:16]}… {state} "
                f"({m['samples']} samples, exported {m['created_at']})"
            )
        else:
            lines.append(f"  {role}    {d['path']}: no manifest (not a longwriter export)")
        for f in d["files"]:
            listed = (
                ""
                if f.get("matches_manifest", True)
                else " (did NOT match its manifest at training)"
            )
            state = _check(root / f["path"], f["sha256"])
            lines.append(f"    {f['path']} sha256 {f['sha256'][:16]}… {state}{listed}")
    return lines
