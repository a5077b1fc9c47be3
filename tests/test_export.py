"""`facevae export RUN --onnx DIR`: valid ONNX files that compute what facevae computes (batch 1 and 7, every
likelihood), a model card whose example runs with onnxruntime and numpy alone, and a DIR facevae may write."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_config
from facevae.run import load_run
from facevae.cli import main
from facevae.distributions import LIKELIHOODS
from facevae.evaluate import evaluate_run
from facevae.model import VAE
from tiny_runs import import_extra, train_tiny

onnx = import_extra("onnx", "onnx")
ort = import_extra("onnxruntime", "onnx")
import_extra("onnxscript", "onnx")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A trained (BatchNorm statistics moved off their start) and evaluated run of the grey demo faces."""
    run = train_tiny(tmp_path_factory.mktemp("export") / "run")
    evaluate_run(run, iw_samples=2)
    return run


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model"
    assert main(["export", str(run), "--onnx", str(out)]) == 0
    return out


def test_files_are_valid_onnx_with_named_dynamic_io(run, exported):
    assert sorted(os.listdir(exported)) == [".facevae", "README.md", "config.json", "decoder.onnx", "encoder.onnx"]
    for name, inputs, outputs in (("decoder", ["latent"], ["image"]), ("encoder", ["image"], ["mean", "logvar"])):
        model = onnx.load(str(exported / f"{name}.onnx"))
        onnx.checker.check_model(model, full_check=True)
        assert [i.name for i in model.graph.input] == inputs and [o.name for o in model.graph.output] == outputs
        first = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert first.dim_param and not first.dim_value  # the batch is a symbol, not a number
    config = json.loads((exported / "config.json").read_text())
    assert config["format"] == "facevae-onnx" and config["latent_dim"] == 4 and config["channels"] == 1
    assert config["eval"] == json.loads((run / "eval.json").read_text())
    assert config["config"] == load_run(run).config.to_dict()


@pytest.mark.parametrize("batch", [1, 7])
def test_onnxruntime_computes_what_facevae_computes(run, exported, batch):
    vae = load_run(run)
    g = torch.Generator().manual_seed(batch)
    z = torch.randn(batch, 4, generator=g) * 2
    x = torch.rand(batch, 1, 32, 32, generator=g)
    decoder = ort.InferenceSession(str(exported / "decoder.onnx"))
    encoder = ort.InferenceSession(str(exported / "encoder.onnx"))
    (image,) = decoder.run(["image"], {"latent": z.numpy()})
    mean, logvar = encoder.run(["mean", "logvar"], {"image": x.numpy()})
    with torch.no_grad():
        want = vae.decode(z).mean.float().clamp(0, 1)
        q = vae.encode(x)
    assert image.shape == (batch, 1, 32, 32) and 0 <= image.min() and image.max() <= 1
    assert np.abs(image - want.numpy()).max() <= 1e-4
    assert np.abs(mean - q.mean.numpy()).max() <= 1e-4
    assert np.abs(logvar - q.logvar.numpy()).max() <= 1e-4


@pytest.mark.slow  # about 2 s an export; CI runs it (make test-slow)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_every_likelihood_exports_its_mean(likelihood):
    from facevae.export import DecoderMean, onnx_bytes

    torch.manual_seed(0)
    vae = VAE(tiny_config(likelihood=likelihood, channels=3)).eval()  # RGB here, grey in the trained run
    session = ort.InferenceSession(onnx_bytes(DecoderMean(vae), torch.zeros(2, 4), "latent", ["image"]))
    z = torch.randn(7, 4) * 3
    (image,) = session.run(None, {"latent": z.numpy()})
    with torch.no_grad():
        assert np.abs(image - vae.decode(z).mean.float().clamp(0, 1).numpy()).max() <= 1e-4


def test_model_card(run, exported):
    card = (exported / "README.md").read_text()
    report = json.loads((run / "eval.json").read_text())
    for heading in ("## Data", "## Likelihood", "## Evaluation", "## Intended use and limits", "## License"):
        assert heading in card
    assert f"{report['elbo_nats']:.2f}" in card and "nats/image" in card and "bits/dim" in card
    assert "Labeled Faces in the Wild" in card and "fixed `sigma`" in card and "MIT" in card


def test_the_model_cards_example_runs_with_onnxruntime_and_numpy_alone(run, exported, tmp_path):
    """The exact code block of README.md, in a fresh interpreter that cannot import torch or facevae."""
    card = (exported / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert 10 <= len(code.strip().splitlines()) <= 20
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nclass _Block:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'facevae', 'PIL'):\n"
        "            raise ImportError(name + ' is blocked: the example must need onnxruntime and numpy alone')\n"
        "sys.meta_path.insert(0, _Block())\n")
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=exported, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = (exported / "faces.pgm").read_bytes()
    header = b"P5\n128 128\n255\n"
    assert data.startswith(header)
    pixels = np.frombuffer(data[len(header):], np.uint8).reshape(128, 128, 1)
    z = torch.from_numpy(np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32))
    with torch.no_grad():
        faces = load_run(run).decode(z).mean.clamp(0, 1)  # (16, 1, 32, 32)
    want = (faces.reshape(4, 4, 1, 32, 32).permute(0, 3, 1, 4, 2).reshape(128, 128, 1) * 255).round()
    assert np.abs(pixels.astype(np.int16) - want.numpy().astype(np.int16)).max() <= 1
    (exported / "faces.pgm").unlink()


def test_export_writes_only_where_it_may(run, exported, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["export", str(run), "--onnx", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "files facevae did not write" in err and err.count("\n") == 1
    assert os.listdir(mine) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    assert main(["export", str(run), "--onnx", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    (exported / "extra.txt").write_text("the user's")  # an earlier export: updated, the user's file left alone
    assert main(["export", str(run), "--onnx", str(exported)]) == 0
    assert (exported / "extra.txt").read_text() == "the user's"
    (exported / "extra.txt").unlink()


def test_without_the_extra_one_line(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert main(["export", str(run), "--onnx", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'facevae[onnx]'" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
