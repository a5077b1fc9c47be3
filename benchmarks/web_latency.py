"""The web page's speed: a slider move (POST /api/decode) against the bare decoder call it wraps, and 50 concurrent
requests, on a real `facevae serve` (uvicorn) on 127.0.0.1.

The deck's network (Config(): 64x64x3, widths 32-512, latent 128) with random weights (latency does not depend on
their values) and 40 attribute vectors, so that each slider request carries three edits as the page sends them.
Goal: a slider move redraws in under 100 ms on a CPU. Measured side by side in one run:
  - bare: in this process, the decoder at batch 1 plus the PNG encoding (what the server does for one face);
  - api: the same face through HTTP, one request at a time on a kept-alive connection (as the page sends them);
  - load: 50 requests at once, each on its own connection (20 decodes, 15 samples, 10 photo uploads, 5 infos).

    python benchmarks/web_latency.py [--requests 100] [--concurrent 50]

Prints a table on stderr and one JSON object on the last line of stdout. Needs the web extra.

The server decodes one face at a time with one torch thread: on an oversubscribed CPU (more runnable processes than
cores, as on a shared 2-core machine), two OpenMP threads made the same decode 100x slower here (0.4-1.1 s against
3-16 ms: OpenMP's worker spins at each barrier while the other thread waits for a core). The bare figure is taken
the same way: one torch thread, in a worker thread, as the server runs it.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save as st_save

from facevae.attributes import INDEX_FILE, VECTORS_FILE, model_digest
from facevae.checkpoint import save_model
from facevae.config import Config
from facevae.model import VAE
from facevae.run import Run

ATTRIBUTES = 40  # CelebA's


def make_run(run_dir: Path) -> Config:
    """A 64x64 run of the deck's network with random weights and random attribute vectors."""
    torch.manual_seed(0)
    config = Config(image_size=64, channels=3).validate()
    vae = VAE(config).eval()
    run_dir.mkdir(parents=True)
    save_model(vae, run_dir / "model.safetensors")
    vectors = torch.randn(ATTRIBUTES, config.latent_dim) * 0.5  # in the latent tools' format (facevae.attributes)
    names = [f"attribute_{i}" for i in range(ATTRIBUTES)]
    digest = model_digest(Run(run_dir))
    metadata = {"format": "facevae-attributes", "names": json.dumps(names), "model_sha256": digest}
    count = torch.ones(ATTRIBUTES, dtype=torch.int64)
    tensors = {"plain": vectors, "balanced": vectors.clone(), "positives": count, "negatives": count.clone(),
               "is_balanced": torch.ones(ATTRIBUTES, dtype=torch.uint8)}
    (run_dir / VECTORS_FILE).write_bytes(st_save(tensors, metadata=metadata))
    (run_dir / INDEX_FILE).write_text(json.dumps({"model_sha256": digest, "attributes": []}))
    return config


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(round(q * len(ordered))) - 1)]


def bare_decode_ms(run_dir: Path, config: Config, n: int) -> list[float]:
    """Decoder at batch 1 + PNG encoding, in this process, as the server's studio does it: in a worker thread (on
    a busy machine, OpenMP's spinning makes the main thread's calls many times slower: see --help)."""
    from facevae.web.studio import Studio

    studio = Studio(run_dir)
    torch.set_num_threads(1)  # as `facevae serve` does once the run is loaded
    z = torch.randn(config.latent_dim)

    def one() -> float:
        t0 = time.perf_counter()
        studio.png(z)
        return 1000 * (time.perf_counter() - t0)

    with ThreadPoolExecutor(max_workers=1) as pool:
        return [pool.submit(one).result() for _ in range(n)]


def api_decode_ms(url: str, config: Config, n: int) -> list[float]:
    """POST /api/decode with three slider edits, one at a time on one kept-alive connection."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    times = []
    for i in range(n):
        body = json.dumps({"latent": torch.randn(config.latent_dim).tolist(),
                           "edits": {"attribute:attribute_3": 0.1 * (i % 20), "attribute:attribute_7": -1.0,
                                     "attribute:attribute_20": 0.5}})
        t0 = time.perf_counter()
        conn.request("POST", "/api/decode", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        times.append(1000 * (time.perf_counter() - t0))
        assert response.status == 200 and data.startswith(b"\x89PNG"), (response.status, data[:100])
    conn.close()
    return times


def one_request(url: str, method: str, path: str, body: bytes | None, headers: dict) -> tuple[int, float]:
    u = urlparse(url)
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status, 1000 * (time.perf_counter() - t0)


def load_ms(url: str, config: Config, concurrent: int) -> list[tuple[int, float]]:
    """`concurrent` requests at once, of the page's kinds, each on its own connection."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buf, "JPEG")
    boundary = uuid.uuid4().hex
    upload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"me.jpg\"\r\n"
              f"Content-Type: image/jpeg\r\n\r\n").encode() + buf.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    latent = json.dumps({"latent": [0.1] * config.latent_dim, "edits": {"attribute:attribute_1": 1.0}}).encode()
    kinds = [("POST", "/api/decode", latent, {"Content-Type": "application/json"})] * 20 \
        + [("GET", f"/api/sample?seed={i}&temperature=0.8", None, {}) for i in range(15)] \
        + [("POST", "/api/encode", upload, {"Content-Type": f"multipart/form-data; boundary={boundary}"})] * 10 \
        + [("GET", "/api/info", None, {})] * 5
    jobs = [kinds[i % len(kinds)] for i in range(concurrent)]
    with ThreadPoolExecutor(max_workers=concurrent) as pool:
        return list(pool.map(lambda job: one_request(url, *job), jobs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=100, help="slider requests timed one at a time")
    p.add_argument("--concurrent", type=int, default=50, help="requests sent at once in the load test")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run64"
        config = make_run(run_dir)
        server = subprocess.Popen([sys.executable, "-m", "facevae", "serve", str(run_dir), "--port", "0"],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
        try:
            url = server.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:"), url
            api_decode_ms(url, config, 10)  # warm-up: first calls allocate
            bare = bare_decode_ms(run_dir, config, args.requests)
            api = api_decode_ms(url, config, args.requests)
            load = load_ms(url, config, args.concurrent)
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(30)
    answered = [t for status, t in load if status == 200]
    result = {
        "model": f"{config.image_size}x{config.image_size}x{config.channels}, widths {config.widths}, "
                 f"latent {config.latent_dim}",
        "bare_decode_ms_median": statistics.median(bare), "api_decode_ms_median": statistics.median(api),
        "api_decode_ms_p95": percentile(api, 0.95), "api_over_bare": statistics.median(api) / statistics.median(bare),
        "slider_goal_ms": 100, "slider_ratio_to_goal": percentile(api, 0.95) / 100,
        "concurrent": args.concurrent, "answered": len(answered),
        "concurrent_ms_median": statistics.median(answered) if answered else None,
        "concurrent_ms_p95": percentile(answered, 0.95) if answered else None,
        "torch_threads": 1, "cpus": os.cpu_count(),
    }
    print(f"model {result['model']} (random weights), torch {torch.__version__}, {os.cpu_count()} CPUs",
          file=sys.stderr)
    print(f"slider move, bare decoder + PNG: median {result['bare_decode_ms_median']:.1f} ms", file=sys.stderr)
    print(f"slider move through the API:     median {result['api_decode_ms_median']:.1f} ms, p95 "
          f"{result['api_decode_ms_p95']:.1f} ms  ({result['api_over_bare']:.2f}x bare; goal < 100 ms: "
          f"p95 = {result['slider_ratio_to_goal']:.2f} of it)", file=sys.stderr)
    print(f"{args.concurrent} concurrent requests: {len(answered)} answered 200, median "
          f"{result['concurrent_ms_median']:.0f} ms, p95 {result['concurrent_ms_p95']:.0f} ms", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
