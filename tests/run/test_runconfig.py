"""RunConfig: the defaults and every example load, the rules that tie the three sections together run
at load and name both keys, and the children's configs put every file in the run dir."""

import subprocess
import sys
import tomllib
from pathlib import Path

import msgspec
import pytest
from tidal.engine.config import EngineConfig
from tidal.engine.runconfig import (
    Layout,
    ReferenceInference,
    RunConfig,
    engine_config,
    serve_config,
    trainer_config,
)
from tidal.protocol.config import load_config, to_toml
from tidal.protocol.errors import ConfigError
from tidal.trainer.config import TrainerConfig

from tests.run.proc import ROOT

EXAMPLES = ROOT / "examples"
KINDS = {"two-hosts/engine.toml": EngineConfig, "two-hosts/trainer.toml": TrainerConfig}
"""Examples that are a daemon's own config; every other one is a `tidal run` config."""


def test_every_example_config_loads():
    found = sorted(str(p.relative_to(EXAMPLES)) for p in EXAMPLES.rglob("*.toml"))
    assert {"cpu.toml", "gpu-sglang.toml", "torchrun.toml", *KINDS} <= set(found), found
    for name in found:
        cfg = load_config(KINDS.get(name, RunConfig), EXAMPLES / name)
        assert cfg is not None, name


def test_the_cpu_example_is_the_default():
    """examples/cpu.toml writes out what `tidal run` runs without a config."""
    assert load_config(RunConfig, EXAMPLES / "cpu.toml") == load_config(RunConfig)


def test_the_gpu_examples_name_sglang_and_a_hub_model():
    gpu = load_config(RunConfig, EXAMPLES / "gpu-sglang.toml")
    assert type(gpu.inference).__struct_config__.tag == "sglang"
    assert gpu.model.path == "Qwen/Qwen2.5-0.5B-Instruct" and not gpu.model.builds
    torchrun = load_config(RunConfig, EXAMPLES / "torchrun.toml")
    assert torchrun.trainer_launch[:2] == ["-m", "torch.distributed.run"]
    assert torchrun.trainer.distributed.strategy == "fsdp"


def test_the_default_builds_the_tiny_model_and_the_resolved_config_reads_back():
    cfg = load_config(RunConfig)
    assert cfg.model.builds and isinstance(cfg.inference, ReferenceInference)
    assert cfg.max_steps > 0 and cfg.max_minutes > 0  # `make run` ends by itself
    assert load_config(RunConfig, overrides=[]) == msgspec.convert(tomllib.loads(to_toml(cfg)), RunConfig)


@pytest.mark.parametrize("overrides, words", [
    (["engine.rollout.group_size=8"], ["engine.rollout.group_size (8)", "trainer.intake.group_size (4)"]),
    (['engine.model.path="/m"'], ["engine.model.path", "model.path"]),
    (['trainer.learner.model.path="/m"'], ["trainer.learner.model.path", "model.path"]),
    (['inference.model.path="/m"'], ["inference.model.path", "model.path"]),
    (['engine.rollout.mode="sync"'], ["engine.rollout.mode", "trainer.intake.max_staleness", "sync = true"]),
    (["trainer.max_steps=5", "max_steps=7"], ["trainer.max_steps (5)", "max_steps (7)"]),
    (['model.path="/m"', "model.build_tiny=true"], ["model.path", "model.build_tiny", "both"]),
    (["model.build_tiny=false"], ["model.path", "neither"]),
    (['inference.type="external"'], ["inference", "urls"]),
    (["engine.rollout.engines=2"], ["engine.rollout.engines", "tidal engine"]),
])
def test_cross_field_rules_name_both_keys(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, overrides=overrides)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_sync_sets_both_sides():
    cfg = load_config(RunConfig, overrides=["sync=true", 'model.path="/m"'])
    layout = Layout(Path("/tmp/run-x"))
    assert trainer_config(cfg, layout, "/m").intake.max_staleness == 0
    engine = engine_config(cfg, layout, "/m", ["http://s:1"], "tcp://127.0.0.1:5", "tcp://127.0.0.1:6")
    assert engine.rollout.mode == "sync"
    plain = load_config(RunConfig, overrides=['model.path="/m"'])
    assert engine_config(plain, layout, "/m", ["http://s:1"], "tcp://a:1", "tcp://a:2").rollout.mode == "async"


def test_the_children_write_only_in_the_run_dir(tmp_path):
    cfg = load_config(RunConfig, overrides=["max_steps=9"])
    layout = Layout(tmp_path / "r")
    t = trainer_config(cfg, layout, "/m")
    e = engine_config(cfg, layout, "/m", ["http://127.0.0.1:7"], "tcp://127.0.0.1:5", "tcp://127.0.0.1:6")
    s = serve_config(cfg, "/m")
    files = [t.checkpoint.dir, t.publish.dir, t.metrics.jsonl, t.failures.dead_letter, e.trainer.spool_dir,
             e.metrics.jsonl]
    assert all(Path(f).is_relative_to(layout.root) for f in files), files
    assert t.learner.model.path == e.model.path == s.model.path == "/m"
    assert t.intake.endpoint == t.intake.status_endpoint == "tcp://127.0.0.1:0"  # read back from `ready`
    assert (e.trainer.endpoint, e.trainer.status_endpoint) == ("tcp://127.0.0.1:5", "tcp://127.0.0.1:6")
    assert e.backend.urls == ["http://127.0.0.1:7"] and t.max_steps == 9
    assert s.server.port == 0
    restarted = serve_config(cfg, "/m", port=4321, weights=tmp_path / "v00000007", version=7)
    assert (restarted.server.port, restarted.server.weight_version) == (4321, "7")
    assert restarted.model.path == str(tmp_path / "v00000007")
    # each child's config is one its daemon loads
    for kind, child in ((TrainerConfig, t), (EngineConfig, e)):
        path = tmp_path / "child.toml"
        path.write_text(to_toml(child))
        assert load_config(kind, path) == child


def test_print_config_and_set_work_from_the_command_line():
    out = subprocess.run([sys.executable, "-m", "tidal", "run", "--print-config", "--set", "max_steps=7",
                          "--sync"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    shown = tomllib.loads(out.stdout)
    assert shown["max_steps"] == 7 and shown["sync"] is True
    assert shown["trainer"]["intake"]["batch_size"] and shown["engine"]["tasks"][0]["env"]
    bad = subprocess.run([sys.executable, "-m", "tidal", "run", "--set", "engine.rollout.group_sise=3"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2
    assert bad.stderr.startswith("tidal run: ") and "group_size" in bad.stderr, bad.stderr


def test_sglang_without_the_package_is_one_clear_line(tmp_path, tiny_model_dir):
    out = subprocess.run([sys.executable, "-m", "tidal", "run", "--run-dir", str(tmp_path / "r"), "--set",
                          f'model.path="{tiny_model_dir}"', "--set", 'inference.type="sglang"', "--set",
                          "console.mode=\"off\""], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert "needs the sglang package" in out.stderr and "inference.type = 'reference'" in out.stderr
    assert "Traceback" not in out.stderr
