"""A test-side engine stand-in: samples multi-turn-shaped trajectories from the tiny model.

Each group shares one random prompt; each member then alternates `turns` sampled model turns (loss mask
1, behaviour log-probabilities recorded from the model at temperature 1, tagged with the policy version
the caller names) with random observation tokens (mask 0). The reward of a turn is the fraction of its
tokens whose id is even, so a trainer that learns raises the probability of even ids (`even_mass`).
`send` ships trajectories over the real trajectory channel (tidal.protocol.channels.TrajectorySender).
"""

import numpy as np
import torch
from tidal.protocol.messages import Trajectory, Turn

__all__ = ["Producer", "even_mass"]


def even_mass(model, prompts: torch.Tensor) -> float:
    """Mean probability the model puts on even token ids at the next position after `prompts` (B, L)."""
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=prompts).logits[:, -1].float(), dim=-1)
    return float(probs[:, 0::2].sum(-1).mean())


class Producer:
    def __init__(self, model_dir, *, seed: int = 0, prompt_len: int = 5, turns: int = 2, gen_tokens: int = 4,
                 obs_tokens: int = 3):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.vocab = self.model.config.vocab_size
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.prompt_len, self.turns, self.gen_tokens, self.obs_tokens = prompt_len, turns, gen_tokens, obs_tokens

    def load_weights(self, path) -> None:
        """Follow the trainer: load a published version (a directory with model.safetensors)."""
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(f"{path}/model.safetensors"))

    @staticmethod
    def retag(traj: Trajectory, version: int) -> Trajectory:
        """The same tokens and log-probabilities, as if sampled by policy `version` (sample ahead, send later)."""
        m = traj.mask()
        return Trajectory.build(
            id=traj.id, group_id=traj.group_id, env_id=traj.env_id, task_seed=traj.task_seed,
            tokens=traj.token_ids(), loss_mask=m, behav_logp=traj.behav_logps(),
            versions=np.where(m == 1, version, -1), turns=traj.turns, reward=traj.reward, terminated=traj.terminated,
            sampling=traj.sampling,
        )

    @torch.no_grad()
    def group(self, group_id: str, version: int, size: int, sampling: dict | None = None) -> list[Trajectory]:
        """`size` trajectories of one prompt, sampled together; ids are `{group_id}-{i}`. `sampling` is
        only recorded (Trajectory.sampling: what an engine would say it sampled with); the draw is
        always from the full distribution at temperature 1."""
        rows = torch.tensor(self.rng.integers(7, self.vocab, self.prompt_len), dtype=torch.long).repeat(size, 1)
        turns: list[tuple[int, int]] = []
        per_row_logp = torch.zeros(size, 0)                                           # (size, generated so far)
        per_row_mask: list[int] = [0] * self.prompt_len
        for _ in range(self.turns):
            start = rows.shape[1]
            for _ in range(self.gen_tokens):
                logits = self.model(input_ids=rows).logits[:, -1].float()
                lp = torch.log_softmax(logits, dim=-1)
                tok = torch.multinomial(lp.exp(), 1, generator=self.gen)            # (size, 1)
                rows = torch.cat([rows, tok], dim=1)
                per_row_logp = torch.cat([per_row_logp, lp.gather(1, tok)], dim=1)
            turns.append((start, rows.shape[1]))
            per_row_mask += [1] * self.gen_tokens
            obs = torch.tensor(self.rng.integers(7, self.vocab, self.obs_tokens), dtype=torch.long).repeat(size, 1)
            rows = torch.cat([rows, obs], dim=1)
            per_row_logp = torch.cat([per_row_logp, torch.zeros(size, self.obs_tokens)], dim=1)
            per_row_mask += [0] * self.obs_tokens
        out = []
        for i in range(size):
            ids = rows[i].numpy()
            m = np.array(per_row_mask, dtype=np.uint8)
            lp = np.concatenate([np.zeros(self.prompt_len), per_row_logp[i].numpy()]).astype(np.float32)
            lp[m == 0] = 0.0
            spans = [Turn(s, e, float((ids[s:e] % 2 == 0).mean())) for s, e in turns]
            out.append(Trajectory.build(
                id=f"{group_id}-{i}", group_id=group_id, env_id="test:even", task_seed=i,
                tokens=ids, loss_mask=m, behav_logp=lp, versions=np.where(m == 1, version, -1),
                turns=spans, reward=sum(t.reward for t in spans), terminated=True, sampling=sampling or {},
            ))
        return out
