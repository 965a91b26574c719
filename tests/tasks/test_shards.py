"""The shard writer (tasks.shards): its parquet tables come from the jsonl lines through
Arrow's JSON reader, and must be what pa.Table.from_pylist gives, down to the file's bytes;
where the two could differ it takes from_pylist."""

import copy
import hashlib
import json
import random
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tasks.shards as shards
from tasks.eval.scoring import DIMENSIONS
from tasks.shards import SCHEMA, _arrow_table, export_shards
from tests.fake_openai import prose

BASE = {
    "messages": [{"role": "user", "content": "Write"}, {"role": "assistant", "content": "Text"}],
    "id": "u1",
    "instruction": "Write",
    "response": "Text",
    "words": 1800,
    "plan": [{"main_point": "Part 1", "word_count": 300}],
    "model": "m",
    "prompt_version": "plan@x,write@y",
    "source": "src",
    "quality": None,
    "length_score": 87.5,
}


def record(i: int, rng: random.Random) -> dict:
    zh = i % 5 == 0
    text = "\n\n".join(prose(f"r{i}|{k}", 120, chinese=zh) for k in range(3))
    rec = copy.deepcopy(BASE)
    rec.update(
        id=f"u{i}",
        instruction=f'Write piece {i} «quoted» "x" \\ tab\t',
        response=text,
        messages=[
            {"role": "user", "content": f"Write {i}"},
            {"role": "assistant", "content": text},
        ],
        words=rng.randrange(0, 40_000),
        plan=[{"main_point": f"点 {k} 😀", "word_count": 300 + k} for k in range(i % 4)],
        length_score=None if i % 7 == 0 else rng.random() * 10 ** rng.randint(-300, 300),
        quality=None
        if i % 3
        else {d: rng.choice((rng.uniform(1, 5), 4, None)) for d in (*DIMENSIONS, "S_q")},
    )
    if i % 11 == 0:
        rec["quality"] = {"S_q": 70, "judge_note_not_in_schema": "x"}  # extra key, missing ones
    return rec


def lines_of(batch: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in batch)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


class CountingArrow:
    """tasks.shards' pyarrow with from_pylist counted."""

    def __init__(self) -> None:
        self.from_pylist_calls = 0
        self.Table = SimpleNamespace(from_pylist=self._from_pylist)

    def _from_pylist(self, *args, **kwargs):
        self.from_pylist_calls += 1
        return pa.Table.from_pylist(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(pa, name)


@pytest.fixture
def counting(monkeypatch):
    arrow = CountingArrow()
    monkeypatch.setattr(shards, "pa", arrow)
    return arrow


def test_json_route_gives_from_pylists_table(counting):
    rng = random.Random(3)
    batch = [record(i, rng) for i in range(1, 120)]
    table = _arrow_table(batch, lines_of(batch))
    assert counting.from_pylist_calls == 0  # the JSON route was taken
    expected = pa.Table.from_pylist(batch, schema=SCHEMA)
    assert table.schema.equals(expected.schema)
    assert table.equals(expected)
    assert all(c.num_chunks == 1 for c in table.columns)


def test_parquet_bytes_equal_from_pylists(tmp_path):
    rng = random.Random(4)
    batches = [[record(200 * b + i, rng) for i in range(1, 60)] for b in range(3)]
    for name, make in (
        ("pylist.parquet", lambda b: pa.Table.from_pylist(b, schema=SCHEMA)),
        ("json.parquet", lambda b: _arrow_table(b, lines_of(b))),
    ):
        writer = pq.ParquetWriter(tmp_path / name, SCHEMA, compression="zstd")
        for batch in batches:
            writer.write_table(make(batch))
        writer.close()
    digest = [
        hashlib.sha256((tmp_path / n).read_bytes()).hexdigest()
        for n in ("pylist.parquet", "json.parquet")
    ]
    assert digest[0] == digest[1]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("length_score", float("nan")),  # JSON has no NaN
        ("length_score", float("inf")),
        ("length_score", 2**53 + 1),  # from_pylist refuses it; JSON would round it
        ("quality", {"S_q": 2**60}),
        ("words", 12.0),  # from_pylist takes an integral float, Arrow's JSON reader does not
        ("plan", [{"main_point": "p", "word_count": 300.0}]),
        ("quality", {"S_q": True}),
    ],
)
def test_values_json_cannot_carry_take_from_pylist(counting, field, value):
    batch = [copy.deepcopy(BASE), {**copy.deepcopy(BASE), field: value}]
    try:
        expected = pa.Table.from_pylist(batch, schema=SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
        with pytest.raises(type(exc)):
            _arrow_table(batch, lines_of(batch))
    else:  # bytes, not Table.equals: a NaN equals nothing
        assert parquet_bytes(_arrow_table(batch, lines_of(batch))) == parquet_bytes(expected)
    assert counting.from_pylist_calls == 1  # the fallback, for the batch with the value


def test_a_lone_surrogate_fails_as_before(tmp_path):
    batch = [{**copy.deepcopy(BASE), "response": "half \ud800 a pair"}]
    with pytest.raises(UnicodeEncodeError):
        export_shards(batch, 1, tmp_path / "out")


def test_export_shards_jsonl_lines_are_json_dumps_of_each_record(tmp_path):
    rng = random.Random(5)
    records = [record(i, rng) for i in range(1, 30)]
    manifest = export_shards(records, len(records), tmp_path / "out", shard_size=10, write_batch=4)
    jsonl = sorted((tmp_path / "out" / "jsonl").iterdir())
    assert "".join(p.read_text(encoding="utf-8") for p in jsonl) == lines_of(records)
    rows = [
        r
        for p in sorted((tmp_path / "out" / "shards").iterdir())
        for r in pq.read_table(p).to_pylist()
    ]
    assert rows == pa.Table.from_pylist(records, schema=SCHEMA).to_pylist()
    assert manifest["counts"]["samples"] == len(records)
