"""Routing balance of an MoE model on real text, counted on the device.

A forward hook on every MoE layer's router reads the router logits and the experts each token
goes to, and adds them into tensors on the router's device. Nothing is copied to the host during
the run (no `.item()`, no logits to the CPU): the accumulators leave the device once, at the end,
and the metrics of moekit.metrics are computed from them on the CPU.

Under `accelerate launch` / `torchrun` every process profiles its share of the batches and the
accumulators are all-reduced; `device_map="auto"` models work too (each layer counts on its own
device). No CLI and no printing here.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from itertools import combinations
from typing import Callable

import torch

from moekit.arch.families import MOE_CONFIG
from moekit.checkpoint import open_checkpoint
from moekit.checkpoint.dtypes import config_name
from moekit.data.text import calibration_texts, pack_text, separator, token_stream
from moekit.errors import MoekitError
from moekit.options import ProfileOptions
from moekit.metrics import (capacities, coefficient_of_variation, dropped_slots, max_vio, normalised_entropy,
                            router_probs, switch_loss, z_terms)
from moekit.runtime.decoder import input_device, run_decoder
from moekit.runtime.models import distributed_rank, load_model, load_tokenizer, run_settings
from moekit.runtime.moe import NOTHING_TO_PROFILE, MoEModel, RoutingCounter, find_moe_layers

CAPACITY_FACTORS = (1.0, 1.25, 1.5, 2.0)


# --------------------------------------------------------------------------- counting on the device


class RoutingStats:
    """What profile adds up per layer from each batch's routing (a `RoutingCounter`'s `on_route`),
    in device tensors.

    Per layer: load per domain [D, N], co-selection [N, N], summed router probabilities [N],
    summed z-loss and router entropy, and per-batch MaxVio (sum and max), local balance loss
    and dropped slots per capacity factor. `domain` says which domain the next batches are from.
    """

    MAX_KEYS = ("vio_max",)  # reduced with max across processes; every other key with sum

    def __init__(self, moe: MoEModel, domains: int = 1, capacity_factors=CAPACITY_FACTORS):
        self.moe, self.domains, self.capacity_factors = moe, domains, tuple(capacity_factors)
        self.domain = 0
        self.acc: dict[int, dict[str, torch.Tensor]] = {}
        self._capacity: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _zeros(self, device) -> dict[str, torch.Tensor]:
        n, z = self.moe.experts, lambda *shape: torch.zeros(shape, dtype=torch.float64, device=device)
        return {"counts": z(self.domains, n), "pairs": z(n, n), "prob_sum": z(n), "z_sum": z(), "entropy_sum": z(),
                "vio_sum": z(), "vio_max": z(), "aux_local_sum": z(), "dropped": z(len(self.capacity_factors))}

    def _capacities(self, tokens: int, device) -> torch.Tensor:
        # Built once per batch size and device: a host → device copy on every batch would synchronise.
        key = (tokens, device)
        if key not in self._capacity:
            caps = capacities(tokens, self.moe.top_k, self.moe.experts, self.capacity_factors)
            self._capacity[key] = torch.tensor(caps, dtype=torch.float32, device=device)
        return self._capacity[key]

    def add(self, layer: int, logits: torch.Tensor, chosen: torch.Tensor, counts: torch.Tensor) -> None:
        """Add one batch of one layer: [T, N] fp32 logits, [T, K] chosen experts, [N] load. Device
        ops only: no value comes back to the host."""
        tokens = logits.shape[0]
        probs = router_probs(logits, self.moe.routing)
        a = self.acc.get(layer)
        if a is None:
            a = self.acc[layer] = self._zeros(logits.device)
        a["counts"][self.domain] += counts
        if self.moe.top_k > 1:
            hits = torch.zeros_like(logits).scatter_(1, chosen, 1.0)  # [T, N]: 1 where the token went
            a["pairs"] += hits.T @ hits
        a["prob_sum"] += probs.sum(0)
        a["z_sum"] += z_terms(logits).sum()
        a["entropy_sum"] += torch.special.entr(probs).sum()
        vio = max_vio(counts)
        a["vio_sum"] += vio
        torch.maximum(a["vio_max"], vio, out=a["vio_max"])
        a["aux_local_sum"] += switch_loss(counts, probs.mean(0))
        a["dropped"] += dropped_slots(counts, self._capacities(tokens, logits.device))

    def totals(self, reduce_device: torch.device | None = None) -> dict[int, dict[str, torch.Tensor]]:
        """Every accumulator on the CPU; all-reduced first when several processes ran."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        out = {}
        for layer in self.moe.layers:
            a = self.acc.get(layer.index) or self._zeros("cpu")  # a process that got no batch adds zeros
            if distributed:
                a = {key: t.to(reduce_device) for key, t in a.items()}
                for key, t in a.items():
                    op = torch.distributed.ReduceOp.MAX if key in self.MAX_KEYS else torch.distributed.ReduceOp.SUM
                    torch.distributed.all_reduce(t, op=op)
            out[layer.index] = {key: t.cpu() for key, t in a.items()}
        return out


# --------------------------------------------------------------------------- data


@dataclass
class Domain:
    name: str
    batches: list[torch.Tensor]  # [B, S] token ids, every position a real token (no padding)

    @property
    def tokens(self) -> int:
        return sum(b.numel() for b in self.batches)


def token_rows(texts: list[str], tokenizer, seq_len: int, max_tokens: int, what: str) -> torch.Tensor:
    """[R, seq_len] rows of packed text (documents separated by EOS), R·seq_len ≤ max_tokens.
    Only full rows: every batch then has the same shape, and per-batch numbers compare."""
    cap = max(1, max_tokens // seq_len) * seq_len
    rows = pack_text(texts, tokenizer, seq_len, separator=separator(tokenizer), min_last=seq_len, max_tokens=cap)
    if not rows:
        have = len(token_stream(texts, tokenizer, separator(tokenizer)))
        raise MoekitError(f"{what}: {have} tokens, shorter than one sequence of {seq_len} (--seq-len): "
                          "give more text or a shorter --seq-len")
    return torch.tensor(rows)


def read_domains(files: list[Path], tokenizer, seq_len: int, batch_size: int, max_tokens: int) -> list[Domain]:
    """One domain per text file, named by its file name, at most `max_tokens` tokens each; without
    files, the built-in sample of real English text."""
    if not files:
        sources = [("builtin", "the built-in text sample", calibration_texts(None))]
    else:
        stems = [f.stem for f in files]
        sources = [(f.stem if stems.count(f.stem) == 1 else str(f), str(f), calibration_texts(f)) for f in files]
    return [Domain(name, list(token_rows(texts, tokenizer, seq_len, max_tokens, what).split(batch_size)))
            for name, what, texts in sources]


# --------------------------------------------------------------------------- running


@torch.no_grad()
def count_routing(model, moe: MoEModel, domains: list[Domain], capacity_factors=CAPACITY_FACTORS,
                  progress: Callable[[int, int], None] | None = None) -> tuple[dict, dict]:
    """Run every batch through the decoder (no LM head: routing does not need the logits) with the
    counting hooks on; this process takes batches rank, rank + W, ... Returns the CPU totals per
    layer and run facts (tokens, batches, seconds over all processes)."""
    rank, world = distributed_rank()
    work = [(d, ids) for d, domain in enumerate(domains) for ids in domain.batches][rank::world]
    device = input_device(model)
    start = time.perf_counter()
    stats = RoutingStats(moe, len(domains), capacity_factors)
    with RoutingCounter(moe, on_route=stats.add):
        for done, (d, ids) in enumerate(work, 1):
            stats.domain = d
            run_decoder(model, ids.to(device))
            if progress:
                progress(done, len(work))
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the one wait for the device: the clock must include its work
    seconds = time.perf_counter() - start
    run = torch.tensor([sum(ids.numel() for _, ids in work), len(work), seconds], dtype=torch.float64)
    if world > 1:
        reduce_device = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        facts = run.to(reduce_device)
        torch.distributed.all_reduce(facts[:2])
        torch.distributed.all_reduce(facts[2:], op=torch.distributed.ReduceOp.MAX)
        run = facts.cpu()
        totals = stats.totals(reduce_device)
    else:
        totals = stats.totals()
    tokens, batches, seconds = run.tolist()
    return totals, {"tokens": int(tokens), "batches": int(batches), "seconds": seconds, "processes": world}


# --------------------------------------------------------------------------- the report


def _top_pairs(pairs: torch.Tensor, counts: torch.Tensor, tokens: int, how_many: int = 5) -> list[dict]:
    """Expert pairs chosen together most often, with their lift over independent choice
    (tokens with both · T / (c_i · c_j): 1 = as often as chance, above 1 = they go together)."""
    i, j = torch.triu_indices(*pairs.shape, offset=1)
    together = pairs[i, j]
    top = together.topk(min(how_many, len(together))).indices if len(together) else []
    return [{"experts": [int(i[t]), int(j[t])], "tokens": int(together[t]), "share": float(together[t]) / tokens,
             "lift": float(together[t] * tokens / (counts[i[t]] * counts[j[t]]))}
            for t in top if together[t] > 0]


def specialisation(domain_counts: torch.Tensor) -> float | None:
    """Mean total-variation distance between the domains' load distributions: the share of routed
    slots that would have to move to give two domains the same expert mix. 0 = every domain uses
    the experts alike; 1 = disjoint experts. None for a single domain."""
    if domain_counts.shape[0] < 2:
        return None
    p = domain_counts / domain_counts.sum(-1, keepdim=True)
    return sum(0.5 * (p[a] - p[b]).abs().sum().item() for a, b in combinations(range(len(p)), 2)) / math.comb(len(p), 2)


def _number(t: torch.Tensor) -> float | None:
    v = float(t)
    return v if math.isfinite(v) else None  # a layer with no tokens (a domain it never saw)


def layer_report(a: dict[str, torch.Tensor], tokens: int, batches: int, moe: MoEModel,
                 capacity_factors, domain_names: list[str]) -> dict:
    """Every metric of one layer from its accumulated totals."""
    n, k = moe.experts, moe.top_k
    counts = a["counts"].sum(0)
    mean_probs = a["prob_sum"] / tokens
    report = {
        "tokens_per_expert": [int(c) for c in counts],
        "maxvio_global": _number(max_vio(counts)),
        "maxvio_batch_mean": _number(a["vio_sum"] / batches),
        "maxvio_batch_max": _number(a["vio_max"]),
        "cv": _number(coefficient_of_variation(counts)),
        "load_entropy": _number(normalised_entropy(counts)),
        "router_entropy": _number(a["entropy_sum"] / tokens / math.log(n)),
        "dead_experts": [i for i, c in enumerate(counts) if c == 0],
        "aux_loss_local": _number(a["aux_local_sum"] / batches),
        "aux_loss_global": _number(switch_loss(counts, mean_probs)),
        "z_loss": _number(a["z_sum"] / tokens),
        "drop_rate": {str(cf): _number(d / (k * tokens)) for cf, d in zip(capacity_factors, a["dropped"])},
        "top_pairs": _top_pairs(a["pairs"], counts, tokens),
        "mean_router_prob": [float(p) for p in mean_probs],
    }
    if len(domain_names) > 1:
        report["domains"] = {name: {"tokens_per_expert": [int(c) for c in dc], "maxvio_global": _number(max_vio(dc))}
                             for name, dc in zip(domain_names, a["counts"])}
        report["specialisation"] = specialisation(a["counts"])
    return report


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def build_report(totals: dict, run: dict, moe: MoEModel, domains: list[Domain], capacity_factors) -> dict:
    """The whole profile as JSON-ready data: per layer, and in total (means over layers)."""
    names = [d.name for d in domains]
    layers = [{"layer": i, **layer_report(a, run["tokens"], run["batches"], moe, capacity_factors, names)}
              for i, a in totals.items()]
    scalar = ("maxvio_global", "maxvio_batch_mean", "maxvio_batch_max", "cv", "load_entropy", "router_entropy",
              "aux_loss_local", "aux_loss_global", "z_loss")
    total = {key: _mean(layer[key] for layer in layers) for key in scalar}
    total["maxvio_batch_max"] = max(layer["maxvio_batch_max"] or 0 for layer in layers)  # the worst batch anywhere
    total["dead_experts"] = sum(len(layer["dead_experts"]) for layer in layers)
    total["drop_rate"] = {str(cf): _mean(layer["drop_rate"][str(cf)] for layer in layers) for cf in capacity_factors}
    if len(domains) > 1:
        total["specialisation"] = _mean(layer["specialisation"] for layer in layers)
        total["domains"] = {name: {"maxvio_global": _mean(layer["domains"][name]["maxvio_global"] for layer in layers)}
                            for name in names}
    return {
        "model_type": moe.model_type, "routing": moe.routing.formula, "experts": moe.experts, "top_k": moe.top_k,
        "moe_layers": len(layers), **run, "tokens_per_s": run["tokens"] / max(run["seconds"], 1e-9),
        "capacity_factors": list(capacity_factors),
        "domains": [{"name": d.name, "tokens": d.tokens} for d in domains],
        "total": total, "layers": layers,
    }


def profile(model, domains: list[Domain], capacity_factors=CAPACITY_FACTORS,
            progress: Callable[[int, int], None] | None = None) -> dict:
    """Count routing on `domains` and report every metric (see build_report)."""
    moe = find_moe_layers(model)
    totals, run = count_routing(model, moe, domains, capacity_factors, progress)
    return build_report(totals, run, moe, domains, capacity_factors)


def run_profile(opts: ProfileOptions, progress: Callable[[int, int], None] | None = None) -> tuple[dict | None, list[str]]:
    """The profile job: (the report, loading warnings); (None, []) on a process of a multi-GPU run
    that is not the main one (it counts, the main process reports)."""
    where, torch_dtype = run_settings(opts.device, opts.dtype)
    config = open_checkpoint(opts.model, allow_pickle=opts.allow_pickle).config  # a dense model fails before loading
    if config.get("model_type") not in MOE_CONFIG:
        raise MoekitError(NOTHING_TO_PROFILE)
    domains = read_domains(opts.data, load_tokenizer(opts.model), opts.seq_len, opts.batch_size, opts.max_tokens)
    loaded, warnings = load_model(opts.model, torch_dtype, where, opts.device_map, allow_pickle=opts.allow_pickle,
                                  complete=True)
    report = profile(loaded, domains, opts.capacity_factors, progress)
    if distributed_rank()[0] != 0:
        return None, []
    return {"model": opts.model, "device": f"device_map={opts.device_map}" if opts.device_map else str(where),
            "dtype": config_name(torch_dtype), "batch_size": opts.batch_size, "seq_len": opts.seq_len,
            **report}, warnings
