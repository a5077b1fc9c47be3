"""The metrics report: ELBO terms, the importance-weighted likelihood, bits/dim, PSNR, SSIM, MSE, active units, FID.

Every likelihood figure states its unit and its sign: nats per image, bits per dimension of 8-bit data.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import facevae.fid as fid
from facevae.data import SplitView
from facevae.distributions import Likelihood
from facevae.device import autocast, eval_batch_size, setup
from facevae.errors import UserError
from facevae.metrics import bits_per_dim, importance_samples, iw_bound, mse, psnr, ssim
from facevae.model import ELBO, VAE, folded
from facevae.pixels import to_float
from facevae.run import Run
from facevae.version import __version__

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al.: unit u is active when Var_x(E_q[z_u | x]) > 0.01
MAX_EVAL_HOURS = 12  # an evaluation estimated to take longer is refused unless --yes


@torch.inference_mode()
def evaluate(vae: VAE, images: torch.Tensor | SplitView, *, iw_samples: int = 1, batch_size: int | None = None,
             device: torch.device | str = "cpu", precision: str = "float32", progress: bool = False) -> dict[str, Any]:
    """Evaluate `vae` (in eval mode) on uint8 images (N, C, H, W); return the report's numbers.

    Runs in inference mode under the given device and precision (autocast for the network; every likelihood and KL
    sum in float32). The ELBO terms come from vae(x), the forward pass training uses, its sample of z scored both by
    the density training optimises and as the probability of the 8-bit image. The K samples of the bound (K > 1)
    also give the Monte Carlo error of that one-sample ELBO. No call decodes more than `batch_size` images
    (default: eval_batch_size(device)), whatever `iw_samples` is: the bound takes `group` images times `chunk`
    samples per decoder call, group * chunk <= batch_size.
    """
    device = torch.device(device)
    batch_size = eval_batch_size(device) if batch_size is None else batch_size
    if iw_samples < 1 or batch_size < 1:
        raise ValueError(f"iw_samples and batch_size must be at least 1, got {iw_samples} and {batch_size}")
    vae.eval()
    net = folded(vae)  # the same function with each BatchNorm folded into its convolution: faster, never trained
    n = len(images)
    per_image: dict[str, list[torch.Tensor]] = {}
    posterior_means: list[torch.Tensor] = []  # (B, latent_dim) each: the active-unit statistic needs their variance
    kl_dims = torch.zeros(vae.config.latent_dim, dtype=torch.float64, device=device)  # summed, no host sync
    bar = tqdm(total=n * iw_samples, desc="evaluate", unit="sample", unit_scale=True, disable=not progress,
               leave=False)  # counts importance samples decoded: its time left holds whatever K is
    for start in range(0, n, batch_size):
        x = to_float(images[start:start + batch_size], device)  # (B, C, H, W) uint8 -> float in [0, 1]
        with autocast(device, precision):
            terms = net(x)  # elbo, recon, kl, loss per image (B,) nats; the posterior q(z|x); p(x|z) at its sample
            x_rec = net.decode(terms.posterior.mode()).mean.float().clamp(0, 1)  # (B, C, H, W): posterior mean
            figures = _likelihood_terms(net, x, terms, iw_samples, batch_size, bar)
        bar.update(len(x) if iw_samples == 1 else 0)
        figures.update(mse=mse(x_rec, x), psnr=psnr(x_rec, x), ssim=ssim(x_rec, x))  # float32, out of autocast
        for k, v in figures.items():
            per_image.setdefault(k, []).append(v)
        posterior_means.append(terms.posterior.mean)
        kl_dims += terms.posterior.kl_per_dim().double().sum(0)
    bar.close()
    # One transfer to the host at the end; means and variances in float64.
    v = {k: torch.cat(t).double().cpu() for k, t in per_image.items()}  # each (N,)
    activity = torch.cat(posterior_means).double().var(0, correction=0).cpu()  # (latent_dim,): Var_x(E_q[z_u|x])
    return _report(vae, v, activity, kl_dims.cpu() / n, dims=images[0].numel(), iw_samples=iw_samples)


def _likelihood_terms(vae: VAE, x: torch.Tensor, terms: ELBO, iw_samples: int, batch_size: int,
                      bar: tqdm) -> dict[str, torch.Tensor]:
    """Per-image figures of one batch, each (B,): the density's and the 8-bit ELBO terms, their importance-weighted
    bounds and Monte Carlo variances (K > 1), and the training loss."""
    out = {"kl": terms.kl, "density_recon": terms.recon, "loss": terms.loss_per_image}
    eight_bit = terms.likelihood.has_8bit()
    if eight_bit:
        out["recon"] = terms.likelihood.log_prob_8bit(x)  # the same z, scored as the 8-bit image
    if iw_samples > 1:
        chunk = min(iw_samples, batch_size)  # samples per image per decoder call
        group = max(1, batch_size // iw_samples)  # images per decoder call
        parts = []
        for i in range(0, len(x), group):  # each call decodes len(x[i:i + group]) * chunk <= batch_size images
            parts.append(importance_samples(vae, x[i:i + group], iw_samples, chunk=chunk,
                                            posterior=terms.posterior.select(slice(i, i + group))))
            bar.update(len(x[i:i + group]) * iw_samples)  # the progress bar counts importance samples
        ratio = torch.cat([p.log_ratio for p in parts], dim=1)  # (K, B)
        scored = {"density_": torch.cat([p.log_density for p in parts], dim=1)}  # (K, B)
        if eight_bit:
            scored[""] = torch.cat([p.log_prob_8bit for p in parts], dim=1)
        for prefix, log_px_z in scored.items():
            out[prefix + "log_px"] = iw_bound(log_px_z, ratio)
            out[prefix + "recon_var"] = log_px_z.var(0)  # the variance of a one-sample reconstruction term
    return {k: t.float() for k, t in out.items()}


@torch.inference_mode()
def estimate_seconds(vae: VAE, images: SplitView, *, iw_samples: int, batch_size: int, device: torch.device,
                     precision: str) -> float:
    """Seconds `evaluate` will take, from one timed decoder call of batch_size samples (after a warm-up call): the
    report needs about n * (K + 2) / batch_size such calls."""
    x = to_float(images[:1], device)  # (1, C, H, W)
    n = len(images)
    with autocast(device, precision):
        z = vae.encode(x).sample(min(batch_size, n * iw_samples)).reshape(-1, vae.config.latent_dim)  # (b, latent)
        x_rep = x.expand(len(z), *x.shape[1:])
        _score(vae.decode(z), x_rep)  # warm-up: first calls pay for allocation and kernel choice
        start = time.perf_counter()
        _score(vae.decode(z), x_rep).sum().item()  # .item(): wait for the device
        seconds = time.perf_counter() - start
    return math.ceil(n * (iw_samples + (2 if iw_samples > 1 else 1)) / len(z)) * seconds


def check_duration(seconds: float, *, yes: bool, what: str) -> None:
    """Refuse a job estimated beyond MAX_EVAL_HOURS unless `yes`; say the estimate when it is over a minute."""
    if seconds > MAX_EVAL_HOURS * 3600 and not yes:
        raise UserError(f"{what} would take about {_duration(seconds)} on this machine (more than {MAX_EVAL_HOURS} "
                        f"hours); lower --iw-samples or --limit, or add --yes to run it anyway")
    if seconds > 60:
        print(f"facevae: {what} will take about {_duration(seconds)}", file=sys.stderr)


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:,.0f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 60:.0f} minutes"


def _score(likelihood: Likelihood, x: torch.Tensor) -> torch.Tensor:
    """What evaluation computes per decoded sample: the density's log-likelihood and the 8-bit one; (B,) nats."""
    lp = likelihood.log_prob(x)
    return lp + likelihood.log_prob_8bit(x) if likelihood.has_8bit() else lp


def _report(vae: VAE, v: dict[str, torch.Tensor], activity: torch.Tensor, kl_per_dim: torch.Tensor, *, dims: int,
            iw_samples: int) -> dict[str, Any]:
    """The report's numbers from the per-image figures (N,) and the per-dimension statistics (latent_dim,)."""
    n = len(v["kl"])
    report = _likelihood_figures(v, n, iw_samples)
    report.update({
        "elbo_bpd": bits_per_dim(report["elbo_nats"], dims),
        "nll_iw_bpd": bits_per_dim(None if report["nll_iw_nats"] is None else -report["nll_iw_nats"], dims),
        "loss_nats": v["loss"].mean().item(),
        "kl_weight": vae.config.kl_weight,
        "psnr_db": v["psnr"].mean().item(),  # the mean of the per-image PSNRs
        "ssim": v["ssim"].mean().item(),
        "mse": v["mse"].mean().item(),
        "active_units": int((activity > ACTIVE_UNIT_THRESHOLD).sum()),
        "latent_dim": vae.config.latent_dim,
        "kl_per_dim_nats": [round(k, 6) for k in kl_per_dim.tolist()],
        "likelihood": vae.config.likelihood,
        "images": n,
        "dims": dims,
    })
    return report


def _likelihood_figures(v: dict[str, torch.Tensor], n: int, iw_samples: int) -> dict[str, Any]:
    """ELBO terms and the importance-weighted -log p(x) with their errors, nats per image. Unprefixed: of the 8-bit
    image (None where the likelihood has no 8-bit probability); density_*: of the density training optimises."""
    def stderr(t: torch.Tensor) -> float | None:  # the standard error of the mean over images; None for one image
        return t.std().item() / math.sqrt(n) if n > 1 else None

    out: dict[str, Any] = {"kl_nats": v["kl"].mean().item(), "iw_samples": iw_samples}
    for prefix in ("", "density_"):
        if prefix + "recon" not in v:
            out.update({prefix + key: None for key in ("elbo_nats", "elbo_stderr", "elbo_mc_stderr", "recon_nats",
                                                       "nll_iw_nats", "nll_iw_stderr")})
            continue
        elbo = v[prefix + "recon"] - v["kl"]  # (N,)
        nll = -elbo if iw_samples == 1 else -v[prefix + "log_px"]  # (N,); K = 1 is the ELBO itself
        var = v.get(prefix + "recon_var")  # (N,) Monte Carlo variance of each image's one-sample term
        out.update({
            prefix + "elbo_nats": elbo.mean().item(),
            prefix + "elbo_stderr": stderr(elbo),  # the spread over images
            prefix + "elbo_mc_stderr": var.sum().sqrt().item() / n if var is not None else None,  # from sampling z
            prefix + "recon_nats": v[prefix + "recon"].mean().item(),
            prefix + "nll_iw_nats": nll.mean().item(),
            prefix + "nll_iw_stderr": stderr(nll),  # over images
        })
    return out


def evaluate_run(run: Run | str | Path, *, split: str = "test", iw_samples: int = 1, limit: int | None = None,
                 batch_size: int | None = None, device: str | None = None, fid_weights: str | Path | None = None,
                 seed: int = 0, data: str | None = None, yes: bool = False) -> dict[str, Any]:
    """Evaluate a run's model on a split of its data and return the report; a full evaluation of the test split (no
    limit) is also written to RUN_DIR/eval.json, the figures `facevae compare` reads (Run.keeps_eval).

    Device, precision, memory layout and threads are the run's config choices, as in training (torch.compile is
    not used: evaluation batch shapes vary); `device` overrides the device. The random draws are seeded, so the same
    command gives the same numbers. FID is computed only when `fid_weights` names the Inception weights file and the
    `fid` extra is installed; otherwise the report's "fid_note" says how to get it. The data comes from the run's
    config.toml, or `data` (--data); a job estimated (after one timed decoder call) beyond MAX_EVAL_HOURS is refused
    unless `yes`.
    """
    if iw_samples < 1:
        raise UserError(f"--iw-samples must be at least 1, got {iw_samples}")
    if batch_size is not None and batch_size < 0:
        raise UserError(f"--batch-size must be positive (or 0: by device), got {batch_size}")
    run = Run(run)
    run.check_writable()  # eval.json is written there: only into a run
    vae = run.load_model(data=data)  # the data from config.toml or --data, never the weights' metadata
    config = vae.config
    dev, precision = setup(config, device=device)  # the run's hardware choices, as in training
    batch_size = batch_size or eval_batch_size(dev, config.eval_batch_size)
    vae = vae.to(dev)
    if config.channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    images = _first(run.data(config, split), split, limit)  # read through the memory-mapped cache, never copied
    # The weights file is checked before the long evaluation: a bad one fails at once.
    extractor, fid_note = fid.load_extractor(fid_weights, dev) if fid_weights else (None, fid.NOTE_NO_WEIGHTS)
    if extractor is not None and len(images) < 2:
        raise UserError("FID needs at least 2 images; raise --limit")

    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        check_duration(estimate_seconds(vae, images, iw_samples=iw_samples, batch_size=batch_size, device=dev,
                                        precision=precision), yes=yes,
                       what=f"evaluating {len(images):,} images with {iw_samples:,} importance samples each")
        torch.manual_seed(seed)
        report = evaluate(vae, images, iw_samples=iw_samples, batch_size=batch_size, device=dev, precision=precision,
                          progress=True)
        if extractor is not None:
            report.update(fid.fid_report(vae, images, extractor, batch_size=batch_size, device=dev,
                                         precision=precision, seed=seed))
            report["fid_weights_sha256"] = fid.file_sha256(fid_weights)
        else:
            report["fid_note"] = fid_note
    report.update(split=split, training=run.training(), facevae_version=__version__,
                  data=_data_entry(config, images.manifest),
                  settings={"iw_samples": iw_samples, "limit": limit, "batch_size": batch_size, "device": str(dev),
                            "precision": precision, "channels_last": config.channels_last, "seed": seed,
                            "fid_weights": str(Path(fid_weights).resolve()) if fid_weights else None})
    if Run.keeps_eval(split, limit):
        run.write_eval(report)
    return report


def _first(images: SplitView, split: str, limit: int | None) -> SplitView:
    """The first `limit` images of a split (all without a limit); a UserError for a limit outside it or no images."""
    if limit is not None and not 1 <= limit <= len(images):
        raise UserError(f"--limit {limit} is outside 1..{len(images)} (the '{split}' split has {len(images)} images)")
    images = images.head(limit) if limit else images
    if len(images) == 0:
        raise UserError(f"the '{split}' split has no images")
    return images


def _data_entry(config: Any, manifest: dict[str, Any]) -> dict[str, Any]:
    """What data a report was computed on: the SPEC, the cache's settings and a digest of its manifest."""
    return {"spec": config.data, "source": manifest.get("source"), "size": manifest.get("size"),
            "crop": manifest.get("crop"), "split_scheme": manifest.get("split"),
            "manifest_sha256": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()}


def training_note(training: dict[str, Any] | None) -> str | None:
    """A warning when the evaluated model's training was unfinished (or not recorded), else None."""
    if training is None:
        return "the model file does not say how far training went (written by an older facevae)"
    if training.get("finished"):
        return None
    return (f"training is unfinished (epoch {training['epoch']} of {training['epochs']}, step {training['step']}): "
            f"these figures describe a partly trained model")


def format_report(r: dict[str, Any]) -> str:
    """The report as a small human-readable table."""
    def num(v: Any, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    def pm(key: str) -> str:
        return "" if r.get(key) is None else f" +- {r[key]:.2f}"

    rows = [
        ("ELBO of the 8-bit image (lower bound on log P(x), higher is better)",
         f"{num(r['elbo_nats'], '.2f')}{pm('elbo_stderr')} nats/image", f"{num(r['elbo_bpd'], '.4f')} bits/dim"),
        ("  its Monte Carlo error (one z per image)", f"{num(r.get('elbo_mc_stderr'), '.3f')} nats/image", ""),
        ("  reconstruction E_q[log P(x|z)]", f"{num(r['recon_nats'], '.2f')} nats/image", ""),
        ("  KL(q(z|x) || p(z))", f"{r['kl_nats']:.2f} nats/image", ""),
        (f"-log P(x), importance-weighted K={r['iw_samples']} (lower is better)",
         f"{num(r['nll_iw_nats'], '.2f')}{pm('nll_iw_stderr')} nats/image", f"{num(r['nll_iw_bpd'], '.4f')} bits/dim"),
        ("ELBO of the continuous density that training optimises",
         f"{r['density_elbo_nats']:.2f}{pm('density_elbo_stderr')} nats/image", ""),
        (f"training objective -recon + {r['kl_weight']:g} * KL (density)", f"{r['loss_nats']:.2f} nats/image", ""),
        ("PSNR (posterior-mean reconstruction, mean over images)", f"{r['psnr_db']:.2f} dB", ""),
        ("SSIM", f"{r['ssim']:.4f}", ""),
        ("MSE (pixels in [0, 1])", f"{r['mse']:.5f}", ""),
        ("active units (Var > 0.01)", f"{r['active_units']} / {r['latent_dim']}", ""),
    ]
    if "fid_recon" in r:
        rows += [(f"FID reconstructions ({r['fid_images']} vs {r['fid_images']} images, lower is better)",
                  f"{r['fid_recon']:.2f}", ""),
                 (f"FID prior samples ({r['fid_images']} vs {r['fid_images']} images, lower is better)",
                  f"{r['fid_samples']:.2f}", "")]
    width = max(len(a) for a, _, _ in rows)
    head = f"{r['likelihood']} likelihood, {r['images']} images of split '{r.get('split', '?')}', D = {r['dims']}"
    lines = [head] + [f"  {a:<{width}}  {b:<28} {c}".rstrip() for a, b, c in rows]
    note = training_note(r.get("training"))
    if note:
        lines.append(f"  Note: {note}.")
    if r.get("fid_note"):
        lines.append(f"  {r['fid_note']}")
    return "\n".join(lines)
