"""The learner's configuration, kept free of torch so that loading or printing a trainer config (and
`tidal run`, which embeds one) never imports it: the model, the optimiser, the loss, the advantage
estimator and packing. The code that uses each lives beside it: trainer/learner.py, losses.py,
advantages.py, packing.py.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta
from tidal.protocol.config import Strict
from tidal.trainer.advantages import AdvantageConfig, GRPOConfig, ReinforcePPConfig

__all__ = ["ModelConfig", "OptimConfig", "LearnerConfig", "PackingConfig", "DecoupledPPOConfig", "TISConfig",
           "LossConfig", "resolve_dtype"]


class PackingConfig(Strict):
    """How a step's sequences become micro-batches (one forward/backward each)."""

    token_budget: Annotated[int, Meta(ge=1)] = 4096
    """Token slots per micro-batch (rows x row length), padding included."""
    strategy: Literal["pack", "pad"] = "pack"
    """`pack` (first-fit-decreasing, no cross-attention) or `pad` (naive padding, for comparison)."""
    row_tokens: Annotated[int, Meta(ge=0)] = 0
    """Width of a packed row; 0: the step's longest sequence (best for sdpa/eager, see above)."""
    pad_to_multiple: Annotated[int, Meta(ge=1)] = 1
    """Round each packed row up to a multiple of this (8 or 64 help GPU kernels; 1 on CPU)."""


Coef = Annotated[float, Meta(ge=0)]


class _Common(Strict):
    is_cap: Annotated[float, Meta(ge=1.0)] = 2.0
    """C: the behaviour importance weight min(pi_prox / mu, C) is capped here (truncated IS as in
    Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training", and
    AReaL's behave_imp_weight_cap); the fraction of tokens capped is reported."""
    is_mode: Literal["truncate", "mask"] = "truncate"
    """Above C: `truncate` the weight to C (TIS), or `mask` the token out (weight 0), as AReaL's
    rejection sampling and IcePop do for tokens too far off-policy to trust."""
    kl_coef: Coef = 0.0
    """Weight of the k3 KL penalty to a frozen reference model (0: no reference model is loaded)."""
    entropy_coef: Coef = 0.0
    """Weight of the entropy bonus (subtracted from the loss)."""
    agg: Literal["token", "sequence"] = "token"
    """Loss aggregation: mean over every trained token of the step, or mean of per-sequence means."""


class DecoupledPPOConfig(_Common, tag="ppo", tag_field="type"):
    """Decoupled PPO (Hilton et al. arXiv:2110.00641; AReaL arXiv:2505.24298): clip against pi_prox,
    weight by pi_prox / mu."""

    clip_low: Annotated[float, Meta(ge=0, lt=1)] = 0.2
    """epsilon below: the ratio pi_theta / pi_prox is clipped at 1 - clip_low."""
    clip_high: Annotated[float, Meta(ge=0)] = 0.2
    """epsilon above: clipped at 1 + clip_high (DAPO's clip-higher uses 0.28)."""
    proximal: Literal["recompute", "loglinear", "behaviour"] = "recompute"
    """pi_prox: `recompute` scores the batch with the trainer's policy before the step (decoupled PPO);
    `loglinear` skips that forward pass and interpolates in log space between mu and pi_theta by
    version (AReaL's `prox_logp_method = loglinear`): for a token s versions stale, in update j of M,
    log pi_prox = log mu + s / (s + j/M) * (log pi_theta - log mu), pi_theta detached. Exact for the
    first update (pi_prox = pi_theta) and for fresh tokens (pi_prox = mu); in between, an estimate.
    `behaviour` takes mu itself (pi_prox = mu, no extra forward pass), which is plain PPO against the
    behaviour policy: ratio pi_theta / mu clipped, weight 1. The naive baseline that AReaL's
    decoupled objective is compared with (`tidal bench staleness`); it degrades as data grows stale."""


class TISConfig(_Common, tag="tis", tag_field="type"):
    """Plain policy gradient with truncated importance sampling: -min(pi_prox / mu, C) * A * log pi_theta.

    The weight is detached (it corrects the sampling distribution, it is not optimised), as in
    slime, verl and OpenRLHF's TIS.
    """


LossConfig = DecoupledPPOConfig | TISConfig


class ModelConfig(Strict):
    """The policy model."""

    path: str
    """A directory `AutoModelForCausalLM.from_pretrained` loads (safetensors + config + tokenizer)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Parameter dtype. "auto" (`resolve_dtype`): float32 on a CPU, bfloat16 on a GPU. bfloat16 trains
    in pure bf16, with no fp32 master copy: right for a large model on a GPU, but an update much
    smaller than a weight (lr 1e-6 on weights near 1) rounds away in bf16, and a CPU gains no speed
    from it. A CPU run should use float32, which "auto" picks there."""
    attn_implementation: str = "sdpa"
    """transformers attention kernel: sdpa (CPU/GPU), flash_attention_2 (varlen packing on GPU), eager."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, about a third more compute."""
    temperature: Annotated[float, Meta(gt=0)] = 1.0
    """Temperature for trajectories that do not record theirs. The learner divides logits by each
    trajectory's own `sampling["temperature"]` (trainer/sampling.py `temperature`), so logp is the
    same tempered full-vocabulary log_softmax that mu is; this value stands in where it is missing."""


class OptimConfig(Strict):
    """AdamW, gradient clipping and the learning-rate schedule."""

    lr: Annotated[float, Meta(gt=0)] = 1e-6
    """Peak learning rate. 1e-6 suits fine-tuning a pretrained LLM of 1B+ parameters; a tiny model on a
    CPU (the test model, `tidal run`'s default) moves visibly only from about 1e-3, which is what the
    tests and a CPU smoke run set (`--set learner.optim.lr=1e-3`)."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: Annotated[float, Meta(gt=0)] = 1e-8
    weight_decay: Annotated[float, Meta(ge=0)] = 0.0
    max_grad_norm: Annotated[float, Meta(ge=0)] = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still reported)."""
    schedule: Literal["constant", "cosine"] = "constant"
    """After warmup: constant, or cosine decay to min_lr_ratio * lr at total_steps."""
    warmup_steps: Annotated[int, Meta(ge=0)] = 0
    """Linear warmup from 0 over this many optimiser updates."""
    total_steps: Annotated[int, Meta(ge=1)] = 1000
    """Length of the cosine schedule in optimiser updates."""
    min_lr_ratio: Annotated[float, Meta(ge=0, le=1)] = 0.0
    minibatches: Annotated[int, Meta(ge=1)] = 1
    """Optimiser updates per step, each on a slice of the batch (AReaL's ppo_n_minibatches)."""


class LearnerConfig(Strict):
    """Everything one training step depends on."""

    model: ModelConfig
    optim: OptimConfig = msgspec.field(default_factory=OptimConfig)
    loss: LossConfig = msgspec.field(default_factory=DecoupledPPOConfig)
    advantage: AdvantageConfig = msgspec.field(default_factory=GRPOConfig)
    packing: PackingConfig = msgspec.field(default_factory=PackingConfig)

    @property
    def needs_reference(self) -> bool:
        """A frozen reference model is kept when a KL penalty uses it."""
        return self.loss.kl_coef > 0 or (isinstance(self.advantage, ReinforcePPConfig) and self.advantage.kl_coef > 0)


def resolve_dtype(dtype: str, device: str) -> str:
    """ModelConfig.dtype as used on `device` ("cpu", "cuda", "cuda:1"): "auto" is float32 on a CPU and
    bfloat16 on a GPU; an explicit dtype is kept."""
    if dtype != "auto":
        return dtype
    return "float32" if device.split(":")[0] == "cpu" else "bfloat16"
