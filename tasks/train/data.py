"""Training data: shards read as conversations, the general-data mix, tokenized with the base
model's chat template (loss on assistant tokens only); over-long samples skipped and reported."""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # heavy imports only for type checkers
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)
T = TypeVar("T")


def data_files(path: Path) -> list[Path]:
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
    for f in data_files(Path(path)):
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


def _warn_skipped(what: str, skipped: list[SkippedSample], max_seq_len: int) -> None:
    if skipped:
        logger.warning(
            "%d %s longer than max_seq_len=%d skipped: %s",
            len(skipped),
            what,
            max_seq_len,
            ", ".join(s.id for s in skipped),
        )


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
    _warn_skipped("sample(s)", skipped, max_seq_len)
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
    _warn_skipped("pair(s)", skipped, max_seq_len)
    return PreparedDPO(rows, skipped, max_seq_len)


# --------------------------------------------------------------------------- trainers
