"""The learner end to end on the tiny model: it learns, packing and sharding change nothing, state resumes."""

import io

import msgspec
import numpy as np
import pytest
import torch
from tidal.protocol.config import load_config
from tidal.protocol.messages import Trajectory, Turn
from tidal.trainer import learner as learner_module
from tidal.trainer.advantages import compute_advantages
from tidal.trainer.learner import Learner, LearnerConfig, _trained_mask, resolve_dtype


def config(model_dir, *overrides) -> LearnerConfig:
    base = [f"model.path={model_dir}", "model.dtype=float32", "optim.lr=1e-3"]
    return load_config(LearnerConfig, overrides=[*base, *overrides])


def episode(i, rng, *, group="g", reward=0.0, version=0, behav=None, length=None):
    """prompt (mask 0) | turn 1 (mask 1) | observation (mask 0) | turn 2 (mask 1)."""
    n = length or int(rng.integers(12, 40))
    a, b, c = n // 4, n // 2, 3 * n // 4
    mask = np.zeros(n, dtype=np.uint8)
    mask[a:b] = 1
    mask[c:] = 1
    logp = behav if behav is not None else -rng.uniform(0.5, 6.0, n)
    return Trajectory.build(
        id=f"t{i}", group_id=group, env_id="test", task_seed=i, tokens=rng.integers(7, 250, n), loss_mask=mask,
        behav_logp=np.where(mask == 1, logp, 0.0), versions=np.where(mask == 1, version, -1),
        turns=[Turn(a, b, 0.0), Turn(c, n, reward)], reward=reward, terminated=True,
    )


def batch_of(n, seed=0, **kw):
    rng = np.random.default_rng(seed)
    return [episode(i, rng, group=f"g{i // 4}", reward=float(rng.random() < 0.5), **kw) for i in range(n)]


def grads(learner):
    return {n: p.grad.clone() for n, p in learner.base_model.named_parameters() if p.grad is not None}


def generated_logp(learner, traj):
    """Mean log-prob of a trajectory's generated tokens under the learner's current model."""
    ids = torch.as_tensor(traj.token_ids().astype(np.int64))[None]
    with torch.no_grad():
        logits = learner.base_model(input_ids=ids, use_cache=False).logits[0, :-1]
    lp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).squeeze(1)
    return lp[torch.as_tensor(traj.mask()[1:] == 1)].mean().item()


def test_step_raises_logp_of_positively_advantaged_tokens(tiny_model_dir):
    learner = Learner(config(tiny_model_dir, "advantage.type=grpo", "loss.type=ppo"))
    rng = np.random.default_rng(0)
    good, bad = episode(0, rng, reward=1.0, length=32), episode(1, rng, reward=0.0, length=32)
    before = {t.id: generated_logp(learner, t) for t in (good, bad)}
    w0 = {n: p.detach().clone() for n, p in learner.base_model.named_parameters()}
    for _ in range(3):
        metrics = learner.train_step([good, bad])
    assert learner.version == 3 and metrics["trainer/version"] == 3.0
    assert any(not torch.equal(w0[n], p) for n, p in learner.base_model.named_parameters())
    assert generated_logp(learner, good) > before[good.id] + 0.05
    assert generated_logp(learner, bad) < before[bad.id] - 0.05
    for key in ("trainer/is_weight_mean", "trainer/is_weight_max", "trainer/clip_frac", "trainer/is_capped_frac",
                "trainer/kl_behav", "trainer/entropy", "trainer/grad_norm", "trainer/tokens_per_s",
                "trainer/padding_frac", "trainer/staleness/0"):
        assert np.isfinite(metrics[key]), key


@pytest.mark.parametrize("agg", ["token", "sequence"])
def test_packed_and_accumulated_step_equals_one_unpacked_forward(tiny_model_dir, agg):
    # the loss and gradients of a step must not depend on how it is cut into micro-batches
    batch = batch_of(10)
    common = ("advantage.type=grpo", "loss.type=ppo", f"loss.agg={agg}", "optim.max_grad_norm=0")
    runs = {}
    for name, packing in {"one": ("packing.token_budget=100000",),
                          "packed": ("packing.token_budget=64",),
                          "padded": ("packing.token_budget=80", "packing.strategy=pad"),
                          "checkpointed": ("packing.token_budget=64", "model.gradient_checkpointing=true")}.items():
        learner = Learner(config(tiny_model_dir, *common, *packing))
        metrics = learner.train_step(batch)
        runs[name] = (metrics, grads(learner))
    assert runs["one"][0]["trainer/micro_batches"] == 1 and runs["packed"][0]["trainer/micro_batches"] > 3
    assert runs["padded"][0]["trainer/padding_frac"] > runs["packed"][0]["trainer/padding_frac"]
    for name in ("packed", "padded", "checkpointed"):
        assert runs[name][0]["trainer/loss"] == pytest.approx(runs["one"][0]["trainer/loss"], abs=1e-6)
        for pname, g in runs["one"][1].items():
            torch.testing.assert_close(runs[name][1][pname], g, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("boolean_keep", [True, False], ids=["lm-head-at-trained-tokens", "all-positions-fallback"])
def test_learner_logprobs_equal_a_plain_forward(tiny_model_dir, boolean_keep):
    # the learner computes logits only at trained tokens of packed rows, or at every position for a
    # model that reads a boolean logits_to_keep as positions (transformers 5.17); compare with full forwards
    learner = Learner(config(tiny_model_dir, "advantage.type=grpo", "loss.type=ppo", "packing.token_budget=64"))
    assert learner.keeps_boolean_logits  # the tiny Llama under this transformers takes the boolean form
    learner.keeps_boolean_logits = boolean_keep
    batch = batch_of(6, seed=7)
    masks = [t.mask().astype(float) for t in batch]
    for m in masks:
        m[0] = 0
    mbs = learner._micro_batches(batch, masks, list(range(6)), list(range(6)))
    assert len(mbs) > 1
    for mb in mbs:
        with torch.no_grad():
            got = learner._forward(learner.model, mb)["logp"]
        for j in mb.seq_ids.tolist():
            ids = torch.as_tensor(batch[j].token_ids().astype(np.int64))[None]
            with torch.no_grad():
                lp = torch.log_softmax(learner.base_model(input_ids=ids, use_cache=False).logits[0, :-1], -1)
            want = lp.gather(1, ids[0, 1:, None]).squeeze(1)[torch.as_tensor(batch[j].mask()[1:] == 1)]
            torch.testing.assert_close(got[mb.seq == j], want, atol=1e-5, rtol=0)


def test_data_parallel_shares_average_to_the_full_batch_gradient(tiny_model_dir):
    # DDP averages rank gradients; each rank scales its share by world_size, so mean(g_r) = g_full
    batch = batch_of(9, seed=3)
    common = ("advantage.type=rebn", "loss.type=tis", "optim.max_grad_norm=0", "packing.token_budget=64")
    full = Learner(config(tiny_model_dir, *common))
    full.train_step(batch)
    shares = []
    for rank in range(2):
        learner = Learner(config(tiny_model_dir, *common), rank=rank, world_size=2)
        learner.train_step(batch)
        shares.append(grads(learner))
    for name, g in grads(full).items():
        torch.testing.assert_close((shares[0][name] + shares[1][name]) / 2, g, atol=1e-6, rtol=1e-4)


def test_gae_value_head_trains_and_is_not_published(tiny_model_dir):
    learner = Learner(config(tiny_model_dir, "advantage.type=gae", "loss.type=ppo"))
    metrics = learner.train_step(batch_of(6))
    head = learner.base_model.value_head
    assert head.weight.grad is not None and head.weight.abs().sum() > 0     # zero-initialised, now moved
    assert "trainer/value_err" in metrics
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    names = [n for n, _ in learner.named_weights()]
    assert sorted(names) == sorted(fresh.state_dict())


def test_minibatches_kl_reference_and_staleness(tiny_model_dir):
    # two updates per step: the second sees pi_theta != pi_prox; versions 0 and 1 trained at version 2
    learner = Learner(config(tiny_model_dir, "advantage.type=reinforce_pp", "advantage.kl_coef=0.05",
                             "loss.type=ppo", "loss.kl_coef=0.1", "optim.minibatches=2", "optim.lr=1e-2"))
    assert learner.reference is not None
    learner.train_step(batch_of(8, seed=1))
    learner.train_step(batch_of(8, seed=2))
    stale = batch_of(4, seed=4, version=0) + batch_of(4, seed=5, version=1)
    metrics = learner.train_step(stale)
    assert learner.version == 3
    assert metrics["trainer/kl_ref"] > 0                          # the policy has moved off the reference
    assert metrics["trainer/staleness/2"] + metrics["trainer/staleness/1"] == pytest.approx(1.0)
    assert metrics["trainer/staleness_max"] == 2.0
    assert metrics["trainer/micro_batches"] >= 2


def test_proximal_behaviour_is_plain_ppo_against_mu(tiny_model_dir):
    # proximal = behaviour: pi_prox is mu, so already the first update's ratio is pi_theta / mu (clipped
    # where it leaves [0.8, 1.2]) and the weight is 1; recompute: the first ratio is 1, the weight pi_prox / mu
    batch = batch_of(8, seed=3)
    common = ("advantage.type=grpo", "loss.type=ppo", "optim.minibatches=1")
    behaviour = Learner(config(tiny_model_dir, *common, "loss.proximal=behaviour"))
    recompute = Learner(config(tiny_model_dir, *common))
    adv, _, _ = compute_advantages(behaviour.cfg.advantage, batch)
    ratio, signs = [], []
    for traj, lp, a in zip(batch, behaviour.logprobs(batch), adv, strict=True):
        trained = _trained_mask(traj).astype(bool)
        ratio.append(np.exp(lp[trained] - traj.behav_logps()[trained]))
        signs.append(a[trained])
    r, a = np.concatenate(ratio), np.concatenate(signs)
    clipped = np.clip(r, 0.8, 1.2) * a < r * a
    assert 0 < clipped.mean() < 1                       # the random mu is far from pi_theta: some clip
    m_b, m_r = behaviour.train_step(batch), recompute.train_step(batch)
    assert m_b["trainer/clip_frac"] == pytest.approx(clipped.mean())
    assert m_b["trainer/is_weight_mean"] == 1.0 and m_b["trainer/kl_behav"] == 0.0
    assert m_r["trainer/clip_frac"] == 0.0 and m_r["trainer/is_weight_mean"] != pytest.approx(1.0)


def on_policy(learner, n, versions):
    """n fresh episodes whose mu is `learner`'s own pi (versions(t): each token's version)."""
    fresh = [episode(i, np.random.default_rng(i), group=f"g{i // 4}", reward=float(i % 3 == 0), length=24)
             for i in range(n)]
    own = learner.logprobs(fresh)
    return [Trajectory.build(id=t.id, group_id=t.group_id, env_id=t.env_id, task_seed=t.task_seed,
                             tokens=t.token_ids(), loss_mask=t.mask(), behav_logp=np.where(t.mask() == 1, lp, 0.0),
                             versions=versions(t), turns=t.turns, reward=t.reward, terminated=True)
            for t, lp in zip(fresh, own, strict=True)]


def test_proximal_behaviour_skips_the_prox_pass_and_equals_recompute_on_policy(tiny_model_dir):
    # with mu = the learner's own pi (fresh data), both objectives give the same step; behaviour runs
    # one forward per micro-batch fewer (no pi_prox pass with several updates)
    common = ("advantage.type=grpo", "loss.type=ppo", "optim.minibatches=2")
    learners = {p: Learner(config(tiny_model_dir, *common, f"loss.proximal={p}")) for p in ("behaviour", "recompute")}
    fresh = on_policy(learners["recompute"], 8, lambda t: t.token_versions())
    forwards = {}
    for name, learner in learners.items():
        calls = []
        real = learner._forward
        learner._forward = lambda *a, real=real, calls=calls, **k: calls.append(1) or real(*a, **k)
        learner.train_step(fresh)
        forwards[name] = len(calls)
    # recompute: a pi_prox pass for the second update's micro-batches only (the first update's own
    # forward is pi_prox, the parameters not having moved yet)
    assert forwards["behaviour"] < forwards["recompute"] < 2 * forwards["behaviour"]
    for (n, p), q in zip(learners["behaviour"].base_model.named_parameters(),
                         learners["recompute"].base_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-4, msg=n)


def test_the_first_update_reuses_its_own_forward_as_pi_prox_and_steps_as_a_full_prox_pass(tiny_model_dir):
    # stale data, four updates: the step that skips the first update's pi_prox pass moves the weights
    # exactly as one that recomputes pi_prox for every micro-batch
    common = ("advantage.type=grpo", "loss.type=ppo", "optim.minibatches=4", "optim.lr=1e-2")
    skip, full = Learner(config(tiny_model_dir, *common)), Learner(config(tiny_model_dir, *common))
    full_record = full._record
    full._record = lambda mbs, first=0: full_record(mbs, first=0)
    batch = batch_of(16, seed=7, version=0)
    for _ in range(2):
        m_skip, m_full = skip.train_step(batch), full.train_step(batch)
    assert m_skip["trainer/clip_frac"] == pytest.approx(m_full["trainer/clip_frac"], abs=1e-6)
    assert m_skip["trainer/is_weight_mean"] == pytest.approx(m_full["trainer/is_weight_mean"], rel=1e-5)
    for (n, p), q in zip(skip.base_model.named_parameters(), full.base_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-4, msg=n)


def test_loglinear_prox_skips_the_prox_pass_and_is_exact_where_the_estimate_is_exact(tiny_model_dir):
    # fresh tokens (s = 0) whose mu is the learner's own pi: there pi_prox = mu exactly, so the estimate
    # (mu for updates after the first, pi_theta for the first) steps as the recomputed pi_prox does,
    # with one forward per micro-batch (the loss's own) and no pi_prox pass
    common = ("advantage.type=grpo", "loss.type=ppo", "optim.minibatches=4", "optim.lr=1e-2")
    learners = {p: Learner(config(tiny_model_dir, *common, f"loss.proximal={p}")) for p in ("loglinear", "recompute")}
    fresh = on_policy(learners["recompute"], 16, lambda t: np.where(t.mask() == 1, 0, -1))
    forwards, metrics = {}, {}
    for name, learner in learners.items():
        calls = []
        real = learner._forward
        learner._forward = lambda *a, real=real, calls=calls, **k: calls.append(1) or real(*a, **k)
        metrics[name] = learner.train_step(fresh)
        forwards[name] = len(calls)
    assert forwards["loglinear"] < forwards["recompute"]
    assert metrics["loglinear"]["trainer/clip_frac"] == pytest.approx(metrics["recompute"]["trainer/clip_frac"],
                                                                      abs=1e-6)
    for (n, p), q in zip(learners["loglinear"].base_model.named_parameters(),
                         learners["recompute"].base_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=n)


def test_loglinear_prox_interpolates_between_mu_and_pi_theta_by_staleness(tiny_model_dir, monkeypatch):
    # stale tokens: in update j of M the estimate sits s / (s + j/M) of the way from log mu to log
    # pi_theta, so the importance weight pi_prox / mu moves with the staleness, not with mu alone
    learner = Learner(config(tiny_model_dir, "advantage.type=grpo", "loss.type=ppo", "optim.minibatches=2",
                             "loss.proximal=loglinear"))
    learner.version = 3
    batch = batch_of(8, seed=5, version=1)                       # s = 2 for every generated token
    every = list(range(len(batch)))
    mb = learner._micro_batches(batch, [_trained_mask(t) for t in batch], every, every)[0]
    learner._advantages(batch, [_trained_mask(t) for t in batch], [mb])
    seen, real = {}, learner_module.policy_loss

    def spy(cfg, inp, **kw):
        seen.update(prox=inp.prox_logp, logp=inp.logp.detach(), behav=inp.behav_logp)
        return real(cfg, inp, **kw)

    monkeypatch.setattr(learner_module, "policy_loss", spy)
    learner._loss(mb, 0.5)
    alpha = 2 / (2 + 0.5)
    torch.testing.assert_close(seen["prox"], seen["behav"] + alpha * (seen["logp"] - seen["behav"]))
    assert not torch.allclose(seen["prox"], seen["behav"]) and not torch.allclose(seen["prox"], seen["logp"])


def test_state_dict_resumes_exactly(tiny_model_dir):
    cfg = config(tiny_model_dir, "advantage.type=grpo", "loss.type=ppo", "optim.schedule=cosine",
                 "optim.warmup_steps=1", "optim.total_steps=4")
    a, b = Learner(cfg), Learner(cfg)
    a.train_step(batch_of(6, seed=1))
    buf = io.BytesIO()                             # through bytes, as a checkpoint would
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.version == 1 and b.scheduler.get_last_lr() == a.scheduler.get_last_lr()
    a.train_step(batch_of(6, seed=2))
    b.train_step(batch_of(6, seed=2))
    for (n, pa), (_, pb) in zip(a.named_weights(), b.named_weights(), strict=True):
        torch.testing.assert_close(pa, pb, atol=0, rtol=0, msg=n)


def test_untrainable_input_is_a_clear_error_naming_the_trajectory(tiny_model_dir):
    learner = Learner(config(tiny_model_dir, "advantage.type=grpo", "loss.type=tis"))
    with pytest.raises(ValueError, match="empty batch"):
        learner.train_step([])
    rng = np.random.default_rng(0)
    good = episode(0, rng)
    bad = Trajectory.build(id="big-ids", group_id="g", env_id="test", task_seed=0, tokens=[1, 99999],
                           loss_mask=[0, 1], behav_logp=[0, -1], versions=[-1, 0], turns=[Turn(1, 2, 1.0)],
                           reward=1.0)
    short = Trajectory.build(id="one", group_id="g", env_id="test", task_seed=0, tokens=[1], loss_mask=[1],
                             behav_logp=[-1], versions=[0], turns=[Turn(0, 1, 1.0)], reward=1.0)
    assert learner.reject_reason(good) is None
    assert "big-ids" in learner.reject_reason(bad) and "vocabulary" in learner.reject_reason(bad)
    assert "at least 2" in learner.reject_reason(short)
    with pytest.raises(ValueError, match="big-ids"):
        learner.train_step([good, bad])
    assert learner.version == 0
    ranked = Learner(config(tiny_model_dir, "advantage.type=grpo", "loss.type=tis"), rank=1, world_size=2)
    with pytest.raises(ValueError, match="each of 2 ranks"):      # a rank without data would hang DDP
        ranked.train_step([good])


def test_every_returned_metric_is_documented(tiny_model_dir):
    from tidal.trainer.learner import METRICS

    learner = Learner(config(tiny_model_dir, "advantage.type=gae", "loss.type=ppo", "loss.kl_coef=0.1"))
    metrics = learner.train_step(batch_of(4))
    documented = {k.replace("<bucket>", "") for k in METRICS}
    for name in metrics:
        assert name in METRICS or any(d.endswith("/") and name.startswith(d) for d in documented), name


def own_sample(learner, rng, temperature: float, n_gen: int = 6, tid: str = "own"):
    """A trajectory whose behav_logp is the learner's own log_softmax(logits / T) at the sampled tokens:
    what a server sampling at temperature T from these very weights would record as mu."""
    ids = torch.as_tensor(rng.integers(7, 250, 5))
    logps = []
    with torch.no_grad():
        for _ in range(n_gen):
            lp = torch.log_softmax(learner.base_model(input_ids=ids[None]).logits[0, -1].float() / temperature, -1)
            tok = int(torch.multinomial(lp.exp(), 1, generator=torch.Generator().manual_seed(len(ids))))
            logps.append(float(lp[tok]))
            ids = torch.cat([ids, torch.tensor([tok])])
    n = len(ids)
    mask = np.r_[np.zeros(n - n_gen), np.ones(n_gen)].astype(np.uint8)
    return Trajectory.build(
        id=tid, group_id="g", env_id="test", task_seed=0, tokens=ids.numpy(), loss_mask=mask,
        behav_logp=np.r_[np.zeros(n - n_gen), logps], versions=np.where(mask == 1, 0, -1),
        turns=[Turn(n - n_gen, n, 1.0)], reward=1.0, terminated=True, sampling={"temperature": temperature},
    )


def test_each_trajectory_is_scored_at_the_temperature_it_was_sampled_at(tiny_model_dir):
    # mu is log_softmax(logits / T) at the engine's T: the learner must score with the same T, per
    # trajectory, or every importance weight pi_prox / mu is off by the temperature alone
    learner = Learner(config(tiny_model_dir, "advantage.type=rebn", "loss.type=tis", "optim.lr=1e-9"))
    rng = np.random.default_rng(4)
    hot, cold = own_sample(learner, rng, 1.7, tid="hot"), own_sample(learner, rng, 0.4, tid="cold")
    unrecorded = msgspec.structs.replace(own_sample(learner, rng, 1.0, tid="plain"), sampling={})
    got = learner.logprobs([hot, cold, unrecorded])
    for traj, lp in zip((hot, cold, unrecorded), got, strict=True):
        m = traj.mask() == 1
        np.testing.assert_allclose(lp[m], traj.behav_logps()[m], atol=1e-5, rtol=0, err_msg=traj.id)
        assert (lp[~m] == 0).all()
    metrics = learner.train_step([hot, cold])  # on-policy data: every weight is 1, the behaviour KL 0
    assert metrics["trainer/is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert abs(metrics["trainer/kl_behav"]) < 1e-6
    # a trajectory that records no temperature is scored at learner.model.temperature
    warm = Learner(config(tiny_model_dir, "model.temperature=1.7"))
    hot_unrecorded = msgspec.structs.replace(hot, sampling={})
    np.testing.assert_allclose(warm.logprobs([hot_unrecorded])[0], got[0], atol=1e-6, rtol=0)


def test_dtype_auto_is_float32_on_a_cpu_and_bfloat16_on_a_gpu(tiny_model_dir):
    learner = Learner(load_config(LearnerConfig, overrides=[f"model.path={tiny_model_dir}"]))
    assert learner.cfg.model.dtype == "auto" and learner.dtype == "float32"
    assert next(learner.base_model.parameters()).dtype == torch.float32
    assert [resolve_dtype("auto", d) for d in ("cpu", "cuda", "cuda:1")] == ["float32", "bfloat16", "bfloat16"]
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16" and resolve_dtype("float32", "cuda") == "float32"
