"""The one training loop: data on the device, Adam, logging, a test pass and pictures each epoch, checkpoints, resume.

Exact resume: the data order is a function of (seed, epoch) alone, every random draw of a step comes from the
global RNG whose state is checkpointed, and a checkpoint records the position inside the epoch, so a run killed at
any point and resumed sees the same batches and the same noise as an uninterrupted one.

Several processes (torchrun): every rank walks the same shuffled order; step b takes the global batch
order[b*B*k : (b+1)*B*k] and rank r its r-th slice of B. Noise is drawn for the whole global batch on every rank (the
RNGs stay identical) and sliced the same way, and BatchNorm uses the global batch's statistics, so k processes with
batch B follow the trajectory of one process with batch k*B. Rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import errno
import json
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from facevae import checkpoint as ckpt
from facevae import images as pictures
from facevae.config import Config
from facevae.data import SplitView, checked_cache, split_view
from facevae.device import autocast, setup, to_unit_float
from facevae.distributed import World, sync_batchnorm
from facevae.errors import Interrupted, UserError
from facevae.evaluate import evaluate
from facevae.fileio import atomic_write
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
    """The shuffled image indices of one epoch: the same for a given (seed, epoch) on every run, rank and resume."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batches_per_epoch(n: int, global_batch: int, world_size: int = 1) -> int:
    """Full global batches, plus (one process only) a last partial one unless it holds a single image."""
    full, rest = divmod(n, global_batch)
    return full + (1 if world_size == 1 and rest >= 2 else 0)


def load_data(config: Config, *, progress: bool = True) -> tuple[SplitView, SplitView]:
    """(train, test) views of the configured data's uint8 images (N, C, H, W), prepared on first use; the test view
    is the test split, else the valid split, else empty (no test pass)."""
    cache = checked_cache(config, progress=progress)
    train = split_view(cache, "train")
    if len(train) < 2:
        raise UserError(f"the data's train split has {len(train)} image(s); training needs at least 2")
    held_out = [n for n in ("test", "valid") if cache.manifest.get("splits", {}).get(n)]
    if not held_out:
        _say("the data has no test or valid split: no test pass each epoch")
    return train, split_view(cache, held_out[0]) if held_out else SplitView(train.images, train.index[:0])


class GracefulStop:
    """SIGINT / SIGTERM ask the loop to stop after the current step (it then checkpoints); a second SIGINT exits
    at once, which is safe because every checkpoint write is atomic."""

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "GracefulStop":
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class MetricsLog:
    """RUN_DIR/metrics.jsonl: one JSON object per line, appended as it goes; rank 0 only."""

    def __init__(self, path: Path, *, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        """Drop records newer than a checkpoint we resume from (a killed run may have logged past it)."""
        if not (self.enabled and self.path.is_file()):
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write(self.path, "".join(line + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def train(config: Config, run_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir`; return the last epoch's record."""
    config.validate()
    run_dir = Path(run_dir)
    world = World.from_env()
    device, precision = setup(config)
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels once
    world.init(device)
    try:
        return _train(config, run_dir, world, device, precision, progress=progress and world.is_main)
    finally:
        world.close()


def _train(config: Config, run_dir: Path, world: World, device: torch.device, precision: str, *,
           progress: bool) -> dict[str, Any]:
    say = _say if world.is_main else (lambda message: None)
    if world.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(run_dir / "config.toml", config.to_toml())
        except OSError as e:
            raise UserError(f"cannot write to run directory {run_dir}: {e.strerror or e}; "
                            f"choose a writable --out") from None
    seed_everything(config.seed)
    if not world.is_main:
        world.barrier()  # rank 0 prepares the data first; the others then open the finished cache
    train_images, test_images = load_data(config, progress=progress)
    if world.is_main:
        world.barrier()
    # uint8 on the device (4x smaller than float, converted per batch there); on the CPU the memory-mapped cache itself
    train_images = train_images.to(device)

    vae = VAE(config).to(device)
    if world.size > 1:  # before the optimiser is built: it must hold the new BatchNorm's parameters
        vae = sync_batchnorm(vae, device)
    if config.channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    optimizer = _adam(vae, config)
    # fp16 needs loss scaling against underflow; for float32 and bf16 the scaler is disabled and every call a no-op.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    global_batch = config.batch_size * world.size
    # step: batches processed (a skipped non-finite batch counts); count: good steps of this epoch, behind `sums`.
    state: dict[str, Any] = {"global_batch": global_batch, "step": 0, "epoch": 0, "batch": 0, "bad_steps": 0,
                             "skipped": 0, "sums": [0.0] * len(TRAIN_TERMS), "count": 0, "seen": 0, "seconds": 0.0}
    if ckpt.has_checkpoint(run_dir):
        saved = ckpt.load_checkpoint(run_dir, vae, optimizer)
        for group in optimizer.param_groups:  # a flag may have changed these for the rest of the run
            group["lr"], group["weight_decay"] = config.learning_rate, config.weight_decay
        state.update({k: saved[k] for k in state if k in saved and k != "global_batch"})
        if saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        if saved.get("global_batch", global_batch) != global_batch:  # another world size or batch: same images done
            state["batch"] = state["batch"] * saved["global_batch"] // global_batch
        say(f"resuming {run_dir} at epoch {state['epoch'] + 1}, step {state['step']}")
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=world.is_main)
    log.truncate_after(state["step"])
    log.write({"kind": "run", "step": state["step"], "device": str(device), "precision": precision,
               "processes": world.size, "channels_last": config.channels_last, "compile": config.compile,
               "torch": torch.__version__, "threads": torch.get_num_threads()})

    model: torch.nn.Module = vae
    buffers = list(vae.buffers())
    if world.size > 1:
        model = DistributedDataParallel(vae,
                                        device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        model = torch.compile(model)
    n = len(train_images)
    nb = batches_per_epoch(n, global_batch, world.size)
    if nb == 0:
        raise UserError(f"batch_size {config.batch_size} x {world.size} process(es) is larger than the {n} "
                        f"training images; lower batch_size")
    fixed_test = test_images[: config.image_count] if len(test_images) else train_images[: config.image_count].cpu()
    say(f"training {run_dir}: {config.likelihood} likelihood, data {config.data} ({n} train / {len(test_images)} "
        f"test images), {config.epochs} epochs of {nb} steps, {world.size} process(es), {device}, {precision}")
    if state["epoch"] >= config.epochs:
        say(f"{run_dir} has already trained {state['epoch']} epoch(s) (epochs = {config.epochs}); "
            f"raise --epochs to train further")
    record: dict[str, Any] = {}

    def save_checkpoint(*, with_model: bool = False) -> None:
        """The checkpoint, and (with_model) the run's model file from the same serialised weights; rank 0 only."""
        if not world.is_main:
            return
        try:
            weights = ckpt.model_bytes(vae)
            if with_model:
                ckpt.save_model(vae, run_dir / ckpt.MODEL_FILE, data=weights)
            ckpt.save_checkpoint(run_dir, vae, optimizer, {**state, "scaler": scaler.state_dict()}, model=weights)
        except OSError as e:
            why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise UserError(f"could not write a checkpoint at step {state['step']} ({why}); the previous "
                            f"checkpoint in {run_dir} is intact: free space and run the same command to resume") from None

    with GracefulStop() as stop:
        for epoch in range(state["epoch"], config.epochs):
            model.train()
            order = epoch_order(n, seed=config.seed, epoch=epoch).to(device)
            # Everything a step measures stays on the device and is read at sync points (logging, checkpoints,
            # epoch end): the training step itself never waits for the GPU.
            sums = torch.tensor(state["sums"], device=device)
            tally = torch.tensor([0.0, 0.0, float(state["bad_steps"])], device=device)  # good, bad, bad in a row

            def sync() -> None:
                """Read the device's tallies into `state`; stop when too many non-finite steps came in a row."""
                good, bad, in_a_row = tally.tolist()
                tally[:2] = 0
                state.update(count=state["count"] + int(good), skipped=state["skipped"] + int(bad),
                             bad_steps=int(in_a_row), sums=sums.tolist(), seconds=time.perf_counter() - t0)
                if in_a_row >= config.max_bad_steps:
                    raise UserError(
                        f"the loss or its gradient was not finite for {int(in_a_row)} steps in a row (up to step "
                        f"{state['step']}); lower learning_rate or check the data; the last good checkpoint is in "
                        f"{run_dir}")

            t0 = time.perf_counter() - state["seconds"]
            bar = tqdm(total=nb, initial=state["batch"], desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
                       disable=not progress, file=sys.stderr, dynamic_ncols=True)
            for b in range(state["batch"], nb):
                batch_idx = order[b * global_batch:(b + 1) * global_batch]
                size = len(batch_idx) // world.size
                mine = slice(world.rank * size, (world.rank + 1) * size)
                x = to_unit_float(train_images[batch_idx[mine]], device)
                if config.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                # Noise for the whole global batch on every rank (RNGs stay in step), then this rank's slice.
                flip = torch.rand(len(batch_idx), device=device)[mine] < 0.5 if config.hflip else None
                eps = torch.randn(len(batch_idx), config.latent_dim, device=device)[mine]
                if flip is not None:
                    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
                kl_weight = config.kl_weight * _warmup(state["step"], config.kl_warmup_steps)
                buffers_before = [buf.clone() for buf in buffers]  # BatchNorm statistics etc.: a few KB
                with autocast(device, precision), _compile_errors(config.compile):
                    terms = model(x, kl_weight=kl_weight, eps=eps)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(terms.loss).backward()
                scaler.unscale_(optimizer)  # true gradients (fp16 only)
                ok = _finite(terms.loss, vae, world)  # on the device: 1.0 when the loss and every gradient are finite
                _step(optimizer, scaler, ok)  # a non-finite batch is skipped: no update, counted
                with torch.no_grad():  # ... and leaves no trace in the buffers its forward pass updated
                    for buf, old in zip(buffers, buffers_before):
                        buf.copy_(torch.where(ok > 0, buf, old))
                with torch.no_grad():
                    values = torch.stack([terms.loss, terms.elbo.mean(), terms.recon.mean(), terms.kl.mean(),
                                          psnr(terms.x_mean, x).mean()]).float()
                    sums += torch.where(ok > 0, values, torch.zeros_like(values))
                    tally[0] += ok
                    tally[1] += 1 - ok
                    tally[2] = (tally[2] + 1) * (1 - ok)  # resets to 0 on a good step
                state["step"] += 1
                state["seen"] += len(batch_idx)
                state["batch"] = b + 1
                bar.update(1)
                # A single process stops at the step the signal arrives; several agree at their next log step (the
                # agreement is a host sync, kept out of the other steps).
                stopping = stop.requested is not None if world.size == 1 else False
                if state["step"] % config.log_every == 0:
                    sync()
                    stopping = world.any(stop.requested is not None, device)
                    means = dict(zip(TRAIN_TERMS, (world.sum(sums.clone()) / world.size / max(state["count"], 1)).tolist()))
                    rate = state["seen"] / (time.perf_counter() - t0)
                    log.write({"kind": "step", "step": state["step"], "epoch": epoch + 1,
                               **{f"train_{k}": v for k, v in means.items()}, "kl_weight": kl_weight,
                               "lr": optimizer.param_groups[0]["lr"], "skipped_steps": state["skipped"],
                               "img_per_s": rate})
                    bar.set_postfix(loss=f"{means['loss']:.1f}", psnr=f"{means['psnr']:.2f}dB")
                ckpt_now = config.checkpoint_every and state["step"] % config.checkpoint_every == 0
                at_max = config.max_steps and state["step"] >= config.max_steps
                if stopping or ckpt_now or at_max:
                    sync()
                    save_checkpoint(with_model=bool(stopping or at_max))  # a stopped run's model is its latest
                if stopping:
                    bar.close()
                    name = stop.requested or "a signal to another process"
                    say(f"stopped by {name} at step {state['step']}; checkpoint saved. "
                        f"Resume with: facevae train --out {run_dir}")
                    raise Interrupted(130 if stop.requested == "SIGINT" else 143)
                if at_max:
                    bar.close()
                    say(f"reached max_steps = {config.max_steps}; checkpoint saved in {run_dir}")
                    return {"kind": "max_steps", "step": state["step"], "epoch": epoch,
                            "img_per_s": state["seen"] / (time.perf_counter() - t0)}
            sync()
            bar.close()
            elapsed = time.perf_counter() - t0
            means = dict(zip(TRAIN_TERMS, (world.sum(sums.clone()) / world.size / max(state["count"], 1)).tolist()))
            seen = state["seen"]
            state.update(epoch=epoch + 1, batch=0, sums=[0.0] * len(TRAIN_TERMS), count=0, seen=0, seconds=0.0)

            vae.eval()
            test = evaluate(vae, test_images, batch_size=config.eval_batch_size, device=device,
                            precision=precision) if len(test_images) else {}
            record = {"kind": "epoch", "epoch": epoch + 1, "step": state["step"],
                      **{f"train_{k}": v for k, v in means.items()},
                      **{f"test_{k}": test[k] for k in ("elbo_nats", "recon_nats", "kl_nats", "elbo_bpd", "psnr_db",
                                                        "mse") if k in test},
                      "skipped_steps": state["skipped"], "img_per_s": seen / elapsed if elapsed > 0 else None,
                      "seconds": elapsed}
            log.write(record)
            last = epoch + 1 == config.epochs
            if world.is_main:
                if (epoch + 1) % config.image_every == 0 or last:
                    _save_pictures(vae, fixed_test, run_dir, epoch + 1, device, config.seed + 12345,
                                   config.image_count)
            save_checkpoint(with_model=True)
            if (epoch + 1) % config.image_every == 0 or last:
                say(_epoch_line(record))
    world.barrier()
    return record


def _adam(vae: VAE, config: Config) -> torch.optim.Optimizer:
    """Adam, fused where this torch has it (CUDA; CPU from torch 2.4): one kernel, and skips without a host sync."""
    params = list(vae.parameters())
    try:
        return torch.optim.Adam(params, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True)
    except RuntimeError:
        return torch.optim.Adam(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def _finite(loss: torch.Tensor, vae: VAE, world: World) -> torch.Tensor:
    """1.0 (a device tensor) when the loss and every gradient are finite on every rank, else 0.0; no host sync."""
    grads = [p.grad for p in vae.parameters() if p.grad is not None]
    norms = torch.stack(torch._foreach_norm(grads)) if grads else loss.new_zeros(1)  # one kernel per dtype
    ok = (torch.isfinite(loss.detach().float()) & torch.isfinite(norms).all()).float()
    return world.min(ok)


def _step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, ok: torch.Tensor) -> None:
    """The optimiser step, skipped on the device when `ok` is 0 (fused Adam's found_inf, or the fp16 scaler's)."""
    if scaler.is_enabled():  # fp16: the scaler found the same non-finite gradients and skips the step itself
        scaler.step(optimizer)
        scaler.update()
    elif optimizer.defaults.get("fused"):
        optimizer.found_inf = 1 - ok  # fused Adam leaves parameters, moments and step count untouched when 1
        optimizer.step()
        del optimizer.found_inf
    elif ok.item():  # unfused Adam (torch < 2.4 on a CPU): a host check, free there
        optimizer.step()


@contextlib.contextmanager
def _compile_errors(enabled: bool):
    """Turn a torch.compile failure (no C compiler, an unsupported op) into a one-line UserError."""
    if not enabled:
        yield
        return
    try:
        yield
    except Exception as e:  # noqa: BLE001 - compile errors come from many torch._dynamo / inductor classes
        if "torch._dynamo" in type(e).__module__ or "torch._inductor" in type(e).__module__:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise UserError(f"torch.compile failed ({type(e).__name__}: {first}); train without it: "
                            f"--set compile=false") from None
        raise


def _warmup(step: int, steps: int) -> float:
    """Linear KL warm-up factor: step / steps, up to 1."""
    return 1.0 if steps <= 0 else min(1.0, step / steps)


@torch.no_grad()
def _save_pictures(vae: VAE, real: torch.Tensor, run_dir: Path, epoch: int, device: torch.device, seed: int,
                   count: int) -> None:
    """images/reconstructions_eNNN.png (real rows above predicted rows) and images/samples_eNNN.png, plus the latest.

    The prior draws come from their own generator (the same every epoch, so the grids show progress) and leave the
    training RNG untouched.
    """
    vae.eval()
    rec = vae.reconstruct(to_unit_float(real, device))
    samples = vae.sample(count, generator=torch.Generator().manual_seed(seed))
    rec_img = pictures.grid(pictures.pairs(real, rec))
    sample_img = pictures.grid(samples)
    for name, img in (("reconstructions", rec_img), ("samples", sample_img)):
        pictures.save_png(img, run_dir / "images" / f"{name}_e{epoch:03d}.png", run_dir / "images" / f"{name}.png")


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
