"""`facevae serve` as a user runs it: a real uvicorn on 127.0.0.1 (an ephemeral port), Ctrl-C, limits enforced on the
wire, and a bounded load test of 50 concurrent requests."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pytest
import torch

pytest.importorskip("starlette", reason="the web extra is not installed: pip install 'facevae[web]'")
pytest.importorskip("uvicorn", reason="the web extra is not installed: pip install 'facevae[web]'")
pytest.importorskip("multipart", reason="the web extra is not installed: pip install 'facevae[web]'")

from facevae.cli import main  # noqa: E402
from facevae.web import server  # noqa: E402
from web_helpers import make_run, photo_bytes, serving  # noqa: E402

UPLOAD_MB = 0.25  # the served limit in these tests: 262,144 bytes


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("web-server") / "run")


@pytest.fixture(scope="module")
def served(run_dir, tmp_path_factory):
    with serving(run_dir, tmp_path_factory.mktemp("log") / "serve.log", "--max-upload-mb", str(UPLOAD_MB)) as s:
        yield s


def address(url: str) -> tuple[str, int]:
    u = urlparse(url)
    return u.hostname, u.port


def request(url: str, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, bytes, float]:
    """One request on its own connection: (status, body, seconds)."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection(*address(url), timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read(), time.perf_counter() - started
    finally:
        conn.close()


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, dict[str, str]]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_serve_binds_the_loopback_prints_the_url_and_stops_on_ctrl_c(run_dir, tmp_path):
    log = tmp_path / "serve.log"
    with serving(run_dir, log) as (url, proc):
        assert url.startswith("http://127.0.0.1:")
        status, body, _ = request(url, "GET", "/api/info")
        assert status == 200 and json.loads(body)["run"] == run_dir.name
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    err = log.read_text()
    assert "facevae: stopped" in err and "Traceback" not in err and "warning" not in err
    with pytest.raises(OSError):  # nothing listens there any more
        socket.create_connection(address(url), timeout=2).close()


def test_a_host_beyond_the_loopback_warns(run_dir, monkeypatch, capsys):
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)  # bind, warn, but serve nothing
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep this test process's threads
    server.serve(run_dir, host="0.0.0.0", port=0)
    out, err = capsys.readouterr()
    assert "warning: serving on 0.0.0.0" in err and "anyone who can reach it on that network" in err
    assert out.startswith("http://0.0.0.0:")
    assert server.is_loopback("127.0.0.1") and server.is_loopback("localhost") and server.is_loopback("::1")
    assert not server.is_loopback("0.0.0.0")


def test_serve_mistakes_are_one_line(run_dir, tmp_path, capsys, monkeypatch):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        assert main(["serve", str(run_dir), "--port", str(busy.getsockname()[1])]) == 2
        assert "pick another with --port" in capsys.readouterr().err
    finally:
        busy.close()
    for argv, message in [(["serve", str(tmp_path / "nothing"), "--port", "0"], "does not exist"),
                          (["serve", str(run_dir), "--port", "70000"], "--port must be from 0 to 65535"),
                          (["serve", str(run_dir), "--max-upload-mb", "0", "--port", "0"], "must be positive")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.setitem(__import__("sys").modules, "uvicorn", None)  # as if the web extra were not installed
    assert main(["serve", str(run_dir)]) == 2
    assert "pip install 'facevae[web]'" in capsys.readouterr().err


def test_an_oversized_upload_is_refused_before_it_is_read_whole(served):
    url, _ = served
    limit = int(UPLOAD_MB * 1024 * 1024)
    status, body, _ = request(url, "POST", "/api/encode", b"", {
        "Content-Type": "multipart/form-data; boundary=x", "Content-Length": str(100 * limit)})
    assert status == 413 and "over the limit" in json.loads(body)["error"]  # said at once, no body needed
    # Chunked, with no length: the server counts while the body streams and answers 413 although the body never
    # ends (a server that read it whole first would wait forever).
    with socket.create_connection(address(url), timeout=20) as s:
        s.sendall(b"POST /api/encode HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Type: multipart/form-data; boundary=x\r\n\r\n")
        part = (b'--x\r\nContent-Disposition: form-data; name="image"; filename="huge.jpg"\r\n'
                b"Content-Type: image/jpeg\r\n\r\n")
        s.sendall(b"%x\r\n" % len(part) + part + b"\r\n")  # a valid start; then the file's bytes, without end
        chunk = b"\xff" * 65536
        sent = 0
        try:
            while sent < 2 * limit:
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed the connection once it had answered
        answer = b""
        while not answer.endswith(b"}"):  # the JSON error, whole
            more = s.recv(65536)
            if not more:
                break
            answer += more
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"over the limit" in answer


def test_fifty_concurrent_requests_are_all_answered(served, capsys):
    """A bounded load test on 127.0.0.1: 50 requests at once (decodes, samples, uploads, infos), each on its own
    connection; all answered 200. Prints the latencies' median and 95th percentile."""
    url, proc = served
    latent = json.dumps({"latent": [0.1] * 8, "edits": {"pc:1": 1.0}}).encode()
    upload, upload_headers = multipart("image", "me.jpg", photo_bytes(640, 480))
    jobs = ([("POST", "/api/decode", latent, {"Content-Type": "application/json"})] * 20
            + [("GET", f"/api/sample?seed={i}&temperature=0.8", None, {}) for i in range(15)]
            + [("POST", "/api/encode", upload, upload_headers)] * 10
            + [("GET", "/api/info", None, {})] * 5)
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda job: request(url, *job), jobs))
    statuses = [status for status, _, _ in results]
    assert statuses == [200] * 50, statuses
    seconds = sorted(t for _, _, t in results)
    p95 = seconds[int(0.95 * len(seconds)) - 1]
    with capsys.disabled():
        print(f"\n50 concurrent requests: median {1000 * statistics.median(seconds):.0f} ms, "
              f"p95 {1000 * p95:.0f} ms, max {1000 * seconds[-1]:.0f} ms")
    assert proc.poll() is None  # still up
    assert request(url, "GET", "/api/info")[0] == 200
