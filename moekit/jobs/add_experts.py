"""The add-experts job: open (upcycling a dense source on the fly), count routing where needed,
plan, write with a freeze manifest, and measure the drift at init on old-domain text."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Callable

import torch

from moekit.arch.families import holds_routed_experts
from moekit.checkpoint import Checkpoint, open_checkpoint
from moekit.checkpoint.dtypes import parse_dtype
from moekit.checkpoint.planned import PlannedCheckpoint
from moekit.checkpoint.writer import parse_size
from moekit.errors import MoekitError, UsageError
from moekit.options import AddExpertsOptions
from moekit.report.write import Progress, WriteResult, set_dtype, write_model
from moekit.metrics import select_experts
from moekit.surgery.add_experts import plan_add_experts
from moekit.runtime.capture import calibration_mlp_inputs
from moekit.surgery.router_init import kmeans_router_rows
from moekit.surgery.upcycle import plan_upcycle
from moekit.arch.targets import TARGETS


def run_add_experts(opts: AddExpertsOptions, progress: Progress | None = None) -> tuple[WriteResult, dict]:
    from moekit.runtime.models import resolve_device

    if opts.layers != "all":  # one expert count per model in every target's config
        raise UsageError("--layers: every MoE layer of a model has the same number of experts in its config, "
                         "so new experts go into all of them (train only some by editing the freeze manifest)")
    dtype = parse_dtype(opts.dtype) if opts.dtype else None
    ckpt = open_checkpoint(opts.source, allow_pickle=opts.allow_pickle, dtype=dtype)
    dense = not holds_routed_experts(ckpt.tensors)
    source: Checkpoint = ckpt
    if dense:
        up = plan_upcycle(ckpt, opts.target, opts.experts, min(2, opts.experts), dtype=dtype, seed=opts.seed)
        source = PlannedCheckpoint(ckpt, up.outputs, up.config)
    device = resolve_device(opts.device)
    # Routing counts and k-means rows read the same hidden states: one model load, one pass.
    states = lru_cache(maxsize=1)(lambda layers: _new_domain_states(ckpt, opts, list(layers), device))
    plan = plan_add_experts(
        source, opts.new_experts, init=opts.init, copy_from=opts.copy_from, router_init=opts.router_init,
        top_k=opts.top_k, drop=opts.drop_upcycling, seed=opts.seed, dtype=dtype,
        usage=lambda layers: _usage(source, opts, layers, states),
        kmeans_rows=lambda layers: _kmeans_rows(source, opts, states(tuple(layers))))
    out_dtype = plan.outputs[0].meta.dtype
    note = {}
    if states.cache_info().currsize and not opts.calibration:  # a data-driven choice ran on the built-in sample
        note["note"] = (f"no --calibration: --copy-from {opts.copy_from} / --router-init {opts.router_init} used "
                        "hidden states of the built-in English sample; give new-domain text with --calibration "
                        "(or counts with --profile)")
    summary = {**note, "target": plan.target.model_type, "old_experts": plan.old_experts, "experts": plan.experts,
               "top_k": plan.top_k, "init": opts.init, "router_init": opts.router_init, "moe_layers": len(plan.layers),
               "trainable_tensors": sum(v != "frozen" for v in plan.freeze["tensors"].values()),
               "dtype": str(out_dtype).removeprefix("torch.")}
    result = write_model(
        opts.output, ckpt, plan.outputs, config=set_dtype(plan.config, out_dtype), operation="add-experts",
        options=opts.model_dump(mode="json"), layers=plan.layers, summary=summary, extra={"freeze": plan.freeze},
        title=f"{plan.target.architecture} with {opts.new_experts} new experts per layer",
        what=(f"`{ckpt.path.name}` with {plan.old_experts} experts per MoE layer, plus {opts.new_experts} new ones "
              f"(ids {plan.old_experts}-{plan.experts - 1}, init {opts.init}, router rows {opts.router_init}) for a new "
              "data distribution. `moekit.json` carries the freeze manifest (old experts, old router rows and the "
              "rest of the network frozen) that `moekit train` applies."),
        max_shard_size=parse_size(opts.max_shard_size), overwrite=opts.overwrite, progress=progress)
    if opts.drift_tokens:
        summary["drift"] = _drift(ckpt, result.path, opts, device)
    return result, summary


def _usage(ckpt: Checkpoint, opts: AddExpertsOptions, layers: list[int],
           states: Callable[[tuple[int, ...]], dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """Tokens routed to each old expert per layer: from a profile JSON, or counted on --calibration."""
    if opts.profile:
        return usage_from_profile(opts.profile, layers)
    t = TARGETS[ckpt.config["model_type"]]
    counts = {}
    for i, x in states(tuple(layers)).items():
        w = ckpt.load(t.router.format(i=i), torch.float32).to(x.device)
        bias = ckpt.load(t.router_bias.format(i=i), torch.float32).to(x.device) if t.router_bias else None
        picked = select_experts(t.routing, x @ w.T, ckpt.config["num_experts_per_tok"], bias)
        counts[i] = torch.bincount(picked.flatten(), minlength=w.shape[0]).cpu()
    return counts


def _kmeans_rows(ckpt: Checkpoint, opts: AddExpertsOptions, states: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """New router rows from k-means of new-domain states, made to compete with the old rows on
    equal terms: the old rows' mean norm, then shifted along the states' mean direction until
    each new row's mean logit on the new domain equals the old rows' mean logit. Raw centroids
    point along the mean hidden state, which every token shares, so they out-score rows that were
    not fitted to it and take every token (measured: 99.7% of slots on SmolLM2)."""
    t = TARGETS[ckpt.config["model_type"]]
    rows = kmeans_router_rows(states, opts.new_experts, seed=opts.seed)
    for i, x in states.items():
        old = ckpt.load(t.router.format(i=i), torch.float32).to(x.device)
        r = rows[i].float()
        r = r / r.norm(dim=1, keepdim=True) * old.norm(dim=1).mean()
        mean_dir = torch.nn.functional.normalize(x.mean(0), dim=0)
        shift = ((x @ old.T).mean() - (x @ r.T).mean(0)) / (x @ mean_dir).mean()
        rows[i] = (r + shift[:, None] * mean_dir).cpu()
    return rows


def usage_from_profile(path, layers: list[int]) -> dict[int, torch.Tensor]:
    try:
        report = json.loads(path.read_text())
        per_layer = {int(r["layer"]): torch.tensor(r["tokens_per_expert"]) for r in report["layers"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MoekitError(f"{path}: not a `moekit profile --json` report with per-layer tokens_per_expert ({e})") from None
    missing = [i for i in layers if i not in per_layer]
    if missing:
        raise MoekitError(f"{path}: the profile has no counts for MoE layer(s) {missing}")
    return per_layer


def _new_domain_states(ckpt: Checkpoint, opts: AddExpertsOptions, layers: list[int], device):
    """Hidden states on --calibration, or on the built-in sample when none is given (the plain
    invocation works; the summary's note says which text it was)."""
    return calibration_mlp_inputs(ckpt.path, layers, opts.calibration, opts.calibration_tokens, device,
                                  allow_pickle=opts.allow_pickle)


def _drift(ckpt: Checkpoint, output, opts: AddExpertsOptions, device) -> dict:
    """verify's numbers for the grown model against its source, on old-domain (built-in) text."""
    from moekit.runtime.models import load_model, load_tokenizer
    from moekit.data.text import builtin_calibration_text
    from moekit.jobs.verify import compare_models, make_inputs, vocab_size

    parent, child = (load_model(p, torch.float32, device, allow_pickle=opts.allow_pickle)[0] for p in (ckpt.path, output))
    try:
        tokenizer = load_tokenizer(ckpt.path)
    except MoekitError:
        tokenizer = None  # no tokenizer: random ids
    texts = builtin_calibration_text() if tokenizer is not None else None
    batches = make_inputs(vocab_size(parent), opts.drift_tokens, 4, 256, opts.seed, tokenizer=tokenizer, texts=texts,
                          what="the built-in sample")
    r = compare_models(parent, child, batches)
    return {"text": "built-in English sample" if tokenizer else "random ids", "tokens": r["tokens"],
            "max_rel_error": r["max_rel_error"], "top1_agreement": r["top1_agreement"], "kl_per_token": r["kl_per_token"]}
