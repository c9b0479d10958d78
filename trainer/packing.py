"""Sequence packing: a step's sequences into micro-batches under a token budget.

Invariant: packed sequences never attend to each other. Each packed row carries per-sequence
`position_ids` restarting at 0 and no attention mask; transformers' masking (`masking_utils.
find_packed_sequence_indices`, used by Llama and most decoder models) turns the restarts into a
block-diagonal causal mask for sdpa/eager, and into varlen boundaries for flash-attention. The
model must be called with `use_cache=False` (transformers only detects packing without a cache).
tests/trainer/test_packing.py checks per-token log-probabilities against separate forwards.

Strategies:
  pack  first-fit-decreasing into rows of `row_tokens` slots, then as many rows per micro-batch as
        fit `token_budget` slots; padding is only the unfilled tail of each row.
  pad   the naive baseline: sequences in arrival order, one per row, right-padded to the longest
        in the micro-batch, as many rows as fit `token_budget` slots.

Row width is a kernel choice. sdpa and eager materialise the block-diagonal mask and compute every
(query, key) pair of a row, so their attention cost grows with the square of the row width: the
default width is the step's longest sequence, so no row costs more attention than that sequence
alone does. flash-attention's varlen kernel skips masked blocks, so there one row per micro-batch
(`row_tokens = token_budget`) is best. `tidal bench trainer` measures all three layouts.

A sequence longer than the budget gets a micro-batch of its own (never split: its tokens attend
to each other). Sequence j's token i (i >= 1) is predicted from position i - 1 of its row, so a
micro-batch lists its trained tokens by the flat position that predicts them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tidal.trainer.learner_config import PackingConfig

__all__ = ["PackingConfig", "MicroBatch", "first_fit_decreasing", "plan", "build", "padding_fraction"]


@dataclass
class MicroBatch:
    """One forward/backward. Model inputs are (R, L); per-token tensors are (T,) over trained tokens."""

    input_ids: torch.Tensor               # (R, L) long
    position_ids: torch.Tensor            # (R, L) long, restarting at 0 per sequence
    attention_mask: torch.Tensor | None   # (R, L) long for `pad`; None for `pack` (block-diagonal)
    index: torch.Tensor                   # (T,) flat position in R*L predicting each trained token, ascending
    targets: torch.Tensor                 # (T,) the trained token ids
    seq: torch.Tensor                     # (T,) index of each token's sequence in the step's batch
    fields: dict[str, torch.Tensor]       # name -> (T,) per-token values (advantage, behav_logp, ...)
    seq_ids: torch.Tensor                 # (S,) the sequences in this micro-batch
    last_index: torch.Tensor              # (S,) flat position of each sequence's last token
    n_real: int                           # real tokens
    n_slots: int                          # R * L

    @property
    def n_tokens(self) -> int:
        """Trained tokens in this micro-batch."""
        return int(self.index.numel())


def first_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Bins of sequence indices with summed length <= budget (an oversize sequence gets its own).

    FFD uses at most 11/9 OPT + 6/9 bins (Dosa 2007); sequences go longest first into the first
    bin with room.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(budget - n)
    return bins


def _pad_plan(lengths: Sequence[int], budget: int) -> list[list[list[int]]]:
    """Arrival order, one sequence per row, while rows * longest <= budget."""
    plans: list[list[list[int]]] = []
    rows: list[list[int]] = []
    longest = 0
    for i, n in enumerate(lengths):
        if rows and (len(rows) + 1) * max(longest, n) > budget:
            plans.append(rows)
            rows, longest = [], 0
        rows.append([i])
        longest = max(longest, n)
    if rows:
        plans.append(rows)
    return plans


def _pack_plan(lengths: Sequence[int], cfg: PackingConfig) -> list[list[list[int]]]:
    """FFD rows of `row_tokens` (default: the longest sequence), grouped under the token budget."""
    width = min(cfg.row_tokens or max(lengths, default=1), cfg.token_budget)
    width = _row_length(width, cfg.pad_to_multiple)
    rows = first_fit_decreasing(lengths, width)
    per_mb = max(cfg.token_budget // width, 1)
    plans: list[list[list[int]]] = []
    current: list[list[int]] = []
    for row in rows:
        if sum(lengths[i] for i in row) > width:   # an oversize sequence: a micro-batch of its own
            plans.append([row])
            continue
        current.append(row)
        if len(current) == per_mb:
            plans.append(current)
            current = []
    if current:
        plans.append(current)
    return plans


def plan(lengths: Sequence[int], cfg: PackingConfig) -> list[list[list[int]]]:
    """Micro-batches, each a list of rows, each row a list of sequence indices."""
    if cfg.strategy == "pack":
        return _pack_plan(lengths, cfg)
    return _pad_plan(lengths, cfg.token_budget)


def _row_length(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def build(rows: list[list[int]], tokens: Sequence[np.ndarray], masks: Sequence[np.ndarray],
          fields: Mapping[str, Sequence[np.ndarray]], cfg: PackingConfig, *, pad_id: int = 0) -> MicroBatch:
    """Tensors for one planned micro-batch.

    Args:
        rows: the micro-batch's rows of sequence indices (from `plan`).
        tokens: (n_j,) token ids of every sequence of the step.
        masks: (n_j,) loss masks; token i of sequence j is trained where masks[j][i] == 1 and i >= 1.
        fields: name -> per-sequence (n_j,) per-token arrays, gathered at the trained tokens.
    """
    packed = cfg.strategy == "pack"
    lens = [sum(len(tokens[j]) for j in row) for row in rows]
    width = _row_length(max(lens), cfg.pad_to_multiple)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    pos = np.zeros((len(rows), width), dtype=np.int64)
    attn = np.zeros((len(rows), width), dtype=np.int64)
    index, seq, seq_ids, last = [], [], [], []
    gathered: dict[str, list[np.ndarray]] = {name: [] for name in fields}
    for r, row in enumerate(rows):
        offset = 0
        for j in row:
            n = len(tokens[j])
            ids[r, offset:offset + n] = tokens[j]
            pos[r, offset:offset + n] = np.arange(n)
            attn[r, offset:offset + n] = 1
            trained = np.flatnonzero(masks[j][1:]) + 1                   # token i >= 1 with mask 1
            index.append(r * width + offset + trained - 1)               # predicted from i - 1
            seq.append(np.full(len(trained), j))
            for name, per_seq in fields.items():
                gathered[name].append(np.asarray(per_seq[j])[trained])
            seq_ids.append(j)
            last.append(r * width + offset + n - 1)
            offset += n
        if packed and offset < width:                                    # padding restarts positions:
            pos[r, offset:] = np.arange(width - offset)                  # its own block, never attended
    flat_index = np.concatenate(index) if index else np.zeros(0, dtype=np.int64)
    return MicroBatch(
        input_ids=torch.from_numpy(ids),
        position_ids=torch.from_numpy(pos),
        attention_mask=None if packed else torch.from_numpy(attn),
        index=torch.from_numpy(flat_index.astype(np.int64)),
        targets=torch.from_numpy(ids.reshape(-1)[flat_index + 1] if len(flat_index) else np.zeros(0, np.int64)),
        seq=torch.from_numpy(np.concatenate(seq).astype(np.int64)),
        fields={name: torch.from_numpy(np.concatenate(v).astype(np.float32)) for name, v in gathered.items()},
        seq_ids=torch.tensor(seq_ids, dtype=torch.int64),
        last_index=torch.tensor(last, dtype=torch.int64),
        n_real=sum(lens),
        n_slots=len(rows) * width,
    )


def padding_fraction(micro_batches: Sequence[MicroBatch]) -> float:
    """Padding slots / all slots over a step's micro-batches."""
    slots = sum(mb.n_slots for mb in micro_batches)
    return 1.0 - sum(mb.n_real for mb in micro_batches) / slots if slots else 0.0
