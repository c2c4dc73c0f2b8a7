from __future__ import annotations

from moekit.commands.common import command, err, print_json
from moekit.options import TrainRunOptions


@command(TrainRunOptions)
def train_command(opts: TrainRunOptions) -> None:
    """Train an MoE (or its dense parent): continued pretraining of an upcycled, split or grown
    model (`--freeze none`), or only the new experts of a grown one (`--freeze manifest`).

    Built on the transformers Trainer: fp32 master weights, bf16 autocast on the GPU with the
    fused experts' matmuls in bf16 (moekit_grouped_mm), warm-up + constant/cosine/WSD schedule with a
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
    from moekit.jobs.train import run_train

    def show(logs: dict) -> None:
        if opts.json_output:
            return
        if "eval_loss" in logs:
            err.print(f"step {logs['step']}  held-out loss {logs['eval_loss']:.4f}", highlight=False)
        if "loss" not in logs:
            return
        parts = [f"step {logs['step']}/{logs['max_steps']}", f"loss {logs['loss']:.4f}"]
        parts += [f"{k} {logs[k]:.4g}" for k in ("lm_loss", "kd_loss", "aux_loss", "z_loss", "maxvio_batch",
                                                  "drop_rate_cf1", "learning_rate") if k in logs]
        err.print("  ".join(parts), highlight=False)

    def announce(line: str) -> None:
        if not opts.json_output:
            err.print(line, highlight=False)

    summary = run_train(opts, show, announce)
    if "output" not in summary:  # not the main process of a multi-GPU run: it writes nothing
        return
    if opts.json_output:
        print_json(summary)
    else:
        err.print(f"[green]wrote[/] {summary['output']}: {summary['steps']} steps, {summary['tokens']:,} tokens on "
                  f"{summary['devices']} in {summary['train_seconds']} s; {summary['trainable_params']:,} weights "
                  f"trained, {summary['frozen_params']:,} frozen; experts {summary['experts']}"
                  + (f"; peak {summary['peak_memory_gib']} GiB" if summary["peak_memory_gib"] else "")
                  + (f"; held-out loss {summary['first_eval_loss']:.4f} -> {summary['last_eval_loss']:.4f}"
                     if summary["last_eval_loss"] is not None else ""), highlight=False)
