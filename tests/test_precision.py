"""bf16 autocast trains to the same test ELBO as float32 (the reason `precision = "auto"` may pick it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from facevae.config import Config
from facevae.device import cpu_has_native_bf16, resolve_precision
from facevae.errors import UserError
from facevae.train import train

DEMO = Path(__file__).resolve().parent.parent / "configs" / "lfw-faces.toml"
TOLERANCE_BPD = 0.02  # bits/dim of the test ELBO; seed-to-seed spread on the demo is of this order


def test_auto_precision_choice():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_native_bf16() else "float32")
    assert resolve_precision("float32", cpu) == "float32"
    with pytest.raises(UserError, match="fp16"):
        resolve_precision("fp16", cpu)


def test_bf16_step_keeps_float32_sums(tiny):
    from facevae.model import VAE

    vae = VAE(tiny())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = vae(torch.rand(4, 1, 32, 32))
    assert terms.recon.dtype == terms.kl.dtype == terms.elbo.dtype == torch.float32


@pytest.mark.slow
def test_bf16_reaches_the_float32_test_elbo(tmp_path):
    results = {}
    for precision in ("float32", "bf16"):
        config = Config.from_toml(DEMO).updated({"precision": precision, "epochs": 100, "image_every": 100})
        results[precision] = train(config.validate(), tmp_path / precision, progress=False)["test_elbo_bpd"]
    assert abs(results["bf16"] - results["float32"]) < TOLERANCE_BPD, results


def test_compile_failure_is_one_line(tmp_path, tiny, monkeypatch):
    import torch._dynamo.exc as dynamo_exc

    from facevae import train as train_module

    class Broken(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            raise dynamo_exc.BackendCompilerFailed(lambda: None, RuntimeError("no C++ compiler"), None)

    monkeypatch.setattr(train_module.torch, "compile", lambda m: Broken(m))
    with pytest.raises(UserError, match="torch.compile failed.*compile=false"):
        train(tiny(compile=True), tmp_path / "run", progress=False)
