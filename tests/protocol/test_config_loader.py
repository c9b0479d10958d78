"""protocol/config.py: defaults < TOML < --set overrides, errors naming the key, --print-config round trip."""

import argparse
import tomllib
from typing import Annotated, Literal

import msgspec
import pytest
from tidal.protocol.config import (
    Strict,
    add_config_args,
    config_from_args,
    example_override,
    load_config,
    to_toml,
)
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


# --- discoverability: docstrings, suggestions, choices, the defaults view --------------------------


class Model(Strict):
    """The policy model."""

    path: str
    """Directory of the checkpoint."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype."""


class Task(Strict):
    env: str = "games:Wordle-v0"
    """A registered env id."""
    weight: float = 1.0


class Needs(Strict):
    """A daemon whose model has no default."""

    model: Model
    """Required: names the checkpoint."""
    trainer: Trainer = msgspec.field(default_factory=Trainer)
    tasks: list[Task] = msgspec.field(default_factory=lambda: [Task(), Task(env="math:Arithmetic-v0", weight=2.0)])


def test_printed_config_carries_each_field_docstring_as_a_comment():
    printed = to_toml(Cfg())
    lines = printed.splitlines()
    assert lines[lines.index("[trainer.optim]") + 1:][:3] == [
        '# one of "adam", "sgd": each has its own keys', 'type = "adam"', "",
    ]
    assert lines[lines.index("lr = 1e-05") - 1] == "# learning rate"  # Adam.lr's docstring, read from the source
    assert "# run_dir: not set" in lines  # None has no TOML form: shown, and read back as None
    assert load_config(Cfg, overrides=[]) == msgspec.toml.decode(printed.encode(), type=Cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.batch_sise=3"], "unknown key trainer.batch_sise; did you mean trainer.batch_size? "
                                   "(trainer takes: batch_size, optim, run_dir, device)"),
        (["trainr.batch_size=3"], "unknown key trainr; did you mean trainer? (the top level takes: model, trainer, tasks)"),
        (["trainer.optim.momentum=0.5"], "unknown key trainer.optim.momentum (trainer.optim takes: type, lr, betas)"),
        (["trainer.optim.type=sdg"], """Invalid value 'sdg' - at trainer.optim.type; expected one of "adam", "sgd\""""),
        (["trainer.device=gpu"], """Invalid enum value 'gpu' - at trainer.device; expected one of "cpu", "cuda\""""),
        (["tasks=[{env = 'x'}, {envv = 'y'}]"],
         "unknown key tasks[1].envv; did you mean tasks[1].env? (tasks[1] takes: env, weight)"),
    ],
)
def test_errors_name_what_the_section_takes(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(Needs, overrides=["model.path=m", *overrides])
    assert message in str(info.value)


def test_print_config_before_the_required_keys_are_given(capsys):
    parser = argparse.ArgumentParser()
    add_config_args(parser, Needs)
    with pytest.raises(ConfigError, match="missing required field `model`"):
        load_config(Needs)  # running still needs it
    assert config_from_args(Needs, parser.parse_args(["--print-config", "--set", "trainer.batch_size=4"])) is None
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    i = lines.index("[model]")
    assert lines[i - 1] == "# Required: names the checkpoint."
    assert lines[i + 1:i + 3] == ["# Directory of the checkpoint.", "# required: path = a string  (not given)"]
    assert "batch_size = 4" in lines and lines.count("[[tasks]]") == 2
    # the view is TOML: with the required key given it loads as the config it shows
    parsed = tomllib.loads(printed)
    assert "path" not in parsed["model"]
    full = load_config(Needs, overrides=["model.path=ckpt", "trainer.batch_size=4"])
    assert msgspec.convert({**parsed, "model": {**parsed["model"], "path": "ckpt"}}, Needs) == full
    assert to_toml(full).count("[[tasks]]") == 2 and "# required" not in to_toml(full)
    # a real mistake is still one, named, whatever is missing
    with pytest.raises(ConfigError, match="unknown key trainer.batch; did you mean trainer.batch_size"):
        config_from_args(Needs, parser.parse_args(["--print-config", "--set", "trainer.batch=4"]))
    cross = ["--print-config", "--set", "trainer.device=cuda", "--set", "trainer.batch_size=1"]
    with pytest.raises(ConfigError, match=r"batch_size must be >= 2 on cuda - at trainer$"):
        config_from_args(Needs, parser.parse_args(cross))


def test_set_help_shows_a_key_that_exists():
    parser = argparse.ArgumentParser()
    add_config_args(parser, Needs)
    example = example_override(Needs)
    assert example == "trainer.batch_size=8" and f"--set {example}" in parser.format_help().replace("\n", " ")
    assert load_config(Needs, overrides=["model.path=m", example]).trainer.batch_size == 8
