"""Time to share a run: `facevae export --onnx` of the 64x64 model and `facevae report`, against their targets.

Targets: export under 30 s on a CPU, a report under 5 s. Measured as a user meets them: the `facevae` command in a
fresh process (so Python, torch and matplotlib start-up count), best of `--repeats`, run in turns. The run is the
deck's default network (Config(): 64x64x3, widths 32-512, latent 128; 3.9 M parameters) with random weights (export
time does not depend on their values), a CelebA-sized metrics.jsonl (50 epochs of 25 logged steps, as
log_every = 100 gives on CelebA's 162,770 images at batch 64), 64x64 grids of 32 faces, and an eval.json.

    python benchmarks/share.py [--repeats 3]

Prints a table on stderr and one JSON object on the last line of stdout: wall-clock and CPU seconds, and wall-clock
seconds / target (below 1 meets the target).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from facevae.checkpoint import save_model
from facevae.config import Config
from facevae.images import grid, pairs, save_png
from facevae.model import VAE

TARGETS = {"export": 30.0, "report": 5.0}


def make_run(run: Path) -> None:
    """A 64x64 run directory: model, config, metrics.jsonl, grids, eval.json."""
    config = Config(data="celeba:/data/celeba", image_size=64, channels=3).validate()
    torch.manual_seed(0)
    vae = VAE(config).eval()
    run.mkdir(parents=True)
    save_model(vae, run / "model.safetensors")
    (run / "config.toml").write_text(config.to_toml())
    rng = random.Random(0)
    lines, step = [], 0
    for epoch in range(1, 51):
        for _ in range(25):
            step += 100
            lines.append({"kind": "step", "step": step, "epoch": epoch, "train_loss": 300 / epoch + rng.random(),
                          "train_elbo": -300 / epoch, "train_psnr": 20 + epoch / 10, "img_per_s": 700.0})
        lines.append({"kind": "epoch", "epoch": epoch, "step": step, "train_elbo": -300 / epoch,
                      "train_kl": 40.0, "train_psnr": 20 + epoch / 10, "test_elbo_nats": -310 / epoch,
                      "test_kl_nats": 41.0, "test_elbo_bpd": 4 + 1 / epoch, "test_psnr_db": 20 + epoch / 11})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with torch.no_grad():
        faces = vae.sample(32, generator=torch.Generator().manual_seed(1))
    save_png(grid(pairs(faces, faces)), run / "images" / "reconstructions.png")
    save_png(grid(faces), run / "images" / "samples.png")
    report = {"elbo_nats": -6.2, "recon_nats": 30.1, "kl_nats": 36.3, "nll_iw_nats": 5.0, "nll_iw_stderr": 0.5,
              "iw_samples": 100, "elbo_bpd": 4.02, "nll_iw_bpd": 4.0, "loss_nats": 6.2, "kl_weight": 1.0,
              "psnr_db": 24.0, "ssim": 0.7, "mse": 0.004, "active_units": 60, "latent_dim": 128,
              "likelihood": "gaussian", "split": "test", "images": 19962}
    (run / "eval.json").write_text(json.dumps(report))


def timed(argv: list[str]) -> tuple[float, float]:
    """Wall-clock and CPU (user + system, all threads) seconds of one `python -m facevae ARGV` in a fresh process.
    On a machine shared with other work the wall clock grows with the load; the CPU time much less."""
    r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run([sys.executable, "-m", "facevae", *argv], check=True, capture_output=True)
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    return t1 - t0, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each, taken in turns (best kept)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "celeba64"
        make_run(run)
        times: dict[str, list[tuple[float, float]]] = {"export": [], "report": []}
        for i in range(args.repeats):
            times["export"].append(timed(["export", str(run), "--onnx", str(Path(tmp) / f"onnx{i}")]))
            times["report"].append(timed(["report", str(run), "--out", str(Path(tmp) / "report.html")]))
        sizes = {name: (Path(tmp) / "onnx0" / name).stat().st_size for name in ("decoder.onnx", "encoder.onnx")}
        report_size = (Path(tmp) / "report.html").stat().st_size
    best = {name: min(w for w, _ in t) for name, t in times.items()}
    cpu = {name: min(c for _, c in t) for name, t in times.items()}
    print(f"{'':8} {'wall s':>7} {'CPU s':>7} {'target s':>9} {'wall/target':>12}   (all runs: wall s)",
          file=sys.stderr)
    for name, t in best.items():
        print(f"{name:8} {t:7.2f} {cpu[name]:7.2f} {TARGETS[name]:9.1f} {t / TARGETS[name]:12.2f}   "
              f"{', '.join(f'{w:.2f}' for w, _ in times[name])}", file=sys.stderr)
    print(f"decoder.onnx {sizes['decoder.onnx'] / 2**20:.1f} MiB, encoder.onnx {sizes['encoder.onnx'] / 2**20:.1f} "
          f"MiB, report.html {report_size / 2**10:.0f} KiB", file=sys.stderr)
    print(json.dumps({"wall_seconds": best, "cpu_seconds": cpu,
                      "wall_to_target": {k: best[k] / TARGETS[k] for k in best},
                      "bytes": {**sizes, "report.html": report_size}}))


if __name__ == "__main__":
    main()
