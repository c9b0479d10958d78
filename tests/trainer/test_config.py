"""`tidal trainer` configuration: defaults < TOML < --set, strict keys, cross-field rules, exit codes."""

import tomllib

import msgspec
from tidal.protocol.config import load_config
from tidal.trainer.config import DistributedPublish, TrainerConfig

from tidal.cli import main as tidal


def test_print_config_resolves_layers(tmp_path, capsys):
    path = tmp_path / "t.toml"
    path.write_text('[learner.model]\npath = "/m"\n[intake]\nbatch_size = 16\ngroup_size = 4\n'
                    '[publish]\ntype = "distributed"\nserver_ranks = 2\n')
    assert tidal(["trainer", str(path), "--set", "intake.max_staleness=3", "--print-config"]) == 0
    resolved = tomllib.loads(capsys.readouterr().out)
    assert resolved["intake"]["batch_size"] == 16 and resolved["intake"]["max_staleness"] == 3
    assert resolved["publish"]["type"] == "distributed" and resolved["publish"]["backend"] == "gloo"
    cfg = load_config(TrainerConfig, path)
    assert isinstance(cfg.publish, DistributedPublish) and cfg.publish.server_ranks == 2
    assert resolved["publish"]["server_ranks"] == 2


def test_bad_configuration_exits_2_naming_the_key(tmp_path, capsys):
    path = tmp_path / "t.toml"
    path.write_text('[learner.model]\npath = "/m"\n[intake]\nbatch_size = 6\ngroup_size = 4\n')
    assert tidal(["trainer", str(path)]) == 2
    assert "intake.batch_size (6) must be a multiple of intake.group_size (4)" in capsys.readouterr().err
    assert tidal(["trainer", str(path), "--set", "intake.batch_size=8", "--set", "checkpoint.every=3"]) == 2
    assert "every" in capsys.readouterr().err


def test_print_config_without_a_model_marks_the_missing_key_and_running_names_it(capsys):
    assert tidal(["trainer", "--print-config"]) == 0  # shown before the model is named, the key marked
    out = capsys.readouterr().out
    assert "# required: path = a string  (not given)" in out and tomllib.loads(out)["learner"]["model"]["dtype"]
    assert tidal(["trainer", "--set", "learner.optim.lr=1e-6"]) == 2
    assert "missing required field `model` - at learner" in capsys.readouterr().err


def test_missing_model_and_busy_endpoint_exit_2_with_the_reason(tmp_path, tiny_model_dir, capsys):
    import zmq

    path = tmp_path / "t.toml"
    path.write_text(f'[learner.model]\npath = "{tmp_path}/nope"\n[metrics]\njsonl = ""\nconsole = false\n'
                    f'[checkpoint]\ndir = "{tmp_path}/ckpt"\n[publish]\ntype = "none"\n')
    assert tidal(["trainer", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"learner.model.path: model path {tmp_path}/nope not found" in err, err

    ctx = zmq.Context()
    busy = ctx.socket(zmq.PULL)
    try:
        port = busy.bind_to_random_port("tcp://127.0.0.1")
        endpoint = f"tcp://127.0.0.1:{port}"
        argv = ["trainer", str(path), "--set", f"learner.model.path='{tiny_model_dir}'",
                "--set", f"intake.endpoint='{endpoint}'", "--set", "intake.status_endpoint='tcp://127.0.0.1:0'"]
        assert tidal(argv) == 2
        assert f"cannot bind intake.endpoint '{endpoint}'" in capsys.readouterr().err
    finally:
        busy.close(linger=0)
        ctx.term()


def test_group_relative_advantages_need_groups(capsys):
    argv = ["trainer", "--set", "learner.model.path='/m'", "--set", "intake.group_size=1", "--set", "intake.batch_size=4"]
    assert tidal(argv) == 2
    assert "learner.advantage.type = 'grpo' compares members of a group, so intake.group_size must be >= 2" in (
        capsys.readouterr().err)
    assert tidal([*argv, "--set", "learner.advantage.type='rebn'", "--print-config"]) == 0


def test_the_trainer_imports_neither_engine_nor_envs():
    import subprocess
    import sys

    code = ("import sys, tidal.trainer.daemon, tidal.trainer.publish, tidal.trainer.distributed; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('engine', 'envs')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_print_config_shows_what_auto_resolves_to_on_this_machine(capsys):
    import torch

    assert tidal(["trainer", "--set", "learner.model.path='/m'", "--print-config"]) == 0
    resolved = tomllib.loads(capsys.readouterr().out)
    on_gpu = torch.cuda.is_available()
    assert resolved["distributed"]["device"] == ("cuda" if on_gpu else "cpu")
    assert resolved["learner"]["model"]["dtype"] == ("bfloat16" if on_gpu else "float32")
    assert resolved["learner"]["optim"]["lr"] == 1e-6  # the default, shown as chosen
    # an explicit choice is kept, and what is printed loads back as it is
    argv = ["trainer", "--set", "learner.model.path='/m'", "--set", "learner.model.dtype='bfloat16'",
            "--set", "distributed.device='cpu'", "--print-config"]
    assert tidal(argv) == 0
    printed = capsys.readouterr().out
    assert tomllib.loads(printed)["learner"]["model"]["dtype"] == "bfloat16"
    cfg = msgspec.toml.decode(printed.encode(), type=TrainerConfig)
    assert (cfg.learner.model.dtype, cfg.distributed.device) == ("bfloat16", "cpu")
