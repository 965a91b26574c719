"""Core of `longwriter train`: data normalisation, mixing, masks, length checks, packing safety,
GGUF export. Uses a tiny random Llama built offline (tests/fixtures_train.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("gguf")

from tasks.train.config import TrainConfig  # noqa: E402
from tasks.train.data import (  # noqa: E402
    Conversation,
    load_conversations,
    mix_general,
    prepare_dpo,
    prepare_sft,
    read_records,
    to_conversation,
    tokenize_conversation,
)
from tasks.train.gguf import export_gguf  # noqa: E402
from tasks.train.model import (  # noqa: E402
    ModelRef,
    embedded_base_model,
    load_model,
    load_tokenizer,
    resolve_base_model,
)
from tasks.train.run import (  # noqa: E402
    TrainReport,
    load_and_check,
    report_markdown,
    run_training,
    save_and_export,
)
from tasks.train.trainer import packing_leak  # noqa: E402
from tests.fixtures_train import (  # noqa: E402
    build_small_tokenizer,
    build_tiny_llama,
    sample_records,
    write_pairs,
    write_shards,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("tiny")
    tok = build_small_tokenizer(base / "tok")
    return build_tiny_llama(base / "model", tok)


@pytest.fixture(scope="module")
def tok(tiny: Path):
    return load_tokenizer(ModelRef(tiny))


# ----------------------------------------------------------------------------- data


def test_read_records_prefers_parquet_shards_over_jsonl_copy(tmp_path: Path) -> None:
    write_shards(tmp_path / "out", sample_records(5))
    recs = read_records(tmp_path / "out")
    assert [r["id"] for r in recs] == [f"s{i:03d}" for i in range(5)]  # not 10: one copy
    assert len(read_records(tmp_path / "out" / "jsonl")) == 5
    assert len(read_records(tmp_path / "out" / "shards" / "part-00000.parquet")) == 5


def test_to_conversation_accepts_the_common_formats() -> None:
    shard = sample_records(1)[0]
    assert to_conversation(shard, 0).messages == shard["messages"]
    assert to_conversation(shard, 0).id == "s000"
    pc = to_conversation({"prompt": "Q", "completion": "A"}, 3, "general")
    assert pc.messages == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert pc.id == "general:3"
    sg = to_conversation(
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}, 0
    )
    assert sg.messages[1] == {"role": "assistant", "content": "A"}
    ir = to_conversation({"instruction": "Q", "response": "A", "id": 7}, 0)
    assert ir.id == "7" and ir.messages[0]["content"] == "Q"
    with pytest.raises(ValueError, match="last message"):
        to_conversation({"messages": [{"role": "user", "content": "Q"}]}, 0)
    with pytest.raises(ValueError, match="no messages"):
        to_conversation({"text": "x"}, 0)


def _convs(n: int, source: str) -> list[Conversation]:
    return [
        Conversation(
            f"{source}{i}",
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            source,
        )
        for i in range(n)
    ]


def test_mix_general_hits_the_requested_share() -> None:
    mixed, stats = mix_general(_convs(30, "l"), _convs(100, "g"), 0.25, seed=1)
    assert stats.general_used == 10 and len(mixed) == 40
    assert stats.ratio_actual == pytest.approx(0.25)
    assert sum(c.source == "g" for c in mixed) == 10
    # Too few general samples: all are used and the actual share says so.
    _, short = mix_general(_convs(30, "l"), _convs(5, "g"), 0.5, seed=1)
    assert short.general_used == 5 and short.ratio_actual == pytest.approx(5 / 35)
    # No ratio: all general data; ratio 0: none.
    assert mix_general(_convs(3, "l"), _convs(4, "g"), None, seed=1)[1].general_used == 4
    assert mix_general(_convs(3, "l"), _convs(4, "g"), 0.0, seed=1)[1].general_used == 0
    # Deterministic for a seed.
    ids = [c.id for c in mix_general(_convs(30, "l"), _convs(100, "g"), 0.25, seed=1)[0]]
    assert ids == [c.id for c in mixed]


def test_train_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs --general"):
        TrainConfig(data=tmp_path, out=tmp_path, general_ratio=0.3)
    with pytest.raises(ValueError):
        TrainConfig(data=tmp_path, out=tmp_path, general=tmp_path, general_ratio=1.0)
    assert TrainConfig(data=tmp_path, out=tmp_path).learning_rate() == 2e-5
    assert TrainConfig(data=tmp_path, out=tmp_path, lora=True).learning_rate() == 2e-4
    assert TrainConfig(data=tmp_path, out=tmp_path, dpo=True).learning_rate() == 1e-6


# ----------------------------------------------------------------------------- tokenization


def test_mask_covers_only_assistant_turns_and_their_end_token(tok) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Write a short poem about the sea."},
        {"role": "assistant", "content": "Waves and light."},
        {"role": "user", "content": "Again."},
        {"role": "assistant", "content": "Quiet stone."},
    ]
    ids, mask = tokenize_conversation(tok, msgs)
    assert ids == tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == "Waves and light.<|im_end|>\nQuiet stone.<|im_end|>\n"
    prompt_part = tok.decode([i for i, m in zip(ids, mask, strict=True) if not m])
    assert "Be brief." in prompt_part and "Again." in prompt_part and "Waves" not in prompt_part


def test_prepare_sft_skips_and_reports_long_samples_never_truncates(tok) -> None:
    convs = [to_conversation(r, i) for i, r in enumerate(sample_records(6, long_id="huge"))]
    prep = prepare_sft(tok, convs, max_seq_len=128)
    assert [s.id for s in prep.skipped] == ["huge"] and prep.skipped[0].tokens > 128
    assert len(prep.rows) == 6
    for row in prep.rows:
        # Every kept row is whole: it ends with the end-of-turn token of the full template.
        full = tok.apply_chat_template(
            convs[int(row["id"][1:])].messages, tokenize=True, return_dict=True
        )["input_ids"]
        assert row["input_ids"] == full and len(full) <= 128
    assert prep.tokens == sum(len(r["input_ids"]) for r in prep.rows)


def test_prepare_dpo_conversational_and_string_pairs(tok, tmp_path: Path) -> None:
    recs = read_records(write_pairs(tmp_path / "p.jsonl", 3))
    recs.append({"id": "long", **recs[0], "chosen": [{"role": "assistant", "content": "w " * 400}]})
    recs[-1]["id"] = "long"
    prep = prepare_dpo(tok, recs, max_seq_len=128)
    assert [s.id for s in prep.skipped] == ["long"] and len(prep.rows) == 3
    assert prep.rows[0]["prompt"][0]["role"] == "user"
    strings = prepare_dpo(tok, [{"prompt": "Q: sea?", "chosen": " Waves.", "rejected": " No."}], 64)
    assert len(strings.rows) == 1 and strings.rows[0]["chosen"] == " Waves."
    with pytest.raises(ValueError, match="chosen"):
        prepare_dpo(tok, [{"prompt": "Q"}], 64)


# ----------------------------------------------------------------------------- base model


def test_resolve_base_model_forms(tiny: Path, tmp_path: Path) -> None:
    assert resolve_base_model(tiny) == ModelRef(tiny)
    emb = embedded_base_model()
    assert emb.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and emb.is_file()
    assert resolve_base_model(None) == ModelRef(emb.parent, emb.name)
    assert resolve_base_model(emb) == ModelRef(emb.parent, emb.name)
    with pytest.raises(FileNotFoundError):
        resolve_base_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="config.json"):
        resolve_base_model(tmp_path)


def test_embedded_smollm2_tokenizer_loads_from_gguf() -> None:
    tok = load_tokenizer(resolve_base_model(None))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n") and tok.eos_token == "<|im_end|>"


# ----------------------------------------------------------------------------- packing


def test_sdpa_packing_keeps_samples_apart(tiny: Path) -> None:
    # transformers>=5 turns restarting position_ids (no mask, no cache) into a block-diagonal
    # mask, so `--packing on` is leak-free with sdpa/eager too; `auto` still packs only with
    # varlen kernels because that mask costs O(L^2).
    for impl in ("sdpa", "eager"):
        model = load_model(ModelRef(tiny), attn_implementation=impl, lora=False)
        assert packing_leak(model) < 1e-4


def test_packing_probe_sees_a_leak(tiny: Path) -> None:
    """The positive control of the probe above: a model that lets the second packed sample
    attend to the first (it drops the restarting position_ids, as an attention implementation
    without packing support would) must show a leak far above the probe's tolerance."""
    import torch

    class IgnoresRestarts(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.config = inner.config

        def forward(self, input_ids: torch.Tensor, **kwargs: object) -> object:
            kwargs.pop("position_ids", None)  # one long sequence: b attends to a
            return self.inner(input_ids=input_ids, **kwargs)

    model = load_model(ModelRef(tiny), attn_implementation="sdpa", lora=False)
    assert packing_leak(IgnoresRestarts(model)) > 1e-2


# ----------------------------------------------------------------------------- training core


def test_packed_lora_sft_trains_and_saves_merged_model(tiny: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    data = write_shards(tmp_path / "data", sample_records(8))
    cfg = TrainConfig(
        data=data,
        out=tmp_path / "out",
        base_model=tiny,
        lora=True,
        lora_r=4,
        max_seq_len=256,
        lr=5e-3,
        batch_size=4,
        grad_accum=1,
        max_steps=3,
        packing="on",
        export_gguf=False,
    )
    loaded = load_and_check(cfg)
    outcome = run_training(cfg, loaded)
    assert outcome.packing and outcome.steps == 3 and len(outcome.losses) == 3
    losses = [loss for _, loss in outcome.losses]
    assert losses[-1] < losses[0], losses  # it trains: the repeated samples get likelier
    out, gguf, err = save_and_export(cfg, loaded, outcome)
    assert gguf is None and "disabled" in str(err)
    assert (out / "adapter" / "adapter_config.json").is_file()
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["use_cache"] is True
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert not any("lora" in n for n, _ in reloaded.named_parameters())


# ----------------------------------------------------------------------------- GGUF export


def test_gguf_export_matches_transformers_and_llama_cpp(tiny: Path, tok, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    gguf_path = export_gguf(tiny, tmp_path / "tiny.gguf", dtype="f32")
    model = AutoModelForCausalLM.from_pretrained(str(tiny)).eval()
    msgs = [{"role": "user", "content": "Write a short poem about the sea."}]
    enc = tok.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    # transformers' GGUF loader undoes llama.cpp's Q/K permutation: same logits means the
    # tensors, names and permutation are what llama.cpp expects.
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf_path.name).eval()
    with torch.no_grad():
        diff = (model(**enc).logits - again(**enc).logits).abs().max().item()
    assert diff < 1e-4

    llama_cpp = pytest.importorskip("llama_cpp")
    greedy = model.generate(**enc, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    hf_tokens = greedy[0, enc["input_ids"].shape[1] :].tolist()
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=128, verbose=False)
    try:
        prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        assert ids == enc["input_ids"][0].tolist()  # same tokenizer in llama.cpp
        got: list[int] = []
        for t in llm.generate(ids, top_k=1, temp=0.0):
            got.append(t)
            if len(got) == len(hf_tokens):
                break
        assert got == hf_tokens
    finally:
        llm.close()


def test_gguf_export_refuses_other_architectures(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="Llama"):
        export_gguf(tmp_path, tmp_path / "x.gguf")


def test_report_markdown_lists_skipped_ids() -> None:
    from tasks.train.data import MixStats, SkippedSample

    r = TrainReport(
        mode="sft",
        base_model="b",
        out="o",
        samples=3,
        skipped=[SkippedSample("huge", 999, "longwriter")],
        max_seq_len=128,
        packing=False,
        attn_implementation="sdpa",
        losses=[(1, 5.0), (2, 4.0)],
        steps=2,
        mix=MixStats(3, 10, 1, 0.25, 0.25),
        gguf_error="disabled",
    )
    md = report_markdown(r)
    assert "| huge | 999 | longwriter |" in md and "5.0000 → 4.0000" in md
    assert "skipped (> 128 tokens) | 1" in md and "not exported: disabled" in md


def test_load_conversations_reads_general_jsonl(tmp_path: Path) -> None:
    p = tmp_path / "g.jsonl"
    p.write_text(json.dumps({"prompt": "Q", "completion": "A"}) + "\n")
    assert load_conversations(p, "general")[0].id == "general:0"


def test_gguf_base_model_is_trainable(tiny: Path, tmp_path: Path) -> None:
    # A GGUF base (like the embedded SmolLM2) must load as plain float weights: transformers
    # otherwise keeps a GGUF quantizer on the model and the Trainer refuses to fine-tune it.
    gguf_dir = tmp_path / "gguf"
    export_gguf(tiny, gguf_dir / "tiny.gguf", dtype="f16")
    cfg = TrainConfig(
        data=write_shards(tmp_path / "data", sample_records(4)),
        out=tmp_path / "out",
        base_model=gguf_dir / "tiny.gguf",
        max_seq_len=256,
        lr=1e-3,
        batch_size=2,
        grad_accum=1,
        max_steps=2,
    )
    loaded = load_and_check(cfg)
    assert loaded.ref.gguf_file == "tiny.gguf"
    outcome = run_training(cfg, loaded)
    assert outcome.steps == 2
    (_, first), (_, last) = outcome.losses
    assert last < first, outcome.losses  # trainable: the optimizer step lowered the loss
    out, gguf, err = save_and_export(cfg, loaded, outcome)
    assert err is None and gguf is not None and (out / "model.safetensors").is_file()
