"""Build docs/tutorial.ipynb from the cells below, run it, and render docs/tutorial.md for reading without Jupyter.

    python docs/make_tutorial.py            # build, execute (about a minute on a CPU), write .ipynb, .md and figures
    python docs/make_tutorial.py --check    # exit 1 if the committed notebook's cells differ from the ones below

The notebook follows the study deck "VAE - Let's make a face" slide by slide with facevae's own API. Its cells live
here, as text, so that a change to the tutorial is a reviewable diff; the executed notebook (with its outputs) and
its Markdown rendering are generated. tests/test_tutorial.py executes the notebook built from these cells.
Needs nbformat and nbclient (the `test` or `notebook` extra).
"""

from __future__ import annotations

import argparse
import base64
import shutil
import sys
import textwrap
from pathlib import Path

import nbformat

DOCS = Path(__file__).resolve().parent
NOTEBOOK = DOCS / "tutorial.ipynb"
MARKDOWN = DOCS / "tutorial.md"
FIGURES = DOCS / "tutorial_files"

# (kind, source): "md" for a Markdown cell, "py" for a code cell. Sources are dedented and stripped.
CELLS: list[tuple[str, str]] = [
    ("md", r"""
    # VAE: let's make a face, with facevae

    This notebook walks the road of the study deck *"VAE: Let's make a face"*, slide by slide, with facevae's own
    API: every formula on a slide is a cell you can run and change.

    1. The auto-encoder: encode a face, decode it
    2. Likelihood and log-likelihood: nats, and what bits/dim means
    3. Variational inference: the posterior, its samples, its KL in closed form and by Monte Carlo
    4. The ELBO: reconstruction minus KL, and log p(x) >= ELBO
    5. The deck's loss: MSE + 0.00024 KL in ELBO terms; a Gaussian and a Bernoulli decoder side by side
    6. Making faces: samples, interpolation, a traversal, an edit
    7. Where to go next: CelebA, GPUs, the other likelihoods

    It runs on a CPU in a few minutes at most, downloads nothing (the faces ship inside scikit-image) and writes only
    to a temporary directory, removed by the last cell. Open it with `pip install 'facevae[notebook]'` then
    `jupyter lab docs/tutorial.ipynb`.
    """),
    ("py", r"""
    import math
    import os
    import tempfile
    from pathlib import Path

    import matplotlib.pyplot as plt
    import torch

    from facevae import Config, load_run, open_dataset
    from facevae.train import train

    scratch = tempfile.TemporaryDirectory(prefix="facevae-tutorial-")  # every file this notebook writes goes here
    work = Path(scratch.name)
    os.environ["FACEVAE_CACHE"] = str(work / "cache")  # the prepared faces too (facevae's default is ~/.cache/facevae)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # networks this small gain little from more threads, and lose much on a busy machine


    def show(rows, labels, *, title=None):
        # One row of faces per tensor (N, C, H, W) in [0, 1], each row labelled on its left.
        n = max(len(r) for r in rows)
        fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n + 1.2, 1.15 * len(rows) + 0.3), squeeze=False)
        for i, (row, label) in enumerate(zip(rows, labels)):
            for j, ax in enumerate(axes[i]):
                ax.set_xticks([]), ax.set_yticks([])
                ax.spines[:].set_visible(False)
                if j < len(row):
                    img = row[j].detach().float().clamp(0, 1)
                    ax.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray", vmin=0, vmax=1)
            axes[i][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=10)
        if title:
            fig.suptitle(title, fontsize=11)
        plt.tight_layout()
        plt.show()
    """),
    ("md", r"""
    ## 1. The auto-encoder

    The deck's first slide: an **encoder** squeezes a face into a short code, a **decoder** paints a face back from
    it. The faces here are the 100 LFW faces that ship inside scikit-image, 25x25 grey, resized to 32x32: 80 to train
    on and 20 held out for testing. `open_dataset` prepares them once (into the cache) and gives uint8 images
    `(N, C, H, W)`; the model takes floats in [0, 1].
    """),
    ("py", r"""
    faces = open_dataset("lfw", split="test", size=32, progress=False)
    x = faces[:8].float() / 255  # (8, 1, 32, 32) uint8 -> float in [0, 1]
    print(len(faces), "test faces;", "a batch:", tuple(x.shape), x.dtype)
    show([x], ["real"])
    """),
    ("md", r"""
    A VAE has to be trained before its codes mean anything. This is the bundled demo's recipe (the deck's network,
    scaled down to 32x32 grey: four stride-2 convolutions, a 32-dimensional code, a Gaussian decoder with a fixed
    sigma of 0.15), trained for 40 short epochs of 5 batches. `train(config, run_dir)` is what `facevae train` runs;
    it writes a run directory (weights, metrics, pictures, a checkpoint to resume from) and `load_run` reads the
    model back, in evaluation mode.
    """),
    ("py", r"""
    config = Config(data="lfw", image_size=32, channels=1, widths=[32, 64, 128, 256], latent_dim=32,
                    likelihood="gaussian", sigma=0.15, kl_weight=1.0, hflip=True,
                    epochs=40, batch_size=16, log_every=25, image_every=40, seed=0, threads=1)
    train(config, work / "faces", progress=False)  # says where it trains and, at the end, the last epoch's figures
    vae = load_run(work / "faces")
    """),
    ("md", r"""
    `vae.encode(x)` gives, for each face, the mean and the log-variance of a Gaussian over codes (section 3 says why
    a distribution rather than one code). `vae.decode(z)` gives, for each code, a distribution over images whose
    `.mean` is the face the decoder paints. Encoding and decoding the posterior means is the auto-encoder's round
    trip:
    """),
    ("py", r"""
    with torch.no_grad():
        q = vae.encode(x)          # the posterior q(z|x): q.mean, q.logvar, each (8, 32)
        p = vae.decode(q.mean)     # the likelihood p(x|z) at the posterior mean
    print("codes:", tuple(q.mean.shape), "  reconstructions:", tuple(p.mean.shape))
    show([x, p.mean], ["real", "reconstructed"])
    """),
    ("md", r"""
    ## 2. Likelihood and log-likelihood

    The decoder does not output an image: it outputs a **likelihood** p(x|z), a probability model of images. Here it
    is a Gaussian around `p.mean` with sigma = 0.15 on every pixel:

    $$\log p(x|z) = -\frac{1}{2} \sum_{i=1}^{D} \left[ \frac{(x_i - \mu_i)^2}{\sigma^2} + \log(2 \pi \sigma^2) \right]$$

    summed over the D = 32 x 32 = 1,024 pixels. `p.log_prob(x)` returns it in **nats** (natural logarithms) per
    image, one number per image:
    """),
    ("py", r"""
    with torch.no_grad():
        log_px = p.log_prob(x)                                        # (8,) nats per image
        by_hand = -0.5 * (((x - p.mean) / 0.15) ** 2 + math.log(2 * math.pi * 0.15**2)).sum((1, 2, 3))
    print("p.log_prob(x):", log_px.numpy().round(1))
    print("by hand:      ", by_hand.numpy().round(1))
    assert torch.allclose(log_px, by_hand, rtol=1e-4)
    """),
    ("md", r"""
    The numbers are positive: a density on [0, 1]^D can exceed 1, so a log-density is not a probability. Images
    are stored as 8-bit integers, though, and the honest figure is the probability of those integers: each pixel's
    probability is the likelihood's mass on its bin [k/256, (k+1)/256) (the two edge bins open to -inf and +inf,
    so that the 256 probabilities sum to 1). `p.log_prob_8bit(x)` returns its log, in nats per image, so that
    -log P(x) >= 0. Divided by D ln 2 it becomes **bits per dimension**, the unit of the likelihood literature:

    $$\text{bits/dim} = \frac{-\log P(x)}{D \ln 2}$$

    A model that knows nothing (every grey level equally likely) scores exactly 8 bits/dim; lower is better. The
    density times the bin width, 1/256 per pixel, is close to it for a decoder as smooth as this one (sigma = 0.15 is
    about 38 bins wide) and far from it for sharp ones.
    """),
    ("py", r"""
    D = x[0].numel()  # 1,024 values per image
    with torch.no_grad():
        log_P = p.log_prob_8bit(x)  # (8,) nats: the log-probability of the 8-bit images
    print("bits/dim of each face:    ", (-log_P / (D * math.log(2))).numpy().round(3))
    print("density x 1/256 per pixel:", ((-log_px + D * math.log(256)) / (D * math.log(2))).numpy().round(3))
    print("a uniform model:          ", D * math.log(256) / (D * math.log(2)), "bits/dim")
    """),
    ("md", r"""
    ## 3. Variational inference

    The exact posterior p(z|x) of a neural decoder has no closed form, so the encoder **approximates** it with a
    Gaussian q(z|x) = N(mu, diag(sigma^2)): that is variational inference. The posterior object holds `mean`,
    `logvar` and `std`; `q.sample()` draws a code with the **reparameterisation** z = mu + sigma * eps, eps ~ N(0, I),
    so that gradients flow through mu and sigma.
    """),
    ("py", r"""
    z = q.sample()                       # (8, 32): one code per face
    eps = torch.randn_like(q.mean)
    z_by_hand = q.mean + q.std * eps     # the same thing, written out
    print("sigma of the first face's 8 first code dimensions:", q.std[0, :8].numpy().round(3))
    with torch.no_grad():
        show([x, vae.decode(q.mean).mean, vae.decode(z).mean, vae.decode(z_by_hand).mean],
             ["real", "z = mean", "z ~ q", "z ~ q again"])
    """),
    ("md", r"""
    The prior over codes is p(z) = N(0, I). The deck's closed-form KL divergence between the posterior and the prior,

    $$\mathrm{KL}(q \,\|\, p) = -\frac{1}{2} \sum_j \left(1 + \log \sigma_j^2 - \mu_j^2 - \sigma_j^2\right),$$

    is `q.kl()`, in nats per image. A KL is an expectation, KL = E_q[log q(z|x) - log p(z)], so a Monte Carlo
    average over samples of q must agree with it. In two lines:
    """),
    ("py", r"""
    z = q.sample(20_000)                                                            # (20000, 8, 32)
    kl_mc = (q.log_prob(z) + 0.5 * (z**2 + math.log(2 * math.pi)).sum(-1)).mean(0)  # E_q[log q - log N(z; 0, I)]

    kl_deck = -0.5 * (1 + q.logvar - q.mean**2 - q.logvar.exp()).sum(-1)           # the slide's formula
    print("q.kl()      :", q.kl().numpy().round(2))
    print("the formula :", kl_deck.numpy().round(2))
    print("Monte Carlo :", kl_mc.numpy().round(2))
    assert torch.allclose(q.kl(), kl_deck, rtol=1e-5) and torch.allclose(q.kl(), kl_mc, rtol=0.03)
    """),
    ("md", r"""
    The KL is a sum over code dimensions, and it tells which of them the model uses: a dimension whose posterior is
    the prior for every face (KL near 0) carries no information.
    """),
    ("py", r"""
    with torch.no_grad():
        q_all = vae.encode(faces.images.float() / 255)  # all 20 test faces
    kl_per_dim = (-0.5 * (1 + q_all.logvar - q_all.mean**2 - q_all.logvar.exp())).mean(0)  # (32,) nats
    order = kl_per_dim.argsort(descending=True)
    plt.figure(figsize=(8, 2.4))
    plt.bar(range(len(order)), kl_per_dim[order])
    plt.xlabel("code dimension (sorted)"), plt.ylabel("mean KL, nats")
    plt.title("KL per code dimension, averaged over the test faces")
    plt.show()
    """),
    ("md", r"""
    ## 4. The ELBO

    The quantity a VAE maximises is the **evidence lower bound**:

    $$\text{ELBO} = \mathbb{E}_{q(z|x)}[\log p(x|z)] - \mathrm{KL}(q(z|x) \,\|\, p(z)) \le \log p(x)$$

    reconstruction (how well codes drawn from q explain the image) minus KL (how far q strays from the prior).
    `vae(x)` returns its terms per image, in nats, with one sampled code per image (what training uses):
    """),
    ("py", r"""
    with torch.no_grad():
        terms = vae(x)
    print("reconstruction:", terms.recon.numpy().round(1))
    print("KL:            ", terms.kl.numpy().round(1))
    print("ELBO:          ", terms.elbo.numpy().round(1))
    assert torch.allclose(terms.elbo, terms.recon - terms.kl)
    """),
    ("md", r"""
    Why is it a lower bound, and how loose is it? Importance sampling with q as the proposal gives estimates of log
    p(x) that tighten as the number of samples K grows (Burda et al., the IWAE bound):

    $$
    \log p(x) \ge \mathbb{E} \log \frac{1}{K} \sum_{k=1}^{K} \frac{p(x|z_k)\, p(z_k)}{q(z_k|x)},
    \quad z_k \sim q(z|x)
    $$

    K = 1 is the ELBO; as K grows the bound rises toward log p(x). Each estimate is random (it is the *expected*
    value that rises with K), so the curve can wobble. Written out with the posterior and the likelihood
    (`facevae evaluate --iw-samples K` computes the same, in batches):
    """),
    ("py", r"""
    @torch.no_grad()
    def log_px_importance(vae, x, K, chunk=100):
        # log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x): (B,) nats; K codes per image, decoded `chunk` at a time
        q = vae.encode(x)
        log_w = []
        for start in range(0, K, chunk):
            k = min(chunk, K - start)
            z = q.sample(k)                                                        # (k, B, latent)
            log_px_z = vae.decode(z.flatten(0, 1)).log_prob(x.repeat(k, 1, 1, 1)).view(k, -1)
            log_pz = -0.5 * (z**2 + math.log(2 * math.pi)).sum(-1)
            log_w.append(log_px_z + log_pz - q.log_prob(z))                        # (k, B)
        return torch.logsumexp(torch.cat(log_w), 0) - math.log(K)


    Ks = [1, 3, 10, 30, 100, 300]
    estimates = [log_px_importance(vae, x, K).mean().item() for K in Ks]
    for K, e in zip(Ks, estimates):
        print(f"K = {K:4d}: {e:8.2f} nats per image")
    plt.figure(figsize=(6, 3))
    plt.semilogx(Ks, estimates, "o-", label="importance-weighted bound")
    plt.axhline(terms.elbo.mean().item(), color="gray", ls="--", label="ELBO (one sample, above)")
    plt.xlabel("K, samples per image"), plt.ylabel("nats per image, mean of 8")
    plt.title("log p(x) >= the bound, which rises with K")
    plt.legend()
    plt.show()
    """),
    ("md", r"""
    ## 5. The deck's loss

    The deck trains with

        loss_deck = mean_squared_error(x_hat, x) + 0.00024 * mean_over_batch(KL)

    which is not the ELBO. Per image, with D values and SSE the sum of squared errors, D * loss_deck = SSE + 0.00024 D
    KL. A Gaussian decoder with sigma = 1 has -log p(x|z) = SSE / 2 + (D/2) log(2 pi), so

    $$
    \frac{D}{2}\, \text{loss}_\text{deck} + \frac{D}{2} \log(2\pi) = -\log p(x|z) + \beta\, \mathrm{KL},
    \qquad \beta = \frac{0.00024\, D}{2}:
    $$

    the deck's loss is a **beta-weighted** objective, beta = 1.47 at the deck's D = 3 x 64 x 64 = 12,288.
    Equivalently, dividing by beta, it is the true ELBO (beta = 1) of a Gaussian decoder with **sigma^2 = 1.47**.
    The same weight on our 32x32 grey faces (D = 1,024) is beta = 0.123, or sigma^2 = 0.123 (sigma = 0.35).
    """),
    ("py", r"""
    w = 0.00024
    for name, dims in [("the deck, CelebA 64x64x3", 3 * 64 * 64), ("these faces, 32x32x1", 32 * 32)]:
        print(f"{name}: D = {dims:6,d}, beta = sigma^2 = w D / 2 = {w * dims / 2:.4f}")
    beta = w * D / 2
    """),
    ("md", r"""
    facevae trains exactly that objective with `likelihood="gaussian", sigma=1, kl_weight=beta` (the recipe
    `configs/celeba64-deck-gaussian.toml`), and the deck's Bernoulli decoder, binary cross-entropy + 0.00024 KL,
    with `likelihood="bernoulli", kl_weight=0.00024 * D` (BCE summed over the D pixels:
    `configs/celeba64-deck-bernoulli.toml`). Both on the same faces, for the same 40 short epochs:
    """),
    ("py", r"""
    deck = config.updated({"likelihood": "gaussian", "sigma": 1.0, "kl_weight": beta})
    train(deck, work / "deck-gaussian", progress=False)
    gaussian = load_run(work / "deck-gaussian")
    """),
    ("py", r"""
    train(deck.updated({"likelihood": "bernoulli", "kl_weight": w * D}), work / "deck-bernoulli", progress=False)
    bernoulli = load_run(work / "deck-bernoulli")
    """),
    ("md", r"""
    The identity above, checked on a batch: facevae's training loss (nats per image, for the same sampled codes) is
    (D/2) times the deck's loss plus a constant.
    """),
    ("py", r"""
    with torch.no_grad():
        t = gaussian(x)  # t.x_mean: the decoder's mean for the sampled codes; t.kl: KL per image
    loss_deck = ((t.x_mean - x) ** 2).mean() + w * t.kl.mean()
    print(f"facevae's loss: {t.loss.item():.3f} nats per image")
    print(f"(D/2) * loss_deck + (D/2) log(2 pi): {D / 2 * loss_deck.item() + D / 2 * math.log(2 * math.pi):.3f}")
    assert math.isclose(t.loss.item(), D / 2 * loss_deck.item() + D / 2 * math.log(2 * math.pi), rel_tol=1e-4)
    """),
    ("md", r"""
    The deck's result slides: real images beside each decoder's predictions, and the mean ELBO of each, here over the
    20 test faces in nats per image (of the density, as training computes it: `vae(x).elbo`). For the Gaussian two
    readings of the same network are given, the true ELBO of the sigma = 1 decoder it was trained as, and that of
    sigma^2 = beta, whose ELBO *is* the deck's objective. The Bernoulli's "ELBO" treats grey levels as probabilities
    of black and white: it is a training objective, not a bound on the likelihood of grey images (facevae reports no
    bits/dim for it; `continuous_bernoulli` is the normalised version).
    """),
    ("py", r"""
    from facevae.distributions import Gaussian

    test = faces.images.float() / 255  # (20, 1, 32, 32)
    with torch.no_grad():
        g, b = gaussian(test), bernoulli(test)
        q_g = gaussian.encode(test)
        as_sigma2_beta = Gaussian(gaussian.decode(q_g.sample()).mean, 0.5 * math.log(beta)).log_prob(test) - q_g.kl()
        predictions = [gaussian.reconstruct(test[:8]), bernoulli.reconstruct(test[:8])]
    show([test[:8], *predictions],
         ["real", "Gaussian\n(MSE)", "Bernoulli\n(BCE)"], title="the deck's slide: real faces and predictions")
    print(f"Gaussian, sigma = 1:        mean ELBO {g.elbo.mean():8.1f} nats per image")
    print(f"Gaussian, sigma^2 = {beta:.3f}: mean ELBO {as_sigma2_beta.mean():8.1f} nats per image")
    print(f"Bernoulli:                  mean ELBO {b.elbo.mean():8.1f} nats per image (a training objective)")
    """),
    ("md", r"""
    The deck prints PSNR (peak signal-to-noise ratio of the reconstructions, in dB) every 100 batches. facevae logs it
    in the run's `metrics.jsonl`, with the test split's PSNR at the end of every epoch:
    """),
    ("py", r"""
    import json

    plt.figure(figsize=(6, 3))
    for name in ["faces", "deck-gaussian", "deck-bernoulli"]:
        records = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
        epochs = [r for r in records if r["kind"] == "epoch"]
        plt.plot([r["epoch"] for r in epochs], [r["test_psnr_db"] for r in epochs], label=name)
    plt.xlabel("epoch"), plt.ylabel("test PSNR, dB")
    plt.title("reconstruction quality while training")
    plt.legend()
    plt.show()
    """),
    ("md", r"""
    ## 6. Making faces

    A VAE is a generative model: a code drawn from the prior N(0, I) and decoded is a new face. `vae.sample(n)`
    returns the decoder's means for n such codes; a temperature T below 1 draws them from N(0, T^2 I), nearer the
    prior's centre, where faces are smoother and more alike.
    """),
    ("py", r"""
    generator = torch.Generator().manual_seed(1)
    show([vae.sample(8, generator=generator), vae.sample(8, generator=generator, temperature=0.5)],
         ["T = 1", "T = 0.5"], title="new faces: decoded codes z ~ N(0, T^2 I)")
    """),
    ("md", r"""
    The making-faces tools of `facevae.faces` work on posterior means (the codes of real faces) and are what the
    commands `facevae interpolate`, `traverse`, `edit` and `analogy` call. **Interpolation** walks from one face's
    code to another's. A code drawn from N(0, I) in 32 dimensions has a norm near sqrt(32) = 5.7: the straight line
    (lerp) between two codes cuts through the inside of that shell, while slerp turns along the great circle between
    them, its norm going evenly from one end's to the other's. The path's end faces are the reconstructions of the
    two faces; here, the two test faces whose codes lie farthest apart.
    """),
    ("py", r"""
    from facevae.faces import edit, encode, interpolate, traverse
    from facevae.latent import latent_path

    codes = encode(vae, faces.images)  # the 20 test faces' posterior means, (20, 32)
    i, j = divmod(torch.cdist(codes, codes).argmax().item(), len(codes))  # the two codes farthest apart
    a, b = faces[i], faces[j]  # uint8 (1, 32, 32) each
    for mode in ["slerp", "lerp"]:
        norms = latent_path(codes[i], codes[j], 8, mode).norm(dim=1)
        print(f"{mode:5s}: code norms along the path", norms.numpy().round(2))
    with_ends = lambda row: torch.cat([a[None] / 255, row, b[None] / 255])  # the real faces at both ends
    show([with_ends(interpolate(vae, a, b, steps=8, mode="slerp")),
          with_ends(interpolate(vae, a, b, steps=8, mode="lerp"))],
         ["slerp", "lerp"], title="from face A to face B, real faces at the ends")
    """),
    ("md", r"""
    A **traversal** moves one code dimension at a time, here from -3 to +3 prior standard deviations around the
    prior's centre z = 0 (`facevae traverse RUN --image FACE` centres it on a face's code instead): the three
    dimensions with the most KL in section 3's bar chart, and the one with the least.
    """),
    ("py", r"""
    dims = [*order[:3].tolist(), order[-1].item()]
    rows = traverse(vae, torch.zeros(32), dims, torch.linspace(-3, 3, 7))  # (4, 7, 1, 32, 32)
    show(list(rows), [f"z{d}\nKL {kl_per_dim[d]:.2f}" for d in dims],
         title="one code dimension at a time, -3 to +3 around z = 0")
    """),
    ("md", r"""
    An **edit** adds an attribute vector: the mean code of the faces that have the attribute minus the mean code of
    those that do not (White 2016). CelebA comes with 40 labelled attributes, and `facevae attributes RUN` and
    `facevae edit RUN FACE --add Smiling=1.5` use them. These faces have no labels, so make one that you can check by
    eye: a light background, the mean grey level of the 4-pixel frame around the face above the training faces'
    median. How well the vector reads the attribute: project the codes on it, pick the threshold on the training
    faces, and measure the ROC AUC on the test faces.
    """),
    ("py", r"""
    from facevae.latent import attribute_vectors, project, readout

    frame = torch.ones(32, 32, dtype=torch.bool)
    frame[4:-4, 4:-4] = False


    def background(images):  # uint8 (N, 1, 32, 32) -> (N,) mean grey level of the frame, 0..255
        return images[:, 0][:, frame].float().mean(1)


    train_faces = open_dataset("lfw", split="train", size=32, progress=False).images  # (80, 1, 32, 32) uint8
    threshold = background(train_faces).median()
    light_train, light_test = background(train_faces) > threshold, background(faces.images) > threshold
    codes_train, codes_test = encode(vae, train_faces), codes  # posterior means (N, 32)
    light = attribute_vectors(codes_train, light_train[:, None], ["light background"]).vector("light background")
    quality = readout((project(codes_train, light[None])[:, 0], light_train),
                      (project(codes_test, light[None])[:, 0], light_test))
    print(f"{int(light_train.sum())} of {len(train_faces)} training faces have a light background; the vector "
          f"(length {light.norm():.2f}) reads it on the {len(light_test)} test faces with ROC AUC {quality['auc']:.2f}")
    """),
    ("py", r"""
    dark, bright = background(faces.images).argmin().item(), background(faces.images).argmax().item()
    show([torch.cat([faces[dark][None] / 255, edit(vae, faces[dark], 2 * light, steps=6)]),
          torch.cat([faces[bright][None] / 255, edit(vae, faces[bright], -2 * light, steps=6)])],
         ["+2 x light", "-2 x light"],
         title="a real face, then its reconstruction moved along the vector in 6 steps")
    """),
    ("md", r"""
    ## 7. Where to go next

    **The deck's experiment on CelebA.** With CelebA on disk (either its original or its Kaggle layout), decode it
    once into a uint8 cache, train both decoders with the deck's settings and compare them:

    ```sh
    facevae prepare --data celeba:/data/celeba --size 64 --crop 148 --split-scheme deck
    facevae train --config configs/celeba64-deck-gaussian.toml --data celeba:/data/celeba --out runs/gaussian
    facevae train --config configs/celeba64-deck-bernoulli.toml --data celeba:/data/celeba --out runs/bernoulli
    facevae evaluate runs/gaussian --iw-samples 1000 --json
    facevae evaluate runs/bernoulli --iw-samples 1000 --json
    facevae compare runs/gaussian runs/bernoulli --out compare.png
    ```

    **GPUs.** The same command uses a GPU when there is one (bf16, channels-last, fused Adam); several GPUs through
    torchrun: `torchrun --nproc_per_node=8 -m facevae train --config configs/celeba64.toml --data
    celeba:/data/celeba --out runs/celeba64`. A second `facevae train --out` of the same run resumes it.

    **The other likelihoods.** `--set likelihood=NAME` (or `Config(likelihood=NAME)`) picks the decoder's p(x|z)
    from facevae's table of likelihoods; `discretized_logistic` is the recommended recipe's
    (`configs/celeba64.toml`), and `make compare-demo` trains each on these faces and prints them side by side. The
    README's "Numbers and units" says what each reported figure means.
    """),
    ("py", r"""
    from facevae import LIKELIHOODS

    for name, likelihood in LIKELIHOODS.items():
        print(f"{name:28s}{likelihood.__doc__.strip().splitlines()[0]}")
    """),
    ("md", r"""
    The last cell removes the temporary directory with the three runs and the prepared faces (skip it to keep them:
    `work` is their path).
    """),
    ("py", r"""
    print("removing", work)
    scratch.cleanup()
    """),
]


def build() -> nbformat.NotebookNode:
    """The notebook of CELLS, without outputs."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    for i, (kind, text) in enumerate(CELLS):
        source = textwrap.dedent(text).strip("\n")
        cell = nbformat.v4.new_markdown_cell(source) if kind == "md" else nbformat.v4.new_code_cell(source)
        cell.id = f"cell-{i:02d}"  # stable ids: rebuilding changes nothing that the cells do not
        nb.cells.append(cell)
    return nb


def execute(nb: nbformat.NotebookNode, *, cwd: Path, timeout: int = 600) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel (nbclient), in `cwd`; an error in a cell raises."""
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def same_cells(a: nbformat.NotebookNode, b: nbformat.NotebookNode) -> bool:
    """Whether two notebooks have the same cells (kinds and sources), outputs aside."""
    return [(c.cell_type, c.source) for c in a.cells] == [(c.cell_type, c.source) for c in b.cells]


def _merged_streams(outputs: list) -> list:
    """Consecutive pieces of one stream (stdout or stderr) as one output, as Jupyter shows them."""
    merged: list = []
    for output in outputs:
        if (output.output_type == "stream" and merged and merged[-1].output_type == "stream"
                and merged[-1].name == output.name):
            merged[-1] = nbformat.from_dict({**merged[-1], "text": merged[-1].text + output.text})
        else:
            merged.append(output)
    return merged


def render_markdown(nb: nbformat.NotebookNode, figures: Path) -> str:
    """The executed notebook as Markdown: code in fences, text outputs in fences, figures as PNG files beside it."""
    out: list[str] = []
    count = 0
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            out.append(cell.source)
            continue
        out.append(f"```python\n{cell.source}\n```")
        for output in _merged_streams(cell.get("outputs", [])):
            data = output.get("data", {})
            if output.output_type == "stream":
                out.append(f"```text\n{output.text.rstrip()}\n```")
            elif "image/png" in data:
                count += 1
                name = f"figure-{count:02d}.png"
                (figures / name).write_bytes(base64.b64decode(data["image/png"]))
                out.append(f"![figure {count}]({figures.name}/{name})")
            elif "text/plain" in data:
                out.append(f"```text\n{data['text/plain'].rstrip()}\n```")
            elif output.output_type == "error":
                raise RuntimeError(f"the notebook failed: {output.ename}: {output.evalue}")
    head = ("<!-- Generated from docs/tutorial.ipynb by docs/make_tutorial.py: edit the cells there, not this file. "
            "-->\n\n")
    return head + "\n\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the committed notebook's cells are current")
    args = parser.parse_args()
    nb = build()
    if args.check:
        current = NOTEBOOK.is_file() and same_cells(nbformat.read(NOTEBOOK, as_version=4), nb)
        print("docs/tutorial.ipynb is " + ("up to date" if current else "stale: run python docs/make_tutorial.py"))
        return 0 if current else 1
    execute(nb, cwd=DOCS)
    nbformat.write(nb, NOTEBOOK)
    shutil.rmtree(FIGURES, ignore_errors=True)
    FIGURES.mkdir()
    MARKDOWN.write_text(render_markdown(nb, FIGURES))
    print(f"wrote {NOTEBOOK}, {MARKDOWN} and {len(list(FIGURES.iterdir()))} figures in {FIGURES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
