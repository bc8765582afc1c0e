"""Shards: build from text, layout, clear errors, HTTP download with retries and resume."""

import http.server
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset
from nanochat.dataset import DatasetError, chunk_table, list_shards, read_row_group, val_chunks


def test_demo_data_layout(demo_data):
    shards = list_shards(demo_data)
    assert len(shards) >= 3
    for path in shards[:-1]:
        assert pq.ParquetFile(path).metadata.num_row_groups >= 2
    chunks = chunk_table(demo_data)
    assert {c.shard for c in chunks} == {
        dataset.shard_index(p) for p in shards[:-1]
    }  # val excluded
    assert sum(c.rows for c in val_chunks(demo_data)) >= 1
    texts = read_row_group(demo_data, chunks[0].shard, chunks[0].row_group)
    assert len(texts) == chunks[0].rows and all(isinstance(t, str) and t for t in texts)


def test_from_text_cli(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(30):
        (src / "sub" / f"doc{i}.txt").write_text(
            f"Document {i}.\n\nIt has two paragraphs, number {i}."
        )
    (src / "ignored.bin").write_bytes(b"\x00\x01")
    out = tmp_path / "out"
    assert (
        dataset.main(
            [
                "from-text",
                str(src),
                "--out",
                str(out),
                "--shard-docs",
                "10",
                "--row-group-size",
                "4",
            ]
        )
        == 0
    )
    shards = list_shards(out)
    assert len(shards) == 4  # 28 training docs in shards of 10, then validation
    texts = [t for p in shards for t in pq.read_table(p).column("text").to_pylist()]
    assert sorted(texts) == sorted(
        f"Document {i}.\n\nIt has two paragraphs, number {i}." for i in range(30)
    )
    assert "training shards" in capsys.readouterr().out


def test_long_documents_are_split_at_paragraphs():
    text = "\n\n".join(f"paragraph {i} " + "x" * 50 for i in range(100))
    pieces = dataset.split_document(text, max_chars=500)
    assert len(pieces) > 10 and all(len(p) <= 500 for p in pieces)
    assert "\n\n".join(pieces) == text


def test_empty_text_is_an_error(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("   \n\n  ")
    with pytest.raises(DatasetError, match="no text found"):
        dataset.texts_from_paths([tmp_path / "empty.txt"])
    assert (
        dataset.main(["from-text", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o")]) == 2
    )
    assert "error: no text found" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="no such file"):
        dataset.texts_from_paths([tmp_path / "missing.txt"])


def test_missing_and_corrupt_shards(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        list_shards(tmp_path / "nope")
    with pytest.raises(DatasetError, match="need at least 2"):
        list_shards(tmp_path)
    dataset.write_shards([f"doc {i}" for i in range(10)], tmp_path, shard_docs=4, row_group_size=2)
    (tmp_path / "shard_00000.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DatasetError, match="shard_00000.parquet: not a readable parquet"):
        chunk_table(tmp_path)
    with pytest.raises(DatasetError, match="missing shard"):
        read_row_group(tmp_path, 7, 0)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "shard_00001.parquet")
    with pytest.raises(DatasetError, match="no `text` column"):
        read_row_group(tmp_path, 1, 0)


# ---------------------------------------------------------------------------- download


class ShardHandler(http.server.BaseHTTPRequestHandler):
    """Serves files from `root` with Range support; failure modes set on the server."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append(self.headers.get("Range"))
        path = srv.root / self.path.lstrip("/")
        if srv.fail_first and len(srv.requests) == 1:
            self.send_error(503, "try again")
            return
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut_first and len(srv.requests) == 1:
            self.wfile.write(body[: len(body) // 2])  # connection drops mid-body
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def shard_server(tmp_path):
    root = tmp_path / "remote"
    root.mkdir()
    dataset.write_shards(
        [f"remote document {i} " * 20 for i in range(40)], root, shard_docs=20, row_group_size=8
    )
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ShardHandler)
    srv.root, srv.requests, srv.fail_first, srv.cut_first = root, [], False, False
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def same_files(a: Path, b: Path):
    names = sorted(p.name for p in a.glob("shard_*.parquet"))
    assert names == sorted(p.name for p in b.glob("shard_*.parquet"))
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_download(shard_server, tmp_path):
    srv, url = shard_server
    out = tmp_path / "dl"
    assert dataset.main(["download", "--num", "3", "--base-url", url, "--out", str(out)]) == 0
    same_files(srv.root, out)
    assert not list(out.glob("*.part"))
    n = len(srv.requests)
    dataset.download(3, out, url)  # already there: no requests
    assert len(srv.requests) == n


def test_download_resumes_partial_file(shard_server, tmp_path):
    srv, url = shard_server
    out = tmp_path / "dl"
    out.mkdir()
    full = (srv.root / "shard_00000.parquet").read_bytes()
    (out / "shard_00000.parquet.part").write_bytes(full[:1000])
    dataset.download_file(f"{url}/shard_00000.parquet", out / "shard_00000.parquet")
    assert srv.requests == ["bytes=1000-"]
    assert (out / "shard_00000.parquet").read_bytes() == full


def test_download_retries_after_failure_and_dropped_connection(shard_server, tmp_path):
    srv, url = shard_server
    srv.fail_first = True
    dest = tmp_path / "a.parquet"
    dataset.download_file(f"{url}/shard_00000.parquet", dest, backoff=0.01)
    assert (
        srv.requests == [None, None]
        and dest.read_bytes() == (srv.root / "shard_00000.parquet").read_bytes()
    )

    srv.requests.clear()
    srv.fail_first, srv.cut_first = False, True
    dest = tmp_path / "b.parquet"
    dataset.download_file(f"{url}/shard_00001.parquet", dest, backoff=0.01)
    assert srv.requests[0] is None and srv.requests[1].startswith(
        "bytes="
    )  # resumed, not restarted
    assert dest.read_bytes() == (srv.root / "shard_00001.parquet").read_bytes()


def test_download_errors(shard_server, tmp_path):
    _, url = shard_server
    with pytest.raises(DatasetError, match="HTTP 404"):
        dataset.download_file(f"{url}/shard_09999.parquet", tmp_path / "x.parquet")
    with pytest.raises(DatasetError, match="at least 2"):
        dataset.download(1, tmp_path, url)
