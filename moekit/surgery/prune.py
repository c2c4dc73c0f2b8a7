"""Expert pruning: keep N' of each MoE layer's N experts, the same N' in every layer (one count in
the config, so the stock classes load the result), renumbered densely in their old order.

Router rows and selection biases are sliced to the kept experts; shared experts and everything
else pass through. Kept tensors are byte ranges of the source (per-expert keys renamed, fused
Granite tensors and router rows as runs of rows), so the writer copies them file to file. Which
experts to keep comes from scores the caller computes (moekit.jobs.prune); this module is pure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.arch.families import SOFTMAX_TOPK, read_field
from moekit.checkpoint import Checkpoint, OutputTensor, TensorMeta, passthrough
from moekit.errors import UsageError
from moekit.surgery.layout import ExpertReader, replace_blocks, source_target
from moekit.surgery.requirements import moe_layer_indices
from moekit.arch.targets import Target


@dataclass(frozen=True)
class PrunePlan:
    outputs: list[OutputTensor]
    config: dict
    layers: list[dict]
    target: Target
    experts: int  # kept per layer
    top_k: int
    weights_kept: bool  # the surviving experts' routing weights are what they were (see weights_change)


def keep_count(n: int, keep: int | None, ratio: float | None) -> int:
    """N' from --keep N' or --ratio r (the share of experts removed, as REAP reports it)."""
    if (keep is None) == (ratio is None):
        raise UsageError("give exactly one of --keep N' (experts kept per layer) or --ratio r (share removed)")
    if ratio is not None:
        if not 0 < ratio < 1:
            raise UsageError(f"--ratio is the share of experts removed, between 0 and 1 (exclusive), got {ratio:g}")
        keep = n - round(ratio * n)
    if not 1 <= keep < n:
        raise UsageError(f"keeping {keep} of {n} experts: --keep must be between 1 and {n - 1}"
                         + (f" (--ratio {ratio:g} of {n} removes {n - keep})" if ratio is not None else ""))
    return keep


def weights_change(target: Target, config: dict) -> bool:
    """True where removing experts changes the weights of the ones that stay: a softmax over all
    experts without renormalisation over the chosen (its denominator loses the removed logits).
    Renormalised softmax, top-k-then-softmax and sigmoid scores do not depend on absent experts."""
    return target.routing is SOFTMAX_TOPK and not config.get("norm_topk_prob")


def check_prune(ckpt: Checkpoint, keep: int, top_k: int | None) -> int:
    """Refuse what the output could not route; return the new top-k."""
    cfg, target = ckpt.config, source_target(ckpt)
    n, k = read_field(cfg, target.fields.expert_fields), cfg["num_experts_per_tok"]
    new_k = k if top_k is None else top_k
    if top_k is not None and not 1 <= top_k <= keep:
        raise UsageError(f"--top-k must be between 1 and the {keep} experts kept, got {top_k}")
    if new_k > keep:
        raise UsageError(f"the model routes each token to {k} experts, more than the {keep} kept; "
                         f"keep at least {k}, or lower top-k with --top-k")
    groups = cfg.get("n_group") or 1
    if groups > 1:
        size, per = n // groups, keep // groups
        if keep % groups or per < 2:
            raise UsageError(f"group-limited routing: {n} experts in {groups} groups of {size}, and the router ranks a "
                             f"group by its two best experts, so every group must keep the same number, at least 2; "
                             f"--keep must be a multiple of {groups} and at least {2 * groups}, got {keep}")
        if new_k > per * cfg.get("topk_group", groups):
            raise UsageError(f"group-limited routing picks top-{new_k} from {cfg.get('topk_group', groups)} groups of "
                             f"{per} kept experts: too few; keep more or lower --top-k")
    return new_k


def choose_kept(scores: torch.Tensor, keep: int, groups: int = 1) -> list[int]:
    """The `keep` highest-scoring experts (ties: the lower id), in id order; with group-limited
    routing the best keep/groups of each group (groups are contiguous id ranges)."""
    size, per = len(scores) // groups, keep // groups
    kept = []
    for g in range(groups):
        part = scores[g * size:(g + 1) * size].double()
        order = torch.argsort(-part, stable=True)
        kept += sorted(g * size + int(e) for e in order[:per])
    return kept


def runs(ids: list[int]) -> tuple[tuple[int, int], ...]:
    """Sorted ids as maximal runs [a, b) of consecutive ids: the row ranges the writer copies."""
    out: list[list[int]] = []
    for e in ids:
        if out and out[-1][1] == e:
            out[-1][1] = e + 1
        else:
            out.append([e, e + 1])
    return tuple((a, b) for a, b in out)


def rows_of(ckpt: Checkpoint, name: str, ids: list[int], dtype: torch.dtype | None, new_name: str | None = None) -> OutputTensor:
    """Rows `ids` (sorted) of a source tensor, copied as byte ranges when the dtype stays."""
    meta = ckpt.meta(name)
    cast = dtype if dtype is not None and meta.dtype.is_floating_point else meta.dtype
    pieces = runs(ids)

    def produce():
        t = ckpt.load(name)
        return torch.cat([t[a:b] for a, b in pieces]).to(cast)

    return OutputTensor(TensorMeta(new_name or name, (len(ids), *meta.shape[1:]), cast), produce,
                        copy_of=(ckpt, name) if cast == meta.dtype else None, rows=pieces)


def plan_prune(ckpt: Checkpoint, kept: dict[int, list[int]], *, top_k: int | None = None,
               dtype: torch.dtype | None = None) -> PrunePlan:
    """Keep experts `kept[layer]` (sorted old ids, the same count in every MoE layer)."""
    cfg, target = ckpt.config, source_target(ckpt)
    n = read_field(cfg, target.fields.expert_fields)
    layers = moe_layer_indices(ckpt, target)
    counts = {len(kept[i]) for i in layers}
    if len(counts) != 1:
        raise ValueError("every MoE layer must keep the same number of experts")
    keep = counts.pop()
    new_k = check_prune(ckpt, keep, top_k)
    reader = ExpertReader(ckpt, target, n)
    owner = {name: i for i in layers for name in reader.names(i)}
    records = []

    def plan_block(i: int) -> list[OutputTensor]:
        block = _pruned_block(ckpt, target, i, kept[i], dtype)
        records.append({"layer": i, "kept": kept[i], "removed": [e for e in range(n) if e not in kept[i]],
                        "new_ids": {str(e): j for j, e in enumerate(kept[i])}})
        return block

    outputs = replace_blocks(ckpt, owner, dtype, plan_block)
    config = dict(cfg)
    config.update({f: keep for f in target.fields.expert_fields})
    config["num_experts_per_tok"] = new_k
    return PrunePlan(outputs, config, records, target, keep, new_k, weights_kept=not weights_change(target, cfg))


def _pruned_block(ckpt: Checkpoint, t: Target, i: int, kept: list[int], dtype) -> list[OutputTensor]:
    block = [rows_of(ckpt, t.router.format(i=i), kept, dtype)]
    if t.router_bias:  # a selection bias stays fp32 whatever --dtype says
        block.append(rows_of(ckpt, t.router_bias.format(i=i), kept, None))
    for name, source, rows in t.experts.select(i, kept):
        block.append(renamed(ckpt, source, name, dtype) if rows is None else rows_of(ckpt, source, rows, dtype))
    return block


def renamed(ckpt: Checkpoint, name: str, new_name: str, dtype: torch.dtype | None) -> OutputTensor:
    """A source tensor under another name (kept expert e becomes expert j), byte for byte."""
    same = passthrough(ckpt, ckpt.meta(name), dtype)
    return OutputTensor(TensorMeta(new_name, same.meta.shape, same.meta.dtype), same.produce, copy_of=same.copy_of)
