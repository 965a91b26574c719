"""What `longwriter train` is asked to do: the training settings, checked."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

from pydantic import BaseModel, Field, model_validator

if TYPE_CHECKING:  # heavy imports only for type checkers
    pass

logger = logging.getLogger(__name__)
T = TypeVar("T")


class TrainConfig(BaseModel):
    """Parameters of one `longwriter train` run (a pydantic model so a deployment can take it)."""

    data: Path = Field(
        description="shards dir (build OUT with shards/*.parquet), a folder or file of "
        "parquet/jsonl; with --dpo: TRL preference pairs (prompt/chosen/rejected)"
    )
    out: Path = Field(
        description="output dir for the trained model: HF model + tokenizer (+ model.gguf, report)"
    )
    base_model: Path | None = Field(
        default=None,
        description="HF model dir or .gguf file (default: the embedded SmolLM2-135M GGUF)",
    )
    general: Path | None = Field(
        default=None, description="general SFT data (parquet/jsonl) to mix in"
    )
    general_ratio: float | None = Field(
        default=None,
        ge=0.0,
        lt=1.0,
        description="share of general samples in the mix, 0 <= R < 1 (default: all general data)",
    )
    dpo: bool = Field(default=False, description="DPO on preference pairs instead of SFT")
    lora: bool = Field(default=False, description="train a LoRA adapter (merged on save)")
    lora_r: int = Field(default=16, ge=1, description="LoRA rank")
    lora_alpha: int = Field(default=32, ge=1, description="LoRA alpha (scale = alpha / rank)")
    max_seq_len: int | None = Field(
        default=None,
        ge=8,
        description="longer samples are skipped and reported (default: the model's context length)",
    )
    epochs: float = Field(default=3.0, gt=0, description="passes over the data")
    lr: float | None = Field(
        default=None, gt=0, description="learning rate (default 2e-5; LoRA 2e-4, DPO 1e-6)"
    )
    batch_size: int = Field(default=1, ge=1, description="per-device micro-batch")
    grad_accum: int = Field(default=8, ge=1, description="micro-batches per optimizer step")
    max_steps: int | None = Field(default=None, ge=1, description="stop after N optimizer steps")
    warmup_ratio: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="share of the steps spent warming up the lr"
    )
    packing: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="padding-free packing; auto: only with a varlen (flash) attention kernel",
    )
    attn_implementation: str | None = Field(
        default=None,
        description="e.g. sdpa, flash_attention_2 (default: flash_attention_2 if installed on "
        "GPU, else sdpa)",
    )
    dpo_beta: float = Field(default=0.1, gt=0, description="DPO beta")
    seed: int = Field(default=42, description="random seed of the run")
    logging_steps: int = Field(default=1, ge=1, description="log the loss every N steps")
    export_gguf: bool = Field(default=True, description="export model.gguf for llama.cpp")
    gguf_dtype: Literal["f16", "f32"] = Field(default="f16", description="GGUF weight type")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.general_ratio is not None and self.general is None:
            raise ValueError("--general-ratio needs --general")
        if self.dpo and self.general is not None:
            raise ValueError("--general mixing applies to SFT only, not --dpo")
        return self

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        if self.dpo:
            return 1e-6  # TRL's DPO default: preference steps drift fast from the reference
        return 2e-4 if self.lora else 2e-5


# --------------------------------------------------------------------------- base model
