"""The learner: a Hugging Face causal LM, its optimiser and one `train_step` over a batch of Trajectory.

Version k is the policy after k steps (docs/architecture.md invariant 3): `train_step` trains version k on the
batch and leaves version k + 1. Within a step:

1. sequences are split into `optim.minibatches` optimiser updates, each packed into micro-batches
   (trainer/packing.py); with data parallelism each rank takes a token-balanced share of every
   minibatch, and every rank holds the whole batch, so loss normalisers (tokens or sequences of the
   minibatch) are computed locally and identically: no count needs an all-reduce;
2. a no-grad pass, when anything needs it, records pi_prox (several updates, or REINFORCE++),
   the reference model's log-probs (KL penalty) and the value head's values (GAE);
3. advantages are computed (trainer/advantages.py), then each update accumulates gradients over its
   micro-batches, clips them and steps AdamW and the LR schedule.

With one update per step (the default) pi_prox is exactly pi_theta at the forward pass, so it is
taken from that forward, detached, instead of a second identical pass. The ratio pi_theta/pi_prox is
then 1 and the PPO clip only acts with `minibatches > 1`; the behaviour weight min(pi_prox/mu, C)
always acts. With `loss.proximal = "behaviour"` (plain PPO, the baseline decoupled PPO is measured
against) pi_prox is mu itself: no pass records it, the ratio is pi_theta/mu and the weight is 1.

Data parallel: wrap `learner.model` (DDP or FSDP2 fully_shard) and pass `rank`, `world_size` and an
`all_reduce` that sums a numpy array across ranks (used only to whiten GAE/REINFORCE++ advantages).
DDP and FSDP average gradients over ranks, so each rank's loss is multiplied by `world_size`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from tidal.protocol.messages import Trajectory
from tidal.trainer.advantages import (
    GAEConfig,
    ReinforcePPConfig,
    compute_advantages,
)
from tidal.trainer.learner_config import (
    DecoupledPPOConfig,
    LearnerConfig,
    ModelConfig,
    OptimConfig,
    resolve_dtype,
)
from tidal.trainer.losses import LossInputs, policy_loss, value_loss
from tidal.trainer.packing import MicroBatch, build, padding_fraction, plan
from tidal.trainer.sampling import temperature

__all__ = ["ModelConfig", "OptimConfig", "LearnerConfig", "Learner", "NonFiniteStep", "resolve_dtype",
           "STALENESS_BUCKETS", "METRICS"]

STALENESS_BUCKETS = ("0", "1", "2", "3", "4-7", "8+")
"""Histogram buckets of per-token staleness, reported as `trainer/staleness/<bucket>` fractions."""

METRICS = {
    "trainer/loss": "the step's loss (policy + KL + entropy + value), per update, averaged over updates",
    "trainer/pg_loss": "the policy-gradient term alone",
    "trainer/is_weight_mean": "mean behaviour weight min(pi_prox/mu, C) over trained tokens",
    "trainer/is_weight_max": "largest uncapped pi_prox/mu of the step",
    "trainer/is_capped_frac": "fraction of trained tokens whose weight exceeded C (truncated, or masked out)",
    "trainer/clip_frac": "fraction of trained tokens where the PPO clip was active (ppo loss only)",
    "trainer/kl_behav": "k3 estimate of KL(mu || pi_prox), nats per token: how off-policy the data is",
    "trainer/kl_ref": "k3 estimate of KL(pi_theta || pi_ref), nats per token (with a KL penalty)",
    "trainer/entropy": "mean policy entropy at the trained tokens, nats",
    "trainer/value_err": "mean squared error of the value head against GAE returns (gae only)",
    "trainer/adv_mean": "mean advantage over trained tokens",
    "trainer/adv_std": "std of advantages over trained tokens",
    "trainer/adv_zero_frac": "fraction of trained tokens with advantage exactly 0 (e.g. all-equal groups)",
    "trainer/reward_mean": "mean final reward of the batch",
    "trainer/rewards_unplaced": "turn rewards with no generated token to sit on (count; should be 0)",
    "trainer/staleness/<bucket>": "fraction of trained tokens per staleness bucket (0, 1, 2, 3, 4-7, 8+)",
    "trainer/staleness_mean": "mean token staleness, versions",
    "trainer/staleness_max": "largest token staleness, versions",
    "trainer/grad_norm": "global gradient norm before clipping (mean over the step's applied updates)",
    "trainer/skipped_updates": "updates of the step skipped for a non-finite loss or gradient norm (count)",
    "trainer/lr": "learning rate after the step",
    "trainer/version": "policy version after the step",
    "trainer/step_s": "wall time of the step, seconds",
    "trainer/tokens": "real (non-padding) tokens through the model",
    "trainer/trained_tokens": "tokens with loss mask 1 that carried loss",
    "trainer/tokens_per_s": "real tokens per second of step time",
    "trainer/padding_frac": "padding slots / all slots of the step's micro-batches",
    "trainer/micro_batches": "forward/backward passes of the step (this rank)",
}
"""Every metric `train_step` returns, with its unit; metrics are this rank's."""


class NonFiniteStep(ArithmeticError):
    """Every update of a step had a non-finite loss or gradient norm, so none was applied: the model,
    optimiser, schedule and version are as before the step (verl and AReaL skip such updates too)."""


def _lr_lambda(cfg: OptimConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = min((step - cfg.warmup_steps) / max(cfg.total_steps - cfg.warmup_steps, 1), 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def _balanced_shares(lengths: Sequence[int], world: int) -> list[list[int]]:
    """Sequence indices per rank, longest first onto the least-loaded rank (deterministic)."""
    shares: list[list[int]] = [[] for _ in range(world)]
    load = [0] * world
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += lengths[i]
    return [sorted(s) for s in shares]


def _takes_boolean_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the model computes lm_head only where a boolean (R, L) `logits_to_keep` is True (newer
    transformers); older versions index with it as positions and fail, so they get every position."""
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            out = model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False,
                        logits_to_keep=torch.tensor([[False, True]], device=device))
    except (IndexError, RuntimeError, TypeError):
        return False
    return out.logits.dim() == 2


def _trained_mask(traj: Trajectory) -> np.ndarray:
    """The loss mask, except token 0 (nothing predicts it)."""
    m = traj.mask().astype(np.float64)
    if len(m):
        m[0] = 0.0
    return m


class Learner:
    """One model, one optimiser; `train_step(batch)` performs step `version` -> `version + 1`."""

    def __init__(self, cfg: LearnerConfig, *, device: str = "cpu", model: torch.nn.Module | None = None,
                 rank: int = 0, world_size: int = 1,
                 all_reduce: Callable[[np.ndarray], np.ndarray] | None = None):
        self.cfg = cfg
        self.device = torch.device(device)
        self.rank, self.world_size, self.all_reduce = rank, world_size, all_reduce
        self.dtype = resolve_dtype(cfg.model.dtype, device)
        """The parameter dtype in use ("auto" resolved for this device)."""
        if model is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(
                cfg.model.path, dtype=getattr(torch, self.dtype),
                attn_implementation=cfg.model.attn_implementation,
            )
        model.to(self.device)
        if cfg.model.gradient_checkpointing:     # renamed in transformers 5; the old name warns
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        if isinstance(cfg.advantage, GAEConfig):
            hidden = model.config.hidden_size
            model.value_head = torch.nn.Linear(hidden, 1, device=self.device, dtype=model.dtype)
            torch.nn.init.zeros_(model.value_head.weight)
            torch.nn.init.zeros_(model.value_head.bias)
        self.base_model = model                 # unwrapped: names, value head, state
        self.model = model                      # what forward runs; part B may wrap it (DDP, FSDP2)
        self.reference = None
        if cfg.needs_reference:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg.optim))
        self.version = 0
        self.pad_id = getattr(model.config, "pad_token_id", None) or 0
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.keeps_boolean_logits = _takes_boolean_logits_to_keep(model)
        self._prox_is_behaviour = isinstance(cfg.loss, DecoupledPPOConfig) and cfg.loss.proximal == "behaviour"
        """Plain PPO against mu: pi_prox is the behaviour policy, so no pass records it."""
        self._prox_loglinear = isinstance(cfg.loss, DecoupledPPOConfig) and cfg.loss.proximal == "loglinear"
        """pi_prox estimated from mu and pi_theta by version: no pass records it either."""

    def reject_reason(self, traj: Trajectory) -> str | None:
        """Why this model cannot train on `traj` (intake rejects and counts it), or None."""
        if len(traj) < 2:
            return f"trajectory {traj.id}: {len(traj)} tokens, training needs at least 2"
        top = int(traj.token_ids().max())
        if top >= self.vocab_size:
            return f"trajectory {traj.id}: token id {top} is outside the model's vocabulary of {self.vocab_size}"
        return None

    # --- forward ------------------------------------------------------------------------------------

    def _forward(self, model: torch.nn.Module, mb: MicroBatch, *, values: bool = False,
                 entropy: bool = False) -> dict[str, torch.Tensor]:
        """log-probs (T,) of the trained tokens, and optionally entropy (T,), values (T,), last values (S,)."""
        dev = self.device
        index = mb.index.to(dev)
        keep = 0                                     # every position, unless the model can do better:
        if self.keeps_boolean_logits:                # lm_head only at trained tokens: (T, V), not (R*L, V)
            keep = torch.zeros(mb.input_ids.numel(), dtype=torch.bool, device=dev)
            keep[index] = True
            keep = keep.view(mb.input_ids.shape)
        out = model(
            input_ids=mb.input_ids.to(dev), position_ids=mb.position_ids.to(dev),
            attention_mask=None if mb.attention_mask is None else mb.attention_mask.to(dev),
            use_cache=False, output_hidden_states=values, logits_to_keep=keep,
        )
        logits = out.logits
        if logits.dim() == 3:                        # a model without boolean logits_to_keep: all positions
            logits = logits.reshape(-1, logits.shape[-1])[index]
        temps = mb.fields.get("temperature")         # (T,) each token's trajectory's sampling temperature
        if temps is None:
            logits = logits.float() / self.cfg.model.temperature                      # (T, V), `index` order
        else:
            logits = logits.float() / temps.to(dev)[:, None]
        logprobs = torch.log_softmax(logits, dim=-1)                                   # (T, V)
        res = {"logp": logprobs.gather(1, mb.targets.to(dev)[:, None]).squeeze(1)}
        if entropy:                                  # with grad only when the bonus is trained
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.loss.entropy_coef > 0):
                res["entropy"] = -(logprobs.exp() * logprobs).sum(-1)
        if values:
            hidden = out.hidden_states[-1].reshape(-1, out.hidden_states[-1].shape[-1])
            v = self.base_model.value_head(hidden).squeeze(-1).float()                 # (R*L,)
            res["values"] = v[index]
            res["last_values"] = v[mb.last_index.to(dev)]
        return res

    @torch.no_grad()
    def _record(self, mbs: list[MicroBatch], first: int = 0) -> None:
        """The no-grad pass: pi_prox, reference log-probs and old values, into each micro-batch.

        The first `first` micro-batches (the step's first update) need no pi_prox of their own when
        only the loss reads it: the parameters have not moved yet, so the update's own forward pass is
        pi_prox (`_loss` takes its log-probs, detached). That spares 1/minibatches of this pass."""
        gae = isinstance(self.cfg.advantage, GAEConfig)
        kl_needs_prox = isinstance(self.cfg.advantage, ReinforcePPConfig)
        estimated = self._prox_is_behaviour or self._prox_loglinear
        need_prox = (self.cfg.optim.minibatches > 1 and not estimated) or kl_needs_prox
        for i, mb in enumerate(mbs):
            prox = need_prox and (kl_needs_prox or i >= first)
            if prox or gae:
                res = self._forward(self.model, mb, values=gae)
                if prox:
                    mb.fields["prox_logp"] = res["logp"].cpu()
                if gae:
                    mb.fields["old_values"] = res["values"].cpu()
                    mb.fields["last_values"] = res["last_values"].cpu()
            if self.reference is not None:
                mb.fields["ref_logp"] = self._forward(self.reference, mb)["logp"].cpu()

    @torch.no_grad()
    def logprobs(self, batch: Sequence[Trajectory]) -> list[np.ndarray]:
        """log pi_theta of each trajectory's generated tokens as a step scores them (the same packing,
        temperature and forward): (n,) float64 per trajectory, 0 where the loss mask is 0 and at token 0
        (nothing predicts it). On this rank's model, for the whole batch. Compare with `behav_logps()`
        to see how far the engine's mu is from the learner's policy."""
        masks = [_trained_mask(t) for t in batch]
        every = list(range(len(batch)))
        mbs = self._micro_batches(batch, masks, every, every)
        training = self.model.training
        self.model.eval()
        try:
            for mb in mbs:
                mb.fields["logp"] = self._forward(self.model, mb)["logp"].cpu()
        finally:
            self.model.train(training)
        per_seq = self._per_sequence(batch, mbs, "logp")
        return [per_seq.get(j, np.zeros(len(t))) for j, t in enumerate(batch)]

    # --- the step ---------------------------------------------------------------------------------

    def train_step(self, batch: list[Trajectory]) -> dict[str, float]:
        """One step on `batch` (every rank passes the same batch); returns `trainer/...` metrics.

        An update whose loss or gradient norm is not finite is skipped (gradients zeroed, no optimiser
        or schedule step) and counted; if every update is skipped the step raises `NonFiniteStep` and
        the version stays. Any other exception also leaves no gradients behind and, when it comes
        before the first update is applied (always, with one update per step), leaves model,
        optimiser and version untouched; after k > 0 applied updates (`optim.minibatches` > 1) the
        version still advances, since the weights changed, and a note on the exception says so.
        """
        if not batch:
            raise ValueError("train_step: empty batch")
        reasons = [r for r in map(self.reject_reason, batch) if r]
        if reasons:
            raise ValueError(f"train_step: {len(reasons)} untrainable trajectories: {'; '.join(reasons[:3])}")
        t0 = time.perf_counter()
        self.model.train()
        cfg = self.cfg
        masks = [_trained_mask(t) for t in batch]
        lengths = [len(t) for t in batch]
        slices = [list(range(m, len(batch), cfg.optim.minibatches)) for m in range(cfg.optim.minibatches)]
        if len(slices[-1]) < self.world_size:
            raise ValueError(
                f"train_step: {len(batch)} trajectories cannot give each of {self.world_size} ranks one per "
                f"update in {cfg.optim.minibatches} updates; send at least {cfg.optim.minibatches * self.world_size}"
            )
        updates: list[list[MicroBatch]] = []
        for sl in slices:
            mine = [sl[i] for i in _balanced_shares([lengths[j] for j in sl], self.world_size)[self.rank]]
            updates.append(self._micro_batches(batch, masks, sl, mine))
        mbs = [mb for update in updates for mb in update]
        self._record(mbs, first=len(updates[0]))
        adv_metrics = self._advantages(batch, masks, mbs)

        totals: dict[str, float] = {"loss": 0.0}
        grad_norms = []
        try:
            for u, update in enumerate(updates):
                self.optimizer.zero_grad(set_to_none=True)
                update_loss = 0.0
                for k, mb in enumerate(update):
                    with self._sync(last=k == len(update) - 1):
                        loss, mb_metrics = self._loss(mb, u / len(updates))
                        (loss * self.world_size).backward()
                    mb_metrics["loss"] = loss.detach()
                    update_loss += float(mb_metrics["loss"])
                    for name, value in mb_metrics.items():
                        v = float(value)
                        if name.endswith("_max"):
                            totals[name] = max(totals.get(name, v), v)
                        elif name.endswith("loss"):             # shares of the update's loss: they add up
                            totals[name] = totals.get(name, 0.0) + v
                        else:                                   # per-token means: weight by tokens
                            totals[name] = totals.get(name, 0.0) + v * mb.n_tokens
                norm = self._clip_and_step(finite_loss=math.isfinite(update_loss))
                if norm is not None:
                    grad_norms.append(norm)
        except BaseException as exc:
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":               # after an OOM, give the cached blocks back
                torch.cuda.empty_cache()
            if grad_norms:
                self.version += 1
                exc.add_note(f"train_step: {len(grad_norms)} of {len(updates)} updates were applied before "
                             f"this failure; they are version {self.version}")
            raise
        if not grad_norms:
            raise NonFiniteStep(
                f"train_step: all {len(updates)} updates of version {self.version} had a non-finite loss "
                f"({totals['loss']}) or gradient norm; skipped, nothing applied"
            )
        self.version += 1

        trained = sum(mb.n_tokens for mb in mbs)
        metrics: dict[str, float] = {}
        for name, value in totals.items():
            if name.endswith("_max"):
                metrics[f"trainer/{name}"] = value
            elif name.endswith("loss"):
                metrics[f"trainer/{name}"] = value / len(updates)
            else:
                metrics[f"trainer/{name}"] = value / max(trained, 1)
        elapsed = time.perf_counter() - t0
        real = sum(mb.n_real for mb in mbs)
        metrics.update(adv_metrics)
        metrics.update(self._staleness(batch, masks, self.version - 1))
        metrics.update({
            "trainer/grad_norm": float(np.mean(grad_norms)),
            "trainer/skipped_updates": float(len(updates) - len(grad_norms)),
            "trainer/lr": self.scheduler.get_last_lr()[0],
            "trainer/version": float(self.version),
            "trainer/step_s": elapsed,
            "trainer/tokens": float(real),
            "trainer/trained_tokens": float(trained),
            "trainer/tokens_per_s": real / elapsed if elapsed > 0 else 0.0,
            "trainer/padding_frac": padding_fraction(mbs),
            "trainer/micro_batches": float(len(mbs)),
        })
        return metrics

    def _micro_batches(self, batch, masks, sl: list[int], mine: list[int]) -> list[MicroBatch]:
        """This rank's micro-batches for one update over sequences `sl` (own share `mine`), with
        aggregation weights normalised over the whole update on all ranks."""
        counts = {j: masks[j].sum() for j in sl}
        n_tokens = sum(counts.values())
        n_seqs = sum(1 for c in counts.values() if c > 0)
        weights = {}
        for j in mine:
            if self.cfg.loss.agg == "token":
                weights[j] = masks[j] / max(n_tokens, 1)
            else:
                weights[j] = masks[j] / (max(counts[j], 1) * max(n_seqs, 1))
        default_t = self.cfg.model.temperature
        fields = {
            "behav_logp": [batch[j].behav_logps() for j in mine],
            "weight": [weights[j] for j in mine],
            "pos": [np.arange(len(batch[j])) for j in mine],
            "temperature": [np.full(len(batch[j]), temperature(batch[j].sampling, default_t)) for j in mine],
        }
        if self._prox_loglinear:  # each token's staleness s at this step, for the pi_prox estimate
            fields["staleness"] = [np.maximum(self.version - batch[j].token_versions(), 0) for j in mine]
        mbs = []
        for rows in plan([len(batch[j]) for j in mine], self.cfg.packing):
            mb = build(rows, [batch[j].token_ids() for j in mine], [masks[j] for j in mine], fields,
                       self.cfg.packing, pad_id=self.pad_id)
            mb.seq = torch.tensor([mine[i] for i in mb.seq.tolist()], dtype=torch.int64)  # batch indices
            mb.seq_ids = torch.tensor([mine[i] for i in mb.seq_ids.tolist()], dtype=torch.int64)
            mbs.append(mb)
        return mbs

    @staticmethod
    def _per_sequence(batch, mbs: list[MicroBatch], name: str) -> dict[int, np.ndarray]:
        """Scatter a recorded per-token field back to (n,) arrays per sequence index."""
        out: dict[int, np.ndarray] = {}
        for mb in mbs:
            seq, pos, val = mb.seq.numpy(), mb.fields["pos"].numpy().astype(np.int64), mb.fields[name].numpy()
            for j in mb.seq_ids.tolist():
                sel = seq == j
                out.setdefault(j, np.zeros(len(batch[j])))[pos[sel]] = val[sel]
        return out

    @staticmethod
    def _gather(per_seq: dict[int, np.ndarray], mb: MicroBatch) -> torch.Tensor:
        """(T,) values of per-sequence (n,) arrays at a micro-batch's trained tokens."""
        seq, pos = mb.seq.numpy(), mb.fields["pos"].numpy().astype(np.int64)
        out = np.zeros(len(seq), dtype=np.float32)
        for j in mb.seq_ids.tolist():
            sel = seq == j
            out[sel] = per_seq[j][pos[sel]]
        return torch.from_numpy(out)

    def _advantages(self, batch, masks, mbs: list[MicroBatch]) -> dict[str, float]:
        """Compute advantages (and GAE returns) and store them per token in each micro-batch."""
        adv_cfg = self.cfg.advantage
        reduce = self.all_reduce
        if isinstance(adv_cfg, GAEConfig | ReinforcePPConfig):
            mine = sorted({j for mb in mbs for j in mb.seq_ids.tolist()})
            sub = [batch[j] for j in mine]
            if isinstance(adv_cfg, GAEConfig):
                values = self._per_sequence(batch, mbs, "old_values")
                last = {j: float(v) for mb in mbs for j, v in zip(mb.seq_ids.tolist(), mb.fields["last_values"].tolist(),
                                                                   strict=True)}
                boot = [0.0 if batch[j].terminated or not batch[j].truncated else last[j] for j in mine]
                adv, returns, metrics = compute_advantages(adv_cfg, sub, values=[values[j] for j in mine],
                                                           bootstrap=boot, reduce=reduce)
            else:
                prox = self._per_sequence(batch, mbs, "prox_logp")
                ref = self._per_sequence(batch, mbs, "ref_logp") if self.reference is not None else None
                kl = [prox[j] - ref[j] if ref is not None else np.zeros(len(batch[j])) for j in mine]
                adv, returns, metrics = compute_advantages(adv_cfg, sub, kl=kl, reduce=reduce)
            by_seq = dict(zip(mine, adv, strict=True))
            ret_by_seq = dict(zip(mine, returns, strict=True)) if returns is not None else None
        else:
            adv, returns, metrics = compute_advantages(adv_cfg, batch)
            by_seq, ret_by_seq = dict(enumerate(adv)), None
        for mb in mbs:
            mb.fields["adv"] = self._gather(by_seq, mb)
            if ret_by_seq is not None:
                mb.fields["returns"] = self._gather(ret_by_seq, mb)
        return metrics

    def _loss(self, mb: MicroBatch, update: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This micro-batch's share of the update's loss (policy + KL + entropy + value); `update` is
        how far into the step its update comes (j/M for update j of M)."""
        dev = self.device
        gae = isinstance(self.cfg.advantage, GAEConfig)
        res = self._forward(self.model, mb, values=gae, entropy=True)
        f = {name: t.to(dev) for name, t in mb.fields.items()}
        if self._prox_is_behaviour:
            prox = f["behav_logp"]
        elif self._prox_loglinear and update > 0:
            s = f["staleness"].float()
            alpha = s / (s + update)
            prox = f["behav_logp"] + alpha * (res["logp"].detach() - f["behav_logp"])
        else:
            prox = f["prox_logp"] if "prox_logp" in f else res["logp"].detach()
        inp = LossInputs(logp=res["logp"], prox_logp=prox, behav_logp=f["behav_logp"], adv=f["adv"],
                         mask=(f["weight"] > 0).float(), weight=f["weight"])
        loss, metrics = policy_loss(self.cfg.loss, inp, entropy=res["entropy"], ref_logp=f.get("ref_logp"))
        if gae:
            vloss, vmetrics = value_loss(res["values"], f["old_values"], f["returns"], f["weight"],
                                         self.cfg.advantage.value_clip)
            loss = loss + self.cfg.advantage.value_coef * vloss
            metrics.update(vmetrics)
        return loss, metrics

    def _sync(self, *, last: bool):
        """Gradient all-reduce only on an update's last micro-batch (DDP no_sync / FSDP2 flag)."""
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(last)
        if not last and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _clip_and_step(self, *, finite_loss: bool) -> float | None:
        """Clip and step; the gradient norm, or None when the loss or the norm is not finite: then the
        update is skipped (gradients zeroed, no optimiser or schedule step). The norm is global (DDP
        and FSDP reduce gradients first), so every rank skips the same updates."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.optim.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not (finite_loss and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        self.scheduler.step()
        return norm

    @staticmethod
    def _staleness(batch, masks, trained_version: int) -> dict[str, float]:
        """Fractions of trained tokens per staleness bucket, mean and max (docs/architecture.md invariant 3)."""
        stale = np.concatenate([trained_version - t.token_versions()[m.astype(bool)] for t, m in zip(batch, masks,
                                                                                                       strict=True)])
        if not len(stale):
            return {}
        edges = [(0, 0), (1, 1), (2, 2), (3, 3), (4, 7), (8, np.iinfo(np.int64).max)]
        out = {f"trainer/staleness/{name}": float(((stale >= lo) & (stale <= hi)).mean())
               for name, (lo, hi) in zip(STALENESS_BUCKETS, edges, strict=True)}
        out["trainer/staleness_mean"] = float(stale.mean())
        out["trainer/staleness_max"] = float(stale.max())
        return out

    # --- state and publishing ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Model (with value head), optimiser, scheduler, version and RNG: everything to resume a run."""
        return {
            "model": self.base_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "version": self.version,
            "rng": {"torch": torch.get_rng_state()},   # tensors and ints only: loads with weights_only
        }

    def load_state_dict(self, state: dict) -> None:
        self.base_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.version = int(state["version"])
        torch.set_rng_state(state["rng"]["torch"])

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The policy's tensors in Hugging Face names (no value head), gathered if sharded (FSDP2)."""
        for name, tensor in self.base_model.state_dict().items():
            if name.startswith("value_head."):
                continue
            yield name, tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
