"""Runs side by side: their eval.json figures in one Markdown table, their reconstructions in one PNG.

The picture is the deck's "Gaussian vs Bernoulli" slide for any number of runs: the same real images in the top
row, each run's posterior-mean reconstructions of them in a row below, labelled on the left.
Runs must have been evaluated first (`facevae evaluate RUN_DIR`): compare reads eval.json and never evaluates
itself, so every figure comes with the settings it was computed under.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from facevae.errors import UserError
from facevae.fileio import check_output_file
from facevae.images import captioned, grid, save_png
from facevae.model import VAE
from facevae.pixels import to_float
from facevae.run import Run, check_count

PICTURE_KEYS = ("data", "image_size", "channels", "crop", "split_scheme")  # config keys the runs' pictures share


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _nll(r: dict[str, Any]) -> str:
    if r.get("nll_iw_nats") is None:
        return "n/a"
    stderr = r.get("nll_iw_stderr")
    pm = f" ± {stderr:.2f}" if stderr is not None else ""
    return f"{r['nll_iw_nats']:.2f}{pm} (K={r['iw_samples']})"


# (row label in Markdown, formatter of one report); "\|" is a literal bar inside a Markdown table cell.
ROWS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("likelihood", lambda r: r["likelihood"]),
    ("ELBO of the 8-bit images, nats/image (higher is better)", lambda r: _fmt(r.get("elbo_nats"), ".2f")),
    ("reconstruction E_q[log P(x\\|z)], nats/image", lambda r: _fmt(r.get("recon_nats"), ".2f")),
    ("KL(q(z\\|x) ‖ p(z)), nats/image", lambda r: f"{r['kl_nats']:.2f}"),
    ("-log P(x) importance-weighted, nats/image (lower is better)", _nll),
    ("-ELBO, bits/dim (lower is better)", lambda r: _fmt(r.get("elbo_bpd"), ".4f")),
    ("-log P(x), bits/dim (lower is better)", lambda r: _fmt(r.get("nll_iw_bpd"), ".4f")),
    ("ELBO of the training density, nats/image", lambda r: _fmt(r.get("density_elbo_nats"), ".2f")),
    ("training objective -recon + β KL, nats/image", lambda r: f"{r['loss_nats']:.2f} (β={r['kl_weight']:g})"
     if "loss_nats" in r else "n/a"),
    ("PSNR, dB (higher is better)", lambda r: f"{r['psnr_db']:.2f}"),
    ("SSIM (higher is better)", lambda r: f"{r['ssim']:.4f}"),
    ("MSE, pixels in [0, 1] (lower is better)", lambda r: f"{r['mse']:.5f}"),
    ("active units", lambda r: f"{r['active_units']} / {r['latent_dim']}"),
]
FID_ROWS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("FID reconstructions (lower is better)", lambda r: f"{r['fid_recon']:.2f}" if "fid_recon" in r else "n/a"),
    ("FID prior samples (lower is better)", lambda r: f"{r['fid_samples']:.2f}" if "fid_samples" in r else "n/a"),
    ("FID images", lambda r: str(r["fid_images"]) if "fid_images" in r else "n/a"),
]
def _trained(r: dict[str, Any]) -> str:
    t = r.get("training")
    if not t:
        return "not recorded"
    return f"epoch {t['epoch']} / {t['epochs']}" + ("" if t.get("finished") else f" (unfinished, step {t['step']})")


DATA_ROWS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("trained", _trained),
    ("evaluated on", lambda r: f"{r.get('images', '?')} images of '{r.get('split', '?')}'"),
]


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Short names for the runs: the directory names, or the paths as given where two names collide."""
    names = [Path(d).name or str(d) for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


def load_eval(run: Run | str | Path) -> dict[str, Any]:
    """A run's eval.json; a UserError telling to run `facevae evaluate` when it is missing or unreadable."""
    return Run(run).read_eval()


def markdown_table(labels: list[str], reports: list[dict[str, Any]], *, stale: Sequence[str] = ()) -> str:
    """The runs' reports side by side: one column per run, one row per figure, units and direction in the rows.

    `stale` names runs whose model is newer than their eval.json; notes below the table say so, and flag what
    makes figures incomparable.
    """
    rows = list(ROWS)
    if any("fid_recon" in r for r in reports):
        rows += FID_ROWS
    rows += DATA_ROWS
    esc = [label.replace("|", "\\|") for label in labels]
    lines = ["| | " + " | ".join(esc) + " |", "|---|" + "---:|" * len(labels)]
    for name, cell in rows:
        lines.append(f"| {name} | " + " | ".join(str(cell(r)).replace("|", "\\|") for r in reports) + " |")
    notes = []
    unfinished = [lab for lab, r in zip(labels, reports) if not (r.get("training") or {}).get("finished")]
    if unfinished:
        notes.append(f"{', '.join(unfinished)}: training unfinished (or not recorded): the figures describe a "
                     f"partly trained model")
    if stale:
        notes.append(f"{', '.join(stale)}: the model is newer than eval.json; run `facevae evaluate` again")
    unnormalised = [lab for lab, r in zip(labels, reports) if r.get("elbo_bpd") is None]
    if unnormalised:
        notes.append(f"{', '.join(unnormalised)}: the likelihood is not a normalised density of [0, 1] pixels and "
                     f"gives no probability of 8-bit images, so it has no ELBO of them, no -log P(x) and no "
                     f"bits/dim; its training density's ELBO is an objective, not a bound")
    settings = {(r.get("split"), r.get("images"), (r.get("data") or {}).get("manifest_sha256")) for r in reports}
    if len(settings) > 1:
        notes.append("the runs were evaluated on different data (split, number of images or data cache): "
                     "their figures are not directly comparable")
    if len({r.get("iw_samples") for r in reports}) > 1:
        notes.append("the runs used different K for -log p(x): a larger K gives a tighter (lower) estimate")
    return "\n".join(lines + [""] + [f"Note: {n}." for n in notes]).rstrip() + "\n"


def comparison_rows(vaes: list[VAE], real: torch.Tensor) -> torch.Tensor:
    """The real uint8 images (n, C, H, W) and each model's reconstructions: ((1 + R) * n, C, H, W) in [0, 1]."""
    x = to_float(real)
    return torch.cat([x] + [vae.reconstruct(x).cpu() for vae in vaes])


def compare_runs(runs: Sequence[Run | str | Path], *, out: str | Path = "compare.png", n: int = 8,
                 split: str = "test", data: str | None = None, force: bool = False,
                 scale: int | None = None) -> tuple[str, Path]:
    """The runs' eval.json side by side as Markdown, and a PNG of the first n images of `split` above each run's
    reconstructions of them; return (table, png path). Runs must share data, image size and channels; the data
    comes from the runs' config.toml (or `data`); `out` replaces only a PNG facevae wrote, unless `force`."""
    if not runs:
        raise UserError("name at least one run directory")
    check_count(n)
    out = check_output_file(out, force=force)
    runs = [Run(r) for r in runs]
    reports = [r.read_eval() for r in runs]
    vaes = [r.load_model(data=data) for r in runs]  # the data from config.toml (or --data), never the weights
    labels = run_labels([r.path for r in runs])
    stale = [label for label, r in zip(labels, runs) if r.eval_is_stale()]
    table = markdown_table(labels, reports, stale=stale)
    shapes = {tuple(getattr(v.config, k) for k in PICTURE_KEYS) for v in vaes}
    if len(shapes) > 1:
        described = "; ".join(f"{lab}: {v.config.image_size}x{v.config.image_size}x{v.config.channels} of "
                              f"{v.config.data}" for lab, v in zip(labels, vaes))
        raise UserError(f"the runs were trained on different data, image size or channels ({described}); "
                        f"compare pictures only of runs on the same data")
    real = runs[0].data(vaes[0].config, split)[:n]  # (n, C, H, W) uint8, only these n read
    if len(real) == 0:
        raise UserError(f"the '{split}' split has no images")
    picture = captioned(grid(comparison_rows(vaes, real), columns=len(real), scale=scale), ["real"] + labels,
                        title=f"{len(real)} '{split}' faces and each run's reconstructions")
    return table, save_png(picture, out)
