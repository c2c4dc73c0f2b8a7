"""Which of an expert's neurons go into which fine-grained child (a free choice: the function is
the same for any partition; only how well the children specialise differs).

Every method returns a permutation of the expert's I neurons; child g takes positions
[g·I/G, (g+1)·I/G) of it. Pure torch, on whatever device the inputs are on.
"""

from __future__ import annotations

import torch

METHODS = ("contiguous", "random", "kmeans", "coactivation")


def contiguous(width: int, groups: int) -> torch.Tensor:
    return torch.arange(width)


def random(width: int, groups: int, seed: int) -> torch.Tensor:
    return torch.randperm(width, generator=torch.Generator().manual_seed(seed))


def equal_size_clusters(features: torch.Tensor, groups: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Balanced spherical k-means: `groups` clusters of exactly len(features)/groups rows each,
    returned as a permutation that lists cluster 0's rows, then cluster 1's, ...

    Each assignment step gives rows to their most similar centroid that still has room, rows with
    the clearest preference first (MoEfication and LLaMA-MoE balance their clusters the same way).
    """
    n = features.shape[0]
    size = n // groups
    if groups == 1 or size == 1:  # nothing to cluster: one cluster, or one neuron per child
        return torch.arange(n, device=features.device)
    x = torch.nn.functional.normalize(features.float(), dim=1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    centroids = x[torch.randperm(n, generator=gen)[:groups].to(x.device)]
    labels = torch.empty(n, dtype=torch.long, device=x.device)
    for _ in range(iters):
        labels = _balanced_assign(x @ centroids.T, size)
        new = torch.nn.functional.normalize(torch.zeros_like(centroids).index_add_(0, labels, x), dim=1)
        if torch.allclose(new, centroids):
            break
        centroids = new
    return torch.argsort(labels, stable=True)


def _balanced_assign(sim: torch.Tensor, size: int) -> torch.Tensor:
    n, groups = sim.shape
    top2 = sim.topk(2, dim=1).values
    order = torch.argsort(top2[:, 0] - top2[:, 1], descending=True).tolist()
    prefs = torch.argsort(sim, dim=1, descending=True).tolist()
    room = [size] * groups
    labels = [0] * n
    for row in order:
        for g in prefs[row]:
            if room[g]:
                labels[row], room[g] = g, room[g] - 1
                break
    return torch.tensor(labels, device=sim.device)


def kmeans(gate: torch.Tensor, up: torch.Tensor, groups: int, seed: int) -> torch.Tensor:
    """Neurons whose input weights point the same way go together: balanced k-means on the
    normalised rows of [W_gate | W_up] (MoEfication's parameter clustering, LLaMA-MoE's split)."""
    return equal_size_clusters(torch.cat([gate.float(), up.float()], dim=1), groups, seed=seed)


def coactivation(gate: torch.Tensor, up: torch.Tensor, hidden: torch.Tensor, groups: int, seed: int) -> torch.Tensor:
    """Neurons that fire together go together: balanced k-means on each neuron's |activation|
    profile over calibration tokens `hidden` [T, H] (the states entering the MLP)."""
    x = hidden.to(gate.device, torch.float32)
    act = torch.nn.functional.silu(x @ gate.float().T) * (x @ up.float().T)  # [T, I]
    return equal_size_clusters(act.abs().T, groups, seed=seed)
