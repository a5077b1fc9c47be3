"""The one training loop: data on the device, Adam, logging, a test pass and pictures each epoch, checkpoints, resume.

Data order is a function of (seed, epoch) alone, and a checkpoint records the position inside the epoch, so a resumed
run sees the same batches in the same order as an uninterrupted one.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from facevae import checkpoint as ckpt
from facevae import images as pictures
from facevae.config import Config
from facevae.data import open_split
from facevae.device import autocast, resolve_device, resolve_precision, to_unit_float
from facevae.errors import UserError
from facevae.evaluate import evaluate
from facevae.model import VAE
from facevae.objectives import psnr

# Keys that fix the network's shape: a resumed run cannot change them.
ARCHITECTURE_KEYS = ("image_size", "channels", "widths", "latent_dim", "likelihood")
TRAIN_TERMS = ("loss", "elbo", "recon", "kl", "psnr")


def resolve_run_config(run_dir: Path, base: Config | None, overrides: list[str]) -> Config:
    """The run's config: defaults < config file (else the run's saved config.toml when resuming) < overrides.

    A run that has a checkpoint keeps its network: changing an architecture key is refused.
    """
    saved_path = Path(run_dir) / "config.toml"
    saved = Config.from_toml(saved_path) if saved_path.is_file() else None
    config = (base or saved or Config()).with_overrides(overrides).validate()
    if saved is not None and ckpt.has_checkpoint(Path(run_dir)):
        changed = [k for k in ARCHITECTURE_KEYS if getattr(config, k) != getattr(saved, k)]
        if changed:
            raise UserError(f"{run_dir} was trained with other {', '.join(changed)} "
                            f"({', '.join(f'{k} = {getattr(saved, k)}' for k in changed)}); "
                            f"use a new --out to train a different network")
    return config


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_order(n: int, *, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled image indices of one epoch: the same for a given (seed, epoch) on every run and every resume."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Full batches, plus the last partial one unless it holds a single image (BatchNorm needs two)."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 else 0)


def load_data(config: Config, *, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) uint8 image tensors (N, C, H, W) of the configured data, prepared on first use."""
    train = open_split(config, "train", progress=progress)
    test = open_split(config, "test", progress=False)
    if len(train) < 2:
        raise UserError(f"the data's train split has {len(train)} image(s); training needs at least 2")
    return train.images, test.images


class MetricsLog:
    """RUN_DIR/metrics.jsonl: one JSON object per line, appended and flushed as it goes."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def train(config: Config, run_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir`; return the last epoch's record."""
    config.validate()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    seed_everything(config.seed)
    train_images, test_images = load_data(config, progress=progress)
    train_images = train_images.to(device)  # uint8 on the device: 4x smaller than float, converted per batch there

    vae = VAE(config).to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    state = {"step": 0, "epoch": 0, "batch": 0}
    if ckpt.has_checkpoint(run_dir):
        saved = ckpt.load_checkpoint(run_dir, vae, optimizer)
        for group in optimizer.param_groups:  # a flag may have changed the learning rate for the rest of the run
            group["lr"], group["weight_decay"] = config.learning_rate, config.weight_decay
        state = {k: saved[k] for k in state}
        _say(f"resuming {run_dir} at epoch {state['epoch'] + 1}, step {state['step']}")
    ckpt.atomic_write(run_dir / "config.toml", config.to_toml())
    log = MetricsLog(run_dir / "metrics.jsonl")
    _say(f"training {run_dir}: {config.likelihood} likelihood, data {config.data} ({len(train_images)} train / "
         f"{len(test_images)} test images), {config.epochs} epochs, {device} {precision}")

    n = len(train_images)
    nb = batches_per_epoch(n, config.batch_size)
    fixed_test = test_images[: config.image_count] if len(test_images) else train_images[: config.image_count].cpu()
    sample_gen_seed = config.seed + 12345  # the same prior draws every epoch, so the sample grids show progress
    record: dict[str, Any] = {}
    if state["epoch"] >= config.epochs:
        _say(f"{run_dir} has already trained {state['epoch']} epoch(s) (epochs = {config.epochs}); "
             f"raise --epochs to train further")
    for epoch in range(state["epoch"], config.epochs):
        vae.train()
        order = epoch_order(n, seed=config.seed, epoch=epoch).to(device)
        sums = torch.zeros(len(TRAIN_TERMS), device=device)  # accumulated on the device; read when logged
        count = 0
        t0, seen = time.perf_counter(), 0
        bar = tqdm(range(state["batch"], nb), desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
                   disable=not progress, file=sys.stderr, dynamic_ncols=True)
        for b in bar:
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            x = to_unit_float(train_images[idx], device)
            if config.hflip:
                flip = torch.rand(len(x), device=device) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            kl_weight = config.kl_weight * _warmup(state["step"], config.kl_warmup_steps)
            with autocast(device, precision):
                terms = vae(x, kl_weight=kl_weight)
            if not torch.isfinite(terms.loss):
                state["bad_steps"] = state.get("bad_steps", 0) + 1
                if state["bad_steps"] >= config.max_bad_steps:
                    raise UserError(f"the loss was not finite for {state['bad_steps']} steps in a row (last at step "
                                    f"{state['step']}); lower learning_rate; the last good checkpoint is in {run_dir}")
                optimizer.zero_grad(set_to_none=True)
                continue
            state["bad_steps"] = 0
            optimizer.zero_grad(set_to_none=True)
            terms.loss.backward()
            optimizer.step()
            state["step"] += 1
            seen += len(x)
            with torch.no_grad():
                sums += torch.stack([terms.loss, terms.elbo.mean(), terms.recon.mean(), terms.kl.mean(),
                                     psnr(terms.x_mean, x).mean()]).float()
            count += 1
            if state["step"] % config.log_every == 0:
                means = dict(zip(TRAIN_TERMS, (sums / count).tolist()))
                rate = seen / (time.perf_counter() - t0)
                log.write({"kind": "step", "step": state["step"], "epoch": epoch + 1, **{f"train_{k}": v for k, v in means.items()},
                           "kl_weight": kl_weight, "lr": optimizer.param_groups[0]["lr"], "img_per_s": rate})
                bar.set_postfix(loss=f"{means['loss']:.1f}", psnr=f"{means['psnr']:.2f}dB")
            if config.checkpoint_every and state["step"] % config.checkpoint_every == 0:
                ckpt.save_checkpoint(run_dir, vae, optimizer, {**state, "epoch": epoch, "batch": b + 1})
        bar.close()
        elapsed = time.perf_counter() - t0
        means = dict(zip(TRAIN_TERMS, (sums / max(count, 1)).tolist()))
        state.update(epoch=epoch + 1, batch=0)

        vae.eval()
        test = evaluate(vae, test_images, batch_size=config.eval_batch_size, device=device, precision=precision) \
            if len(test_images) else {}
        record = {"kind": "epoch", "epoch": epoch + 1, "step": state["step"],
                  **{f"train_{k}": v for k, v in means.items()},
                  **{f"test_{k}": test[k] for k in ("elbo_nats", "recon_nats", "kl_nats", "elbo_bpd", "psnr_db", "mse")
                     if k in test},
                  "img_per_s": seen / elapsed if elapsed > 0 else None, "seconds": elapsed}
        log.write(record)
        if (epoch + 1) % config.save_every == 0 or epoch + 1 == config.epochs:
            _save_pictures(vae, fixed_test, run_dir, epoch + 1, device, sample_gen_seed, config.image_count)
            ckpt.save_model(vae, run_dir / ckpt.MODEL_FILE)
            ckpt.save_checkpoint(run_dir, vae, optimizer, state)
            _say(_epoch_line(record))
    return record


def _warmup(step: int, steps: int) -> float:
    """Linear KL warm-up factor: step / steps, up to 1."""
    return 1.0 if steps <= 0 else min(1.0, step / steps)


@torch.no_grad()
def _save_pictures(vae: VAE, real: torch.Tensor, run_dir: Path, epoch: int, device: torch.device, seed: int,
                   count: int) -> None:
    """images/reconstructions_eNNN.png (real rows above predicted rows) and images/samples_eNNN.png, plus the latest."""
    vae.eval()
    rec = vae.reconstruct(to_unit_float(real, device))
    samples = vae.sample(count, generator=torch.Generator().manual_seed(seed))
    rec_img = pictures.grid(pictures.pairs(real, rec))
    sample_img = pictures.grid(samples)
    for name, img in (("reconstructions", rec_img), ("samples", sample_img)):
        pictures.save_png(img, run_dir / "images" / f"{name}_e{epoch:03d}.png")
        pictures.save_png(img, run_dir / "images" / f"{name}.png")


def _epoch_line(r: dict[str, Any]) -> str:
    parts = [f"epoch {r['epoch']}", f"train elbo {r['train_elbo']:.1f} nats", f"psnr {r['train_psnr']:.2f} dB"]
    if "test_elbo_nats" in r:
        parts += [f"test elbo {r['test_elbo_nats']:.1f} nats", f"psnr {r['test_psnr_db']:.2f} dB"]
    if r.get("img_per_s"):
        parts.append(f"{r['img_per_s']:.0f} img/s")
    return " | ".join(parts)


def _say(message: str) -> None:
    """A line for the person at the terminal, on stderr (stdout is kept for --json)."""
    print(message, file=sys.stderr)
