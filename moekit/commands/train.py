from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from moekit.commands.common import JsonOpt, OutputArg, OverwriteOpt, err, handle_errors, print_json
from moekit.errors import MoekitError, UsageError

DataOpt = Annotated[Path, typer.Option(help="New-domain text: .txt (paragraphs), .jsonl/.json or .parquet with a \"text\" column.", show_default=False)]


@handle_errors
def train_command(
    model: Annotated[str, typer.Argument(help="MoE model folder (from `moekit add-experts`, or any safetensors MoE folder).", show_default=False)],
    output: OutputArg,
    data: DataOpt,
    replay: Annotated[Optional[Path], typer.Option(help="Old-domain text mixed in (same formats): with --kd-weight, distilled from the old model (not LM-trained); without, trained on like --data.", show_default=False)] = None,
    replay_ratio: Annotated[float, typer.Option(min=0.0, max=0.95, help="Share of training rows taken from --replay.")] = 0.25,
    freeze: Annotated[str, typer.Option(help="manifest (MODEL's moekit.json), none (train everything), or a JSON file holding a manifest.")] = "manifest",
    kd_weight: Annotated[float, typer.Option(min=0.0, help="λ of KL(old model ‖ new model) per token (Lifelong-MoE); 0: no teacher.")] = 0.0,
    aux_loss_coef: Annotated[float, typer.Option(min=0.0, help="α of the Switch balance loss, per layer from router logits.")] = 0.0,
    bias_update_rate: Annotated[float, typer.Option(min=0.0, help="u of loss-free balancing on e_score_correction_bias (GLM-4.5/DeepSeek-V3 family); 0: off.")] = 1e-3,
    steps: Annotated[int, typer.Option(min=1, help="Optimiser steps.")] = 100,
    lr: Annotated[float, typer.Option(min=0.0, help="Learning rate (AdamW, constant after warm-up).")] = 1e-4,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per device per micro-batch.")] = 8,
    grad_accum: Annotated[int, typer.Option(min=1, help="Micro-batches per optimiser step.")] = 1,
    seq_len: Annotated[int, typer.Option(min=2, help="Tokens per row.")] = 512,
    weight_decay: Annotated[float, typer.Option(min=0.0, help="AdamW decoupled weight decay (never applied to frozen weights).")] = 0.0,
    warmup_steps: Annotated[int, typer.Option(min=0, help="Linear learning-rate warm-up steps.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of data order and replay sampling.")] = 0,
    log_every: Annotated[int, typer.Option(min=1, help="Log losses and MaxVio every N steps.")] = 10,
    device: Annotated[str, typer.Option(help="auto (GPU(s) when present; every GPU under `accelerate launch`) or cpu.")] = "auto",
    overwrite: OverwriteOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Train an MoE with its freeze manifest applied: new experts learn, the old ones stay exact.

    Built on the transformers Trainer. With `--freeze manifest` (from `moekit add-experts`), frozen
    tensors get no gradient and frozen slices (old experts inside fused expert tensors, old router
    rows) are gradient-masked and restored after every optimiser step: bit-identical at the end.
    `--kd-weight` distils from the model as it was (Lifelong-MoE); `--aux-loss-coef` adds the
    Switch balance loss; GLM-4.5/DeepSeek-V3-family routers get loss-free bias balancing. MaxVio_batch
    is logged. OUTPUT has the input's tensor names, config.json and tokenizer files: stock
    transformers 4.57 and 5.x load it. Multi-GPU (DDP, one process per GPU):
    `accelerate launch -m moekit train ...`

    Examples:

        moekit train ./smol-6x2 ./smol-6x2-fr --data fr.txt --steps 300
        moekit train ./smol-6x2 ./smol-6x2-fr --data fr.jsonl --replay en.txt --kd-weight 1
        moekit train ./smol-6x2 ./smol-full --data fr.txt --freeze none
        accelerate launch -m moekit train ./big-moe ./out --data corpus.parquet --batch-size 4
    """
    from moekit.hf import load_tokenizer
    from moekit.training import TrainOptions, check_run, load_text_rows, read_manifest, train_model

    # Everything that can be wrong with the options fails now, before minutes of loading.
    if device not in ("auto", "cpu"):
        raise UsageError(f"--device {device!r}: use auto or cpu (accelerate picks the GPUs)")
    for path in (data, replay):
        if path is not None and not path.is_file():
            raise MoekitError(f"{path}: no such data file")
    if freeze == "manifest":
        manifest = read_manifest(model)
    elif freeze == "none":
        manifest = None
    elif Path(freeze).suffix == ".json" or Path(freeze).is_file():
        manifest = read_manifest(freeze)
    else:
        raise UsageError(f"--freeze {freeze!r}: use manifest, none, or a JSON file")
    check_run(model, output, manifest, overwrite)
    opts = TrainOptions(steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len,
                        weight_decay=weight_decay, warmup_steps=warmup_steps, kd_weight=kd_weight,
                        aux_loss_coef=aux_loss_coef, bias_update_rate=bias_update_rate, replay_ratio=replay_ratio,
                        seed=seed, log_every=log_every, device=device)
    tokenizer = load_tokenizer(model)
    new_rows = load_text_rows(data, tokenizer, seq_len)
    replay_rows = load_text_rows(replay, tokenizer, seq_len) if replay else None
    if not json_output:
        err.print(f"{len(new_rows):,} rows of {seq_len} tokens from {data}"
                  + (f", {len(replay_rows):,} from {replay}" if replay_rows else ""), highlight=False)

    def show(logs: dict) -> None:
        if json_output or "loss" not in logs:
            return
        parts = [f"step {logs['step']}/{logs['max_steps']}", f"loss {logs['loss']:.4f}"]
        parts += [f"{k} {logs[k]:.4g}" for k in ("lm_loss", "kd_loss", "aux_loss", "maxvio_batch") if k in logs]
        err.print("  ".join(parts), highlight=False)

    summary = train_model(model, output, new_rows, replay_rows, manifest, opts, overwrite=overwrite, on_log=show,
                          record={"data": str(data), "replay": str(replay) if replay else None, "freeze": freeze})
    if "output" not in summary:  # not the main process of a multi-GPU run: it writes nothing
        return
    if json_output:
        print_json(summary)
    else:
        err.print(f"[green]wrote[/] {summary['output']}: {summary['steps']} steps, {summary['tokens']:,} tokens on "
                  f"{summary['devices']} in {summary['train_seconds']} s; {summary['trainable params']:,} weights trained, "
                  f"{summary['frozen params']:,} frozen", highlight=False)
