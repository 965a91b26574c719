"""TRL trainers: token-averaged loss, packing only where it cannot leak attention across
samples, LoRA, the loss log."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tasks.train.config import TrainConfig
from tasks.train.data import PreparedDPO, PreparedSFT
from tasks.train.model import VARLEN_ATTENTION, has_cuda

if TYPE_CHECKING:  # heavy imports only for type checkers
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback

logger = logging.getLogger(__name__)
T = TypeVar("T")


def packing_supported(attn_implementation: str) -> bool:
    """Whether padding-free packing keeps samples apart with this attention implementation."""
    return attn_implementation in VARLEN_ATTENTION


def decide_packing(mode: str, attn_implementation: str) -> bool:
    """auto: pack only with varlen kernels. 'on' is also leak-free with sdpa/eager in
    transformers>=5, whose mask builder turns packed position_ids into a block-diagonal mask
    (tested), but that mask is O(L^2), so it is opt-in."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    return packing_supported(attn_implementation)


def packing_leak(model: PreTrainedModel, seed: int = 0) -> float:
    """Largest logit change of a sample caused by packing it behind another one.

    Runs two short random sequences separately and packed (position_ids restarting at 0, no
    attention mask, no KV cache: how TRL's padding-free collator and SFT forward call the model).
    ~0 means the attention implementation keeps packed samples apart.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    vocab = int(model.config.get_text_config().vocab_size)
    device = next(model.parameters()).device
    a = torch.randint(0, vocab, (1, 12), generator=gen).to(device)
    b = torch.randint(0, vocab, (1, 9), generator=gen).to(device)
    pos = torch.cat([torch.arange(12), torch.arange(9)]).unsqueeze(0).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(input_ids=b, use_cache=False).logits.float()
            packed = model(
                input_ids=torch.cat([a, b], 1), position_ids=pos, use_cache=False
            ).logits.float()
    finally:
        model.train(was_training)
    return float((packed[:, 12:] - alone).abs().max())


def packing_is_safe(model: PreTrainedModel) -> bool:
    import torch

    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    return packing_leak(model) <= tol


class LossLog:
    """Collects the Trainer's log entries (a TrainerCallback is built around it lazily)."""

    def __init__(self) -> None:
        self.entries: list[dict[str, float]] = []

    def callback(self) -> TrainerCallback:
        from transformers import TrainerCallback

        entries = self.entries

        class _Cb(TrainerCallback):
            def on_log(
                self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any
            ) -> None:
                if logs:
                    row = {k: float(v) for k, v in logs.items() if isinstance(v, int | float)}
                    row["step"] = float(state.global_step)
                    entries.append(row)

        return _Cb()

    def losses(self) -> list[tuple[int, float]]:
        return [(int(e["step"]), e["loss"]) for e in self.entries if "loss" in e]


def _common_args(cfg: TrainConfig, out: Path) -> dict[str, Any]:
    cuda = has_cuda()
    bf16 = bool(cuda and _bf16_ok())
    return {
        "output_dir": str(out / "checkpoints"),
        "num_train_epochs": cfg.epochs,
        "max_steps": cfg.max_steps if cfg.max_steps is not None else -1,
        "learning_rate": cfg.learning_rate(),
        "per_device_train_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "warmup_steps": cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        "lr_scheduler_type": "cosine",
        "logging_steps": cfg.logging_steps,
        "logging_first_step": True,
        "save_strategy": "no",  # the flow saves the final model itself
        "report_to": "none",
        "seed": cfg.seed,
        "bf16": bf16,
        "fp16": False,
        # Checkpointing trades ~20% time for memory; only worth it on GPU with long sequences.
        _checkpointing_arg(): cuda,
        "use_cpu": not cuda,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "average_tokens_across_devices": True,
    }


def _checkpointing_arg() -> str:
    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (the old name
    # warns); TRL still defaults the old one to True, so set whichever this version has.
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return (
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else "gradient_checkpointing"
    )


def _bf16_ok() -> bool:
    import torch

    return bool(torch.cuda.is_bf16_supported())


def lora_config(cfg: TrainConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.05,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def build_sft_trainer(
    cfg: TrainConfig,
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prepared: PreparedSFT,
    *,
    packing: bool,
    callbacks: list[TrainerCallback] | None = None,
) -> Trainer:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        **_common_args(cfg, cfg.out),
        max_length=prepared.max_seq_len,  # every row already fits: nothing is truncated
        packing=packing,
        packing_strategy="bfd",  # best-fit decreasing + padding-free: no sample is split
        padding_free=packing,
        completion_only_loss=True,
        dataset_num_proc=None,
    )
    ds = Dataset.from_list(
        [
            {"input_ids": r["input_ids"], "completion_mask": r["completion_mask"]}
            for r in prepared.rows
        ]
    )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        peft_config=lora_config(cfg) if cfg.lora else None,
        callbacks=callbacks,
    )


def build_dpo_trainer(
    cfg: TrainConfig,
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prepared: PreparedDPO,
    *,
    callbacks: list[TrainerCallback] | None = None,
) -> Trainer:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        **_common_args(cfg, cfg.out),
        max_length=prepared.max_seq_len,
        beta=cfg.dpo_beta,
    )
    return DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(prepared.rows),
        processing_class=tok,
        peft_config=lora_config(cfg) if cfg.lora else None,
        callbacks=callbacks,
    )


# --------------------------------------------------------------------------- save / export
