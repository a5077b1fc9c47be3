"""Small, fast tests written against the mutants that `make mutate` (tools/mutate.py, issue 18) found alive: each
asserts real behaviour, and each was checked to fail on the mutant it names."""

from __future__ import annotations

import copy
import dataclasses
import errno
import hashlib
import json
import math
import os
import random
import signal
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from facevae import checkpoint as ckpt
from facevae import evaluate as ev
from facevae.data.cache import Cache, seeded_split
from facevae.distributions import (Bernoulli, ContinuousBernoulli, DiagonalGaussian, DiscretizedLogistic,
                                   Gaussian)
from facevae.metrics import importance_samples
from facevae.errors import Interrupted, UserError
from facevae.model import VAE
from facevae.train import Meter, Trainer, TrainState, _warmup, batches_per_epoch, train


class _LinearGaussianModel:
    """A latent model small enough to reason about: q(z|x) = N(0, I), p(x|z) = N(z_0, 1) per pixel; records the
    number of images of each decoder call."""

    def __init__(self):
        self.decoded: list[int] = []
        self.encoded = 0

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        self.encoded += 1
        return DiagonalGaussian(torch.zeros(len(x), 2), torch.zeros(len(x), 2))

    def decode(self, z: torch.Tensor) -> Gaussian:
        self.decoded.append(len(z))
        return Gaussian(z[:, :1, None, None].expand(-1, 1, 2, 2).contiguous())


# ------------------------------------------------------------------ metrics.importance_samples
def test_importance_samples_decode_at_most_chunk_samples_at_a_time():
    """chunk bounds the decoder's batch (its memory): chunk=1 decodes one sample of each image per call, chunk=0 is
    taken as 1, and the K samples are all scored."""
    x = torch.rand(3, 1, 2, 2)
    for chunk, calls in ((1, [3] * 4), (0, [3] * 4), (3, [9, 3]), (None, [12]), (10, [12])):
        model = _LinearGaussianModel()
        s = importance_samples(model, x, 4, chunk=chunk)
        assert model.decoded == calls, chunk
        assert s.log_density.shape == s.log_ratio.shape == (4, 3)


def test_importance_samples_use_the_posterior_given():
    """A posterior passed in is the proposal (evaluation encodes once for every figure): the encoder is not called,
    and the samples come from it: with a posterior far from N(0, I) the log ratio log p(z) - log q(z|x) is about
    -|mean|^2 / 2 - log std^2 per dimension, not the 0 of q = N(0, I)."""
    torch.manual_seed(0)
    x = torch.rand(3, 1, 2, 2)
    model = _LinearGaussianModel()
    mean = torch.full((3, 2), 4.0)
    posterior = DiagonalGaussian(mean, torch.full((3, 2), -8.0))  # std e^-4: z is 4 within 0.1
    s = importance_samples(model, x, 5, posterior=posterior)
    assert model.encoded == 0
    # log N(z; 0, I) - log N(z; 4, e^-8) per dimension = -z^2/2 + eps^2/2 + logvar/2 with z = 4 + e^-4 eps:
    # about -8 + 1/2 - 4 = -11.5, so -23 for two dimensions (q = N(0, I) would give 0)
    assert torch.allclose(s.log_ratio.mean(), torch.tensor(-23.0), atol=1.0)


# ------------------------------------------------------------------ fileio: what atomic_write and remove_own_dir touch
def test_atomic_write_writes_all_of_a_short_writes_data_in_utf8(tmp_path, monkeypatch):
    """os.write may write less than asked: every byte still arrives, a str as UTF-8; the temporary is made with the
    permissions a new file gets (0o666 less the umask)."""
    from facevae import fileio

    real_write, sizes = os.write, []

    def short(fd, data):
        sizes.append(len(data))
        return real_write(fd, bytes(data[:3]))

    monkeypatch.setattr(fileio.os, "write", short)
    fileio.atomic_write(tmp_path / "a.txt", "héllo wörld")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo wörld" and sizes[:2] == [13, 10]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_an_interrupt_just_after_the_rename_is_what_atomic_write_raises(tmp_path, monkeypatch):
    """Ctrl-C arriving right after the rename: the new content is in place, the temporary is gone, and the
    KeyboardInterrupt itself propagates (the clean-up of the already renamed temporary must not replace it)."""
    from facevae import fileio

    real = os.replace

    def replace_then_interrupt(src, dst):
        real(src, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(fileio.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        fileio.atomic_write(tmp_path / "a.json", "{}")
    assert (tmp_path / "a.json").read_text() == "{}" and sorted(os.listdir(tmp_path)) == ["a.json"]


def test_atomic_writes_temporary_names_are_counted_and_run_out(tmp_path, monkeypatch):
    """.NAME.tmp-<pid>-<n>, the first free n; a dangling link at a name is passed over (never written through), and
    with the 100 names taken it gives up, creating nothing."""
    from facevae import fileio

    pid = os.getpid()
    (tmp_path / f".x.json.tmp-{pid}-0").symlink_to(tmp_path / "target")  # dangling
    fd, tmp = fileio._new_temp(tmp_path / "x.json")
    os.close(fd)
    assert tmp == tmp_path / f".x.json.tmp-{pid}-1" and tmp.is_file() and not (tmp_path / "target").exists()
    for n in range(2, 100):
        (tmp_path / f".x.json.tmp-{pid}-{n}").write_text("")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(FileExistsError, match="no free temporary name beside"):
        fileio._new_temp(tmp_path / "x.json")
    assert sorted(os.listdir(tmp_path)) == before


def test_own_names_are_the_files_and_their_temporaries_only():
    from facevae.fileio import _own_name

    names = {"model.safetensors", "state.json"}
    assert _own_name("state.json", names) and _own_name(".state.json.tmp-12-0", names)
    for other in ("state.json.tmp-12-0", ".state.json", ".other.json.tmp-1-0", "notes.txt", ".state.jsonX.tmp-1-0",
                  "model.safetensors.bak"):
        assert not _own_name(other, names), other
    assert _own_name(".a.tmp-b.json.tmp-3-0", {"a.tmp-b.json"})  # a name holding the infix: its last one counts
    assert not _own_name(".a.tmp-b.json.tmp-3-0", {"a"})


def test_remove_own_dir_removes_only_a_folder_of_its_own_files(tmp_path):
    """Its files and their temporaries go, then the folder; a missing one is fine; a link (even dangling), a file,
    a sub-folder or a stranger's file is refused with the first three strangers named, before anything is removed."""
    from facevae.fileio import remove_own_dir

    names = {"a.bin", "b.json"}
    remove_own_dir(tmp_path / "missing", names)
    own = tmp_path / "own"
    own.mkdir()
    for name in ("a.bin", ".b.json.tmp-3-0"):
        (own / name).write_text("x")
    (tmp_path / "precious").write_text("keep")
    (own / "b.json").symlink_to(tmp_path / "precious")  # a link under an own name: the link goes, not its target
    (tmp_path / "folder").mkdir()
    (own / "a.bin").unlink()
    (own / "a.bin").symlink_to(tmp_path / "folder")  # even a link to a folder
    remove_own_dir(own, names)
    assert not own.exists() and (tmp_path / "precious").read_text() == "keep" and (tmp_path / "folder").is_dir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(UserError, match="is a link or a file, not a folder facevae wrote"):
        remove_own_dir(link, names)
    assert link.is_symlink()
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UserError, match="is a link or a file"):
        remove_own_dir(tmp_path / "file", names)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("a.bin", "z.txt", "y.txt", "x.txt", "w.txt"):
        (mixed / name).write_text("x")
    (mixed / "b.json").mkdir()  # a folder under an own file's name is no file of ours
    with pytest.raises(UserError) as refused:
        remove_own_dir(mixed, names)
    assert str(refused.value) == (f"{mixed} holds files facevae did not write (b.json, w.txt, x.txt); facevae leaves "
                                  f"it alone: move them away")
    assert sorted(os.listdir(mixed)) == ["a.bin", "b.json", "w.txt", "x.txt", "y.txt", "z.txt"]


# ------------------------------------------------------------------ train and checkpoint: stop, resume, in-process
def _tiny_run(**extra):
    """Two epochs of 5 steps of 16 images, flips on, a checkpoint every 2 steps, a step record every 3."""
    return tiny_config(**{"batch_size": 16, "epochs": 2, "log_every": 3, "checkpoint_every": 2, "image_every": 100,
                          "hflip": True, **extra})


def _records(run: Path) -> list[dict]:
    """metrics.jsonl without the run headers and the timings."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("img_per_s", "seconds")} for r in lines if r["kind"] != "run"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted run that every stopped and resumed one must match bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(_tiny_run(), out, progress=False)
    return out


# A signal stops one process at the step it arrives, which here is never a log step (every 3rd, where several
# processes agree to stop) nor, for SIGINT, a checkpoint step.
@pytest.mark.parametrize("stop_at, how", [(1, "max_steps"), (8, "max_steps"), (1, "SIGTERM"), (7, "SIGINT")])
def test_a_run_stopped_and_resumed_in_process_is_bit_identical(reference_run, tmp_path, monkeypatch, capsys, stop_at,
                                                              how):
    """The in-process twin of the signal tests (mutants never reach a subprocess): stop at max_steps or on a signal
    (inside the first epoch, before any periodic checkpoint, or inside the second), leave what a crash leaves (a
    record past the checkpoint, a half-written line), resume: the same weights, optimiser state and records as the
    uninterrupted run, which needs the data order, the RNG state, the optimiser, the position in the epoch and the
    epoch's running sums all restored."""
    run = tmp_path / "run"
    if how == "max_steps":
        train(_tiny_run(max_steps=stop_at), run, progress=False)
    else:
        steps, original = [], Trainer.guarded_step

        def signalling(self, *args):
            steps.append(1)
            if len(steps) == stop_at:
                os.kill(os.getpid(), getattr(signal, how))  # the handler asks the loop to stop after this step
            return original(self, *args)

        monkeypatch.setattr(Trainer, "guarded_step", signalling)
        before = signal.getsignal(signal.SIGTERM)
        with pytest.raises(Interrupted) as stopped:
            train(_tiny_run(), run, progress=False)
        assert stopped.value.exit_status == {"SIGINT": 130, "SIGTERM": 143}[how]
        assert signal.getsignal(signal.SIGTERM) is before  # the handlers are put back
        assert f"stopped by {how} at step {stop_at}; checkpoint saved. Resume with: facevae train --out {run}" in \
            capsys.readouterr().err
        monkeypatch.setattr(Trainer, "guarded_step", original)
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == stop_at and "scaler" in state  # the loss scaler's state too (fp16)
    # the stop's checkpoint and model file are the same serialised weights, with the same progress note
    assert (run / "checkpoint" / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()
    assert ckpt.read_training(run / "model.safetensors") == {"step": stop_at, "epoch": stop_at // 5, "epochs": 2,
                                                            "finished": how == "max_steps"}
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"kind": "step", "step": stop_at + 1}) + '\n{"kind": "st')
    record = train(_tiny_run(), run, progress=False)
    assert "dropped 1 damaged line(s)" in capsys.readouterr().err
    assert record["step"] == 10 and record["epoch"] == 2
    for name in ("model.safetensors", "checkpoint/model.safetensors", "checkpoint/optimizer.safetensors"):
        a, b = load_file(str(reference_run / name)), load_file(str(run / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert _records(run) == _records(reference_run)


# ------------------------------------------------------------------ data.cache: the splits
def test_seeded_split_is_int8_with_exactly_the_test_count():
    """splits.npy is int8 (one byte an image, as the format says); `test` images are test, drawn by the seed."""
    codes = seeded_split(1000, 100, seed=5)
    assert codes.dtype == np.int8 and codes.shape == (1000,)
    assert (codes == 2).sum() == 100 and (codes == 0).sum() == 900
    assert np.array_equal(codes, seeded_split(1000, 100, seed=5))
    assert not np.array_equal(codes, seeded_split(1000, 100, seed=6))


def _cache(split_names, codes, splits=None) -> Cache:
    manifest = {"split_names": split_names, **({"splits": splits} if splits is not None else {})}
    return Cache(Path("unused"), manifest, np.zeros((len(codes), 1, 2, 2), np.uint8), np.array(codes, np.int8), None)


def test_split_indices_without_split_counts_in_the_manifest():
    """A manifest without "splits" counts: the indices come from the codes alone."""
    cache = _cache(["train", "valid", "test"], [0, 2, 0, 2, 2])
    assert cache.split_indices("test").tolist() == [1, 3, 4]
    assert cache.split_indices("test").dtype == np.int64
    assert cache.split_indices("valid").tolist() == []


def test_a_missing_split_names_only_the_splits_that_have_images():
    """Asking for a split that is absent or empty says which ones have images: a split of one image counts, a split
    of none does not, and one the counts do not mention is taken as present."""
    cache = _cache(["train", "valid", "test"], [0, 0, 2], splits={"train": 2, "valid": 0, "test": 1})
    with pytest.raises(UserError, match=r"no 'valid' split \(it has: train, test\)"):
        cache.split_indices("valid")
    cache = _cache(["train", "test"], [0, 0, 1], splits={"train": 2})
    with pytest.raises(UserError, match=r"no 'valid' split \(it has: train, test\)"):
        cache.split_indices("valid")


# ------------------------------------------------------------------ evaluate: the figures, their errors, active units
FIGURES = ("elbo_nats", "elbo_stderr", "elbo_mc_stderr", "recon_nats", "nll_iw_nats", "nll_iw_stderr")


def test_figures_of_a_likelihood_without_8bit_probability_are_named_and_none():
    """Without an 8-bit probability the unprefixed figures are there, each None; the density's are numbers."""
    v = {"kl": torch.tensor([1.0, 2.0, 4.0]), "density_recon": torch.tensor([-10.0, -20.0, -30.0])}
    out = ev._likelihood_figures(v, 3, 1)
    assert set(out) == {"kl_nats", "iw_samples", *FIGURES, *("density_" + k for k in FIGURES)}
    assert all(out[k] is None for k in FIGURES)
    assert out["density_elbo_nats"] == pytest.approx(-(11 + 22 + 34) / 3)
    assert out["density_elbo_mc_stderr"] is None  # K = 1: no Monte Carlo variance


def test_standard_errors_of_two_images():
    """The standard error of the mean over images is std / sqrt(N) from N = 2 on (None for one image); the ELBO's
    Monte Carlo error is sqrt(sum of the per-image variances) / N."""
    v = {"kl": torch.tensor([0.0, 0.0]), "density_recon": torch.tensor([-1.0, -3.0]),
         "density_log_px": torch.tensor([-0.5, -2.5]), "density_recon_var": torch.tensor([4.0, 5.0])}
    out = ev._likelihood_figures(v, 2, 8)
    assert out["density_elbo_stderr"] == pytest.approx(torch.tensor([1.0, 3.0]).std().item() / 2**0.5)
    assert out["density_nll_iw_nats"] == pytest.approx(1.5)
    assert out["density_nll_iw_stderr"] == pytest.approx(out["density_elbo_stderr"])
    assert out["density_elbo_mc_stderr"] == pytest.approx(3.0 / 2)
    one = ev._likelihood_figures({k: t[:1] for k, t in v.items()}, 1, 8)
    assert one["density_elbo_stderr"] is None and one["density_nll_iw_stderr"] is None


def test_a_unit_at_exactly_the_threshold_is_not_active_and_kl_is_rounded_to_micronats(tiny):
    """Burda et al.: active when the variance is above 0.01 (not at it); kl_per_dim_nats keeps 6 decimals."""
    vae = VAE(tiny(latent_dim=3))
    v = {"kl": torch.tensor([1.0, 2.0]), "density_recon": torch.tensor([-1.0, -3.0]), "loss": torch.tensor([1.0, 2.0]),
         "psnr": torch.tensor([20.0, 30.0]), "ssim": torch.tensor([0.5, 0.7]), "mse": torch.tensor([0.1, 0.2])}
    report = ev._report(vae, v, torch.tensor([0.01, 0.0100001, 0.0], dtype=torch.float64),
                        torch.tensor([0.123456789, 1.0, 2.5]), dims=1024, iw_samples=1)
    assert report["active_units"] == 1
    assert report["kl_per_dim_nats"] == [0.123457, 1.0, 2.5]


def test_evaluation_encodes_each_batch_once_and_counts_every_importance_sample(tiny, monkeypatch):
    """The bound reuses the ELBO pass's posterior (one encoder pass per batch, whatever K is), and the progress bar
    counts the N * K importance samples it decodes."""
    vae = VAE(tiny()).eval()
    images = torch.randint(0, 256, (10, 1, 32, 32), dtype=torch.uint8)
    encoded = []
    original = vae.encode
    monkeypatch.setattr(vae, "encode", lambda x: encoded.append(len(x)) or original(x))
    counted = []

    class Bar:
        def __init__(self, *a, **kw):
            pass

        def update(self, n):
            counted.append(n)

        def close(self):
            pass

    monkeypatch.setattr(ev, "tqdm", Bar)
    ev.evaluate(vae, images, iw_samples=3, batch_size=4)
    assert encoded == [4, 4, 2]
    assert sum(counted) == 10 * 3


# ------------------------------------------------------------------ checkpoint: every generator and the optimiser
def _draws() -> list:
    """One draw of each generator a run may use: torch, numpy (its cached Gaussian too), Python (its too)."""
    return [torch.rand(3).tolist(), np.random.standard_normal(), np.random.rand(2).tolist(), random.gauss(0, 1),
            random.random()]


def test_a_checkpoint_restores_every_generator_and_the_optimiser(tiny, tmp_path):
    """After a load, torch, numpy and Python draw what they would have drawn at the save (numpy's and Python's
    cached second Gaussian included), and Adam's state is the saved one."""
    vae = VAE(tiny())
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    vae(torch.rand(4, 1, 32, 32)).loss.backward()
    optimizer.step()
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal(), random.gauss(0, 1)  # each now holds a cached second Gaussian
    ckpt.save_checkpoint(tmp_path, vae, optimizer, {"step": 7})
    saved = copy.deepcopy(optimizer.state_dict())
    expected = _draws()
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    fresh = torch.optim.Adam(vae.parameters(), lr=0.5, betas=(0.5, 0.6))
    assert ckpt.load_checkpoint(tmp_path, vae, fresh)["step"] == 7
    assert _draws() == expected
    state = fresh.state_dict()
    assert json.loads(json.dumps(state["param_groups"])) == json.loads(json.dumps(saved["param_groups"]))
    assert state["state"].keys() == saved["state"].keys()
    for i, entry in saved["state"].items():
        assert entry.keys() == state["state"][i].keys()
        assert all(torch.equal(torch.as_tensor(entry[k]), torch.as_tensor(state["state"][i][k])) for k in entry)


def test_a_checkpoint_keeps_the_cuda_generators(tiny, tmp_path, monkeypatch):
    """Each CUDA device's generator state is saved, in device order, and restored where the device count matches
    (faked here: the machine has no GPU)."""
    states = [torch.arange(5, dtype=torch.uint8), torch.arange(5, 10, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda new: restored.append([s.clone() for s in new]))
    vae = VAE(tiny())
    optimizer = torch.optim.Adam(vae.parameters())
    ckpt.save_checkpoint(tmp_path, vae, optimizer, {"step": 1})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    ckpt.load_checkpoint(tmp_path, vae, optimizer)
    assert len(restored) == 1 and [s.tolist() for s in restored[0]] == [s.tolist() for s in states]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # another machine: the CUDA states are left alone
    ckpt.load_checkpoint(tmp_path, vae, optimizer)
    assert len(restored) == 1


def _saved(tiny, run: Path) -> tuple[VAE, torch.optim.Optimizer]:
    """A tiny model after one Adam step, and its checkpoint in run/checkpoint."""
    vae = VAE(tiny())
    optimizer = torch.optim.Adam(vae.parameters())
    vae(torch.rand(4, 1, 32, 32)).loss.backward()
    optimizer.step()
    ckpt.save_checkpoint(run, vae, optimizer, {"step": 1})
    return vae, optimizer


@pytest.mark.parametrize("over", [0, 1])
def test_a_checkpoint_file_over_its_size_limit_is_refused_before_it_is_hashed(tiny, tmp_path, monkeypatch, over):
    """A file larger than the model's tensors twice (Adam's two moments) plus safetensors' 100 MiB header limit is
    refused unread; one of exactly that size is hashed (and, being wrong, refused too). Sparse files: no disk used."""
    vae, optimizer = _saved(tiny, tmp_path)
    limit = sum(t.numel() * t.element_size() for t in vae.state_dict().values()) * 2 + (100 << 20)
    target = tmp_path / "checkpoint" / "optimizer.safetensors"
    os.truncate(target, limit + over)
    hashed, real = [], ckpt._file_sha256
    monkeypatch.setattr(ckpt, "_file_sha256", lambda path: hashed.append(path.name) or real(path))
    with pytest.raises(ckpt.DamagedCheckpoint, match="checksum mismatch of optimizer.safetensors"):
        ckpt.load_checkpoint(tmp_path, vae, optimizer)
    assert hashed == ["model.safetensors"] + ["optimizer.safetensors"] * (1 - over)


@pytest.mark.parametrize("name, tensor", [
    ("optim.0.exp_avg", torch.zeros(3)),  # a moment of another shape than its parameter
    ("optim.20.step", torch.zeros(())),  # index 20 of 20 parameters
    ("optim.x.step", torch.zeros(())),  # not an index
    ("optim.0", torch.zeros(())),  # no key
    ("optim.0.exp_avg.more", torch.zeros(())),
    ("state.0.step", torch.zeros(())),  # neither optim nor rng
    ("rng.0.x", torch.zeros((), dtype=torch.uint8)),  # an RNG state is a flat (1-D) tensor
    ("rng.extra", torch.zeros(2, 2, dtype=torch.uint8)),
    ("rng.extra", torch.zeros(4)),  # of bytes or int64
    ("rng.extra", torch.zeros(1 << 20, dtype=torch.uint8)),  # under 1 MiB
])
def test_an_optimizer_file_with_a_tensor_it_cannot_hold_is_damaged(tiny, tmp_path, name, tensor):
    """optimizer.safetensors holds Adam's moments (their parameter's shape) and scalar steps, indexed by parameter,
    and flat RNG states; anything else, even with a matching checksum, is named and refused before it is read."""
    vae, optimizer = _saved(tiny, tmp_path)
    cdir = tmp_path / "checkpoint"
    tensors = load_file(str(cdir / "optimizer.safetensors"))
    assert all(t.shape in ((), tuple(p.shape)) for k, t in tensors.items() if k.startswith("optim.")
               for p in [list(vae.parameters())[int(k.split(".")[1])]])
    data = st_save({**tensors, name: tensor})
    (cdir / "optimizer.safetensors").write_bytes(data)
    state = json.loads((cdir / "state.json").read_text())
    state["sha256"]["optimizer.safetensors"] = hashlib.sha256(data).hexdigest()
    (cdir / "state.json").write_text(json.dumps(state))
    with pytest.raises(ckpt.DamagedCheckpoint, match=f"optimizer.safetensors holds '{re.escape(name)}'"):
        ckpt.load_checkpoint(tmp_path, vae, optimizer)


def test_moments_take_their_parameters_memory_layout_on_load(tiny, tmp_path):
    """safetensors stores tensors contiguous; a channels_last model's Adam moments get their parameter's strides
    back on load (fused Adam walks both as raw memory), and the values stay the saved ones."""
    vae = VAE(tiny()).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(vae.parameters())
    vae(torch.rand(4, 1, 32, 32)).loss.backward()
    optimizer.step()
    ckpt.save_checkpoint(tmp_path, vae, optimizer, {"step": 1})
    saved = {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(optimizer.state.values())}
    fresh = torch.optim.Adam(vae.parameters())
    ckpt.load_checkpoint(tmp_path, vae, fresh)
    params = list(vae.parameters())
    assert any(p.dim() == 4 and not p.is_contiguous() for p in params)  # some are channels_last
    for i, p in enumerate(params):
        for key in ("exp_avg", "exp_avg_sq"):
            moment = fresh.state[p][key]
            assert moment.stride() == p.stride() and torch.equal(moment, saved[i][key]), (i, key)


def test_read_training_of_a_model_file(tiny, tmp_path):
    """How far training had gone, from the model file's header: the four checked keys alone; None for a file
    without it, with malformed JSON or wrong types, or that is not a model file."""
    vae = VAE(tiny())
    path = tmp_path / "model.safetensors"
    progress = {"step": 3, "epoch": 1, "epochs": 2, "finished": False}
    ckpt.save_model(vae, path, data=ckpt.model_bytes(vae, training={**progress, "extra": 1}))
    assert ckpt.read_training(path) == progress
    ckpt.save_model(vae, path)
    assert ckpt.read_training(path) is None  # no "training" entry (an older facevae's file)
    for bad in ('{"step": 3', "[1, 2]", json.dumps({**progress, "step": "3"}), json.dumps({**progress, "finished": 1}),
                json.dumps({k: v for k, v in progress.items() if k != "epochs"}), "[" * 100000 + "]" * 100000):
        path.write_bytes(st_save({k: v for k, v in vae.state_dict().items()},
                                 metadata={**vae.metadata(), "training": bad}))
        assert ckpt.read_training(path) is None, bad[:40]
    path.write_bytes(b"not a model")
    assert ckpt.read_training(path) is None
    assert ckpt.read_training(tmp_path / "missing.safetensors") is None


# ------------------------------------------------------------------ train: the state's small parts
def test_progress_says_finished_at_the_last_epoch_or_at_max_steps(tiny):
    state = TrainState(8, step=5, epoch=1)
    assert state.progress(tiny(epochs=2)) == {"step": 5, "epoch": 1, "epochs": 2, "finished": False}
    assert state.progress(tiny(epochs=1))["finished"] is True
    assert state.progress(tiny(epochs=2, max_steps=5))["finished"] is True
    assert state.progress(tiny(epochs=2, max_steps=6))["finished"] is False


def test_a_state_resumed_with_another_global_batch_starts_after_the_same_images():
    saved = {**dataclasses.asdict(TrainState(8, step=7, epoch=1, batch=3, seen=24, count=3, sums=[1.0] * 5)),
             "unknown": 1}
    state = TrainState.resumed(saved, 4)
    assert (state.global_batch, state.batch, state.step, state.epoch, state.seen, state.count) == (4, 6, 7, 1, 24, 3)
    assert TrainState.resumed({k: v for k, v in saved.items() if k != "global_batch"}, 4).batch == 3
    state.start_epoch()
    assert (state.batch, state.count, state.seen, state.seconds, state.sums) == (0, 0, 0, 0.0, [0.0] * 5)
    assert state.step == 7 and state.epoch == 1


def test_batches_per_epoch_and_the_kl_warmup():
    """A last partial batch is a step when it holds 2 images or more, and only in one process (ranks must agree on
    the batch); the KL weight rises linearly to 1 over the warm-up steps (none: 1 at once)."""
    assert [batches_per_epoch(n, 8) for n in (80, 81, 82, 7, 1)] == [10, 10, 11, 1, 0]
    assert batches_per_epoch(82, 8, world_size=2) == 10 and batches_per_epoch(16, 8, world_size=2) == 2
    assert [_warmup(s, 4) for s in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert [_warmup(s, 1) for s in (0, 1, 2)] == [0.0, 1.0, 1.0]
    assert _warmup(0, 0) == 1.0 and _warmup(3, -1) == 1.0


def test_epoch_means_are_those_of_the_good_steps(tiny, tmp_path, monkeypatch):
    """The epoch record's train_* figures are the means of the steps' terms over the steps that were not skipped;
    the skipped ones are counted."""
    losses, original = [], Trainer.guarded_step

    def recording(self, x, eps, kl_weight):
        if len(losses) == 2:  # the third step's loss is not finite: skipped
            x = x * float("nan")
        terms, ok = original(self, x, eps, kl_weight)
        losses.append((terms.loss.item(), terms.elbo.mean().item(), terms.kl.mean().item(), bool(ok)))
        return terms, ok

    monkeypatch.setattr(Trainer, "guarded_step", recording)
    record = train(tiny(batch_size=16, epochs=1, log_every=100, image_every=100), tmp_path / "run", progress=False)
    good = [t for t in losses if t[3]]
    assert len(losses) == 5 and len(good) == 4 and record["skipped_steps"] == 1
    for i, key in enumerate(("train_loss", "train_elbo", "train_kl")):
        assert record[key] == pytest.approx(sum(t[i] for t in good) / 4, rel=1e-5), key


@pytest.mark.parametrize("configured, used", [(7, 7), (0, 32)])  # 0: by device, 32 images on a CPU
def test_the_epoch_test_pass_takes_the_configured_batch_and_the_runs_device_and_precision(tiny, tmp_path,
                                                                                          monkeypatch, configured,
                                                                                          used):
    """Each epoch's test pass evaluates the test split in batches of eval_batch_size, on the run's device and in its
    precision (bf16 here: its figures are those of the network that trains)."""
    import facevae.train as train_module

    calls, real = [], train_module.evaluate

    def recording(vae, images, **kwargs):
        calls.append((len(images), kwargs))
        return real(vae, images, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", recording)
    train(tiny(batch_size=40, epochs=2, eval_batch_size=configured, precision="bf16"), tmp_path / "run",
          progress=False)
    assert calls == [(20, {"batch_size": used, "device": torch.device("cpu"), "precision": "bf16"})] * 2


def test_data_without_a_test_split_trains_without_a_test_pass(tiny, tmp_path, capsys):
    """A cache whose images are all in the train split: no test pass, no test figures, said once."""
    from facevae.data.cache import SPLIT_NAMES, CacheWriter

    writer = CacheWriter(tmp_path / "cache", count=24, channels=1, size=32)
    writer.images[:] = torch.randint(0, 256, (24, 1, 32, 32), generator=torch.Generator().manual_seed(0)).numpy()
    writer.split_codes[:] = SPLIT_NAMES.index("train")
    writer.commit({"source": {"kind": "generated"}, "crop": None, "split": {"scheme": "all-train"}, "skipped": []})
    record = train(tiny(data=str(tmp_path / "cache"), batch_size=8, epochs=2), tmp_path / "run", progress=False)
    assert record["epoch"] == 2 and not [k for k in record if k.startswith("test_")]
    assert capsys.readouterr().err.count("the data has no test or valid split: no test pass each epoch") == 1


def test_each_step_trains_with_its_warmed_up_kl_weight_and_the_noise_its_batch_drew(tiny, tmp_path, monkeypatch):
    """The network gets, at step s, kl_weight * min(1, s / kl_warmup_steps) and the eps that Trainer._batch drew for
    the step (the whole global batch's noise, sliced: what keeps several processes in step with one), under the
    run's autocast; the step records log the same weights."""
    drawn, given = [], []
    batch, forward = Trainer._batch, VAE.forward

    def recording_batch(self, order, b):
        out = batch(self, order, b)
        drawn.append(out[1])
        return out

    def recording_forward(self, x, **kw):
        if self.training:
            given.append((kw["kl_weight"], kw["eps"]))
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        return forward(self, x, **kw)

    monkeypatch.setattr(Trainer, "_batch", recording_batch)
    monkeypatch.setattr(VAE, "forward", recording_forward)
    train(tiny(batch_size=16, epochs=1, kl_weight=0.5, kl_warmup_steps=4, log_every=1, precision="bf16"),
          tmp_path / "run", progress=False)
    assert [w for w, _ in given] == [0.0, 0.125, 0.25, 0.375, 0.5]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kl_weight"] for r in records if r["kind"] == "step"] == [0.0, 0.125, 0.25, 0.375, 0.5]
    assert len(drawn) == 5 and all(eps is mine for (_, eps), mine in zip(given, drawn))


def test_the_progress_bar_counts_steps_and_names_the_epoch(tiny, tmp_path, capsys):
    train(tiny(batch_size=40, epochs=2, log_every=100), tmp_path / "run", progress=True)
    err = capsys.readouterr().err
    assert "epoch 2/2" in err and "epoch 3/2" not in err
    assert "4/4" in err and max(int(n) for n in re.findall(r"\b(\d+)/4\b", err)) == 4  # 4 steps in all
    assert not re.search(r"\d+batch \[", err)  # tqdm drops the total ("8batch [...]") once a bar overruns it


def test_an_epochs_time_counts_the_part_before_a_resume(tiny, tmp_path):
    """A run stopped inside an epoch and resumed: the epoch's seconds (and so its img/s) add the time before the stop,
    which the checkpoint kept."""
    run = tmp_path / "run"
    train(tiny(batch_size=16, epochs=1, max_steps=3), run, progress=False)
    state_file = run / "checkpoint" / "state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "seconds": 1000.0}))
    record = train(tiny(batch_size=16, epochs=1), run, progress=False)
    assert 1000.0 < record["seconds"] < 1100.0


def test_pictures_come_every_image_every_epochs_and_at_the_last(tiny, tmp_path, capsys):
    train(tiny(batch_size=40, epochs=4, image_every=3, log_every=100), tmp_path / "run", progress=False)
    pictures = sorted(p.name for p in (tmp_path / "run" / "images").glob("samples_e*.png"))
    assert pictures == ["samples_e003.png", "samples_e004.png"]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch ")]
    assert [line.split(" | ")[0] for line in lines] == ["epoch 3", "epoch 4"]


# ------------------------------------------------------------------ checkpoint: what a damaged one is told apart by
EXPECTED = {**dataclasses.asdict(TrainState(8)), "scaler": {}}  # what training expects of state.json


def _edit_state(cdir: Path, edit) -> None:
    path = cdir / "state.json"
    state = json.loads(path.read_text())
    path.write_text(json.dumps(edit(state)))


def _without(key):
    return lambda s: {k: v for k, v in s.items() if k != key}


def _with(**values):
    return lambda s: {**s, **values}


SHA = "state.json must give the SHA-256 of exactly model.safetensors, optimizer.safetensors"


@pytest.mark.parametrize("edit, why", [
    (lambda s: [1, 2], SHA),
    (_without("sha256"), SHA),
    (lambda s: {**s, "sha256": {**s["sha256"], "extra": "0" * 64}}, SHA),
    (lambda s: {**s, "sha256": {"model.safetensors": s["sha256"]["model.safetensors"]}}, SHA),
    (lambda s: {**s, "sha256": {**s["sha256"], "model.safetensors": "0" * 63}}, SHA),
    (lambda s: {**s, "sha256": {**s["sha256"], "model.safetensors": 7}}, SHA),
    (_without("optimizer"), "state.json lacks the optimizer or rng table"),
    (_without("rng"), "state.json lacks the optimizer or rng table"),
    (_with(optimizer=[]), "state.json lacks the optimizer or rng table"),
    (_with(step="abc"), "state.json has step = 'abc'"),
    (_with(step=-1), "state.json has step = '-1'"),
    (_with(step=True), "state.json has step = 'True'"),
    (_with(seconds=float("inf")), "state.json has seconds = 'inf'"),
    (_with(seconds="1"), "state.json has seconds = '1'"),
    (_with(sums=[1.0, 2.0]), "state.json has sums = '[1.0, 2.0]'"),
    (_with(sums=[1.0, 2.0, 3.0, 4.0, False]), "state.json has sums = '[1.0, 2.0, 3.0, 4.0, False]'"),
    (_with(sums="12345"), "state.json has sums = '12345'"),
    (_with(scaler=[]), "state.json has scaler = '[]'"),
    (lambda s: {**s, "sha256": {**s["sha256"], "model.safetensors": "0" * 64}},
     "checksum mismatch of model.safetensors"),
])
def test_a_damaged_state_json_is_named_with_its_fault(tiny, tmp_path, edit, why):
    """Each fault of state.json is one DamagedCheckpoint line that names the checkpoint and says what is wrong."""
    vae, optimizer = _saved(tiny, tmp_path)
    cdir = tmp_path / "checkpoint"
    _edit_state(cdir, edit)
    with pytest.raises(ckpt.DamagedCheckpoint) as caught:
        ckpt.load_checkpoint(tmp_path, vae, optimizer, expected=EXPECTED)
    assert str(caught.value) == f"the checkpoint {cdir} is damaged ({why}); delete {cdir} to start over"


def test_state_json_faults_that_are_not_json_links_or_too_large(tiny, tmp_path):
    vae, optimizer = _saved(tiny, tmp_path)
    cdir = tmp_path / "checkpoint"
    path = cdir / "state.json"
    good = path.read_bytes()

    def fault() -> str:
        with pytest.raises(ckpt.DamagedCheckpoint) as caught:
            ckpt.load_checkpoint(tmp_path, vae, optimizer, expected=EXPECTED)
        message = str(caught.value)
        assert message.startswith(f"the checkpoint {cdir} is damaged (") and message.endswith(
            f"); delete {cdir} to start over")
        return message[len(f"the checkpoint {cdir} is damaged ("):-len(f"); delete {cdir} to start over")]

    path.write_bytes(good[:-2] + b"\n\n  x")
    assert fault() == "state.json: Expecting ',' delimiter: line %d column 3 (char %d)" % (
        good[:-2].count(b"\n") + 3, len(good) + 2)  # the error on one line
    path.write_bytes(b'{"a": "\xff"}')
    assert fault().startswith("state.json: 'utf-8' codec can't decode byte 0xff in position 7")
    path.write_bytes(b"[" * 200000 + b"]" * 200000)
    assert fault().startswith("state.json: maximum recursion depth exceeded")
    path.write_bytes(good + b" " * ((4 << 20) - len(good) + 1))  # one byte over 4 MiB
    assert fault() == "state.json is a link or too large"
    path.write_bytes(good + b" " * ((4 << 20) - len(good)))  # 4 MiB exactly: read
    assert ckpt.load_checkpoint(tmp_path, vae, optimizer, expected=EXPECTED)["step"] == 1
    (tmp_path / "elsewhere.json").write_bytes(good)
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere.json")
    assert fault() == "state.json is a link or too large"


def test_checkpoint_files_that_are_links_or_wrong_are_named(tiny, tmp_path):
    vae, optimizer = _saved(tiny, tmp_path)
    cdir = tmp_path / "checkpoint"
    good = (cdir / "model.safetensors").read_bytes()
    (tmp_path / "elsewhere.safetensors").write_bytes(good)
    (cdir / "model.safetensors").unlink()
    (cdir / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(ckpt.DamagedCheckpoint, match=rf"^the checkpoint {re.escape(str(cdir))} is damaged \(.*link"):
        ckpt.load_checkpoint(tmp_path, vae, optimizer, expected=EXPECTED)
    (cdir / "model.safetensors").unlink()
    wrong = {k: v.clone() for k, v in vae.state_dict().items()}
    name = next(k for k, v in wrong.items() if v.dim() == 4)
    wrong[name] = torch.zeros(1, 1, 1, 1)
    data = st_save(wrong, metadata=vae.metadata())
    (cdir / "model.safetensors").write_bytes(data)
    _edit_state(cdir, lambda s: {**s, "sha256": {**s["sha256"], "model.safetensors": hashlib.sha256(data).hexdigest()}})
    with pytest.raises(UserError, match=re.escape(str(cdir / "model.safetensors"))):
        ckpt.load_checkpoint(tmp_path, vae, optimizer, expected=EXPECTED)
    (tmp_path / "checkpoint").rename(tmp_path / "moved")
    (tmp_path / "checkpoint").symlink_to(tmp_path / "moved")
    with pytest.raises(ckpt.DamagedCheckpoint) as caught:
        ckpt.load_checkpoint(tmp_path, vae, optimizer, expected=EXPECTED)
    assert str(caught.value) == (f"the checkpoint {cdir} is damaged (it is a link; facevae reads only files inside the "
                                 f"run); delete {cdir} to start over")


def test_a_checkpoint_between_its_two_renames_is_read_from_checkpoint_old(tiny, tmp_path):
    """save_checkpoint swaps checkpoint.new in by two renames: a crash between them leaves checkpoint.old alone."""
    vae, optimizer = _saved(tiny, tmp_path)
    assert ckpt.has_checkpoint(tmp_path)
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")
    assert ckpt.has_checkpoint(tmp_path)
    assert ckpt.load_checkpoint(tmp_path, vae, optimizer, expected=EXPECTED)["step"] == 1
    (tmp_path / "checkpoint.old" / "state.json").unlink()
    assert not ckpt.has_checkpoint(tmp_path)


def test_a_missing_state_key_takes_its_default_and_model_bytes_are_written_as_given(tiny, tmp_path):
    """A state.json from before a key existed loads (the key takes the new run's value); save_checkpoint writes the
    model bytes it is handed (the epoch's end serialises the weights once) into a run folder it creates."""
    vae, optimizer = _saved(tiny, tmp_path)
    _edit_state(tmp_path / "checkpoint", _without("seen"))
    assert "seen" not in ckpt.load_checkpoint(tmp_path, vae, optimizer, expected=EXPECTED)
    run = tmp_path / "new" / "run"
    data = ckpt.model_bytes(vae, training={"step": 1, "epoch": 0, "epochs": 1, "finished": False})
    ckpt.save_checkpoint(run, vae, optimizer, {"step": 1}, model=data)
    assert (run / "checkpoint" / "model.safetensors").read_bytes() == data
    assert not (run / "checkpoint.new").exists() and not (run / "checkpoint.old").exists()


# ------------------------------------------------------------------ distributions: sampling
N_DRAWS = 40000


def test_discretized_logistic_samples_follow_its_256_probabilities():
    """Each level k/255 is drawn with the probability log_prob gives it (the bins' masses); only grid values."""
    mu = torch.tensor([0.0, 0.3, 0.5, 0.998]).repeat(N_DRAWS, 1)
    log_scale = torch.log(torch.tensor([0.02, 0.01, 0.004, 0.05])).repeat(N_DRAWS, 1)
    torch.manual_seed(0)
    x = DiscretizedLogistic(mu[:, :, None, None], log_scale[:, :, None, None]).sample().reshape(N_DRAWS, 4)
    levels = x * 255
    assert torch.equal(levels, levels.round()) and x.min() >= 0 and x.max() <= 1
    grid = torch.arange(256.0) / 255
    for i in range(4):
        lik = DiscretizedLogistic(mu[:256, i].reshape(256, 1, 1, 1), log_scale[:256, i].reshape(256, 1, 1, 1))
        p = lik.log_prob(grid.reshape(256, 1, 1, 1)).exp()  # P(k) of each level
        freq = torch.bincount(levels[:, i].round().long(), minlength=256).float() / N_DRAWS
        assert (freq - p).abs().max() < 5 * (p.max() / N_DRAWS) ** 0.5 + 1e-3, i


def test_bernoulli_and_gaussian_samples_have_their_means_and_spreads():
    torch.manual_seed(0)
    logits = torch.tensor([-2.0, 0.0, 3.0]).repeat(N_DRAWS, 1)
    x = Bernoulli(logits).sample()
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(x.mean(0), torch.sigmoid(logits[0]), atol=0.01)
    mu = torch.tensor([0.2, 0.5, 0.9]).repeat(N_DRAWS, 1)
    g = Gaussian(mu, torch.log(torch.tensor([0.1, 0.3, 0.05]))).sample()
    assert torch.allclose(g.mean(0), mu[0], atol=0.01)
    assert torch.allclose(g.std(0), torch.tensor([0.1, 0.3, 0.05]), rtol=0.03)
    with pytest.raises(ValueError, match="relative to data"):
        Gaussian(mu, optimal="batch").sample()


@pytest.mark.parametrize("eta", [-30.0, -3.0, -1e-7, 0.0, 2e-7, 0.5, 4.0, 40.0])
def test_continuous_bernoulli_samples_follow_its_cdf(eta):
    """The empirical CDF of the samples is F(x) = expm1(eta x) / expm1(eta) (x for eta = 0), on either side of 0 and
    for large |eta|, and every sample lies in [0, 1]."""
    torch.manual_seed(0)
    x = ContinuousBernoulli(torch.full((N_DRAWS,), eta)).sample().double()
    assert x.min() >= 0 and x.max() <= 1
    for q in (0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
        exact = q if abs(eta) < 1e-6 else math.expm1(eta * q) / math.expm1(eta)
        assert (x <= q).double().mean().item() == pytest.approx(exact, abs=0.01), q


def test_each_rank_takes_its_slice_of_the_global_batch_and_of_its_noise(tiny):
    """Step b of rank r of k: images order[b*B*k : (b+1)*B*k][r*B : (r+1)*B], flips and noise drawn for the whole
    global batch (the RNGs of the ranks stay in step) and sliced the same way (Trainer._batch on a fake world)."""
    images = torch.randint(0, 256, (40, 1, 32, 32), dtype=torch.uint8)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    config = tiny(hflip=True, latent_dim=3)
    for rank in (0, 1):
        me = SimpleNamespace(config=config, world=SimpleNamespace(rank=rank, size=2), device=torch.device("cpu"),
                             state=SimpleNamespace(global_batch=8), train_images=images)
        torch.manual_seed(5)
        x, eps, count = Trainer._batch(me, order, 2)
        torch.manual_seed(5)
        flip, noise = torch.rand(8) < 0.5, torch.randn(8, 3)
        mine = slice(4 * rank, 4 * rank + 4)
        raw = images[order[16:24][mine]].float() / 255
        assert count == 8 and torch.equal(eps, noise[mine])
        assert torch.equal(x, torch.where(flip[mine].view(-1, 1, 1, 1), raw.flip(-1), raw))
        assert 0 < int(flip[mine].sum()) < 4 or rank == 1  # both flipped and kept images among rank 0's


def test_a_step_is_finite_only_when_the_loss_and_every_gradient_are():
    """_finite: 1 when the loss and all gradients are finite; 0 for a non-finite gradient under a finite loss, or a
    non-finite loss; parameters without a gradient are passed over, and with none at all the loss decides."""
    from facevae.train import _finite

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    one = SimpleNamespace(min=lambda t: t)  # a single process
    loss = torch.tensor(1.5)
    assert _finite(loss, net, one).item() == 1.0  # no gradient yet
    assert _finite(torch.tensor(float("nan")), net, one).item() == 0.0
    net[0].weight.grad = torch.ones(2, 2)
    assert _finite(loss, net, one).item() == 1.0
    net[0].weight.grad[1, 0] = float("inf")
    assert _finite(loss, net, one).item() == 0.0
    net[0].weight.grad = None
    net[1].bias.grad = torch.tensor([float("nan")])
    assert _finite(loss, net, one).item() == 0.0


def test_a_sync_reads_the_epochs_seconds_and_stops_after_too_many_bad_steps(tiny):
    """Trainer._sync: the epoch's seconds are the time since its clock; max_bad_steps non-finite steps in a row stop
    the run, naming the last good checkpoint (or that none was written)."""
    import time as time_module

    state = TrainState(8, step=12)
    me = SimpleNamespace(state=state, meter=SimpleNamespace(sync=lambda s: None), config=tiny(max_bad_steps=3),
                         clock=time_module.perf_counter() - 5.0, saved_step=10, run="RUN")
    Trainer._sync(me)
    assert 5.0 <= state.seconds < 6.0
    state.bad_steps = 2
    Trainer._sync(me)
    state.bad_steps = 3
    with pytest.raises(UserError) as stopped:
        Trainer._sync(me)
    assert str(stopped.value) == ("the loss or its gradient was not finite for 3 steps in a row (up to step 12); "
                                  "lower learning_rate or check the data; the last good checkpoint, at step 10, is "
                                  "in RUN")
    me.saved_step = None
    with pytest.raises(UserError, match="no checkpoint had been written yet, so RUN holds nothing to resume"):
        Trainer._sync(me)


def test_metrics_past_the_checkpoint_are_dropped_and_the_rest_kept_byte_for_byte(tmp_path, capsys):
    """MetricsLog.truncate_after(step): records up to the step are kept as they were (a record without a step counts
    as step 0), later ones and blank lines dropped silently, damaged lines dropped and counted."""
    from facevae.train import MetricsLog

    path = tmp_path / "metrics.jsonl"
    lines = [b'{"kind": "run"}  ', b'{"kind": "step", "step": 2}\t', b"", b'{"kind": "step", "step": 3}', b"[1, 2]",
             b'{"kind": "st']
    path.write_bytes(b"\n".join(lines))
    MetricsLog(path, enabled=True).truncate_after(2)
    assert path.read_bytes() == b'{"kind": "run"}  \n{"kind": "step", "step": 2}\t\n'
    assert capsys.readouterr().err.strip() == (f"facevae: dropped 1 damaged line(s) of {path} (a crash in the middle "
                                               f"of a write leaves a partial line); resuming")
    path.write_bytes(b'{"kind": "run"}\n\n')
    MetricsLog(path, enabled=True).truncate_after(0)
    assert path.read_bytes() == b'{"kind": "run"}\n' and capsys.readouterr().err == ""
    MetricsLog(tmp_path / "none.jsonl", enabled=True).truncate_after(0)  # no file yet: nothing to do
    MetricsLog(path, enabled=False).truncate_after(-1)  # not rank 0: never touched
    assert path.read_bytes() == b'{"kind": "run"}\n' and not (tmp_path / "none.jsonl").exists()


def test_the_optimizer_step_is_skipped_on_the_device_when_not_finite():
    """_step: with the fp16 loss scaler, the scaler steps (and skips an inf gradient itself); fused Adam is told by
    found_inf (removed afterwards); an unfused optimiser steps only when ok."""
    from facevae.train import _step

    p = torch.nn.Parameter(torch.ones(2))
    sgd = torch.optim.SGD([p], lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(p.sum()).backward()
    scaler.unscale_(sgd)
    _step(sgd, scaler, torch.tensor(1.0))
    assert torch.equal(p.detach(), torch.full((2,), 0.5)) and scaler.get_scale() == 4.0
    off = torch.amp.GradScaler("cpu", enabled=False)
    for ok, expected in ((0.0, 0.5), (1.0, 0.0)):
        p.grad = torch.ones(2)
        _step(sgd, off, torch.tensor(ok))
        assert torch.equal(p.detach(), torch.full((2,), expected)), ok
    q = torch.nn.Parameter(torch.ones(2))
    adam = torch.optim.Adam([q], lr=0.1, fused=True)
    for ok, expected in ((0.0, 1.0), (1.0, 0.9)):
        q.grad = torch.ones(2)
        _step(adam, off, torch.tensor(ok))
        assert torch.allclose(q.detach(), torch.full((2,), expected)) and not hasattr(adam, "found_inf"), ok


def _stepper(tiny, scaler=None) -> SimpleNamespace:
    """What Trainer.guarded_step reads of its trainer: a tiny VAE, SGD, one process, float32."""
    config = tiny()
    vae = VAE(config)
    buffers = list(vae.buffers())
    return SimpleNamespace(config=config, device=torch.device("cpu"), precision="float32", model=vae, vae=vae,
                           optimizer=torch.optim.SGD(vae.parameters(), lr=0.1), world=SimpleNamespace(min=lambda t: t),
                           scaler=scaler or torch.amp.GradScaler("cpu", enabled=False), buffers=buffers,
                           snapshot=[b.clone() for b in buffers])


def test_a_guarded_step_keeps_a_good_steps_buffers_and_restores_a_bad_ones(tiny):
    """BatchNorm's running statistics move with a good step; a non-finite one leaves weights and buffers as before."""
    me = _stepper(tiny)
    x, eps = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0)), torch.zeros(4, 4)
    before = [b.clone() for b in me.buffers]
    _, ok = Trainer.guarded_step(me, x, eps, 1.0)
    assert ok.item() == 1.0 and not all(torch.equal(a, b) for a, b in zip(before, me.buffers))
    after, weights = [b.clone() for b in me.buffers], [p.detach().clone() for p in me.vae.parameters()]
    _, ok = Trainer.guarded_step(me, x * float("nan"), eps, 1.0)
    assert ok.item() == 0.0 and all(torch.equal(a, b) for a, b in zip(after, me.buffers))
    assert all(torch.equal(w, p) for w, p in zip(weights, me.vae.parameters()))


def test_a_guarded_step_with_a_loss_scaler_updates_by_the_true_gradient(tiny):
    """fp16's loss scaler (here on the CPU) multiplies the loss by 1024; the update is still the unscaled one."""
    x, eps = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0)), torch.zeros(4, 4)
    torch.manual_seed(0)
    plain = _stepper(tiny)
    torch.manual_seed(0)
    scaled = _stepper(tiny, torch.amp.GradScaler("cpu", init_scale=1024.0))
    Trainer.guarded_step(plain, x, eps, 1.0)
    Trainer.guarded_step(scaled, x, eps, 1.0)
    for p, q in zip(plain.vae.parameters(), scaled.vae.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("channels_last", [True, False])
def test_a_batch_without_flips_is_its_images_in_order_in_the_configured_layout(tiny, channels_last):
    """hflip off: the images of the order's slice unchanged (no flip drawn: the noise is the RNG's next draw), in the
    memory layout the config asks for."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=g)
    order = torch.randperm(12, generator=g)
    me = SimpleNamespace(config=tiny(hflip=False, latent_dim=3, channels_last=channels_last),
                         device=torch.device("cpu"),
                         world=SimpleNamespace(rank=0, size=1), state=SimpleNamespace(global_batch=4),
                         train_images=images)
    torch.manual_seed(5)
    x, eps, count = Trainer._batch(me, order, 1)
    torch.manual_seed(5)
    assert count == 4 and torch.equal(eps, torch.randn(4, 3))
    assert torch.equal(x, images[order[4:8]].float() / 255)
    layouts = (torch.channels_last, torch.contiguous_format)
    assert x.is_contiguous(memory_format=layouts[not channels_last])
    assert not x.is_contiguous(memory_format=layouts[channels_last])


def test_a_batch_its_flips_and_its_noise_are_drawn_on_the_training_device(tiny):
    """On an accelerator (the meta device stands for one) the batch, its flips and its noise are made there: a flip
    or a noise drawn on the CPU would be a copy, and a sync, every step."""
    images = torch.empty(12, 3, 8, 8, dtype=torch.uint8, device="meta")
    order = torch.empty(12, dtype=torch.long, device="meta")
    me = SimpleNamespace(config=tiny(hflip=True, latent_dim=3), device=torch.device("meta"), train_images=images,
                         world=SimpleNamespace(rank=0, size=1), state=SimpleNamespace(global_batch=4))
    x, eps, count = Trainer._batch(me, order, 1)
    assert (x.device.type, eps.device.type, x.shape, eps.shape, count) == ("meta", "meta", (4, 3, 8, 8), (4, 3), 4)


def test_a_resumed_run_takes_the_new_learning_rate_and_weight_decay_and_knows_its_checkpoint(tiny, tmp_path,
                                                                                             monkeypatch, capsys):
    """Resuming with other learning_rate and weight_decay applies them to the restored optimiser and says so; the
    trainer knows the step of the checkpoint it resumed from (named if the run must stop before the next one)."""
    run = tmp_path / "run"
    train(tiny(batch_size=16, epochs=1, max_steps=2, checkpoint_every=0), run, progress=False)
    seen, fit = {}, Trainer.fit

    def recording(self):
        group = self.optimizer.param_groups[0]
        seen.update(lr=group["lr"], weight_decay=group["weight_decay"], saved_step=self.saved_step)
        return fit(self)

    monkeypatch.setattr(Trainer, "fit", recording)
    capsys.readouterr()
    train(tiny(batch_size=16, epochs=1, learning_rate=5e-4, weight_decay=0.01), run, progress=False)
    assert seen == {"lr": 5e-4, "weight_decay": 0.01, "saved_step": 2}
    err = capsys.readouterr().err.splitlines()
    assert f"resuming {run} at epoch 1, step 2" in err
    assert ("resuming with changed settings: max_steps 2 -> 0, learning_rate 0.001 -> 0.0005, weight_decay 0.0 -> "
            "0.01") in err


def test_resume_restores_the_fp16_loss_scalers_scale(tiny, tmp_path):
    """fp16's loss scaler (CUDA only in training; an enabled CPU one here) resumes at the scale it had reached, not
    at its initial 65536 (which would overflow, and skip, the first steps again)."""
    vae = VAE(tiny())
    optimizer = torch.optim.Adam(vae.parameters())
    saved = torch.amp.GradScaler("cpu", init_scale=512.0).state_dict()
    ckpt.save_checkpoint(tmp_path, vae, optimizer, {**dataclasses.asdict(TrainState(8, step=3)), "scaler": saved})
    me = SimpleNamespace(run=SimpleNamespace(path=tmp_path), vae=vae, optimizer=optimizer, config=tiny(),
                         scaler=torch.amp.GradScaler("cpu"), say=lambda message: None)
    state = Trainer._resume(me, TrainState(8))
    assert state.step == 3 and me.saved_step == 3 and me.scaler.get_scale() == 512.0


def test_a_checkpoint_whose_scaler_state_is_not_a_table_is_refused(tiny, tmp_path):
    run = tmp_path / "run"
    train(tiny(batch_size=16, epochs=1, max_steps=2), run, progress=False)
    state_file = run / "checkpoint" / "state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "scaler": 5}))
    with pytest.raises(UserError, match="state.json has scaler = '5'"):
        train(tiny(batch_size=16, epochs=1), run, progress=False)


def test_seed_everything_seeds_python_numpy_and_torch():
    from facevae.train import seed_everything

    draws = []
    for _ in range(2):
        seed_everything(7)
        draws.append((random.random(), np.random.rand(), torch.rand(1).item()))
    assert draws[0] == draws[1]


def test_epoch_means_are_averaged_over_the_processes():
    """Meter.means: the sums of all processes (world.sum), over the processes and the good steps."""
    state = TrainState(8, count=4)
    meter = Meter(state, torch.device("cpu"))
    meter.sums = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0])
    world = SimpleNamespace(size=2, sum=lambda t: t * 3)  # the other process's sums are twice ours
    assert meter.means(state, world) == dict(zip(("loss", "elbo", "recon", "kl", "psnr_sampled"),
                                                 [3.0, 1.5, 0.75, 0.375, 0.0]))
    assert Meter(TrainState(8), torch.device("cpu")).means(TrainState(8), world)["loss"] == 0.0  # no good step
    one = TrainState(8, count=1)
    assert meter.means(one, SimpleNamespace(size=1, sum=lambda t: t))["loss"] == 8.0  # one good step: its terms


def test_the_meter_lives_on_the_training_device():
    """Its sums and tallies are device tensors (the meta device stands for a GPU): the step never reads them."""
    meter = Meter(TrainState(8, bad_steps=2, sums=[1.0] * 5), torch.device("meta"))
    assert meter.sums.device.type == meter.tally.device.type == "meta"
    cpu = Meter(TrainState(8, bad_steps=2, sums=[1.0] * 5), torch.device("cpu"))
    assert cpu.sums.tolist() == [1.0] * 5 and cpu.tally.tolist() == [0.0, 0.0, 2.0]


# ------------------------------------------------------------------ distributions: edges of the formulas
def test_log1mexp_is_accurate_near_zero_and_far_below():
    from facevae.distributions import _log1mexp

    d = torch.tensor([-1e-8, -1e-3, -0.5, -0.7, -5.0, -40.0])
    exact = torch.tensor([math.log(-math.expm1(v)) for v in d.tolist()])
    assert torch.allclose(_log1mexp(d), exact, rtol=1e-6, atol=1e-12)


def test_continuous_bernoulli_normaliser_near_its_taylor_switch():
    """log C(eta) = log(eta / tanh(eta / 2)) on both sides of |eta| = 0.01, where the Taylor series takes over (its
    t^4 term included: float64, 1e-13)."""
    for eta in (-0.0099, -0.005, 0.0049, 0.0099, 0.0101, 0.5):
        got = ContinuousBernoulli(torch.tensor([eta], dtype=torch.float64)).log_normalizer().item()
        assert got == pytest.approx(math.log(eta / math.tanh(eta / 2)), abs=1e-13), eta


def test_discretized_logistic_mean_far_outside_the_unit_interval_and_in_colour():
    """A location far below 0 or above 1 with a sharp scale puts all the mass on level 0 or 255; the decoder's raw
    output holds a location and a log-scale per channel (3 channels)."""
    lik = DiscretizedLogistic(torch.tensor([-0.3, 1.3, 1.1]), torch.log(torch.tensor([1e-3, 1e-3, 2e-3])))
    assert torch.allclose(lik.mean, torch.tensor([0.0, 1.0, 1.0]), atol=1e-7)
    raw = torch.randn(2, 6, 4, 4)
    settings = SimpleNamespace(sigma=1.0, min_sigma=1e-3)
    colour = DiscretizedLogistic.from_decoder(raw, None, settings, training=True)
    assert torch.allclose(colour.mu, torch.sigmoid(raw[:, :3])) and torch.allclose(colour.log_scale, raw[:, 3:])


def test_optimal_sigma_decoders_train_at_the_optimum_and_evaluate_at_the_running_sigma():
    """Training: sigma* = sqrt(mean squared error), clamped below at min_sigma, so log p = -D/2 - D log sigma* -
    D/2 log 2 pi; evaluation: the running estimate (0 before any batch), which starts as the mean of the first 100
    batches' optima and then moves by 1% a batch."""
    from facevae.distributions import GaussianOptimal, RunningSigma

    settings = SimpleNamespace(sigma=1.0, min_sigma=0.2)
    raw = torch.zeros(1, 1, 4, 4)  # mu = 1/2
    x = torch.full((1, 1, 4, 4), 0.5)
    x[..., 0, 0] = 0.9  # squared error 0.16 on one pixel of 16: sigma* = 0.1, clamped at 0.2
    running = RunningSigma()
    assert running.running_log_sigma.item() == 0.0 and running.running_count.item() == 0
    lik = GaussianOptimal.from_decoder(raw, running, settings, training=True)
    d = 16
    expected = -0.5 * 0.16 / 0.04 - d * (math.log(0.2) + 0.5 * math.log(2 * math.pi))
    assert lik.log_prob(x).item() == pytest.approx(expected, rel=1e-5)
    assert GaussianOptimal.from_decoder(raw, running, settings, training=False).log_sigma.item() == 0.0
    batches = [0.5 * math.log(v) for v in torch.linspace(0.01, 0.05, 103).tolist()]
    for i, b in enumerate(batches):
        running.update(torch.zeros(1), torch.full((1,), math.exp(b)))
        if i in (0, 1, 99):
            assert running.running_log_sigma.item() == pytest.approx(sum(batches[:i + 1]) / (i + 1), abs=1e-6)
    expect = sum(batches[:100]) / 100
    for b in batches[100:]:
        expect += 0.01 * (b - expect)
    assert running.running_log_sigma.item() == pytest.approx(expect, abs=1e-6) and running.running_count.item() == 103


def test_a_likelihood_without_an_8bit_probability_says_which():
    with pytest.raises(NotImplementedError, match="^Bernoulli has no 8-bit probability$"):
        Bernoulli(torch.zeros(1, 1, 2, 2)).log_prob_8bit(torch.zeros(1, 1, 2, 2))


def test_optimizer_state_round_trips_through_tensors_and_json():
    """An optimiser's state_dict, tensors to safetensors and everything else to JSON, comes back whole: scalar state
    (other optimisers than Adam keep counters) and keys with dots included."""
    state = {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2), "n_iter": 4, "name.with.dots": torch.zeros(1)},
             2: {"func_evals": 7, "prev.loss": 0.5}}
    sd = {"state": state, "param_groups": [{"lr": 0.1, "params": [0, 1, 2]}]}
    tensors, meta = ckpt._optimizer_to_flat(SimpleNamespace(state_dict=lambda: sd))
    back = ckpt._optimizer_from_flat(tensors, json.loads(json.dumps(meta)))
    assert back["param_groups"] == sd["param_groups"] and back["state"].keys() == state.keys()
    for i, entry in state.items():
        assert back["state"][i].keys() == entry.keys()
        for k, v in entry.items():
            assert torch.equal(back["state"][i][k], v) if torch.is_tensor(v) else back["state"][i][k] == v


def test_gaussian_defaults_to_unit_sigma_and_says_why_it_cannot_sample():
    """Gaussian(mu) is N(mu, 1) per pixel; an optimal-sigma one refuses to sample, saying why."""
    mu, x = torch.zeros(1, 1, 2, 2), torch.tensor([[[[0.5, -1.0], [2.0, 0.0]]]])
    expected = -0.5 * (0.25 + 1 + 4) - 4 * 0.5 * math.log(2 * math.pi)
    assert Gaussian(mu).log_prob(x).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError) as refused:
        Gaussian(mu, optimal="image").sample()
    assert str(refused.value) == "an optimal-sigma Gaussian has a sigma only relative to data; use .mean"


@pytest.mark.parametrize("tracing", ["is_compiling", "is_exporting"])
def test_a_traced_graph_on_the_cpu_takes_the_branch_free_logistic_mean(monkeypatch, tracing):
    """torch.compile and ONNX export cannot branch on data: either of them alone turns the boolean index off."""
    from facevae import distributions

    assert distributions._selects_in_place(torch.zeros(2))
    monkeypatch.setattr(torch.compiler, tracing, lambda: True)
    assert not distributions._selects_in_place(torch.zeros(2))


def test_gaussian_sigma_is_a_float32_scalar_on_the_means_device():
    """log sigma, given as a number or a tensor, is float32 on mu's device (a number is filled in there: a copy from
    the host would be a sync on a GPU at every step); the meta device stands for an accelerator."""
    for mu in (torch.zeros(2, 1, 2, 2, device="meta", dtype=torch.bfloat16), torch.zeros(2, 1, 2, 2)):
        for log_sigma in (-1.5, torch.tensor(-1.5, dtype=torch.float64)):
            g = Gaussian(mu, log_sigma)
            assert (g.log_sigma.device, g.log_sigma.dtype, g.log_sigma.shape) == (mu.device, torch.float32, ())
    assert Gaussian(torch.zeros(1), -1.5).log_sigma.item() == -1.5


def test_discretized_logistic_scale_is_clamped_at_the_configured_min_sigma():
    raw = torch.full((1, 2, 2, 2), -20.0)  # log-scale far below any minimum
    lik = DiscretizedLogistic.from_decoder(raw, None, SimpleNamespace(sigma=1.0, min_sigma=0.05), training=True)
    assert torch.allclose(lik.log_scale, torch.full((1, 1, 2, 2), math.log(0.05)))


def test_one_wide_bin_among_narrow_ones_gets_its_own_mass():
    """The 8-bit Gaussian mass with exactly one open edge bin (level 0) among narrow mid-grey bins: each pixel its
    exact mass Phi(b) - Phi(a), the edge bin's open to -inf (not the narrow-bin series)."""
    from facevae.distributions import gaussian_bin_log_mass

    x = torch.full((1, 1, 2, 2), 128 / 255, dtype=torch.float64)
    x[0, 0, 0, 0] = 0.0
    mu, sigma = torch.full_like(x, 0.3), 0.2
    got = gaussian_bin_log_mass(x, mu, torch.tensor(math.log(sigma), dtype=torch.float64))

    def phi(v: float) -> float:
        return 0.5 * math.erfc(-v / math.sqrt(2))

    edge = math.log(phi((1 / 256 - 0.3) / sigma))
    mid = math.log(phi((129 / 256 - 0.3) / sigma) - phi((128 / 256 - 0.3) / sigma))
    assert got[0, 0, 0, 0].item() == pytest.approx(edge, rel=1e-9)
    assert torch.allclose(got.flatten()[1:], torch.tensor(mid, dtype=torch.float64), rtol=1e-9)


def test_sums_are_taken_in_float32_at_least():
    """A bfloat16 network's terms are summed in float32: 300 ones sum to 300 (in bfloat16 they stop at 256)."""
    from facevae.distributions import Likelihood, _sum_per_item

    total = _sum_per_item(torch.ones(2, 3, 10, 10, dtype=torch.bfloat16))
    assert total.dtype == torch.float32 and total.tolist() == [300.0, 300.0]
    assert _sum_per_item(torch.ones(1, 3, dtype=torch.float64)).dtype == torch.float64

    class NoBins(Likelihood):  # a likelihood that says its support has no 8-bit bins
        support = "none"

        def log_prob_8bit(self, x):
            return x

    assert not NoBins.has_8bit() and Bernoulli.has_8bit() is False and DiscretizedLogistic.has_8bit()


def test_posterior_samples_are_drawn_on_its_device():
    """The noise is drawn where the posterior lives (the meta device stands in for a GPU here)."""
    posterior = DiagonalGaussian(torch.zeros(3, 2, device="meta"), torch.zeros(3, 2, device="meta"))
    assert posterior.sample().device.type == "meta" and posterior.sample(4).shape == (4, 3, 2)


def test_posterior_log_variance_is_clamped_to_its_bounds():
    """logvar is clamped to [-30, 20] (exp stays finite in float32 early in training)."""
    posterior = DiagonalGaussian(torch.zeros(1, 3), torch.tensor([[-100.0, 0.5, 100.0]]))
    assert posterior.logvar.tolist() == [[-30.0, 0.5, 20.0]]
    assert torch.isfinite(posterior.std).all() and torch.isfinite(posterior.kl()).all()


def test_an_optimizer_file_fault_names_the_checkpoint_and_cuts_long_names(tiny, tmp_path):
    """The message names the checkpoint, the tensor's name up to 80 characters and the shape's first 4 sizes."""
    vae, optimizer = _saved(tiny, tmp_path)
    cdir = tmp_path / "checkpoint"
    name = "rng." + "x" * 100
    data = st_save({**load_file(str(cdir / "optimizer.safetensors")), name: torch.zeros(1, 1, 1, 1, 2)})
    (cdir / "optimizer.safetensors").write_bytes(data)
    _edit_state(cdir, lambda s: {**s, "sha256": {**s["sha256"],
                                                 "optimizer.safetensors": hashlib.sha256(data).hexdigest()}})
    with pytest.raises(ckpt.DamagedCheckpoint) as caught:
        ckpt.load_checkpoint(tmp_path, vae, optimizer)
    assert str(caught.value) == (f"the checkpoint {cdir} is damaged (optimizer.safetensors holds {name[:80]!r} "
                                 f"(1, 1, 1, 1)); delete {cdir} to start over")


def test_a_crash_between_the_two_renames_leaves_the_previous_checkpoint_loadable(tiny, tmp_path, monkeypatch):
    """save_checkpoint moves the current checkpoint to checkpoint.old, then checkpoint.new in its place: killed
    between the two, the previous one is read from checkpoint.old."""
    vae, optimizer = _saved(tiny, tmp_path)  # step 1
    real = os.replace

    def crash(src, dst):
        if Path(src).name == "checkpoint.new":
            raise OSError("killed between the renames")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed between"):
        ckpt.save_checkpoint(tmp_path, vae, optimizer, {"step": 2})
    monkeypatch.setattr(os, "replace", real)
    assert not (tmp_path / "checkpoint").exists()
    assert ckpt.load_checkpoint(tmp_path, vae, optimizer)["step"] == 1


def test_saving_over_a_checkpoint_and_a_stale_old_one_leaves_one_checkpoint(tiny, tmp_path):
    """A second save replaces the first and removes checkpoint.old; a checkpoint.old a crash left behind is
    replaced too (a rename onto it would fail)."""
    vae, optimizer = _saved(tiny, tmp_path)
    (tmp_path / "checkpoint.old").mkdir()
    (tmp_path / "checkpoint.old" / "state.json").write_text("{}")
    ckpt.save_checkpoint(tmp_path, vae, optimizer, {"step": 2})
    ckpt.save_checkpoint(tmp_path, vae, optimizer, {"step": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert ckpt.load_checkpoint(tmp_path, vae, optimizer)["step"] == 3


def test_state_json_errors_are_cut_at_160_characters_and_other_types_are_not_checked(tiny, tmp_path):
    """A state.json that cannot be read gives its error on one line, cut at 160 characters; an expected key whose
    type the loader has no check for (a string here) is taken as it is."""
    deep = tmp_path / ("d" * 100) / ("e" * 100)
    deep.mkdir(parents=True)
    with pytest.raises(ckpt.DamagedCheckpoint) as caught:
        ckpt._read_state(deep, {})
    error = f"[Errno 2] No such file or directory: '{deep / 'state.json'}'"
    assert str(caught.value) == (f"the checkpoint {deep} is damaged (state.json: {error[:160]}); delete {deep} to "
                                 f"start over")
    vae, optimizer = _saved(tiny, tmp_path)
    _edit_state(tmp_path / "checkpoint", _with(note=7))
    assert ckpt.load_checkpoint(tmp_path, vae, optimizer, expected={"note": "text"})["note"] == 7


def test_a_checkpoint_file_that_is_not_safetensors_is_named_and_long_values_are_cut(tiny, tmp_path):
    vae, optimizer = _saved(tiny, tmp_path)
    cdir = tmp_path / "checkpoint"
    data = b"\x08\x00\x00\x00\x00\x00\x00\x00not json"
    (cdir / "optimizer.safetensors").write_bytes(data)
    _edit_state(cdir, lambda s: {**s, "sha256": {**s["sha256"],
                                                 "optimizer.safetensors": hashlib.sha256(data).hexdigest()}})
    with pytest.raises(ckpt.DamagedCheckpoint) as caught:
        ckpt.load_checkpoint(tmp_path, vae, optimizer)
    assert re.fullmatch(rf"the checkpoint {re.escape(str(cdir))} is damaged \(.*optimizer\.safetensors.+\); delete "
                        rf"{re.escape(str(cdir))} to start over", str(caught.value)), str(caught.value)
    vae, optimizer = _saved(tiny, tmp_path)
    _edit_state(cdir, _with(step="x" * 60))
    with pytest.raises(ckpt.DamagedCheckpoint, match=r"\(state\.json has step = 'x{40}'\)"):
        ckpt.load_checkpoint(tmp_path, vae, optimizer, expected=EXPECTED)


def test_a_state_json_that_breaks_the_restore_is_named_with_the_error(tiny, tmp_path):
    """An error while restoring (here an optimiser scalar whose index is no number) is one line: the error's type
    and text, its whitespace squeezed, cut at 160 characters."""
    vae, optimizer = _saved(tiny, tmp_path)
    cdir = tmp_path / "checkpoint"
    _edit_state(cdir, lambda s: {**s, "optimizer": {**s["optimizer"], "scalars": {"y" * 200 + ".k": 1}}})
    with pytest.raises(ckpt.DamagedCheckpoint) as caught:
        ckpt.load_checkpoint(tmp_path, vae, optimizer)
    why = " ".join(f"invalid literal for int() with base 10: '{'y' * 200}'".split())[:160]
    assert str(caught.value) == f"the checkpoint {cdir} is damaged (ValueError: {why}); delete {cdir} to start over"


@pytest.mark.parametrize("code, why", [(errno.ENOSPC, "the disk is full"), (errno.EACCES, "Permission denied"),
                                       (None, "a reason of its own")])  # an OSError with no errno: its text
def test_a_checkpoint_that_cannot_be_written_says_why(tiny, tmp_path, monkeypatch, code, why):
    def failing(*args, **kwargs):
        raise OSError(code, os.strerror(code)) if code else OSError(why)

    monkeypatch.setattr(ckpt, "save_checkpoint", failing)
    with pytest.raises(UserError) as caught:
        train(tiny(batch_size=40, epochs=1, checkpoint_every=1), tmp_path / "run", progress=False)
    assert f"could not write a checkpoint at step 1 ({why}); the previous checkpoint" in str(caught.value)
