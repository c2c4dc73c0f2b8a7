"""Routing-balance metrics and losses: one implementation for profile, balance and training.

Plain torch on [..., N] load vectors (routed slots per expert) and [T, N] router logits: the
hooks call them on the device per batch, the report on the CPU over the whole set, training
inside the loss. No model code here.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from moekit.arch.families import SIGMOID_BIASED, SOFTMAX_RENORM, Routing

# --------------------------------------------------------------------------- load metrics


def max_vio(counts: torch.Tensor) -> torch.Tensor:
    """(max_i c_i − c̄) / c̄, with c̄ = K·T/N the mean load (every token fills K slots)."""
    mean = counts.mean(-1)
    return (counts.amax(-1) - mean) / mean


def coefficient_of_variation(counts: torch.Tensor) -> torch.Tensor:
    return counts.std(-1, correction=0) / counts.mean(-1)


def normalised_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy of the distribution proportional to `weights`, over log N: 1 = uniform."""
    p = weights / weights.sum(-1, keepdim=True)
    return torch.special.entr(p).sum(-1) / math.log(weights.shape[-1])


def capacity(slots, experts: int, factor: float = 1.0):
    """Expert capacity C = ceil(CF·K·T/N) for K·T routed `slots`: a number, or a tensor kept on its
    device (no host copy)."""
    c = factor * slots / experts - 1e-9  # 1e-9: 1.1·K·T/N is not exact
    return torch.ceil(c) if isinstance(c, torch.Tensor) else math.ceil(c)


def capacities(tokens: int, top_k: int, experts: int, factors) -> list[int]:
    """`capacity` per capacity factor, for T tokens routed to K experts each."""
    return [capacity(top_k * tokens, experts, cf) for cf in factors]


def dropped_slots(counts: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    """Routed slots over capacity (dropped by a capacity-limited MoE), per capacity: [C] for counts [N]
    and capacities [C]; batched, [L, C] for [L, N] and [L, C] (every layer in one kernel)."""
    return (counts[..., None, :] - capacity[..., :, None]).clamp_min(0).sum(-1)


# --------------------------------------------------------------------------- router probabilities and losses


def select_experts(routing: Routing, logits: torch.Tensor, k: int, bias: torch.Tensor | None) -> torch.Tensor:
    """The experts a router picks per token (the ranking step of each routing family; DeepSeek's
    group limit is left out, moekit's own glm4_moe outputs have a single group)."""
    if routing is SIGMOID_BIASED:
        scores = torch.sigmoid(logits.float())
        return (scores + (bias if bias is not None else 0)).topk(k, dim=-1).indices
    return logits.topk(k, dim=-1).indices  # softmax is monotonic: the same top-k as the logits


def router_probs(logits: torch.Tensor, routing: Routing) -> torch.Tensor:
    """P(expert | token) for the balance loss and entropy: softmax of the logits, or for sigmoid
    routers the scores normalised to sum to 1 (DeepSeek-V3's sequence-wise balance loss)."""
    if routing is SIGMOID_BIASED:
        scores = logits.sigmoid()
        return scores / scores.sum(-1, keepdim=True)
    return logits.softmax(-1)


def switch_loss(counts: torch.Tensor, mean_probs: torch.Tensor) -> torch.Tensor:
    """Switch/GShard balance loss N·Σ f_i·P_i, f_i = share of routed slots, P_i = mean router
    probability: 1.0 when uniform (transformers' `load_balancing_loss_func` reports K times this)."""
    return counts.shape[-1] * (counts / counts.sum(-1, keepdim=True) * mean_probs).sum(-1)


def balance_loss(router_logits: Sequence[torch.Tensor], counts: Sequence[torch.Tensor],
                 routing: Routing) -> torch.Tensor:
    """`switch_loss` of each layer, averaged over layers (transformers pools all layers into one:
    a layer's imbalance then hides behind the others).

    `f_i` comes from `counts` (the slots expert i got; no gradient): the router's own choices of
    this micro-batch for the micro-batch loss, or of the whole global batch so far for Qwen's
    global-batch loss. `P_i` is the mean `router_probs` over this micro-batch's tokens.
    Minimised (= 1) by a uniform load. All layers in one batched computation: a loop over layers
    launched some 20 small GPU kernels per layer."""
    if len(router_logits) != len(counts):
        raise ValueError(f"{len(router_logits)} layers of router logits, {len(counts)} of counts")
    logits = _stack_layers(router_logits)  # [layers, tokens, N]
    c = torch.stack([c.to(logits.device, torch.float32) for c in counts])
    return switch_loss(c, router_probs(logits, routing).mean(1)).mean()


def _stack_layers(router_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The layers' router logits as one fp32 [layers, tokens, N] tensor (every layer of a model
    routes the same tokens)."""
    return torch.stack([logits.reshape(-1, logits.shape[-1]) for logits in router_logits]).float()


def switch_aux_loss(router_logits: Sequence[torch.Tensor], top_k: int, routing: Routing = SOFTMAX_RENORM,
                    biases: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """`balance_loss` of one micro-batch, with `f` from the experts each layer's router selects on
    these logits: for sigmoid routers on `score + e_score_correction_bias` (`biases`, one per layer),
    as the router itself selects, not on the scores alone."""
    counts = []
    for i, logits in enumerate(router_logits):
        logits = logits.float().reshape(-1, logits.shape[-1])
        chosen = select_experts(routing, logits, top_k, biases[i] if biases else None)
        counts.append(torch.bincount(chosen.flatten(), minlength=logits.shape[-1]))
    return balance_loss(router_logits, counts, routing)


def z_terms(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss per token (ST-MoE): logsumexp(logits)², [T] for [T, N] logits."""
    return torch.logsumexp(logits, -1).square()


def z_loss(router_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Router z-loss, the mean of `z_terms` over tokens, averaged over layers; keeps router logits
    small, which bf16 routing needs."""
    return z_terms(_stack_layers(router_logits)).mean()  # every layer sees every token: one mean


# --------------------------------------------------------------------------- loss-free balancing


@torch.no_grad()
def bias_step(bias: torch.Tensor, load: torch.Tensor, size: torch.Tensor, last: torch.Tensor, rate: float,
              adaptive: bool) -> None:
    """One loss-free balancing step (DeepSeek, arXiv 2408.15664), in place: `bias += size · sign(c̄ − c)`
    for the load `c` of one batch. Fixed (DeepSeek): `size` stays `rate`. Adaptive: each expert's
    step grows ×1.2 while its direction holds and halves when it flips, never above `rate` (Rprop);
    `last` keeps the previous direction. `size` and `last` start as `rate` and 0 (`bias_state`)."""
    direction = torch.sign(load.mean() - load).float()
    if adaptive:
        agree = direction * last
        size.mul_(torch.where(agree > 0, 1.2, torch.where(agree < 0, 0.5, 1.0))).clamp_(max=rate)
        last.copy_(direction)
    bias.add_(size * direction)


def bias_state(bias: torch.Tensor, rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The (size, last direction) a bias starts `bias_step` with."""
    return torch.full_like(bias, rate), torch.zeros_like(bias)
