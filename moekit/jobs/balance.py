"""Loss-free balancing (DeepSeek, arXiv 2408.15664) of a sigmoid-routed MoE, without training.

Sigmoid routers (DeepSeek-V3, GLM-4.5, dots1) choose experts on `score + e_score_correction_bias`
and weight them by the unbiased score. After each calibration batch every layer's bias moves
`b_i += u · sign(c̄ − c_i)`: starved experts become more attractive, overloaded ones less, while
the weights of the experts a token gets stay what the router computes. No gradients; the bias is
kept in fp32. The result is a copy of the checkpoint with only those biases changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ContextManager

import torch

from moekit.arch.families import MOE_CONFIG, SIGMOID_BIASED
from moekit.checkpoint import Checkpoint, OutputTensor, TensorMeta, passthrough
from moekit.checkpoint.writer import DEFAULT_MAX_SHARD_SIZE, check_target
from moekit.checkpoint import open_checkpoint
from moekit.data.text import calibration_texts, read_texts
from moekit.errors import MoekitError
from moekit.jobs.profile import Domain, profile, token_rows
from moekit.options import BalanceOptions
from moekit.metrics import bias_state, bias_step
from moekit.report.write import Progress, WriteResult, write_model
from moekit.runtime.decoder import input_device, run_decoder
from moekit.runtime.models import load_model, load_tokenizer, run_settings
from moekit.runtime.moe import MoEModel, RoutingCounter, find_moe_layers

BIAS = "e_score_correction_bias"
BIASED_FAMILIES = tuple(t for t, f in MOE_CONFIG.items() if f.routing is SIGMOID_BIASED)


def check_balanceable(config: dict) -> None:
    """Refuse, with the reason, a model whose routing has no selection bias to calibrate."""
    model_type = config.get("model_type", "?")
    fields = MOE_CONFIG.get(model_type)
    if fields is None:
        raise MoekitError(f"nothing to balance: {model_type!r} has no MoE layers moekit knows; upcycle it first")
    if fields.routing is not SIGMOID_BIASED:
        raise MoekitError(f"balance calibrates {BIAS}, which only sigmoid routers have ({', '.join(BIASED_FAMILIES)}); "
                          f"{model_type} routes by {fields.routing.formula}: balance it with an auxiliary loss in training")


@torch.no_grad()
def calibrate_bias(model, moe: MoEModel, batches: list[torch.Tensor], steps: int, rate: float, adaptive: bool = True,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
    """Run `steps` batches (cycling through `batches`) and update every layer's bias after each.
    Returns the calibrated biases by checkpoint key, fp32 on the CPU; the model keeps them.

    Fixed (DeepSeek): every step is `rate`. Adaptive: `rate` is the largest step; each expert's
    step grows ×1.2 while its direction holds and halves when it flips (Rprop). Where sigmoid
    scores saturate, experts differ by 1e-5 or less and a fixed 1e-3 only flips the ranking to
    and fro; the adaptive step shrinks to the scale that balances them.

    The bias returned (and left in the model) is the mean over the last half of the steps: each
    step reacts to one batch's counts, so the last iterate carries that batch's noise, and the
    average of iterates around the balance point does not (Polyak averaging).
    """
    layers = []
    for layer in moe.layers:
        if not hasattr(layer.router, BIAS):
            raise MoekitError(f"{layer.name} has no {BIAS}")
        # An fp32 master copy replaces the buffer, so that the model routes with it as it moves
        # (transformers 4.57 casts buffers to the model dtype; bf16 would swallow steps of 1e-3).
        bias = getattr(layer.router, BIAS).detach().float().clone()
        setattr(layer.router, BIAS, bias)
        layers.append((layer, bias, *bias_state(bias, rate), torch.zeros_like(bias)))
    device = input_device(model)
    averaged_from = steps // 2
    with RoutingCounter(moe) as counter:
        for step in range(steps):
            run_decoder(model, batches[step % len(batches)].to(device))
            for layer, bias, size, last, total in layers:
                bias_step(bias, counter.last[layer.index], size, last, rate, adaptive)
                if step >= averaged_from:
                    total.add_(bias)
            if progress:
                progress(step + 1, steps)
    for _, bias, _, _, total in layers:
        bias.copy_(total / (steps - averaged_from))
    return {f"{layer.name}.{BIAS}": bias.cpu() for layer, bias, *_ in layers}


def write_balanced(ckpt: Checkpoint, output: Path, biases: dict[str, torch.Tensor], *, options: dict,
                   layers: list[dict], summary: dict, overwrite: bool, progress: Progress | None = None) -> WriteResult:
    """A copy of `ckpt` whose correction biases are `biases` (fp32); every other tensor passes
    through unchanged, streamed one at a time."""
    outputs = []
    for name, meta in ckpt.tensors.items():
        if name in biases:
            outputs.append(OutputTensor(TensorMeta(name, meta.shape, torch.float32), lambda b=biases[name]: b))
        else:
            outputs.append(passthrough(ckpt, meta, None))
    # A checkpoint may lack the biases (transformers then starts them at zero): add them.
    outputs += [OutputTensor(TensorMeta(name, tuple(b.shape), torch.float32), lambda b=b: b)
                for name, b in biases.items() if name not in ckpt.tensors]
    return write_model(
        output, ckpt, outputs, config=ckpt.config, operation="balance", options=options, layers=layers, summary=summary,
        title=f"{ckpt.path.name}, routing balanced (loss-free bias)",
        what=(f"`{ckpt.path.name}` with its `{BIAS}` calibrated by DeepSeek's loss-free balancing on "
              "calibration text: the experts a token is sent to changed, the weights and every other tensor did not."),
        max_shard_size=DEFAULT_MAX_SHARD_SIZE, overwrite=overwrite, progress=progress)


def run_balance(opts: BalanceOptions, progress_for: Callable[[str], ContextManager],
                bytes_progress: Callable[[], ContextManager]) -> tuple[WriteResult, dict, list[dict]]:
    """The balance job: calibrate the correction biases on text, measure MaxVio on held-out text
    before and after, write the model; (result, summary, per-layer rows). `progress_for(label)` and
    `bytes_progress()` give the progress callbacks of the batch loops and of the writer."""
    where, torch_dtype = run_settings(opts.device, opts.dtype)
    ckpt = open_checkpoint(opts.model)
    check_balanceable(ckpt.config)
    check_target(opts.output, [ckpt.path], opts.overwrite)  # before minutes of calibration, not after
    tokenizer = load_tokenizer(opts.model)
    what = str(opts.data) if opts.data else "the built-in sample"
    rows = token_rows(calibration_texts(opts.data), tokenizer, opts.seq_len, opts.max_tokens, what)
    # Shuffled (seeded): consecutive sequences come from the same document, and a bias that
    # chases one document per batch does not balance the whole text.
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]
    if opts.eval_data:
        held = token_rows(read_texts(opts.eval_data), tokenizer, opts.seq_len, opts.max_tokens, str(opts.eval_data))
    elif len(rows) < 2:
        raise MoekitError(f"{what}: one sequence of {opts.seq_len} tokens; calibration and held-out text need two "
                          "(or give --eval-data)")
    else:
        split = len(rows) - max(1, len(rows) // 4)
        rows, held = rows[:split], rows[split:]
    loaded, warnings = load_model(opts.model, torch_dtype, where, complete=True)
    moe = find_moe_layers(loaded)
    held_out = [Domain("held-out", list(held.split(opts.batch_size)))]
    with progress_for("MaxVio before") as progress:
        before = profile(loaded, held_out, progress=progress)
    with progress_for("calibrating") as progress:
        biases = calibrate_bias(loaded, moe, list(rows.split(opts.batch_size)), opts.steps, opts.rate,
                                not opts.fixed_rate, progress)
    with progress_for("MaxVio after") as progress:
        after = profile(loaded, held_out, progress=progress)

    layers = []
    for layer, b, a in zip(moe.layers, before["layers"], after["layers"]):
        bias = biases[f"{layer.name}.{BIAS}"]
        layers.append({"layer": layer.index, "maxvio_before": b["maxvio_global"], "maxvio_after": a["maxvio_global"],
                       "bias_min": bias.min().item(), "bias_max": bias.max().item()})
    summary = {"maxvio_global_before": before["total"]["maxvio_global"],
               "maxvio_global_after": after["total"]["maxvio_global"],
               "worst_layer_before": max(x["maxvio_before"] for x in layers),
               "worst_layer_after": max(x["maxvio_after"] for x in layers),
               "steps": opts.steps, "rate": opts.rate, "calibration_tokens": rows.numel(),
               "held_out_tokens": held.numel()}
    options = {"data": str(opts.data) if opts.data else "built-in sample",
               "eval_data": str(opts.eval_data) if opts.eval_data else None, "rate": opts.rate, "steps": opts.steps,
               "fixed_rate": opts.fixed_rate, "max_tokens": opts.max_tokens, "batch_size": opts.batch_size,
               "seq_len": opts.seq_len, "dtype": str(torch_dtype)}
    with bytes_progress() as progress:
        result = write_balanced(ckpt, opts.output, biases, options=options, layers=layers, summary=summary,
                                overwrite=opts.overwrite, progress=progress)
    result.warnings[:0] = warnings  # loading warnings first, as they came
    return result, summary, layers
