"""The one training loop: data on the device, Adam, logging, a test pass and pictures each epoch, checkpoints, resume.

Where training stands is a TrainState (what the checkpoint stores); a Meter keeps the step's figures on the device;
Trainer.guarded_step is the step (forward, backward, finite check, skipped update, BatchNorm restore); Trainer.fit is
the epoch loop.

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
import dataclasses
import errno
import json
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import facevae.checkpoint as ckpt
from facevae.config import Config
from facevae.data import SplitView, checked_cache, split_view, with_data_shape
from facevae.device import autocast, eval_batch_size, setup
from facevae.distributed import World, sync_batchnorm
from facevae.errors import Interrupted, UserError, first_line
from facevae.evaluate import evaluate
from facevae.fileio import atomic_write
from facevae.metrics import psnr
from facevae.model import ELBO, VAE, expected_state
from facevae.pixels import to_float
from facevae.run import Run, save_epoch_pictures
from facevae.watch import RunWatch

# The training step's terms: batch means of the density that training optimises, and psnr_sampled, the PSNR of the
# mean of p(x|z) at the step's sampled z (not the posterior-mean reconstruction that evaluation's psnr_db scores).
TRAIN_TERMS = ("loss", "elbo", "recon", "kl", "psnr_sampled")
# Of the epoch's test pass: the 8-bit figures, and the density's ELBO, comparable with the training terms.
TEST_TERMS = ("elbo_nats", "recon_nats", "kl_nats", "elbo_bpd", "density_elbo_nats", "psnr_db", "mse")


@dataclass
class TrainState:
    """Where training stands: what the checkpoint's state.json stores besides weights, optimiser and RNG states."""

    global_batch: int  # images per step over all processes
    step: int = 0  # batches processed in all (a skipped non-finite batch counts)
    epoch: int = 0  # epochs finished
    batch: int = 0  # global batches done in the current epoch
    bad_steps: int = 0  # non-finite steps in a row, as of the last sync
    skipped: int = 0  # non-finite steps skipped in all, as of the last sync
    sums: list[float] = field(default_factory=lambda: [0.0] * len(TRAIN_TERMS))  # this epoch's good steps' terms
    count: int = 0  # good steps of this epoch behind `sums`
    seen: int = 0  # images of this epoch
    seconds: float = 0.0  # training time of this epoch

    @classmethod
    def resumed(cls, saved: dict[str, Any], global_batch: int) -> "TrainState":
        """The state a checkpoint saved; another world size or batch resumes after the same images."""
        names = {f.name for f in dataclasses.fields(cls)} - {"global_batch"}
        state = cls(global_batch, **{k: saved[k] for k in names if k in saved})
        state.batch = state.batch * saved.get("global_batch", global_batch) // global_batch
        return state

    def progress(self, config: Config) -> dict[str, Any]:
        """How far training has gone, for the model file: steps, whole epochs done, and whether the run is finished
        (all its epochs, or max_steps reached)."""
        finished = self.epoch >= config.epochs or bool(config.max_steps and self.step >= config.max_steps)
        return {"step": self.step, "epoch": self.epoch, "epochs": config.epochs, "finished": finished}

    def start_epoch(self) -> None:
        """Clear what counts within an epoch (after the epoch's record was taken)."""
        self.batch, self.sums, self.count, self.seen, self.seconds = 0, [0.0] * len(TRAIN_TERMS), 0, 0, 0.0


class Meter:
    """The epoch's sums of TRAIN_TERMS over good steps and the step tallies, kept on the device: the training step
    never waits for it; sync() reads it into the TrainState at log steps, checkpoints and the epoch's end."""

    def __init__(self, state: TrainState, device: torch.device):
        self.sums = torch.tensor(state.sums, device=device)
        self.tally = torch.tensor([0.0, 0.0, float(state.bad_steps)], device=device)  # good, bad, bad in a row

    @torch.no_grad()
    def add(self, terms: ELBO, x: torch.Tensor, ok: torch.Tensor) -> None:
        """Count one step; its terms only when `ok` (a device 0/1) says the step was finite."""
        values = torch.stack([terms.loss, terms.elbo.mean(), terms.recon.mean(), terms.kl.mean(),
                              psnr(terms.x_mean, x).mean()]).float()
        self.sums += torch.where(ok > 0, values, torch.zeros_like(values))
        self.tally[0] += ok
        self.tally[1] += 1 - ok
        self.tally[2] = (self.tally[2] + 1) * (1 - ok)  # resets to 0 on a good step

    def sync(self, state: TrainState) -> None:
        """Read the device's tallies into `state` (a host sync)."""
        good, bad, in_a_row = self.tally.tolist()
        self.tally[:2] = 0
        state.count, state.skipped, state.bad_steps = state.count + int(good), state.skipped + int(bad), int(in_a_row)
        state.sums = self.sums.tolist()

    def means(self, state: TrainState, world: World) -> dict[str, float]:
        """The epoch's mean terms over all processes' good steps (after sync)."""
        total = world.sum(self.sums.clone()) / world.size / max(state.count, 1)
        return dict(zip(TRAIN_TERMS, total.tolist()))


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
    return train, split_view(cache, held_out[0]) if held_out else train.head(0)


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

    def __init__(self, path: Path, *, enabled: bool, watch: RunWatch | None = None):
        self.path, self.enabled, self.watch = path, enabled, watch

    def truncate_after(self, step: int) -> None:
        """Drop records newer than a checkpoint we resume from (a killed run may have logged past it), and lines a
        crash left half-written (said on stderr)."""
        if not (self.enabled and self.path.is_file()):
            return
        keep, damaged = [], 0
        with self.path.open("rb") as f:
            for line in f:
                try:
                    record = json.loads(line) if line.strip() else None
                except (ValueError, RecursionError):
                    record, damaged = None, damaged + 1
                at = record.get("step", 0) if isinstance(record, dict) else None
                if isinstance(at, int) and at <= step:
                    keep.append(line.rstrip(b"\n") + b"\n")
        if damaged:
            _say(f"facevae: dropped {damaged} damaged line(s) of {self.path} (a crash in the middle of a write "
                 f"leaves a partial line); resuming")
        atomic_write(self.path, b"".join(keep))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self.watch is not None:
                self.watch.record(record)  # the same numbers to TensorBoard, when asked for


def train(config: Config, run_dir: str | Path | Run, *, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir`; return the last record (kind "epoch", or "max_steps")."""
    config = with_data_shape(config.validate())
    expected_state(config)  # the network's size is bounded before anything is built
    run = Run(run_dir)
    run.check_writable()  # before anything is read or written: a folder that is not a run is refused
    world = World.from_env()
    watch = RunWatch(run, config, enabled=world.is_main)  # a missing optional package: refused before any work
    device, precision = setup(config)
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels once
    world.init(device)
    try:
        with contextlib.ExitStack() as held:  # the run's lock, taken once the config and the data are checked
            return Trainer(config, run, world, device, precision, progress=progress and world.is_main,
                           held=held, watch=watch).fit()
    finally:
        watch.close()
        world.close()


class Trainer:
    """One training run: the model, its optimiser, the data on the device, the state, and the loop."""

    def __init__(self, config: Config, run: Run, world: World, device: torch.device, precision: str, *,
                 progress: bool, held: contextlib.ExitStack, watch: RunWatch):
        self.config, self.run, self.world, self.device, self.precision = config, run, world, device, precision
        self.progress, self.watch = progress, watch  # watch: images/curves.png and TensorBoard
        seed_everything(config.seed)
        if not world.is_main:
            world.barrier()  # rank 0 prepares the data first; the others then open the finished cache
        train_images, self.test_images = load_data(config, progress=progress)
        if world.is_main:  # nothing is created before the config and the data are checked
            self.changes = run.changed_settings(config)  # said once the checkpoint has loaded (_resume)
            held.push(run.open_for_training(config))  # already held: released when `held` closes
            world.barrier()
        # uint8 on the device (4x smaller than float, converted per batch there); on the CPU the memory-mapped cache
        self.train_images = train_images.to(device)
        self.vae = self._build_model()
        self.optimizer = _adam(self.vae, config)
        # fp16 needs loss scaling against underflow; for float32 and bf16 the scaler is disabled, every call a no-op.
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.state = self._resume(TrainState(global_batch=config.batch_size * world.size))
        self.buffers = list(self.vae.buffers())  # BatchNorm statistics etc.: restored after a skipped step
        self.snapshot = [buf.clone() for buf in self.buffers]  # their values before the step, a few KB
        self.model: torch.nn.Module = self.vae
        if world.size > 1:
            self.model = DistributedDataParallel(self.vae, device_ids=[device.index] if device.type == "cuda" else None)
        if config.compile:
            self.model = torch.compile(self.model)
        self.n = len(self.train_images)
        self.steps_per_epoch = batches_per_epoch(self.n, self.state.global_batch, world.size)
        if self.steps_per_epoch == 0:
            raise UserError(f"batch_size {config.batch_size} x {world.size} process(es) is larger than the {self.n} "
                            f"training images; lower batch_size")
        self.log = MetricsLog(run.metrics_file, enabled=world.is_main, watch=self.watch)
        self.log.truncate_after(self.state.step)
        self.meter = Meter(self.state, device)
        self.clock = time.perf_counter()  # the epoch's start, less the seconds it ran before a resume

    def _build_model(self) -> VAE:
        vae = VAE(self.config).to(self.device)
        if self.world.size > 1:  # before the optimiser is built: it must hold the new BatchNorm's parameters
            vae = sync_batchnorm(vae, self.device)
        if self.config.channels_last:
            vae = vae.to(memory_format=torch.channels_last)
        return vae

    def _resume(self, state: TrainState) -> TrainState:
        """The checkpoint's state (model, optimiser, scaler and RNGs restored), or `state` for a new run."""
        self.saved_step: int | None = None  # the step of the last checkpoint on disk, for a failed run's message
        if not ckpt.has_checkpoint(self.run.path):
            return state
        saved = ckpt.load_checkpoint(self.run.path, self.vae, self.optimizer,
                                     expected={**dataclasses.asdict(state), "scaler": {}})
        self.saved_step = saved["step"]
        for group in self.optimizer.param_groups:  # a flag may have changed these for the rest of the run
            group["lr"], group["weight_decay"] = self.config.learning_rate, self.config.weight_decay
        if saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        state = TrainState.resumed(saved, state.global_batch)
        self.say(f"resuming {self.run} at epoch {state.epoch + 1}, step {state.step}")
        if getattr(self, "changes", None):  # rank 0 only: the others never read config.toml
            self.say(f"resuming with changed settings: {', '.join(self.changes)}")
        return state

    def say(self, message: str) -> None:
        if self.world.is_main:
            _say(message)

    # ------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs; return the last record."""
        c, s = self.config, self.state
        self.log.write({"kind": "run", "step": s.step, "device": str(self.device), "precision": self.precision,
                        "processes": self.world.size, "channels_last": c.channels_last, "compile": c.compile,
                        "torch": torch.__version__, "threads": torch.get_num_threads()})
        self.say(f"training {self.run}: {c.likelihood} likelihood, data {c.data} ({self.n} train / "
                 f"{len(self.test_images)} test images), {c.epochs} epochs of {self.steps_per_epoch} steps, "
                 f"{self.world.size} process(es), {self.device}, {self.precision}")
        if s.epoch >= c.epochs:
            self.say(f"{self.run} has already trained {s.epoch} epoch(s) (epochs = {c.epochs}); "
                     f"raise --epochs to train further")
        record = self._record("epoch")
        # One bar for the whole run (its estimate of the time left is the run's); epoch lines every image_every.
        total = c.epochs * self.steps_per_epoch
        self.bar = tqdm(total=total, initial=min(s.epoch * self.steps_per_epoch + s.batch, total), unit="batch",
                        disable=not self.progress or s.epoch >= c.epochs, file=sys.stderr, dynamic_ncols=True)
        with GracefulStop() as stop, self.bar:
            for epoch in range(s.epoch, c.epochs):
                if not self._epoch(epoch, stop):
                    return self._record("max_steps")
                record = self._end_epoch(epoch)
        self.world.barrier()
        return record

    def _epoch(self, epoch: int, stop: GracefulStop) -> bool:
        """The steps of one epoch from where the state stands; False when max_steps stopped it."""
        c, s = self.config, self.state
        self.model.train()
        order = epoch_order(self.n, seed=c.seed, epoch=epoch).to(self.device)
        self.meter = Meter(s, self.device)
        self.clock = time.perf_counter() - s.seconds
        self.bar.set_description(f"epoch {epoch + 1}/{c.epochs}")
        for b in range(s.batch, self.steps_per_epoch):
            x, eps, images = self._batch(order, b)
            kl_weight = c.kl_weight * _warmup(s.step, c.kl_warmup_steps)
            terms, ok = self.guarded_step(x, eps, kl_weight)
            self.meter.add(terms, x, ok)
            s.step, s.seen, s.batch = s.step + 1, s.seen + images, b + 1
            self.bar.update(1)
            # One process stops at the step the signal arrives; several agree at their next log step (the
            # agreement is a host sync, kept out of the other steps).
            stopping = stop.requested is not None and self.world.size == 1
            if s.step % c.log_every == 0:
                stopping = self._log_step(epoch, kl_weight, stop)
            at_max = bool(c.max_steps) and s.step >= c.max_steps
            if stopping or at_max or (c.checkpoint_every and s.step % c.checkpoint_every == 0):
                self._sync()
                self._save_checkpoint(with_model=stopping or at_max)  # a stopped run's model is its latest
            if stopping:
                self._stop(stop)
            if at_max:
                self.say(f"reached max_steps = {c.max_steps}; checkpoint saved in {self.run}")
                return False
        return True

    def _batch(self, order: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Step b's images of this process as float (B, C, H, W) on the device, their noise eps (B, latent_dim), and
        the number of images of the global batch."""
        c, world, device = self.config, self.world, self.device
        batch_idx = order[b * self.state.global_batch:(b + 1) * self.state.global_batch]
        size = len(batch_idx) // world.size
        mine = slice(world.rank * size, (world.rank + 1) * size)
        layout = torch.channels_last if c.channels_last else torch.contiguous_format
        x = to_float(self.train_images[batch_idx[mine]], device, memory_format=layout)
        # Noise for the whole global batch on every rank (RNGs stay in step), then this rank's slice.
        flip = torch.rand(len(batch_idx), device=device)[mine] < 0.5 if c.hflip else None
        eps = torch.randn(len(batch_idx), c.latent_dim, device=device)[mine]
        if flip is not None:
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x, eps, len(batch_idx)

    def guarded_step(self, x: torch.Tensor, eps: torch.Tensor, kl_weight: float) -> tuple[ELBO, torch.Tensor]:
        """Forward, backward and update, without a host sync; a non-finite loss or gradient (on any rank) skips the
        update and restores the buffers its forward pass changed. Returns the terms and ok (a device 0/1)."""
        torch._foreach_copy_(self.snapshot, self.buffers)  # one call, no allocation
        with autocast(self.device, self.precision), _compile_errors(self.config.compile):
            terms = self.model(x, kl_weight=kl_weight, eps=eps)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms.loss).backward()
        self.scaler.unscale_(self.optimizer)  # true gradients (fp16 only)
        ok = _finite(terms.loss, self.vae, self.world)  # 1.0 when the loss and every gradient are finite
        _step(self.optimizer, self.scaler, ok)  # a non-finite batch is skipped: no update, counted
        with torch.no_grad():  # ... and leaves no trace in the buffers its forward pass updated
            for buf, old in zip(self.buffers, self.snapshot):
                buf.copy_(torch.where(ok > 0, buf, old))
        return terms, ok

    # ------------------------------------------------------------ sync points: logging, checkpoints, epoch ends
    def _sync(self) -> None:
        """Read the device's tallies into the state; stop when too many non-finite steps came in a row."""
        s = self.state
        self.meter.sync(s)
        s.seconds = time.perf_counter() - self.clock
        if s.bad_steps >= self.config.max_bad_steps:
            # Skipped steps never change the weights, so the last checkpoint holds good ones; say when there is none.
            where = (f"the last good checkpoint, at step {self.saved_step}, is in {self.run}"
                     if self.saved_step is not None else
                     f"no checkpoint had been written yet, so {self.run} holds nothing to resume")
            raise UserError(f"the loss or its gradient was not finite for {s.bad_steps} steps in a row (up to step "
                            f"{s.step}); lower learning_rate or check the data; {where}")

    def _log_step(self, epoch: int, kl_weight: float, stop: GracefulStop) -> bool:
        """Write a step record; return whether any process was asked to stop."""
        s = self.state
        self._sync()
        stopping = self.world.any(stop.requested is not None, self.device)
        means = self.meter.means(s, self.world)
        self.log.write({"kind": "step", "step": s.step, "epoch": epoch + 1,
                        **{f"train_{k}": v for k, v in means.items()}, "kl_weight": kl_weight,
                        "lr": self.optimizer.param_groups[0]["lr"], "skipped_steps": s.skipped,
                        "img_per_s": s.seen / (time.perf_counter() - self.clock)})
        self.bar.set_postfix(loss=f"{means['loss']:.1f}", psnr_sampled=f"{means['psnr_sampled']:.2f}dB")
        return stopping

    def _pictures(self, epoch: int, pictures: bool) -> None:
        """The grids of reconstructions and samples after `epoch` when `pictures` (rank 0), and the watchers' epoch
        end: images/curves.png, TensorBoard's grids. The samples come from a generator of their own: the training RNG,
        which the checkpoint saves, is untouched."""
        c = self.config
        if self.world.is_main and pictures:
            real = self.test_images if len(self.test_images) else self.train_images
            save_epoch_pictures(self.run, self.vae, real[:c.image_count], epoch, seed=c.seed + 12345,
                                count=c.image_count)
        self.watch.epoch_end(self.state.step, pictures=pictures)

    def _stop(self, stop: GracefulStop) -> None:
        name = stop.requested or "a signal to another process"
        self.say(f"stopped by {name} at step {self.state.step}; checkpoint saved. "
                 f"Resume with: facevae train --out {self.run}")
        raise Interrupted(130 if stop.requested == "SIGINT" else 143)

    def _save_checkpoint(self, *, with_model: bool) -> None:
        """The checkpoint, and (with_model) the run's model file from the same serialised weights; rank 0 only."""
        if not self.world.is_main:
            return
        try:
            weights = ckpt.model_bytes(self.vae, training=self.state.progress(self.config))
            if with_model:
                ckpt.save_model(self.vae, self.run.model_file, data=weights)
            ckpt.save_checkpoint(self.run.path, self.vae, self.optimizer,
                                 {**dataclasses.asdict(self.state), "scaler": self.scaler.state_dict()}, model=weights)
            self.saved_step = self.state.step
        except OSError as e:
            why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise UserError(f"could not write a checkpoint at step {self.state.step} ({why}); the previous checkpoint "
                            f"in {self.run} is intact: free space and run the same command to resume") from None

    def _record(self, kind: str, test: dict[str, Any] | None = None) -> dict[str, Any]:
        """Where training stands, as one record (after a sync): train means, test figures, speed."""
        s = self.state
        return {"kind": kind, "epoch": s.epoch, "step": s.step,
                **{f"train_{k}": v for k, v in self.meter.means(s, self.world).items()},
                **{f"test_{k}": (test or {})[k] for k in TEST_TERMS if k in (test or {})},
                "skipped_steps": s.skipped, "img_per_s": s.seen / s.seconds if s.seconds > 0 else None,
                "seconds": s.seconds}

    def _end_epoch(self, epoch: int) -> dict[str, Any]:
        """Sync, the test pass, the epoch's record, pictures and checkpoint; the state moves to the next epoch."""
        c = self.config
        self._sync()
        self.vae.eval()
        test = evaluate(self.vae, self.test_images, batch_size=eval_batch_size(self.device, c.eval_batch_size),
                        device=self.device, precision=self.precision) if len(self.test_images) else {}
        self.state.epoch = epoch + 1
        record = self._record("epoch", test)
        self.log.write(record)
        pictures = (epoch + 1) % c.image_every == 0 or epoch + 1 == c.epochs
        self._pictures(epoch + 1, pictures)
        self.state.start_epoch()
        self._save_checkpoint(with_model=True)
        if pictures:
            self.say(_epoch_line(record))
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
            raise UserError(f"torch.compile failed ({type(e).__name__}: {first_line(e)}); train without it: "
                            f"--set compile=false") from None
        raise


def _warmup(step: int, steps: int) -> float:
    """Linear KL warm-up factor: step / steps, up to 1."""
    return 1.0 if steps <= 0 else min(1.0, step / steps)


def _epoch_line(r: dict[str, Any]) -> str:
    parts = [f"epoch {r['epoch']}", f"train elbo {r['train_elbo']:.1f} nats (density)",
             f"psnr at sampled z {r['train_psnr_sampled']:.2f} dB"]
    if "test_density_elbo_nats" in r:
        bpd = r.get("test_elbo_bpd")
        parts += [f"test elbo {r['test_density_elbo_nats']:.1f} nats (density)"
                  + (f", {bpd:.4f} bits/dim (8-bit)" if bpd is not None else ""), f"psnr {r['test_psnr_db']:.2f} dB"]
    if r.get("img_per_s"):
        parts.append(f"{r['img_per_s']:.0f} img/s")
    return " | ".join(parts)


def _say(message: str) -> None:
    """A line for the person at the terminal, on stderr (stdout is kept for --json), above the progress bar."""
    tqdm.write(message, file=sys.stderr)
