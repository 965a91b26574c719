"""One training run end to end: load and check the data, train, save and export, report."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tasks.train.config import TrainConfig
from tasks.train.data import (
    MixStats,
    PreparedDPO,
    PreparedSFT,
    SkippedSample,
    load_conversations,
    mix_general,
    prepare_dpo,
    prepare_sft,
    read_records,
)
from tasks.train.gguf import export_gguf, save_model
from tasks.train.model import (
    ModelRef,
    load_model,
    load_tokenizer,
    pick_attn_implementation,
    resolve_base_model,
)
from tasks.train.trainer import (
    LossLog,
    build_dpo_trainer,
    build_sft_trainer,
    decide_packing,
    packing_is_safe,
)

if TYPE_CHECKING:  # heavy imports only for type checkers
    pass

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class TrainReport:
    mode: str
    base_model: str
    out: str
    samples: int
    skipped: list[SkippedSample]
    max_seq_len: int
    packing: bool
    attn_implementation: str
    losses: list[tuple[int, float]] = field(default_factory=list)
    steps: int = 0
    runtime_s: float = 0.0
    mix: MixStats | None = None
    gguf: str | None = None
    gguf_error: str | None = None
    tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def report_markdown(r: TrainReport) -> str:
    lines = [
        f"# longwriter train ({r.mode})",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{r.base_model}` |",
        f"| output | `{r.out}` |",
        f"| samples trained on | {r.samples} |",
        f"| skipped (> {r.max_seq_len} tokens) | {len(r.skipped)} |",
        f"| packing | {'on' if r.packing else 'off'} ({r.attn_implementation}) |",
        f"| optimizer steps | {r.steps} |",
        f"| runtime | {r.runtime_s:.1f} s |",
    ]
    if r.tokens:
        lines.append(f"| tokens per epoch | {r.tokens} |")
    if r.losses:
        lines.append(f"| loss first → last | {r.losses[0][1]:.4f} → {r.losses[-1][1]:.4f} |")
    if r.mix is not None:
        m = r.mix
        lines.append(
            f"| general mix | {m.general_used}/{m.general_available} general + {m.longwriter} "
            f"LongWriter (share {m.ratio_actual:.3f}, asked {m.ratio_requested}) |"
        )
    if r.gguf:
        lines.append(f"| GGUF | `{r.gguf}` |")
    elif r.gguf_error:
        lines.append(f"| GGUF | not exported: {r.gguf_error} |")
    if r.losses:
        lines += ["", "## Loss", "", "| step | loss |", "|---|---|"]
        every = max(1, len(r.losses) // 50)  # keep the artifact readable for long runs
        picked = r.losses[::every]
        if picked[-1] != r.losses[-1]:
            picked.append(r.losses[-1])
        lines += [f"| {s} | {loss:.4f} |" for s, loss in picked]
    if r.skipped:
        lines += ["", "## Skipped samples (never truncated)", "", "| id | tokens | source |"]
        lines.append("|---|---|---|")
        lines += [f"| {s.id} | {s.tokens} | {s.source} |" for s in r.skipped]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- stages


@dataclass
class LoadedData:
    """Output of the load+check stage: what the training stage needs."""

    ref: ModelRef
    tokenizer: Any
    max_seq_len: int
    sft: PreparedSFT | None = None
    dpo: PreparedDPO | None = None
    mix: MixStats | None = None

    @property
    def skipped(self) -> list[SkippedSample]:
        return (self.sft or self.dpo).skipped if (self.sft or self.dpo) else []

    @property
    def samples(self) -> int:
        return len((self.sft or self.dpo).rows) if (self.sft or self.dpo) else 0


def context_length_of(ref: ModelRef) -> int:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(ref.directory), **ref.load_kwargs()).get_text_config()
    return int(getattr(cfg, "max_position_embeddings", 0) or 32768)


def load_and_check(cfg: TrainConfig) -> LoadedData:
    """Resolve the base model, read + mix data, tokenize, skip (and report) over-long samples."""
    ref = resolve_base_model(cfg.base_model)
    tok = load_tokenizer(ref)
    max_len = cfg.max_seq_len or context_length_of(ref)
    data = LoadedData(ref=ref, tokenizer=tok, max_seq_len=max_len)
    if cfg.dpo:
        data.dpo = prepare_dpo(tok, read_records(cfg.data), max_len)
        n = len(data.dpo.rows)
    else:
        # Length-check each source first, so the ratio holds for what is actually trained on.
        sft = prepare_sft(tok, load_conversations(cfg.data, "longwriter"), max_len)
        if cfg.general is not None:
            gen = prepare_sft(tok, load_conversations(cfg.general, "general"), max_len)
            rows, data.mix = mix_general(sft.rows, gen.rows, cfg.general_ratio, cfg.seed)
            sft = PreparedSFT(
                rows=rows,
                skipped=sft.skipped + gen.skipped,
                max_seq_len=max_len,
                tokens=sum(len(r["input_ids"]) for r in rows),
                assistant_tokens=sum(sum(r["completion_mask"]) for r in rows),
            )
        data.sft = sft
        n = len(data.sft.rows)
    if n == 0:
        raise ValueError(f"no trainable samples left (max_seq_len={max_len}, {cfg.data})")
    return data


@dataclass
class TrainOutcome:
    trainer: Any
    losses: list[tuple[int, float]]
    steps: int
    runtime_s: float
    packing: bool
    attn_implementation: str


def run_training(cfg: TrainConfig, data: LoadedData) -> TrainOutcome:
    import time

    attn = pick_attn_implementation(cfg.attn_implementation)
    model = load_model(data.ref, attn_implementation=attn, lora=cfg.lora)
    log = LossLog()
    if cfg.dpo:
        assert data.dpo is not None
        packing = False  # TRL's DPO has no padding-free path at the moment
        trainer = build_dpo_trainer(
            cfg, model, data.tokenizer, data.dpo, callbacks=[log.callback()]
        )
    else:
        assert data.sft is not None
        packing = decide_packing(cfg.packing, attn)
        if packing and not packing_is_safe(model):
            # Never trade correctness for speed: a leaking kernel would let samples attend to
            # their neighbours in the pack.
            logger.warning("packing disabled: %s lets packed samples attend to each other", attn)
            packing = False
        trainer = build_sft_trainer(
            cfg, model, data.tokenizer, data.sft, packing=packing, callbacks=[log.callback()]
        )
    t0 = time.monotonic()
    result = trainer.train()
    ckpt = cfg.out / "checkpoints"
    if ckpt.is_dir() and not any(ckpt.iterdir()):
        ckpt.rmdir()
    return TrainOutcome(
        trainer=trainer,
        losses=log.losses(),
        steps=int(result.global_step),
        runtime_s=time.monotonic() - t0,
        packing=packing,
        attn_implementation=attn,
    )


def save_and_export(
    cfg: TrainConfig, data: LoadedData, outcome: TrainOutcome
) -> tuple[Path, Path | None, str | None]:
    """Save the HF model; export GGUF if asked and supported (export errors kept, not raised)."""
    out = save_model(outcome.trainer, data.tokenizer, cfg.out)
    if not cfg.export_gguf:
        return out, None, "disabled (--no-gguf)"
    try:
        path = export_gguf(
            out, out / "model.gguf", source_gguf=data.ref.gguf_path, dtype=cfg.gguf_dtype
        )
    except (ValueError, FileNotFoundError, KeyError) as exc:
        logger.warning("GGUF export skipped: %s", exc)
        return out, None, str(exc)
    return out, path, None
