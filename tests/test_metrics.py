"""moekit.metrics against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.arch.families import SIGMOID_BIASED, SOFTMAX_TOPK
from moekit.metrics import (balance_loss, bias_state, bias_step, capacities, capacity, coefficient_of_variation,
                            dropped_slots, max_vio, normalised_entropy, router_probs, switch_aux_loss, switch_loss,
                            z_loss, z_terms)

COUNTS = torch.tensor([6.0, 2.0, 0.0, 0.0])  # T = 4 tokens, K = 2, N = 4: mean load 2


def test_load_metrics_by_hand():
    assert max_vio(COUNTS) == pytest.approx(2.0)  # (6 - 2) / 2
    assert coefficient_of_variation(COUNTS) == pytest.approx(math.sqrt((16 + 0 + 4 + 4) / 4) / 2)
    assert normalised_entropy(COUNTS) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4))
    flat = torch.full((4,), 3.0)
    assert max_vio(flat) == coefficient_of_variation(flat) == 0
    assert normalised_entropy(flat) == pytest.approx(1.0)
    rows = torch.stack([COUNTS, flat])  # [..., N]: one value per row
    assert max_vio(rows).tolist() == pytest.approx([2.0, 0.0])


def test_capacities_and_drops_by_hand():
    assert capacities(4, 2, 4, (1.0, 1.25, 1.5, 2.0)) == [2, 3, 3, 4]  # ceil(CF · 8 / 4)
    assert capacities(10, 1, 8, [1.1]) == [2]  # ceil(1.375)
    assert capacities(8, 1, 8, [1.1]) == [2]  # ceil(1.1)
    assert capacities(10, 2, 4, [1.0]) == [5]  # exactly 5: not 6 from rounding
    on_device = capacity(torch.tensor([8.0, 20.0], dtype=torch.float64), 4)
    assert on_device.tolist() == [2.0, 5.0]
    assert dropped_slots(COUNTS, torch.tensor([2.0, 3.0, 4.0])).tolist() == [4, 3, 2]  # only expert 0 overflows


def test_router_probs_softmax_and_normalised_sigmoid():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert router_probs(logits, SOFTMAX_TOPK).tolist()[0] == pytest.approx([0.25, 0.75])
    s = [0.5, 1 / (1 + math.exp(-math.log(3.0)))]  # sigmoid(0), sigmoid(log 3) = 0.75
    assert router_probs(logits, SIGMOID_BIASED).tolist()[0] == pytest.approx([s[0] / sum(s), s[1] / sum(s)])


def test_switch_loss_by_hand():
    mean_probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    # N · Σ f_i P_i with f = counts / 8
    assert switch_loss(COUNTS, mean_probs) == pytest.approx(4 * (0.75 * 0.4 + 0.25 * 0.3))
    assert switch_loss(torch.ones(4), torch.full((4,), 0.25)) == pytest.approx(1.0)  # uniform: 1
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    p = logits.softmax(-1).mean(0)
    want = 4 * (0.75 * p[0] + 0.25 * p[1])
    two_layers = balance_loss([logits, logits], [COUNTS, COUNTS], SOFTMAX_TOPK)
    assert two_layers.item() == pytest.approx(float(want), rel=1e-6)  # the mean over layers


def test_switch_loss_selects_with_the_correction_bias():
    """f from the experts a sigmoid router picks: top-k of score + e_score_correction_bias."""
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]])  # scores rank 0 > 1 > 2 > 3
    bias = torch.tensor([0.0, 0.0, 0.0, 1.0])  # lifts expert 3 over all: picks {0, 3} per token
    p = router_probs(logits, SIGMOID_BIASED).mean(0)
    with_bias = switch_aux_loss([logits], 2, SIGMOID_BIASED, [bias])
    assert with_bias.item() == pytest.approx(float(4 * (0.5 * p[0] + 0.5 * p[3])), rel=1e-6)
    without = switch_aux_loss([logits], 2, SIGMOID_BIASED)  # picks {0, 1}
    assert without.item() == pytest.approx(float(4 * (0.5 * p[0] + 0.5 * p[1])), rel=1e-6)


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    terms = [math.log(2.0) ** 2, math.log(4.0) ** 2]  # logsumexp: log 2, log(3 + 1)
    assert z_terms(logits).tolist() == pytest.approx(terms)
    doubled = [math.log(2.0) ** 2, math.log(10.0) ** 2]  # 2·logits: log 2, log(9 + 1)
    assert z_loss([logits, 2 * logits]).item() == pytest.approx((sum(terms) + sum(doubled)) / 4)


def test_bias_step_fixed_and_adaptive():
    load = torch.tensor([5.0, 1.0, 3.0])  # mean 3: expert 0 over, 1 under, 2 even
    bias = torch.zeros(3)
    size, last = bias_state(bias, 0.1)
    bias_step(bias, load, size, last, 0.1, adaptive=False)
    assert bias.tolist() == pytest.approx([-0.1, 0.1, 0.0])
    bias = torch.zeros(3)
    size, last = bias_state(bias, 0.1)
    bias_step(bias, load, size, last, 0.1, adaptive=True)  # first step: no previous direction, full rate
    bias_step(bias, torch.tensor([1.0, 5.0, 3.0]), size, last, 0.1, adaptive=True)  # both flip: steps halve
    assert size.tolist() == pytest.approx([0.05, 0.05, 0.1])
    assert bias.tolist() == pytest.approx([-0.05, 0.05, 0.0])
    bias_step(bias, torch.tensor([1.0, 5.0, 3.0]), size, last, 0.1, adaptive=True)  # held: ×1.2
    assert size.tolist() == pytest.approx([0.06, 0.06, 0.1])
