"""Training curves from metrics.jsonl: images/curves.png of one run, and `facevae plot` of several on one figure.

The curves are read from metrics.jsonl alone, so any run can be plotted, also one trained before curves existed or
by someone else: lines that are not JSON objects (a torn last line after a crash) are passed over. matplotlib is
imported inside the functions that draw, with its non-interactive Agg backend (no display, no GUI toolkit).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from facevae.errors import UserError
from facevae.fileio import PNG_SOFTWARE, atomic_write, check_output_file
from facevae.run import Run

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CURVES_FILE = "curves.png"  # RUN_DIR/images/curves.png
MAX_METRICS_BYTES = 512 * 2**20  # a metrics.jsonl past this is not one facevae wrote (CelebA: ~10 KB per epoch)

# (panel title, y label, [(metrics key, line label)]), one panel per entry, epochs on the x axis.
EPOCH_PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("-ELBO of the training density (lower is better)", "nats / image",
     [("train_elbo", "train"), ("test_density_elbo_nats", "test")]),
    ("-ELBO of 8-bit images (lower is better)", "bits / dim", [("test_elbo_bpd", "test")]),
    ("PSNR of reconstructions (higher is better)", "dB",
     [("train_psnr_sampled", "train (sampled z)"), ("test_psnr_db", "test (posterior mean)")]),
    ("KL(q(z|x) || p(z))", "nats / image", [("train_kl", "train"), ("test_kl_nats", "test")]),
]
NEGATED = {"train_elbo", "test_density_elbo_nats"}  # plotted as -ELBO, so that every loss-like panel goes down


@dataclass
class RunCurves:
    """One run's logged numbers: per-epoch records and per-step training losses."""

    label: str
    epochs: list[dict[str, Any]] = field(default_factory=list)  # the "epoch" records, in epoch order
    steps: list[tuple[int, float]] = field(default_factory=list)  # (step, train_loss) of the "step" records


def read_metrics(run: Run | str | Path, *, label: str | None = None) -> RunCurves:
    """A run's curves from its metrics.jsonl (UserError when the run or its metrics are missing)."""
    run = Run(run)
    path = run.metrics_file
    if not run.path.is_dir():
        raise UserError(f"run directory {run} does not exist")
    if not path.is_file():
        raise UserError(f"{run} has no {path.name}; train it with `facevae train --out {run}`")
    if path.stat().st_size > MAX_METRICS_BYTES:
        raise UserError(f"{path} is larger than {MAX_METRICS_BYTES >> 20} MiB; it is not a facevae metrics log")
    curves = RunCurves(label or run.path.resolve().name)
    by_epoch: dict[int, dict[str, Any]] = {}
    with path.open("rb") as f:
        for line in f:  # one record at a time: memory follows what is kept, not the file
            record = _record(line)
            if record.get("kind") == "epoch" and isinstance(record.get("epoch"), int):
                by_epoch[record["epoch"]] = record  # a resumed run may repeat an epoch: the last one counts
            elif record.get("kind") == "step" and _finite(record.get("step")) and _finite(record.get("train_loss")):
                curves.steps.append((int(record["step"]), float(record["train_loss"])))
    curves.epochs = [by_epoch[e] for e in sorted(by_epoch)]
    curves.steps.sort()
    return curves


def _record(line: bytes) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def draw(runs: list[RunCurves]) -> "Figure":
    """One figure: the per-epoch panels and the per-step training loss, every run in its own colour (train dashed,
    test solid)."""
    from matplotlib.figure import Figure  # a bare Figure draws with Agg and needs no pyplot state or display

    fig = Figure(figsize=(15, 8.5), layout="constrained")
    axes = fig.subplot_mosaic([["0", "1", "2"], ["3", "step", "step"]])
    colours = [f"C{i % 10}" for i in range(len(runs))]
    several = len(runs) > 1
    for i, (title, unit, lines) in enumerate(EPOCH_PANELS):
        ax = axes[str(i)]
        for run, colour in zip(runs, colours):
            for key, split in lines:
                points = [(r["epoch"], -r[key] if key in NEGATED else r[key]) for r in run.epochs
                          if _finite(r.get(key))]
                if points:
                    ax.plot(*zip(*points), color=colour, linestyle="--" if split == "train" else "-",
                            marker="." if len(points) < 30 else None,
                            label=f"{run.label} {split}" if several else split)
        _finish(ax, title, "epoch", unit)
    ax = axes["step"]
    for run, colour in zip(runs, colours):
        if run.steps:
            ax.plot(*zip(*run.steps), color=colour, linewidth=1, label=run.label if several else "train")
    _finish(ax, "training objective -recon + beta KL at logged steps (mean over the epoch so far)", "step",
            "nats / image")
    return fig


def _finish(ax: "Axes", title: str, xlabel: str, ylabel: str) -> None:
    """Title, labels and legend; an empty panel says why it is empty."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.ticklabel_format(axis="y", useOffset=False)  # absolute values on the axis, not "+9.354" and offsets
    ax.xaxis.get_major_locator().set_params(integer=True)
    if ax.lines:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not logged for this run\n(no test split, or no 8-bit likelihood)", ha="center",
                va="center", transform=ax.transAxes, color="grey")


def png_bytes(runs: list[RunCurves]) -> bytes:
    """The curves of `runs` as PNG bytes (marked as facevae's in its Software text)."""
    buf = io.BytesIO()
    draw(runs).savefig(buf, format="png", dpi=80, metadata={"Software": PNG_SOFTWARE})
    return buf.getvalue()


def save_run_curves(run: Run | str | Path) -> Path:
    """Redraw RUN_DIR/images/curves.png from the run's metrics.jsonl; return its path."""
    run = Run(run)
    path = run.picture(CURVES_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, png_bytes([read_metrics(run)]))
    return path


def plot_runs(run_dirs: list[Run | str | Path], *, out: str | Path = "curves.png", force: bool = False) -> Path:
    """Several runs' curves on one figure, labelled by run name, written to `out` (a PNG)."""
    from facevae.compare import run_labels

    if not run_dirs:
        raise UserError("name at least one run directory")
    out = check_output_file(out, force=force)  # a PNG facevae drew, or a new file (or --force)
    labels = run_labels([Run(d).path for d in run_dirs])
    runs = [read_metrics(d, label=label) for d, label in zip(run_dirs, labels)]
    data = png_bytes(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, data)
    return out
