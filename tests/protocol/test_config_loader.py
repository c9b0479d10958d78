"""protocol/config.py: defaults < TOML < --set overrides, errors naming the key, --print-config round trip."""

import argparse
from typing import Annotated, Literal

import msgspec
import pytest
from tidal.protocol.config import Strict, add_config_args, config_from_args, load_config, to_toml
from tidal.protocol.errors import ConfigError


class Adam(Strict, tag="adam"):
    lr: Annotated[float, msgspec.Meta(gt=0)] = 1e-5
    """learning rate"""
    betas: list[float] = msgspec.field(default_factory=lambda: [0.9, 0.999])


class Sgd(Strict, tag="sgd"):
    lr: Annotated[float, msgspec.Meta(gt=0)] = 1e-3
    momentum: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0


class Trainer(Strict):
    batch_size: Annotated[int, msgspec.Meta(ge=1)] = 8
    optim: Adam | Sgd = msgspec.field(default_factory=Adam)
    run_dir: str | None = None
    device: Literal["cpu", "cuda"] = "cpu"

    def __post_init__(self) -> None:
        if self.device == "cuda" and self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 on cuda")


class Cfg(Strict):
    trainer: Trainer = msgspec.field(default_factory=Trainer)
    name: str = "run"


def test_defaults_toml_then_overrides(tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text('name = "exp"\n[trainer]\nbatch_size = 32\n[trainer.optim]\ntype = "sgd"\nlr = 0.1\n')
    assert load_config(Cfg) == Cfg()
    cfg = load_config(Cfg, path, ["trainer.optim.momentum=0.9", "trainer.run_dir=runs/a", "name=override"])
    assert cfg.name == "override"
    assert cfg.trainer.batch_size == 32
    assert cfg.trainer.optim == Sgd(lr=0.1, momentum=0.9)  # the tagged union picked by `type`
    assert cfg.trainer.run_dir == "runs/a"  # bare text is a string
    assert load_config(Cfg, overrides=["trainer.optim.betas=[0.5, 0.6]"]).trainer.optim.betas == [0.5, 0.6]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.lr=1e-6"], "unknown key trainer.lr"),
        (["bogus=1"], "unknown key bogus"),
        (["trainer.batch_size=0"], "Expected `int` >= 1 - at trainer.batch_size"),
        (["trainer.batch_size=many"], "Expected `int`, got `str` - at trainer.batch_size"),
        (["trainer.optim.type=rmsprop"], "Invalid value 'rmsprop' - at trainer.optim.type"),
        (["trainer.optim.type=sgd", "trainer.optim.momentum=2"], "Expected `float` <= 1.0 - at trainer.optim.momentum"),
        (["trainer.device=tpu"], "Invalid enum value 'tpu' - at trainer.device"),
        (["trainer.device=cuda", "trainer.batch_size=1"], "batch_size must be >= 2 on cuda - at trainer"),
        (["trainer.optim.betas=[1, \"x\"]"], "Expected `float`, got `str` - at trainer.optim.betas[1]"),
        (["trainer"], "expected KEY=VALUE"),
        (["trainer..lr=1"], "empty part"),
        (["name=x", "name.sub=1"], "'name' is a value, not a section"),
    ],
)
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(Cfg, overrides=overrides)
    assert message in str(info.value)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Cfg, tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[trainer\n")
    with pytest.raises(ConfigError, match=f"{bad} is not valid TOML"):
        load_config(Cfg, bad)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[trainer]\nbatch_size = -3\n")
    with pytest.raises(ConfigError, match=f"in {wrong}: Expected `int` >= 1 - at trainer.batch_size"):
        load_config(Cfg, wrong)


def test_print_config_round_trips(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    args = parser.parse_args(["--set", "trainer.optim.type=sgd", "--set", "trainer.optim.lr=0.5", "--print-config"])
    assert config_from_args(Cfg, args) is None
    printed = capsys.readouterr().out
    assert 'type = "sgd"' in printed
    path = tmp_path / "resolved.toml"
    path.write_text(printed)
    resolved = load_config(Cfg, path)
    assert resolved == load_config(Cfg, overrides=["trainer.optim.type=sgd", "trainer.optim.lr=0.5"])
    assert resolved.trainer.run_dir is None  # None is left out of TOML and reads back as its default
    args = parser.parse_args([str(path), "--set", "name=again"])
    assert config_from_args(Cfg, args).name == "again"
    assert to_toml(resolved) == printed
