"""ZeroMQ CURVE on the trajectory and status channels (protocol/channels/curve.py, `tidal keys`).

With keys, an engine holding an allowed key delivers trajectories and hears the trainer's status;
a peer without a key, with a key the trainer does not list, or expecting another trainer's key is
refused before any frame reaches a decoder, and each refusal is counted in the channel's
`stats.refused`. Keys added to or removed from the allowed directory take effect at the next
handshake. Without keys nothing changes (the other channel tests run that way)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import stat

import pytest
from tidal.protocol.channels import StatusPublisher, StatusSubscriber, TrajectoryReceiver, TrajectorySender
from tidal.protocol.channels.curve import client_keys, server_keys
from tidal.protocol.errors import ConfigError
from tidal.protocol.keys import main as keys_main
from tidal.protocol.keys import make_keys
from tidal.protocol.messages import TrainerStatus, Trajectory, Turn

from tidal.cli import main as cli_main


def trajectory(i: int) -> Trajectory:
    return Trajectory.build(id=f"t-{i}", group_id="g", env_id="curve", task_seed=i, tokens=[1, 2, 3, 4],
                            loss_mask=[0, 0, 1, 1], behav_logp=[0, 0, -0.5, -0.25], versions=[-1, -1, 0, 0],
                            turns=[Turn(2, 4, 1.0)], reward=1.0)


@pytest.fixture
def keys(tmp_path):
    made = make_keys(tmp_path / "keys", ["engine-0", "engine-1"])
    trainer = server_keys(str(made["trainer"][1]), str(tmp_path / "keys" / "engines"))
    return tmp_path / "keys", trainer, made


def engine_keys(made, name: str):
    return client_keys(str(made[name][1]), str(made["trainer"][0]))


async def until(cond, what: str, timeout: float = 10.0):
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


# --- tidal keys ----------------------------------------------------------------------------------------

def test_tidal_keys_lays_out_pairs_and_the_allowed_directory(tmp_path, capsys):
    root = tmp_path / "k"
    assert keys_main([str(root), "--engines", "2"]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == ["engine-0.key", "engine-0.key_secret", "engine-1.key",
                                                      "engine-1.key_secret", "engines", "trainer.key",
                                                      "trainer.key_secret"]
    assert sorted(p.name for p in (root / "engines").iterdir()) == ["engine-0.key", "engine-1.key"]
    for secret in root.glob("*.key_secret"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert f'curve_allowed_dir = "{root.resolve() / "engines"}"' in printed
    assert f'curve_server_key = "{root.resolve() / "trainer.key"}"' in printed
    before = {p.name: p.read_bytes() for p in root.glob("*.key_secret")}
    assert keys_main([str(root), "--names", "engine-0", "late"]) == 0  # nothing in use is replaced
    assert {p.name: p.read_bytes() for p in root.glob("*.key_secret") if p.name in before} == before
    assert (root / "engines" / "late.key").exists()
    assert keys_main([str(root), "--names", "trainer"]) == 2
    assert cli_main(["keys", str(tmp_path / "via-cli")]) == 0  # `tidal keys` is the same command
    assert (tmp_path / "via-cli" / "engines" / "engine-0.key").exists()


def test_key_config_errors_name_the_key(tmp_path, keys):
    root, _, made = keys
    with pytest.raises(ConfigError, match="intake.curve_secret_key and intake.curve_allowed_dir go together"):
        server_keys(str(made["trainer"][1]), "")
    with pytest.raises(ConfigError, match="trainer.curve_secret_key and trainer.curve_server_key go together"):
        client_keys("", str(made["trainer"][0]))
    with pytest.raises(ConfigError, match=r"intake.curve_secret_key = .*nope.*tidal keys"):
        server_keys(str(tmp_path / "nope"), str(root / "engines"))
    with pytest.raises(ConfigError, match="holds only a public key"):
        client_keys(str(made["engine-0"][0]), str(made["trainer"][0]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="curve_allowed_dir .* holds no engine public key"):
        server_keys(str(made["trainer"][1]), str(tmp_path / "empty"))
    assert server_keys("", "") is None and client_keys("", "") is None


# --- trajectory channel --------------------------------------------------------------------------------

async def test_an_allowed_engine_delivers(keys):
    _, trainer, made = keys
    async with TrajectoryReceiver("tcp://127.0.0.1:0", curve=trainer, auto_commit=True) as rx:
        async with TrajectorySender(rx.endpoint, "engine-0", curve=engine_keys(made, "engine-0")) as tx:
            await tx.send(trajectory(1))
            got = await asyncio.wait_for(rx.recv(), 10)
            assert got.traj.id == "t-1" and got.engine_id == "engine-0"
            assert await tx.flush(10)
        assert rx.stats.refused == 0


@pytest.mark.parametrize("who", ["no-key", "unknown-key", "wrong-server-key"])
async def test_a_stranger_is_refused_and_counted(keys, tmp_path, caplog, who):
    _, trainer, made = keys
    strangers = make_keys(tmp_path / "other", ["stranger"])
    curve = {"no-key": None,
             "unknown-key": client_keys(str(strangers["stranger"][1]), str(made["trainer"][0])),
             "wrong-server-key": client_keys(str(made["engine-0"][1]), str(strangers["trainer"][0]))}[who]
    with caplog.at_level(logging.WARNING):
        async with TrajectoryReceiver("tcp://127.0.0.1:0", curve=trainer, auto_commit=True) as rx:
            async with TrajectorySender(rx.endpoint, "intruder", curve=curve, heartbeat_s=0.05) as tx:
                send = asyncio.create_task(tx.send(trajectory(666)))
                await until(lambda: rx.stats.refused >= 1, "a refusal")
                if who == "unknown-key":  # the engine learns it too: the authenticator's no reaches it
                    await until(lambda: tx.stats.refused >= 1, "the engine's count of the refusal")
                send.cancel()
            assert rx.stats.received == 0 and rx.queued == 0 and not rx.engines
            assert "trajectory receiver: refused a peer" in rx.stats.last_error
    assert "refused a peer" in caplog.text
    if who == "unknown-key":
        assert "refused a client with CURVE key" in caplog.text  # the authenticator names the key it denied
        assert "refused this engine's CURVE handshake" in tx.stats.last_error  # and says what to check


async def test_keys_added_or_removed_take_effect_at_the_next_handshake(keys):
    root, trainer, made = keys
    async with TrajectoryReceiver("tcp://127.0.0.1:0", curve=trainer, auto_commit=True) as rx:
        late = make_keys(root, ["late"])  # a new engine joins while the trainer runs
        async with TrajectorySender(rx.endpoint, "late", curve=engine_keys(late, "late")) as tx:
            await tx.send(trajectory(2))
            assert (await asyncio.wait_for(rx.recv(), 10)).traj.id == "t-2"
        (root / "engines" / "engine-1.key").unlink()  # engine-1 is revoked
        async with TrajectorySender(rx.endpoint, "engine-1", curve=engine_keys(made, "engine-1"),
                                    heartbeat_s=0.05) as tx:
            send = asyncio.create_task(tx.send(trajectory(3)))
            await until(lambda: rx.stats.refused >= 1, "a refusal")
            send.cancel()
        assert rx.stats.delivered == 1
        shutil.rmtree(root / "engines")  # the allowed directory vanishes: no one is admitted, nothing breaks
        async with TrajectorySender(rx.endpoint, "late", curve=engine_keys(late, "late"), heartbeat_s=0.05) as tx:
            send = asyncio.create_task(tx.send(trajectory(4)))
            await until(lambda: rx.stats.refused >= 2, "a second refusal")
            send.cancel()
        assert rx.stats.delivered == 1


# --- status channel ------------------------------------------------------------------------------------

async def test_status_reaches_an_allowed_engine_and_no_stranger(keys, tmp_path):
    _, trainer, made = keys
    async with StatusPublisher("tcp://127.0.0.1:0", heartbeat_s=0.05, curve=trainer) as pub:
        await pub.publish(TrainerStatus(version=4, consumed=32))
        async with StatusSubscriber(pub.endpoint, curve=engine_keys(made, "engine-1")) as sub, \
                StatusSubscriber(pub.endpoint) as stranger:
            assert await asyncio.wait_for(sub.recv(), 10) == TrainerStatus(version=4, consumed=32)
            await until(lambda: pub.stats.refused >= 1, "a refused subscriber")
            await asyncio.sleep(0.2)  # several heartbeats went out meanwhile
            assert stranger.stats.received == 0 and stranger.latest_status is None


# --- the daemons -----------------------------------------------------------------------------------------

@pytest.mark.slow
async def test_the_trainer_daemon_serves_status_only_to_engines_with_keys(tmp_path, tiny_model_dir, keys):
    from tests.trainer.proc import TrainerProcess, trainer_toml

    root, _, made = keys
    cfg = trainer_toml(tmp_path, tiny_model_dir, intake={
        "curve_secret_key": str(made["trainer"][1]), "curve_allowed_dir": str(root / "engines")})
    trainer = TrainerProcess(tmp_path, cfg)
    try:
        ready = await asyncio.to_thread(trainer.start)
        async with StatusSubscriber(ready["status_endpoint"], curve=engine_keys(made, "engine-0")) as keyed, \
                StatusSubscriber(ready["status_endpoint"]) as stranger:
            await until(lambda: keyed.stats.received >= 2, "status and a heartbeat for the engine with keys", 60)
            assert stranger.stats.received == 0, "a subscriber without keys heard the trainer"
    finally:
        trainer.stop()
