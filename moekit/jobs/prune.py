"""The prune job: score every expert on calibration text, keep the best N' per layer, write.

Scores per expert j of a layer, over the calibration tokens routed to j:

- frequency: the number of tokens routed to j (runtime.moe.RoutingCounter's load);
- ean: Σ ‖E_j(x)‖₂, the expert's output norm, summed (expert activation norm);
- reap: mean of g_j(x)·‖E_j(x)‖₂, g_j(x) the weight the router gave j (REAP, Cerebras 2025);
- random: a seeded draw (the baseline).

E_j(x) is evaluated from the layer's fused expert parameters as transformers 5.x holds them
(`experts.gate_up_proj` [N, 2I, H], `experts.down_proj` [N, H, I]), on the tokens and with the
weights the router chose, read where the MoE block calls its experts. Frequency only needs the
router's choice, so it also runs under transformers 4.57 for the softmax families.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from moekit.arch.families import holds_routed_experts, read_field
from moekit.checkpoint import open_checkpoint
from moekit.checkpoint.dtypes import parse_dtype
from moekit.checkpoint.writer import parse_size
from moekit.errors import MoekitError, UsageError
from moekit.options import PruneOptions
from moekit.report.write import Progress, WriteResult, set_dtype, write_model
from moekit.runtime.decoder import input_device, run_decoder
from moekit.runtime.moe import ExpertNorms, RoutingCounter, find_moe_layers
from moekit.surgery.layout import source_target
from moekit.surgery.prune import check_prune, choose_kept, keep_count, plan_prune
from moekit.surgery.requirements import moe_layer_indices

METHODS = ("reap", "frequency", "ean", "random")
NEEDS_NORMS = ("reap", "ean")


def calibration_batches(texts: list[str], tokenizer, max_tokens: int, seq_len: int = 512, batch_size: int = 8):
    """Packed rows of calibration text, max_tokens in all: full rows in batches, a shorter last row alone."""
    from moekit.data.text import batches, pack_text, separator

    rows = pack_text(texts, tokenizer, seq_len, separator=separator(tokenizer), max_tokens=max_tokens)
    if sum(map(len, rows)) < 2:
        raise MoekitError("the calibration text has fewer than 2 tokens")
    return batches(rows, batch_size)


@torch.no_grad()
def expert_scores(model, batches: list[torch.Tensor], norms: bool = True) -> dict[int, dict[str, torch.Tensor]]:
    """Per MoE layer: frequency, and with `norms` ean and reap, each [N] on the CPU."""
    moe = find_moe_layers(model)
    device = input_device(model)
    sums = ExpertNorms(moe) if norms else nullcontext()
    with RoutingCounter(moe) as counter, sums:
        for ids in batches:
            run_decoder(model, ids.to(device))
    out = {}
    for i, counts in counter.totals().items():
        freq = counts.cpu()
        scores = {"frequency": freq}
        if norms:
            ean = sums.ean.get(i, torch.zeros_like(freq)).cpu()
            scores.update(ean=ean, reap=sums.gated.get(i, torch.zeros_like(freq)).cpu() / freq.clamp_min(1))
        out[i] = scores
    return out


def random_scores(layers: list[int], n: int, seed: int) -> dict[int, dict[str, torch.Tensor]]:
    return {i: {"random": torch.rand(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + i), dtype=torch.float64)}
            for i in layers}


def profile_scores(path, layers: list[int], n: int) -> dict[int, dict[str, torch.Tensor]]:
    from moekit.jobs.add_experts import usage_from_profile

    counts = usage_from_profile(path, layers)
    wrong = [i for i in layers if len(counts[i]) != n]
    if wrong:
        raise MoekitError(f"{path}: layer {wrong[0]} has counts for {len(counts[wrong[0]])} experts, the model has {n}")
    return {i: {"frequency": counts[i].double()} for i in layers}


def calibration_scores(opts: PruneOptions, device) -> dict[int, dict[str, torch.Tensor]]:
    from moekit.runtime.models import load_model, load_tokenizer
    from moekit.data.text import calibration_texts

    model, tokenizer = load_model(opts.source, torch.float32, device)[0], load_tokenizer(opts.source)
    texts = calibration_texts(opts.calibration)
    return expert_scores(model, calibration_batches(texts, tokenizer, opts.calibration_tokens),
                         norms=opts.method in NEEDS_NORMS)


def run_prune(opts: PruneOptions, progress: Progress | None = None) -> tuple[WriteResult, dict]:
    from moekit.runtime.models import resolve_device

    if opts.layers != "all":  # one expert count per model in every family's config
        raise UsageError("--layers: every MoE layer of a model has the same number of experts in its config "
                         "(the stock classes read one count), so pruning applies to all MoE layers")
    if opts.profile and opts.method != "frequency":
        raise UsageError(f"--profile holds routing counts, which only --method frequency uses; {opts.method} "
                         "needs a calibration pass (drop --profile)")
    dtype = parse_dtype(opts.dtype) if opts.dtype else None
    ckpt = open_checkpoint(opts.source, allow_pickle=opts.allow_pickle, dtype=dtype)
    if not holds_routed_experts(ckpt.tensors):
        raise MoekitError(f"{ckpt.path} is a dense model: it has no experts to prune")
    target = source_target(ckpt)
    cfg = ckpt.config
    n = read_field(cfg, target.fields.expert_fields)
    keep = keep_count(n, opts.keep, opts.ratio)
    check_prune(ckpt, keep, opts.top_k)  # options valid before any forward pass
    layers = moe_layer_indices(ckpt, target)
    if opts.method == "random":
        scores = random_scores(layers, n, opts.seed)
    elif opts.profile:
        scores = profile_scores(opts.profile, layers, n)
    else:
        scores = calibration_scores(opts, resolve_device(opts.device))
    groups = cfg.get("n_group") or 1
    kept = {i: choose_kept(scores[i][opts.method], keep, groups) for i in layers}
    plan = plan_prune(ckpt, kept, top_k=opts.top_k, dtype=dtype)
    for record in plan.layers:
        record["scores"] = {m: [_number(v) for v in s.tolist()] for m, s in scores[record["layer"]].items()}
    scored_on = (str(opts.profile) if opts.profile else f"seed {opts.seed}" if opts.method == "random"
                 else str(opts.calibration or "the built-in text sample"))
    summary = {"target": target.model_type, "method": opts.method, "scored_on": scored_on, "from": n,
               "experts": plan.experts, "top_k": plan.top_k, "moe_layers": len(plan.layers),
               "weights_kept": plan.weights_kept}
    if not plan.weights_kept:
        summary["note"] = (f"{target.model_type} routes by a softmax over all experts without renormalisation "
                           "(norm_topk_prob false): the surviving experts' weights change (the softmax runs over "
                           "fewer logits); measure the drift with `moekit verify SOURCE OUT`")
    result = write_model(
        opts.output, ckpt, plan.outputs, config=set_dtype(plan.config, plan.outputs[0].meta.dtype), operation="prune",
        options=opts.model_dump(mode="json"), layers=plan.layers, summary=summary,
        title=f"{target.architecture} pruned to {plan.experts} of {n} experts",
        what=(f"`{ckpt.path.name}` with {plan.experts} of its {n} experts kept in each of {len(plan.layers)} MoE "
              f"layers, chosen by {opts.method} scores; kept experts are renumbered densely in their old order "
              "(the map and every score are in `moekit.json`), router rows and selection biases sliced to them, "
              f"routed top-{plan.top_k}."),
        max_shard_size=parse_size(opts.max_shard_size), overwrite=opts.overwrite, progress=progress)
    return result, summary


def _number(v: float) -> float | None:
    return v if math.isfinite(v) else None
