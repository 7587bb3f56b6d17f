"""Downloads against a local HTTP server: retries, resume via Range, checksums; safe unpacking."""

import dataclasses
import gzip
import hashlib
import http.server
import io
import tarfile
import threading
import zipfile

import numpy as np
import pytest

from capsdist.data import read_meta
from data_tools import DataToolError, make_mnist
from data_tools import download as dl
from data_tools.converters import CONVERTERS
from tests.unit.test_data_idx import write_mnist


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    drops: dict[str, int] = {}  # path → how many more GETs to cut off half-way
    log: list[tuple[str, str | None]] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        body = self.files.get(self.path)
        self.log.append((self.path, self.headers.get("Range")))
        if body is None:
            self.send_error(404)
            return
        start = 0
        if rng := self.headers.get("Range"):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        part = body[start:]
        if self.drops.get(self.path, 0) > 0:
            self.drops[self.path] -= 1
            self.wfile.write(part[: len(part) // 2])  # then hang up: a broken connection
            self.close_connection = True
            return
        self.wfile.write(part)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Handler.files, _Handler.drops, _Handler.log = {}, {}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler
    httpd.shutdown()
    httpd.server_close()


def md5(data):
    return hashlib.md5(data).hexdigest()


def test_interrupted_download_is_retried_and_resumed_with_range(server, tmp_path):
    url, handler = server
    body = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    handler.files["/f.bin"] = body
    handler.drops["/f.bin"] = 2
    path = dl.fetch(f"{url}/f.bin", tmp_path / "f.bin", md5(body), backoff=0.01, progress=False)
    assert path.read_bytes() == body and not (tmp_path / "f.bin.part").exists()
    ranges = [r for p, r in handler.log if p == "/f.bin"]
    assert ranges[0] is None and ranges[1] == "bytes=150000-" and len(ranges) == 3


def test_checksum_mismatch_is_a_clear_error_and_leaves_nothing(server, tmp_path):
    url, handler = server
    handler.files["/f.bin"] = b"not what was published"
    with pytest.raises(
        DataToolError, match=r"f.bin: checksum mismatch \(md5 [0-9a-f]{32}, expected 0{32}"
    ):
        dl.fetch(f"{url}/f.bin", tmp_path / "f.bin", "0" * 32, progress=False)
    assert not list(tmp_path.iterdir())
    with pytest.raises(DataToolError, match="HTTP 404"):
        dl.fetch(f"{url}/missing", tmp_path / "m", None, progress=False)


def test_mnist_without_src_downloads_checks_and_converts(server, tmp_path, monkeypatch):
    url, handler = server
    src = tmp_path / "src"
    write_mnist(src, np.random.default_rng(1), n_train=30, n_test=10, gz=True)
    sources = []
    for path in sorted(src.iterdir()):
        handler.files["/" + path.name] = path.read_bytes()
        sources.append(dl.Source(f"https://example.invalid/{path.name}", md5(path.read_bytes())))
    mnist = dataclasses.replace(CONVERTERS["mnist"], sources=tuple(sources))
    monkeypatch.setitem(CONVERTERS, "mnist", mnist)  # this test's files and their md5s
    handler.drops["/" + sources[0].name] = 1
    result = make_mnist(None, tmp_path / "out", mirror=url, progress=False)
    assert result["splits"] == {"train": 30, "test": 10}
    assert read_meta(tmp_path / "out")["splits"] == {"train": 30, "test": 10}


def _tar_with(tmp_path, name, kind=tarfile.REGTYPE):
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("good/ok.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        bad = tarfile.TarInfo(name)
        bad.type = kind
        if kind == tarfile.SYMTYPE:
            bad.linkname = "/etc/passwd"
        else:
            bad.size = 4
        tar.addfile(bad, io.BytesIO(b"evil") if kind == tarfile.REGTYPE else None)
    return path


@pytest.mark.parametrize(
    "name,kind",
    [
        ("../escaped.txt", tarfile.REGTYPE),
        ("good/../../escaped.txt", tarfile.REGTYPE),
        ("/tmp/capsdist_escaped.txt", tarfile.REGTYPE),
        ("good/link", tarfile.SYMTYPE),
    ],
)
def test_tar_extraction_refuses_path_traversal_and_links(tmp_path, name, kind):
    archive = _tar_with(tmp_path, name, kind)
    dest = tmp_path / "a" / "dest"
    with pytest.raises(DataToolError, match="refused"):
        dl.safe_extract(archive, dest)
    assert not (tmp_path / "a" / "escaped.txt").exists() and not (dest / "good" / "link").exists()


def test_zip_extraction_refuses_path_traversal(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("fine/a.txt", "a")
        z.writestr("../../escaped.txt", "evil")
    with pytest.raises(DataToolError, match="outside"):
        dl.safe_extract(archive, tmp_path / "x" / "dest")
    assert not (tmp_path / "escaped.txt").exists()
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as z:
        z.writestr("d/a.bin", gzip.compress(b"x"))
    assert (dl.safe_extract(good, tmp_path / "g") / "d" / "a.bin").is_file()
