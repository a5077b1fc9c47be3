"""Shapes, round trips through the run directory, and the Python API."""

from __future__ import annotations

import pytest
import torch

from facevae.checkpoint import load_model, save_model
from facevae.config import Config
from facevae.data import with_data_shape
from facevae.distributions import LIKELIHOODS
from facevae.model import VAE, folded, network_summary


@pytest.mark.parametrize("size,widths", [(32, [8, 16, 32]), (64, [8, 16, 32, 32, 64]), (128, [4, 8, 8, 16, 16])])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_for_each_size_and_channel_count(size, widths, channels):
    config = Config(image_size=size, channels=channels, widths=widths, latent_dim=6).validate()
    vae = VAE(config)
    x = torch.rand(2, channels, size, size)
    q = vae.encode(x)
    assert q.mean.shape == q.logvar.shape == q.sample().shape == (2, 6)
    assert q.log_prob(q.sample()).shape == q.kl().shape == (2,)
    p = vae.decode(q.sample())
    assert p.mean.shape == x.shape
    assert p.log_prob(x).shape == (2,)
    terms = vae(x)
    assert terms.x_mean.shape == x.shape and terms.loss.ndim == 0
    assert vae.sample(3).shape == (3, channels, size, size)


def test_default_network_is_the_decks():
    config = with_data_shape(Config(data="celeba:/nowhere").validate())  # CelebA: 64x64 RGB, nothing read
    assert (config.image_size, config.channels, config.widths, config.latent_dim) == (64, 3, [32, 64, 128, 256, 512], 128)
    vae = VAE(config)
    convs = [m for m in vae.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.out_channels) for c in convs] == [((3, 3), (2, 2), w) for w in config.widths]
    # the popular repository's vanilla VAE has about 3.9M parameters at 64x64, latent 128 (ours has no tanh layer)
    params = sum(p.numel() for p in vae.parameters())
    assert 3.5e6 < params < 4.3e6


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_decoder_output_is_in_the_data_range(likelihood):
    config = Config(image_size=32, channels=1, widths=[8, 16], latent_dim=4, likelihood=likelihood).validate()
    vae = VAE(config)
    with torch.no_grad():
        mean = vae.decode(torch.randn(5, 4) * 10).mean
    assert mean.min() >= 0 and mean.max() <= 1
    assert not any(isinstance(m, torch.nn.Tanh) for m in vae.modules())


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_save_load_identical_outputs(tmp_path, tiny, likelihood):
    torch.manual_seed(0)
    vae = VAE(tiny(likelihood=likelihood))
    vae(torch.rand(8, 1, 32, 32))  # move BatchNorm's running statistics away from their initial values
    vae.eval()
    save_model(vae, tmp_path / "model.safetensors")
    loaded = load_model(tmp_path / "model.safetensors")
    assert loaded.config == vae.config
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(vae.reconstruct(x), loaded.reconstruct(x))
        torch.manual_seed(3)
        a = vae(x)
        torch.manual_seed(3)
        b = loaded(x)
    assert torch.equal(a.elbo, b.elbo)


def test_summary_lists_layers_and_parameters():
    text = network_summary(Config(image_size=64, channels=3, likelihood="gaussian").validate())
    assert "Conv2d" in text and "ConvTranspose2d" in text and "Total params" in text
    assert "[1, 3, 64, 64]" in text  # the decoder's output shape
    mult_adds = [line for line in text.splitlines() if line.startswith("Total mult-adds")]
    assert len(mult_adds) == 1 and "Units." not in mult_adds[0] and "MB" not in mult_adds[0]
    count = int(mult_adds[0].split("(")[1].rstrip(")").replace(",", ""))  # "Total mult-adds: 52.43 M (52,428,800)"
    assert mult_adds[0].startswith(f"Total mult-adds: {count / 1e6:.2f} M (")


def test_folded_is_the_same_function_without_batchnorm():
    """Evaluation's copy folds each BatchNorm into its convolution: the same posterior and decoder output as the
    eval-mode network with trained (non-trivial) statistics, and the original model is left as it was."""
    torch.manual_seed(0)
    vae = VAE(Config(image_size=16, channels=3, widths=[8, 16], latent_dim=4))
    for m in vae.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.2, 3)
            m.weight.data.normal_()
            m.bias.data.normal_()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    vae.eval()
    fast = folded(vae)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    x, z = torch.rand(5, 3, 16, 16), torch.randn(5, 4)
    with torch.no_grad():
        for a, b in zip(vae.encoder(x), fast.encoder(x)):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast.decoder(z), vae.decoder(z), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in vae.modules())
