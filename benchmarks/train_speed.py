"""Speed of `moekit train` on the SmolLM2-135M shape upcycled to 8 experts top-2, against a plain
dense bf16 `Trainer` step, side by side in one run on one GPU (docs/benchmarks.md).

Weights are drawn at random (speed does not depend on them); the text is real (rows from
benchmarks/code_corpus.py), so both losses should fall. Runs, each `--steps` optimiser steps of
`--batch-size` × `--seq-len` tokens, timed from step `--timed-from` to the last (two device
synchronisations in all, so the clock holds the GPU's work and nothing more):

- dense_trainer_bf16: transformers `Trainer`, the dense model in bf16 weights, fused AdamW: the yardstick;
- moekit_dense: `moekit train --freeze none` on the dense model (fp32 master weights, bf16 autocast);
- moekit_8x2: `moekit train --freeze none --aux-loss-coef 0.01` on the 8 × top-2 upcycle
  (`moekit upcycle DENSE MOE -n 8 -k 2`), experts through grouped_mm in bf16;
- moekit_8x2_checkpointing: the same with `--gradient-checkpointing`;
- moekit_8x2_two_at_once: two moekit_8x2 processes on the GPU at once (throughput gain over one).

    python benchmarks/train_speed.py SKELETON ROWS.pt OUT.json
SKELETON: a folder with SmolLM2-135M's config.json and tokenizer files (`moekit convert` of the GGUF).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from moekit.training import TrainOptions, train_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class StepTimer(TrainerCallback):
    """Wall time from the end of step `start` to the end of the last step, GPU work included."""

    def __init__(self, start: int):
        self.start, self.t0, self.ms_per_step = start, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (self.start, state.max_steps):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            if state.global_step == self.start:
                self.t0 = now
            elif self.t0 is not None:
                self.ms_per_step = 1000 * (now - self.t0) / (state.max_steps - self.start)


def random_model(skeleton: Path, folder: Path, seed: int = 0) -> Path:
    """SmolLM2-135M's architecture with random weights (its own init), saved with its tokenizer."""
    config = AutoConfig.from_pretrained(skeleton)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    for f in skeleton.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation")) or f.suffix == ".jinja":
            shutil.copy(f, folder / f.name)
    shutil.copy(skeleton / "config.json", folder / "config.json")  # as moekit convert wrote it
    return folder


def dense_trainer(folder: Path, rows: torch.Tensor, steps: int, timed_from: int, lr: float) -> dict:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(DEVICE)
    data = [{"input_ids": r, "labels": r} for r in rows.long()]  # the model shifts the labels itself
    timer = StepTimer(timed_from)
    with tempfile.TemporaryDirectory() as work:
        args = TrainingArguments(output_dir=work, max_steps=steps, per_device_train_batch_size=16, learning_rate=lr,
                                 warmup_steps=min(10, steps // 4), lr_scheduler_type="cosine", bf16=DEVICE == "cuda",
                                 use_cpu=DEVICE == "cpu",
                                 optim="adamw_torch_fused", logging_steps=1, save_strategy="no", report_to="none",
                                 disable_tqdm=True, dataloader_drop_last=True)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {"ms_per_step": timer.ms_per_step,
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else None,
              "losses": losses, "first_loss": losses[0], "last_loss": losses[-1], "experts": "none (dense)",
              "weights": "bf16"}
    del trainer, model
    gc.collect()
    torch.cuda.empty_cache()
    return result


def moekit_run(folder: Path, rows: torch.Tensor, steps: int, timed_from: int, lr: float, **options) -> dict:
    timer = StepTimer(timed_from)
    losses: list[float] = []
    opts = TrainOptions(steps=steps, lr=lr, lr_schedule="cosine", warmup_steps=min(10, steps // 4), batch_size=16,
                        seq_len=rows.shape[1], log_every=1, **options)
    with tempfile.TemporaryDirectory() as out:
        summary = train_model(folder, Path(out) / "trained", rows.tolist(), None, None, opts,
                              on_log=lambda logs: losses.append(logs["loss"]) if "loss" in logs else None,
                              callbacks=[timer])
    gc.collect()
    torch.cuda.empty_cache()
    return {"ms_per_step": timer.ms_per_step, "peak_gib": summary["peak_memory_gib"], "losses": losses,
            "first_loss": losses[0], "last_loss": losses[-1], "experts": summary["experts"],
            "weights": "fp32 master, bf16 autocast", "options": options}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("skeleton", type=Path)
    ap.add_argument("rows", type=Path, help="train.pt from code_corpus.py")
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--timed-from", type=int, default=5)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "train-speed")
    ap.add_argument("--runs", default="dense_trainer_bf16,moekit_dense,moekit_8x2,moekit_8x2_checkpointing,"
                                      "moekit_8x2_two_at_once")
    args = ap.parse_args()
    rows = torch.load(args.rows)[: args.steps * 16]
    dense, moe = args.work / "dense", args.work / "moe-8x2"
    if not moe.exists():
        random_model(args.skeleton, dense)
        subprocess.run([sys.executable, "-m", "moekit", "upcycle", str(dense), str(moe), "-n", "8", "-k", "2",
                        "--dtype", "bfloat16"], check=True)
    runs = {
        "dense_trainer_bf16": lambda: dense_trainer(dense, rows, args.steps, args.timed_from, args.lr),
        "moekit_dense": lambda: moekit_run(dense, rows, args.steps, args.timed_from, args.lr),
        "moekit_8x2": lambda: moekit_run(moe, rows, args.steps, args.timed_from, args.lr, aux_loss_coef=0.01),
        "moekit_8x2_checkpointing": lambda: moekit_run(moe, rows, args.steps, args.timed_from, args.lr,
                                                       aux_loss_coef=0.01, gradient_checkpointing=True),
    }
    import transformers

    results = {"setup": {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
                         "transformers": transformers.__version__, "steps": args.steps, "timed_steps":
                         f"{args.timed_from + 1}-{args.steps}", "batch": f"16 x {rows.shape[1]}"}, "runs": {}}
    def two_at_once() -> dict:
        """moekit_8x2 in two processes at once on the same GPU: does a second run fill what one leaves idle?"""
        outs = [args.work / f"two-{i}.json" for i in range(2)]
        procs = [subprocess.Popen([sys.executable, __file__, str(args.skeleton), str(args.rows), str(o), "--steps",
                                   str(args.steps), "--timed-from", str(args.timed_from), "--work", str(args.work),
                                   "--runs", "moekit_8x2"], stdout=subprocess.DEVNULL) for o in outs]
        if any(p.wait() for p in procs):
            raise RuntimeError("a run failed")
        ms = [json.loads(o.read_text())["runs"]["moekit_8x2"]["ms_per_step"] for o in outs]
        one = results["runs"]["moekit_8x2"]["ms_per_step"]
        return {"ms_per_step_each": ms, "throughput_gain": 2 * one / (sum(ms) / 2)}

    runs["moekit_8x2_two_at_once"] = two_at_once
    for name in args.runs.split(","):
        try:
            results["runs"][name] = runs[name]()
        except Exception as e:  # one run failing must not cost the others their GPU time
            results["runs"][name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        r = results["runs"][name]
        print(name, {k: v for k, v in r.items() if k not in ("losses", "first_loss", "last_loss") or k == "last_loss"},
              flush=True)
        args.out.write_text(json.dumps(results, indent=1))
    base = results["runs"].get("dense_trainer_bf16", {}).get("ms_per_step")
    for r in results["runs"].values():
        if base and r.get("ms_per_step"):
            r["x_dense_trainer_bf16"] = round(r["ms_per_step"] / base, 3)
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps({k: {m: v.get(m) for m in ("ms_per_step", "x_dense_trainer_bf16", "peak_gib", "first_loss", "last_loss",
                                                "throughput_gain", "error") if m in v}
                      for k, v in results["runs"].items()}), flush=True)


if __name__ == "__main__":
    main()
