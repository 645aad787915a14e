import hashlib
import http.server
import threading
from functools import partial

import pytest

from catdog.download import download
from catdog.errors import CatdogError


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with HTTP Range support (the standard library's server ignores Range)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.translate_path(self.path)
        try:
            data = open(path, "rb").read()
        except OSError:
            self.send_error(404)
            return
        start = 0
        if "Range" in self.headers:
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


@pytest.fixture
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(served)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_resumes_and_verifies(server, tmp_path):
    served, base = server
    payload = bytes(range(256)) * 4000
    (served / "archive.zip").write_bytes(payload)
    dest = tmp_path / "out" / "archive.zip"
    dest.parent.mkdir()
    (dest.parent / "archive.zip.part").write_bytes(payload[:100_000])  # an interrupted earlier download
    sha = hashlib.sha256(payload).hexdigest()
    assert download(f"{base}/archive.zip", dest, sha256=sha, size=len(payload)).read_bytes() == payload
    assert not (dest.parent / "archive.zip.part").exists()
    assert download(f"{base}/archive.zip", dest, sha256=sha) == dest  # already complete: nothing fetched


def test_checksum_mismatch_and_unreachable(server, tmp_path):
    served, base = server
    (served / "a.bin").write_bytes(b"x" * 1000)
    with pytest.raises(CatdogError, match="checksum mismatch"):
        download(f"{base}/a.bin", tmp_path / "a.bin", sha256="0" * 64)
    assert not (tmp_path / "a.bin").exists()
    with pytest.raises(CatdogError, match="HTTP 404"):
        download(f"{base}/missing.bin", tmp_path / "m.bin")
    with pytest.raises(CatdogError, match="Offline"):
        download("http://127.0.0.1:9/none.zip", tmp_path / "n.zip", timeout=2)
