"""Data-driven router rows for upcycling: k-means of captured FFN inputs (the forward passes that
capture them, and the prompt rows that need them, live in moekit.runtime.capture).

An upcycled layer starts with N identical experts, so its output does not depend on the router
(docs/upcycle.md); the router only decides which experts will *specialise* once training starts. Rows
taken from the data give each expert a distinct region of the space the router actually sees,
instead of a random projection:

- k-means: cluster the hidden states that enter the layer's MLP (= what the new router will
  receive) on calibration text; one centroid per expert (LLaMA-MoE v2).
- prompts: mergekit-moe's "hidden" gate mode; expert i's row points at the mean hidden state of
  prompts describing its domain, minus the mean of negative prompts.

Everything here is plain torch on tensors: no model runs, no CLI, no printing.
"""

from __future__ import annotations

import torch

from moekit.errors import MoekitError


# --------------------------------------------------------------------------- MLP inputs of calibration text


# --------------------------------------------------------------------------- k-means rows


def balanced_kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """Spherical k-means (cosine similarity on L2-normalised rows) with k-means++ seeding.

    Returns [k, H] unit centroids, every one with at least one point assigned to it: a cluster
    that empties is re-seeded with the point its current centroid fits worst, taken from a
    cluster that can spare it. An empty cluster would become an expert the router never picks.
    Cosine, not Euclidean: the router's logit is a dot product, and the norm of a token's hidden
    state says little about what it is about.
    """
    if x.shape[0] < k:
        raise MoekitError(f"k-means needs at least {k} hidden states, got {x.shape[0]}; use more calibration text")
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    gen = torch.Generator(device=x.device).manual_seed(seed)

    # k-means++: each new centroid is drawn with probability proportional to its squared
    # distance to the nearest centroid so far (2 - 2cos for unit vectors).
    def distance(centre):  # points equal up to rounding count as equal: no centroid is picked twice
        d = 1 - x @ centre
        return torch.where(d > 1e-6, d, torch.zeros_like(d))

    c = x[torch.randint(x.shape[0], (1,), generator=gen, device=x.device)]
    dist = distance(c[0])
    for _ in range(1, k):
        if dist.sum() <= 0:
            raise MoekitError(f"k-means: fewer than {k} distinct hidden states; use more (or more varied) calibration text")
        pick = torch.multinomial(dist, 1, generator=gen)
        c = torch.cat([c, x[pick]])
        dist = torch.minimum(dist, distance(x[pick][0]))

    for _ in range(iters):
        sim = x @ c.T
        labels = _fill_empty(sim, sim.argmax(dim=1), k)
        # cluster sums as a matmul: index_add_ is ~50x slower on CPU
        new = torch.nn.functional.normalize(torch.nn.functional.one_hot(labels, k).to(x.dtype).T @ x, dim=-1)
        done = torch.allclose(new, c, atol=1e-6)
        c = new
        if done:
            break
    return c


def _fill_empty(sim: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=k)
    empty = (counts == 0).nonzero().flatten().tolist()
    if not empty:
        return labels
    labels = labels.clone()
    fit = sim.gather(1, labels[:, None]).flatten()
    for j in empty:
        # the worst-fitting point among clusters that keep at least one point after giving it up
        donors = counts[labels] > 1
        p = torch.where(donors, fit, torch.inf).argmin()
        counts[labels[p]] -= 1
        counts[j] += 1
        labels[p] = j
        fit[p] = torch.inf  # fits its own cluster perfectly now; never move it again
    return labels


def scale_to_logit_std(rows: torch.Tensor, x: torch.Tensor, target: float = 1.0) -> torch.Tensor:
    """`rows` times one factor so that the router logits `x @ rows.T` have, per token, a standard
    deviation across experts of `target` on average (RMS over tokens).

    Why: unit centroids give logits |x|·cos, and |x| of an MLP input ranges from ~1 to ~100s
    depending on the norm weights of the layer and the family (OLMo-2 routes the raw residual), so
    the raw centroids make some layers' softmax one-hot (no gradient reaches the other experts,
    and the router cannot learn) and others' uniform (the choice is noise). A spread of ~1 logit
    across experts makes the centroid choice decisive for top-K (the nearest centroid wins by
    e^1-ish ratios) while every expert keeps a probability the gradient can move; it is the same
    for every layer and model, and it only rescales rows, so the k-means ranking is unchanged.
    Only the spread across experts matters: softmax ignores a shift common to all experts.
    """
    logits = x.float() @ rows.T
    spread = logits.std(dim=1, unbiased=False).pow(2).mean().sqrt()
    return rows * (target / spread.clamp(min=1e-12))


def kmeans_router_rows(
    states: dict[int, torch.Tensor], n_experts: int, iters: int = 50, seed: int = 0, logit_std: float = 1.0
) -> dict[int, torch.Tensor]:
    """Per layer, [N, H] router rows: k-means centroids of that layer's MLP inputs, scaled by
    `scale_to_logit_std` (LLaMA-MoE v2 uses centroids as they are; see there for why not).

    The k-means is seeded per layer with `seed + layer`, so the same seed reproduces the rows.
    """
    rows = {}
    for layer, x in states.items():
        centroids = balanced_kmeans(x, n_experts, iters=iters, seed=seed + layer)
        rows[layer] = scale_to_logit_std(centroids, x, logit_std)
    return rows


# --------------------------------------------------------------------------- prompt rows
