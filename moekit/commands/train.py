from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from moekit.commands.common import JsonOpt, OutputArg, OverwriteOpt, err, handle_errors, print_json
from moekit.data import FORMATS as TEXT_FORMATS
from moekit.errors import MoekitError, UsageError

DataOpt = Annotated[Path, typer.Option(help=f"New-domain text: {TEXT_FORMATS}.", show_default=False)]


@handle_errors
def train_command(
    model: Annotated[str, typer.Argument(help="MoE model folder (from `moekit add-experts`, or any safetensors MoE folder).", show_default=False)],
    output: OutputArg,
    data: DataOpt,
    replay: Annotated[Optional[Path], typer.Option(help=f"Old-domain text mixed in, {TEXT_FORMATS}. With --kd-weight, distilled from the old model (not LM-trained); without, trained on like --data.", show_default=False)] = None,
    replay_ratio: Annotated[float, typer.Option(min=0.0, max=0.95, help="Share of training rows taken from --replay.")] = 0.25,
    freeze: Annotated[str, typer.Option(help="manifest (MODEL's moekit.json), none (train everything), or a JSON file holding a manifest.")] = "manifest",
    kd_weight: Annotated[float, typer.Option(min=0.0, help="λ of KL(old model ‖ new model) per token (Lifelong-MoE); 0: no teacher.")] = 0.0,
    aux_loss_coef: Annotated[float, typer.Option(min=0.0, help="α of the Switch balance loss, per layer from router logits.")] = 0.0,
    balance: Annotated[str, typer.Option(help="Where the Switch loss counts expert loads: global (the whole step: every micro-batch so far and every GPU; Qwen) or micro (each micro-batch).")] = "global",
    z_loss_coef: Annotated[float, typer.Option(min=0.0, help="Coefficient of the router z-loss mean(logsumexp(logits)²).")] = 0.0,
    bias_update_rate: Annotated[float, typer.Option(min=0.0, help="u of loss-free balancing on e_score_correction_bias (GLM-4.5/DeepSeek-V3 family); 0: off.")] = 1e-3,
    bias_update: Annotated[str, typer.Option(help="Loss-free step: fixed (u every step, DeepSeek) or adaptive (at most u, Rprop, as `moekit balance`).")] = "fixed",
    steps: Annotated[int, typer.Option(min=1, help="Optimiser steps.")] = 100,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (AdamW).")] = 1e-4,
    lr_schedule: Annotated[str, typer.Option(help="After the warm-up: constant, cosine (down to the floor) or wsd (stable, then a cosine decay over --decay-share of the steps).")] = "constant",
    min_lr_ratio: Annotated[float, typer.Option(min=0.0, max=1.0, help="Floor of cosine and wsd, as a share of --lr.")] = 0.1,
    decay_share: Annotated[float, typer.Option(min=0.0, max=1.0, help="wsd: share of the steps that decay.")] = 0.2,
    max_grad_norm: Annotated[float, typer.Option(min=0.0, help="Clip the gradient norm to this; 0: no clipping.")] = 1.0,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per device per micro-batch.")] = 8,
    grad_accum: Annotated[int, typer.Option(min=1, help="Micro-batches per optimiser step.")] = 1,
    seq_len: Annotated[int, typer.Option(min=2, help="Tokens per row.")] = 512,
    weight_decay: Annotated[float, typer.Option(min=0.0, help="AdamW decoupled weight decay (never applied to frozen weights).")] = 0.0,
    warmup_steps: Annotated[int, typer.Option(min=0, help="Linear learning-rate warm-up steps.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of data order and replay sampling.")] = 0,
    log_every: Annotated[int, typer.Option(min=1, help="Log losses, MaxVio and drop rates every N steps.")] = 10,
    eval_data: Annotated[Optional[Path], typer.Option(help=f"Held-out text, {TEXT_FORMATS}: its loss before training, every --eval-every steps and at the end.", show_default=False)] = None,
    eval_share: Annotated[float, typer.Option(min=0.0, max=0.5, help="Without --eval-data: hold out this share of --data's rows for evaluation.")] = 0.0,
    eval_every: Annotated[int, typer.Option(min=1, help="Evaluate every N steps.")] = 50,
    save_every: Annotated[int, typer.Option(min=0, help="Checkpoint every N steps (into --checkpoint-dir); 0: none.")] = 0,
    checkpoint_dir: Annotated[Optional[Path], typer.Option(help="Where checkpoints go. [default: OUTPUT.checkpoints]", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in --checkpoint-dir (same options).")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute activations in the backward pass: less memory, about a third more compute.")] = False,
    experts_implementation: Annotated[str, typer.Option(help="transformers 5.x fused experts: grouped_mm, batched_mm or eager (bf16 under autocast either way); 4.x loops over expert modules.")] = "grouped_mm",
    device: Annotated[str, typer.Option(help="auto (GPU(s) when present; every GPU under `accelerate launch`) or cpu.")] = "auto",
    overwrite: OverwriteOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Train an MoE (or its dense parent): continued pretraining of an upcycled, split or grown
    model (`--freeze none`), or only the new experts of a grown one (`--freeze manifest`).

    Built on the transformers Trainer: fp32 master weights, bf16 autocast on the GPU with the
    fused experts' matmuls in bf16 (grouped_mm), warm-up + constant/cosine/WSD schedule with a
    floor, gradient clipping, held-out evaluation, checkpoints and `--resume`, the loss curve
    written beside the model (training_curve.json / .png). With `--freeze manifest`, frozen
    tensors get no gradient and frozen slices (old experts inside fused expert tensors, old router
    rows) are gradient-masked and restored after every optimiser step: bit-identical at the end.
    `--kd-weight` distils from the model as it was (Lifelong-MoE); `--aux-loss-coef` adds the
    Switch balance loss; GLM-4.5/DeepSeek-V3-family routers get loss-free bias balancing. MaxVio_batch
    is logged. OUTPUT has the input's tensor names, config.json and tokenizer files: stock
    transformers 4.57 and 5.x load it. Multi-GPU (DDP, one process per GPU):
    `accelerate launch -m moekit train ...`

    Examples:

        moekit train ./smol-8x2 ./smol-8x2-cpt --freeze none --data code.txt --eval-share 0.02 --lr-schedule cosine --warmup-steps 30 --aux-loss-coef 0.01 --batch-size 16 --seq-len 1024 --save-every 100
        moekit train ./smol-8x2 ./smol-8x2-cpt --freeze none --data code.txt --eval-share 0.02 --lr-schedule cosine --warmup-steps 30 --aux-loss-coef 0.01 --batch-size 16 --seq-len 1024 --save-every 100 --resume
        moekit train ./smol-6x2 ./smol-6x2-fr --data fr.txt --steps 300
        moekit train ./smol-6x2 ./smol-6x2-fr --data fr.jsonl --replay en.txt --kd-weight 1
        moekit train ./smol-6x2 ./smol-full --data fr.txt --freeze none
        accelerate launch -m moekit train ./big-moe ./out --data corpus.parquet --batch-size 4
    """
    from moekit.hf import load_tokenizer
    from moekit.training import (TrainOptions, check_options, check_run, checkpoint_folder, last_checkpoint, load_text_rows,
                                 read_manifest, train_model)

    # Everything that can be wrong with the options fails now, before minutes of loading.
    if device not in ("auto", "cpu"):
        raise UsageError(f"--device {device!r}: use auto or cpu (accelerate picks the GPUs)")
    for path in (data, replay, eval_data):
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
    opts = TrainOptions(steps=steps, lr=lr, lr_schedule=lr_schedule, min_lr_ratio=min_lr_ratio, decay_share=decay_share,
                        batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, weight_decay=weight_decay,
                        warmup_steps=warmup_steps, max_grad_norm=max_grad_norm, kd_weight=kd_weight,
                        aux_loss_coef=aux_loss_coef, balance=balance, z_loss_coef=z_loss_coef,
                        bias_update_rate=bias_update_rate, bias_update=bias_update, replay_ratio=replay_ratio,
                        eval_share=0.0 if eval_data else eval_share, eval_every=eval_every, save_every=save_every,
                        gradient_checkpointing=gradient_checkpointing, experts_implementation=experts_implementation,
                        seed=seed, log_every=log_every, device=device)
    check_options(opts)
    check_run(model, output, manifest, overwrite)
    if resume:
        last_checkpoint(checkpoint_folder(output, checkpoint_dir))
    tokenizer = load_tokenizer(model)
    new_rows = load_text_rows(data, tokenizer, seq_len)
    replay_rows = load_text_rows(replay, tokenizer, seq_len) if replay else None
    eval_rows = load_text_rows(eval_data, tokenizer, seq_len) if eval_data else None
    if not json_output:
        err.print(f"{len(new_rows):,} rows of {seq_len} tokens from {data}"
                  + (f", {len(replay_rows):,} from {replay}" if replay_rows else "")
                  + (f", {len(eval_rows):,} held out in {eval_data}" if eval_rows else ""), highlight=False)

    def show(logs: dict) -> None:
        if json_output:
            return
        if "eval_loss" in logs:
            err.print(f"step {logs['step']}  held-out loss {logs['eval_loss']:.4f}", highlight=False)
        if "loss" not in logs:
            return
        parts = [f"step {logs['step']}/{logs['max_steps']}", f"loss {logs['loss']:.4f}"]
        parts += [f"{k} {logs[k]:.4g}" for k in ("lm_loss", "kd_loss", "aux_loss", "z_loss", "maxvio_batch",
                                                  "drop_rate_cf1", "learning_rate") if k in logs]
        err.print("  ".join(parts), highlight=False)

    summary = train_model(model, output, new_rows, replay_rows, manifest, opts, eval_rows=eval_rows,
                          checkpoints=checkpoint_dir, resume=resume, overwrite=overwrite, on_log=show,
                          record={"data": str(data), "replay": str(replay) if replay else None, "freeze": freeze,
                                  "eval_data": str(eval_data) if eval_data else None})
    if "output" not in summary:  # not the main process of a multi-GPU run: it writes nothing
        return
    if json_output:
        print_json(summary)
    else:
        err.print(f"[green]wrote[/] {summary['output']}: {summary['steps']} steps, {summary['tokens']:,} tokens on "
                  f"{summary['devices']} in {summary['train_seconds']} s; {summary['trainable params']:,} weights trained, "
                  f"{summary['frozen params']:,} frozen; experts {summary['experts']}"
                  + (f"; peak {summary['peak memory GiB']} GiB" if summary["peak memory GiB"] else "")
                  + (f"; held-out loss {summary['first eval loss']:.4f} -> {summary['last eval loss']:.4f}"
                     if summary["last eval loss"] is not None else ""), highlight=False)
