"""`longwriter publish`: the dry run lists exactly what would go and sends nothing; a real
upload through huggingface_hub's HfApi reaches a fake Hub on loopback (create repo, list,
preupload, commit) with every file byte for byte, the private flag, stale shards deleted; the
token is sent as the bearer header and never appears in anything the command prints.

Not tested here (no network): the real huggingface.co, LFS/Xet uploads of large files (the
fake answers every file "regular", so content goes inline in the commit), and the Hub's own
rendering of the card."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from flows.cli import main as cli_main
from flows.publish import planned_files
from storage.store import Store
from tasks.export import export_store
from tests.tasks.test_export import fill

TOKEN = "hf_publishTestToken_0123456789abcdef"


def _export(tmp_path: Path) -> Path:
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    fill(store, 3)
    out = tmp_path / "out"
    export_store(store, out, {"license": "apache-2.0"})
    store.close()
    (out / "stray.db").write_text("not for the Hub")  # anything unlisted stays home
    return out


class FakeHub:
    """Just enough of the Hub's HTTP API for HfApi.create_repo / list_repo_files /
    create_commit with regular (inline) files."""

    def __init__(self) -> None:
        self.files: dict[str, dict[str, bytes]] = {}
        self.created: list[dict] = []
        self.auth: set[str | None] = set()
        self.unknown: list[str] = []
        self.commits: list[list[dict]] = []
        self.validated: list[dict] = []

    def handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _json(self, obj: object, status: int = 200) -> None:
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _repo(self, parts: list[str]) -> str:
                return f"{parts[2]}/{parts[3]}"

            def do_POST(self) -> None:
                hub.auth.add(self.headers.get("Authorization"))
                parts = self.path.split("?")[0].strip("/").split("/")
                data = self._body()
                if parts[:3] == ["api", "repos", "create"]:
                    req = json.loads(data)
                    hub.created.append(req)
                    repo = f"{req.get('organization') or 'me'}/{req['name']}"
                    hub.files.setdefault(repo, {})
                    return self._json(
                        {"url": f"http://{self.headers['Host']}/datasets/{repo}", "name": repo}
                    )
                if parts == ["api", "validate-yaml"]:
                    # The Hub checks the card's YAML before a commit that changes README.md.
                    hub.validated.append(json.loads(data))
                    return self._json({"warnings": []})
                if parts[:2] == ["api", "datasets"] and parts[4] == "preupload":
                    files = json.loads(data)["files"]
                    return self._json(
                        {
                            "files": [
                                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                for f in files
                            ]
                        }
                    )
                if parts[:2] == ["api", "datasets"] and parts[4] == "commit":
                    repo = self._repo(parts)
                    lines = [json.loads(x) for x in data.decode().splitlines() if x.strip()]
                    hub.commits.append(lines)
                    for line in lines:
                        v = line["value"]
                        if line["key"] == "file":
                            hub.files[repo][v["path"]] = base64.b64decode(v["content"])
                        elif line["key"] == "deletedFile":
                            hub.files[repo].pop(v["path"], None)
                    oid = "a" * 40
                    return self._json(
                        {
                            "commitUrl": f"http://{self.headers['Host']}/datasets/{repo}/commit/{oid}",
                            "commitOid": oid,
                            "pullRequestUrl": None,
                        }
                    )
                hub.unknown.append(f"POST {self.path}")
                self._json({"error": "not faked"}, 404)

            def do_GET(self) -> None:
                hub.auth.add(self.headers.get("Authorization"))
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:2] == ["api", "datasets"] and len(parts) >= 5 and parts[4] == "tree":
                    repo = self._repo(parts)
                    return self._json(
                        [
                            {"type": "file", "path": p, "size": len(b), "oid": "b" * 40}
                            for p, b in sorted(hub.files.get(repo, {}).items())
                        ]
                    )
                hub.unknown.append(f"GET {self.path}")
                self._json({"error": "not faked"}, 404)

        return Handler

    @contextmanager
    def running(self) -> Iterator[str]:
        server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()


def test_dry_run_lists_what_would_go_and_hides_the_token(tmp_path, monkeypatch, capsys):
    out = _export(tmp_path)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert cli_main(["publish", "--out", str(out), "--repo", "me/lw", "--dry-run"]) == 0
    printed = capsys.readouterr()
    listed = [f.path for f in planned_files(out)]
    assert listed == [
        "README.md",
        "jsonl/train-00000-of-00001.jsonl",
        "manifest.json",
        "report.html",
        "shards/train-00000-of-00001.parquet",
    ]
    for path in listed:
        assert f"  {path}  " in printed.out
    assert "stray.db" not in printed.out and "s.db" not in printed.out
    assert "HF_TOKEN is set" in printed.out and "(public)" in printed.out
    assert TOKEN not in printed.out + printed.err


def test_refuses_a_tampered_or_incomplete_folder(tmp_path, monkeypatch, capsys):
    out = _export(tmp_path)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    shard = out / "jsonl" / "train-00000-of-00001.jsonl"
    shard.write_text(shard.read_text() + "{}\n")
    assert cli_main(["publish", "--out", str(out), "--repo", "me/lw", "--dry-run"]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err
    (out / "README.md").unlink()
    assert cli_main(["publish", "--out", str(out), "--repo", "me/lw"]) == 2
    assert "no README.md" in capsys.readouterr().err


def test_upload_without_token_is_refused(tmp_path, monkeypatch, capsys):
    out = _export(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert cli_main(["publish", "--out", str(out), "--repo", "me/lw"]) == 2
    assert "set HF_TOKEN" in capsys.readouterr().err


@pytest.fixture
def online(monkeypatch):
    """conftest makes huggingface_hub offline (no test reaches the real Hub); the fake is on
    loopback, so these requests may go."""
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)


def test_upload_to_a_loopback_hub(tmp_path, monkeypatch, capsys, online):
    out = _export(tmp_path)
    hub = FakeHub()
    with hub.running() as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        # An earlier publish left a shard this export no longer has.
        hub.files["me/lw"] = {"shards/train-00000-of-00003.parquet": b"old", "notes.txt": b"keep"}
        code = cli_main(["publish", "--out", str(out), "--repo", "me/lw", "--private"])
        printed = capsys.readouterr()
        assert code == 0, printed.err
    assert hub.unknown == []
    (card,) = hub.validated
    assert card["repoType"] == "dataset" and "path: shards/train-*.parquet" in card["content"]
    req = hub.created[0]
    assert req["type"] == "dataset" and req["name"] == "lw"
    assert req.get("visibility") == "private" or req.get("private") is True, req
    assert hub.auth == {f"Bearer {TOKEN}"}  # the token travels only as the header
    got = hub.files["me/lw"]
    for f in planned_files(out):
        assert got[f.path] == (out / f.path).read_bytes(), f.path
    assert "shards/train-00000-of-00003.parquet" not in got  # stale shard deleted
    assert got["notes.txt"] == b"keep"  # other remote files left alone
    assert "stray.db" not in got and len(hub.commits) == 1
    assert "published 5 file(s)" in printed.out and "deleted 1 stale" in printed.out
    assert TOKEN not in printed.out + printed.err


def test_hub_errors_are_one_line_without_the_token(tmp_path, monkeypatch, capsys, online):
    out = _export(tmp_path)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused
    assert cli_main(["publish", "--out", str(out), "--repo", "me/lw"]) == 1
    printed = capsys.readouterr()
    assert printed.err.startswith("longwriter: error: publish failed:")
    assert printed.err.count("\n") == 1 and TOKEN not in printed.out + printed.err
