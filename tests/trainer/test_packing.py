"""Packing: bins under budget, low padding, and packed forwards equal to separate forwards."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tidal.trainer.packing import PackingConfig, build, first_fit_decreasing, padding_fraction, plan


def test_ffd_hand_worked():
    # lengths sorted 5, 4, 3, 3, 2, 1 into budget 8: 5 -> bin0 (3 left), 4 -> bin1 (4 left),
    # 3 -> bin0 (0 left), 3 -> bin1 (1 left), 2 -> bin2, 1 -> bin1
    assert first_fit_decreasing([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=60), st.integers(16, 512))
def test_ffd_places_each_sequence_once_within_budget(lengths, budget):
    bins = first_fit_decreasing(lengths, budget)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    for b in bins:
        assert sum(lengths[i] for i in b) <= budget or len(b) == 1
    # first fit never leaves two bins that could have been one (hence at most 2 OPT bins)
    loads = sorted(sum(lengths[i] for i in b) for b in bins)
    assert len(loads) < 2 or loads[0] + loads[1] > budget


def long_tail(n, rng):
    """Mostly short sequences with a few long ones (lognormal), as agent rollouts are."""
    return [int(x) for x in np.clip(rng.lognormal(4.0, 0.9, n), 8, 1024)]


def test_packing_pads_far_less_than_naive_padding():
    lengths = long_tail(64, np.random.default_rng(0))
    toks = [np.zeros(n, dtype=np.int64) for n in lengths]
    masks = [np.ones(n) for n in lengths]
    fracs = {}
    for name, cfg in {"pack": PackingConfig(token_budget=1024),
                      "one_row": PackingConfig(token_budget=1024, row_tokens=1024),
                      "pad": PackingConfig(token_budget=1024, strategy="pad")}.items():
        mbs = [build(rows, toks, masks, {}, cfg) for rows in plan(lengths, cfg)]
        fracs[name] = padding_fraction(mbs)
        assert sum(mb.n_real for mb in mbs) == sum(lengths)
        assert sorted(j for mb in mbs for j in mb.seq_ids.tolist()) == list(range(64))
        assert all(mb.n_slots <= 1024 or len(mb.seq_ids) == 1 for mb in mbs)
    assert fracs["one_row"] == 0.0       # one row per micro-batch, pad_to_multiple = 1
    assert fracs["pack"] < 0.1           # rows as wide as the longest sequence, filled by FFD
    assert fracs["pad"] > 0.3            # rows padded to the longest of a long-tailed mix


def test_pad_to_multiple_bounds_padding():
    lengths = [5, 9, 3]
    cfg = PackingConfig(token_budget=64, row_tokens=64, pad_to_multiple=8)
    (rows,) = plan(lengths, cfg)
    mb = build(rows, [np.arange(n) for n in lengths], [np.ones(n) for n in lengths], {}, cfg)
    assert mb.n_slots == 24 and mb.n_real == 17
    # the padding is its own block: positions restart at 0
    assert mb.position_ids[0, 17:].tolist() == list(range(7))


def test_trained_tokens_and_fields_are_aligned():
    # sequence 0: tokens [10, 11, 12, 13], mask [0, 1, 0, 1] -> trained tokens 11 and 13,
    # predicted from positions 0 and 2; sequence 1 follows at offset 4
    toks = [np.array([10, 11, 12, 13]), np.array([20, 21])]
    masks = [np.array([0, 1, 0, 1]), np.array([0, 1])]
    fields = {"adv": [np.array([0.0, 1.0, 0.0, 3.0]), np.array([0.0, 5.0])]}
    cfg = PackingConfig(token_budget=100, row_tokens=100)
    (rows,) = plan([4, 2], cfg)
    mb = build(rows, toks, masks, fields, cfg)
    assert mb.attention_mask is None
    assert mb.index.tolist() == [0, 2, 4] and mb.targets.tolist() == [11, 13, 21]
    assert mb.fields["adv"].tolist() == [1.0, 3.0, 5.0] and mb.seq.tolist() == [0, 0, 1]
    assert mb.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1] and mb.last_index.tolist() == [3, 5]


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def token_logps(model, mb):
    with torch.no_grad():
        logits = model(input_ids=mb.input_ids, position_ids=mb.position_ids, attention_mask=mb.attention_mask,
                       use_cache=False).logits
    lp = torch.log_softmax(logits.reshape(-1, logits.shape[-1])[mb.index], -1)
    return lp.gather(1, mb.targets[:, None]).squeeze(1)


@pytest.mark.parametrize("strategy,row_tokens", [("pack", 0), ("pack", 128), ("pad", 0)])
def test_packed_forward_equals_separate_forwards(tiny_model, strategy, row_tokens):
    rng = np.random.default_rng(1)
    lengths = [37, 5, 1, 64, 12, 2, 30]
    toks = [rng.integers(7, 250, n) for n in lengths]
    masks = [np.ones(n) for n in lengths]
    cfg = PackingConfig(token_budget=128, strategy=strategy, row_tokens=row_tokens, pad_to_multiple=8)
    mbs = [build(rows, toks, masks, {}, cfg) for rows in plan(lengths, cfg)]
    assert any(len(mb.seq_ids) > 1 for mb in mbs)      # sequences really share rows / micro-batches
    assert row_tokens or any(mb.input_ids.shape[0] > 1 for mb in mbs)
    for mb in mbs:
        got = token_logps(tiny_model, mb)
        for j in mb.seq_ids.tolist():
            with torch.no_grad():
                logits = tiny_model(input_ids=torch.as_tensor(toks[j])[None], use_cache=False).logits[0]
            want = torch.log_softmax(logits[:-1], -1).gather(1, torch.as_tensor(toks[j][1:])[:, None]).squeeze(1)
            torch.testing.assert_close(got[mb.seq == j], want, atol=1e-5, rtol=0)
