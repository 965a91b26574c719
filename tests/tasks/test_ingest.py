import json

import pandas as pd
import pytest

from storage.store import Store
from tasks.ingest import (
    Decontaminator,
    InputError,
    ingest_file,
    ingest_records,
    normalize,
    read_records,
)
from tests.conftest import write_jsonl


def test_normalize_folds_case_width_punctuation():
    assert normalize("  Write ＡN essay!!  about\tcats. ") == normalize("write an essay about cats")


def test_bad_records_each_get_a_reason(tmp_path):
    path = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"prompt": "Write a long story about a lighthouse keeper", "id": "a"}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"id": "no-prompt"}),
        json.dumps({"prompt": "   "}),
        json.dumps({"prompt": 42}),
        json.dumps({"prompt": "Write about seas", "length": "lots"}),
        json.dumps({"prompt": "write a LONG story about a lighthouse keeper!"}),  # duplicate
        json.dumps({"prompt": "Another story entirely", "id": "a"}),  # duplicate id
        json.dumps({"prompt": "x" * 2_000_000}),
        "",
    ]
    data = ("\n".join(lines) + "\n").encode() + b'{"prompt": "bad \xff\xfe bytes"}\n'
    path.write_bytes(data)
    result = ingest_records(read_records(path), str(path), {}, Decontaminator.from_files())
    reasons = {r.line_no: r.reason for r in result.rejections}
    assert reasons == {
        2: "invalid_json",
        3: "not_an_object",
        4: "missing_prompt",
        5: "blank_prompt",
        6: "invalid_prompt",
        7: "invalid_length",
        8: "duplicate",
        9: "duplicate_id",
        10: "too_large",
        12: "invalid_utf8",
    }
    assert [i.uid for i in result.instructions] == ["a"]
    assert result.records == 11  # the blank line is layout, not a record
    assert all(r.detail for r in result.rejections)


def test_longwriter_messages_records_and_optional_fields(tmp_path):
    path = write_jsonl(
        tmp_path / "lw.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "写一篇关于黄河的长文"},
                    {"role": "assistant", "content": "..."},
                ],
                "length": "3,000",
                "source": "lw6k",
            }
        ],
    )
    (inst,) = ingest_records(read_records(path), "f", {}, None).instructions
    assert inst.prompt == "写一篇关于黄河的长文"
    assert inst.length == 3000
    assert inst.lang == "zh"
    assert inst.source == "lw6k"
    assert inst.uid.startswith("sha-")


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
def test_other_formats(tmp_path, fmt):
    rows = [{"prompt": f"Write a detailed guide number {i}", "id": f"g{i}"} for i in range(3)]
    path = tmp_path / f"in.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    result = ingest_records(read_records(path), str(path), {}, None)
    assert [i.uid for i in result.instructions] == ["g0", "g1", "g2"]


def test_decontamination_against_longbench_write():
    decon = Decontaminator.from_files()
    bench = "Write a 1000-word China travel guide"
    assert decon.check(bench)
    assert decon.check("Please: " + bench + ", thanks")
    assert decon.check("对于雷锋精神的推文，200字以内")
    assert decon.check("Write a detailed history of medieval bread baking in France") is None


def test_ingest_file_is_idempotent_and_accounts_every_record(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [{"prompt": "Write about owls"}, "{oops", {"prompt": "Write about owls"}],
    )
    first = ingest_file(store, path)
    assert first["accepted"] == 1 and first["rejected"] == 2
    again = ingest_file(store, path)
    assert again["skipped_file"] == 1
    # a changed file is ingested again without duplicating what is stored
    path.write_text(path.read_text() + json.dumps({"prompt": "Write about bats"}) + "\n")
    third = ingest_file(store, path)
    assert third["accepted"] == 1 and third["already_stored"] == 1
    stats = store.stats()
    (src,) = stats["sources"]
    assert src["records"] == 4 == src["instructions"] + src["ingest_rejections"]
    with pytest.raises(InputError):
        ingest_file(store, tmp_path / "missing.jsonl")
