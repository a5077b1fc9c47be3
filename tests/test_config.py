"""Config: TOML in and out, --set parsing, and a one-line error naming the key for every bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from facevae.config import Config
from facevae.errors import UserError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_toml_round_trip(tmp_path):
    config = Config(latent_dim=7, widths=[4, 8], likelihood="bernoulli", learning_rate=3e-4, hflip=True, data="a\"b")
    path = tmp_path / "c.toml"
    path.write_text(config.to_toml())
    assert Config.from_toml(path) == config


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    Config.from_toml(path).validate()


def test_set_overrides_parse_toml_values():
    c = Config().with_overrides(["latent_dim=16", "learning_rate=1e-4", "hflip=true", "widths=[8, 16]",
                                 "likelihood=bernoulli", "data=celeba:/x/y", "kl_weight=2"])
    assert (c.latent_dim, c.learning_rate, c.hflip, c.widths, c.likelihood, c.data, c.kl_weight) == \
        (16, 1e-4, True, [8, 16], "bernoulli", "celeba:/x/y", 2.0)


@pytest.mark.parametrize("assignment,key", [
    ("nonsense=1", "nonsense"),
    ("latent_dim=abc", "latent_dim"),
    ("latent_dim=0", "latent_dim"),
    ("learning_rate=-1", "learning_rate"),
    ("image_size=48", "image_size"),
    ("channels=2", "channels"),
    ("likelihood=laplace", "likelihood"),
    ("hflip=1", "hflip"),
    ("widths=[8, -1]", "widths"),
    ("epochs=1.5", "epochs"),
])
def test_bad_values_name_the_key(assignment, key):
    with pytest.raises(UserError, match=key) as info:
        Config().with_overrides([assignment]).validate()
    assert "\n" not in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Config.from_toml(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("latent_dim = = 3\n")
    with pytest.raises(UserError, match="not valid TOML"):
        Config.from_toml(bad)


def test_an_old_key_is_read_under_its_new_name_with_one_notice(tmp_path, capsys, monkeypatch):
    """`split` became `split_scheme`: an old config still loads; the notice is said once per process, though a run's
    config.toml and its model's metadata both hold the old key."""
    from facevae import config as config_module

    monkeypatch.setattr(config_module, "_NOTED", set(), raising=False)
    (tmp_path / "config.toml").write_text('split = "deck"\n')
    first = Config.from_toml(tmp_path / "config.toml")
    second = Config.from_dict({"split": "deck"}, source="the model's metadata")
    assert first.split_scheme == second.split_scheme == "deck"
    assert capsys.readouterr().err.count("config key 'split'") == 1
