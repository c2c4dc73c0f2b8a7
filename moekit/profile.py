"""Routing balance of an MoE model on real text, counted on the device.

A forward hook on every MoE layer's router reads the router logits and the experts each token
goes to, and adds them into tensors on the router's device. Nothing is copied to the host during
the run (no `.item()`, no logits to the CPU): the accumulators leave the device once, at the end,
and the metrics of BRIEF §3 are computed from them on the CPU.

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
import torch.nn.functional as F

from moekit.architectures import MOE_CONFIG, SIGMOID_BIASED, SOFTMAX_RENORM, SOFTMAX_TOPK, TOPK_SOFTMAX, Routing, read_field
from moekit.data.text import calibration_texts, pack_text, separator, token_stream
from moekit.errors import MoekitError
from moekit.surgery.grow import select_experts

CAPACITY_FACTORS = (1.0, 1.25, 1.5, 2.0)
NOTHING_TO_PROFILE = "nothing to profile: no MoE layers; upcycle it first"


# --------------------------------------------------------------------------- metrics of counts
# Plain torch on [..., N] load vectors (tokens routed to each expert): the hooks call them on the
# device per batch, the report on the CPU over the whole set.


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


def capacities(tokens: int, top_k: int, experts: int, factors) -> list[int]:
    """Expert capacity C = ceil(CF·K·T/N) per capacity factor."""
    return [math.ceil(cf * top_k * tokens / experts - 1e-9) for cf in factors]  # 1e-9: 1.1·K·T/N is not exact


def dropped_slots(counts: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    """Routed slots over capacity (dropped by a capacity-limited MoE), per capacity [C]."""
    return (counts[None, :] - capacity[:, None]).clamp_min(0).sum(-1)


def aux_loss(counts: torch.Tensor, mean_probs: torch.Tensor) -> torch.Tensor:
    """Switch/GShard balance loss N·Σ f_i·P_i, f_i = share of routed slots, P_i = mean router
    probability: 1.0 when uniform (transformers' `load_balancing_loss_func` reports K times this)."""
    return counts.shape[-1] * (counts / counts.sum(-1, keepdim=True) * mean_probs).sum(-1)


# --------------------------------------------------------------------------- finding the routers


@dataclass(frozen=True)
class MoELayer:
    index: int  # decoder layer number
    name: str  # module path of the router: also the prefix of its keys in the checkpoint
    router: torch.nn.Module


@dataclass(frozen=True)
class MoEModel:
    layers: list[MoELayer]
    experts: int
    top_k: int
    routing: Routing
    model_type: str


def find_moe_layers(model) -> MoEModel:
    """The MoE layers of a transformers causal LM and its routing (architectures.MOE_CONFIG)."""
    config = model.config.to_dict()
    model_type = config.get("model_type", "?")
    fields = MOE_CONFIG.get(model_type)
    if fields is None:
        raise MoekitError(f"{NOTHING_TO_PROFILE} (model type {model_type!r} is not a Mixture-of-Experts family moekit knows)")
    names = {m: n for n, m in model.named_modules()}
    layers = []
    for i, block in enumerate(model.model.layers):
        # MoE blocks are `mlp` (5.x, Qwen, GLM, DeepSeek) or `block_sparse_moe` (4.57 Mixtral, GraniteMoe);
        # their router is `gate` or `router`. Dense MLPs in MoE models have neither.
        ffn = getattr(block, "mlp", None) or getattr(block, "block_sparse_moe", None)
        router = getattr(ffn, "gate", None) or getattr(ffn, "router", None)
        if isinstance(router, torch.nn.Module):
            layers.append(MoELayer(i, names[router], router))
    if not layers:
        raise MoekitError(NOTHING_TO_PROFILE)
    return MoEModel(layers, int(read_field(config, fields.experts)), int(read_field(config, fields.top_k)),
                    fields.routing, model_type)


def _router_output(router, args, output) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, chosen experts or None) from whatever this router module returns."""
    if isinstance(output, torch.Tensor):  # 4.57 Mixtral, Qwen-MoE, OLMoE: the gate is an nn.Linear
        return output, None
    if len(output) == 3:  # 5.x routers: (logits, weights, indices)
        return output[0], output[2]
    if len(output) == 5:  # 4.57 GraniteMoe gating: (sorted index, batch index, gates, sizes, logits)
        return output[4], None
    # 4.57 DeepSeek-V3 / GLM / dots1 return (indices, weights), GPT-OSS (scores, indices): no logits,
    # so they are recomputed from the router's input (one [T, H] × [H, N] product).
    indices = next(o for o in output if not o.is_floating_point())
    x = args[0].reshape(-1, router.weight.shape[1]).float()
    bias = getattr(router, "bias", None)
    return F.linear(x, router.weight.float(), None if bias is None else bias.float()), indices


def _select(logits: torch.Tensor, top_k: int, routing: Routing) -> torch.Tensor:
    """The experts the block picks from these logits, where the router does not say (4.57's
    bare nn.Linear gates: softmax and top-k happen in the block)."""
    if routing not in (SOFTMAX_RENORM, SOFTMAX_TOPK, TOPK_SOFTMAX):
        raise MoekitError(f"cannot tell which experts this router chose ({routing.formula}); "
                          "use transformers 5.x, whose routers return their choice")
    return select_experts(routing, logits, top_k, None)


def router_probs(logits: torch.Tensor, routing: Routing) -> torch.Tensor:
    """P(expert | token) for the balance loss and entropy: softmax of the logits, or for sigmoid
    routers the scores normalised to sum to 1 (DeepSeek-V3's sequence-wise balance loss)."""
    if routing is SIGMOID_BIASED:
        scores = logits.sigmoid()
        return scores / scores.sum(-1, keepdim=True)
    return logits.softmax(-1)


# --------------------------------------------------------------------------- counting on the device


class RouterCounter:
    """Forward hooks that count routing decisions into device tensors, per layer.

    Per layer: load per domain [D, N], co-selection [N, N], summed router probabilities [N],
    summed z-loss and router entropy, and per-batch MaxVio (sum and max), local balance loss
    and dropped slots per capacity factor. `domain` says which domain the next batches are from.
    `last_counts[layer]` is the load of the latest batch (loss-free balancing reads it).
    """

    MAX_KEYS = ("vio_max",)  # reduced with max across processes; every other key with sum

    def __init__(self, moe: MoEModel, domains: int = 1, capacity_factors=CAPACITY_FACTORS):
        self.moe, self.domains, self.capacity_factors = moe, domains, tuple(capacity_factors)
        self.domain = 0
        self.acc: dict[int, dict[str, torch.Tensor]] = {}
        self.last_counts: dict[int, torch.Tensor] = {}
        self._capacity: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._handles = []

    def __enter__(self) -> RouterCounter:
        for layer in self.moe.layers:
            def hook(router, args, output, i=layer.index):
                self.count(i, *_router_output(router, args, output))
            self._handles.append(layer.router.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

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

    def count(self, layer: int, logits: torch.Tensor, chosen: torch.Tensor | None) -> None:
        """Add one batch of one layer. Device ops only: no value comes back to the host."""
        n, k = self.moe.experts, self.moe.top_k
        logits = logits.reshape(-1, n).float()
        chosen = (_select(logits, k, self.moe.routing) if chosen is None else chosen).reshape(-1, k)
        tokens = logits.shape[0]
        hits = torch.zeros_like(logits).scatter_(1, chosen, 1.0)  # [T, N]: 1 where the token went
        counts = hits.sum(0)  # exact in fp32 below 2^24 tokens per batch
        probs = router_probs(logits, self.moe.routing)
        mean_probs = probs.mean(0)
        a = self.acc.get(layer)
        if a is None:
            a = self.acc[layer] = self._zeros(logits.device)
        a["counts"][self.domain] += counts
        if k > 1:
            a["pairs"] += hits.T @ hits
        a["prob_sum"] += probs.sum(0)
        a["z_sum"] += torch.logsumexp(logits, -1).square().sum()
        a["entropy_sum"] += torch.special.entr(probs).sum()
        vio = max_vio(counts)
        a["vio_sum"] += vio
        torch.maximum(a["vio_max"], vio, out=a["vio_max"])
        a["aux_local_sum"] += aux_loss(counts, mean_probs)
        a["dropped"] += dropped_slots(counts, self._capacities(tokens, logits.device))
        self.last_counts[layer] = counts

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


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) under `accelerate launch` or `torchrun` (they set WORLD_SIZE and the
    rendezvous variables); the process group is initialised on first use. (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank(), world


def input_device(model) -> torch.device:
    """Where token ids go: the embedding's device (the first GPU under device_map="auto")."""
    return model.get_input_embeddings().weight.device


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
    with RouterCounter(moe, len(domains), capacity_factors) as counter:
        for done, (d, ids) in enumerate(work, 1):
            counter.domain = d
            model.model(input_ids=ids.to(device), use_cache=False)
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
        totals = counter.totals(reduce_device)
    else:
        totals = counter.totals()
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
        "aux_loss_global": _number(aux_loss(counts, mean_probs)),
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
