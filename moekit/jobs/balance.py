"""Loss-free balancing (DeepSeek, arXiv 2408.15664) of a sigmoid-routed MoE, without training.

Sigmoid routers (DeepSeek-V3, GLM-4.5, dots1) choose experts on `score + e_score_correction_bias`
and weight them by the unbiased score. After each calibration batch every layer's bias moves
`b_i += u · sign(c̄ − c_i)`: starved experts become more attractive, overloaded ones less, while
the weights of the experts a token gets stay what the router computes. No gradients; the bias is
kept in fp32. The result is a copy of the checkpoint with only those biases changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from moekit.arch.families import MOE_CONFIG, SIGMOID_BIASED
from moekit.checkpoint import Checkpoint, OutputTensor, TensorMeta, passthrough
from moekit.checkpoint.writer import DEFAULT_MAX_SHARD_SIZE
from moekit.errors import MoekitError
from moekit.metrics import bias_state, bias_step
from moekit.report.write import Progress, WriteResult, write_model
from moekit.runtime.decoder import input_device, run_decoder
from moekit.runtime.moe import MoEModel, RoutingCounter

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
