"""Saving the trained model for transformers and exporting it to GGUF for llama.cpp."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

if TYPE_CHECKING:  # heavy imports only for type checkers
    import numpy as np
    from transformers import PreTrainedTokenizerBase, Trainer

logger = logging.getLogger(__name__)
T = TypeVar("T")


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
