"""Speed of `moekit train` on the SmolLM2-135M shape upcycled to 8 experts top-2, against a plain
dense bf16 `Trainer` step, side by side in one run on one GPU (docs/benchmarks.md).

Weights are drawn at random (speed does not depend on them); the text is real (rows from
benchmarks/code_corpus.py), so both losses should fall. Runs, each `--steps` optimiser steps of
`--batch-size` × `--seq-len` tokens, timed from step `--timed-from` to the last (two device
synchronisations in all, so the clock holds the GPU's work and nothing more):

- dense_trainer_bf16: transformers `Trainer`, the dense model in bf16 weights, fused AdamW: the yardstick;
- dense_trainer_bf16_nosync: the same without the Trainer's two host synchronisations per step (its NaN
  filter and the blocking copy of each batch), as `moekit train` runs it;
- moekit_dense: `moekit train --freeze none` on the dense model (bf16 weights, fp32 master copies);
- moekit_8x2: `moekit train --freeze none --aux-loss-coef 0.01` on the 8 × top-2 upcycle
  (`moekit upcycle DENSE MOE -n 8 -k 2`), experts through moekit_grouped_mm, bf16 weights, fp32 masters;
- moekit_8x2_fp32: the same with `--weights fp32` (fp32 weights under bf16 autocast, the default until 2026-12-02);
- moekit_8x2_transformers_experts: the same with transformers' grouped_mm experts function;
- moekit_dense_before / moekit_8x2_before: the same runs of the moekit at `--before` (another
  checkout's folder), in a child process: before and after side by side;
- moekit_8x2_checkpointing: moekit_8x2 with `--gradient-checkpointing`;
- moekit_8x2_two_at_once: two moekit_8x2 processes on the GPU at once (throughput gain over one).

Each run has a fresh process of its own, one after another.

With `--profile DIR`, the `--profile-steps` steps after the timed ones run under torch.profiler
and CUDA's sync debug mode: DIR/NAME.txt gets the GPU-busy share of the wall time, the kernels
and operators by time, and every host synchronisation by source line.

    python benchmarks/train_speed.py SKELETON ROWS.pt OUT.json
SKELETON: a folder with SmolLM2-135M's config.json and tokenizer files (`moekit convert` of the GGUF).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from moekit.training import TrainOptions, train_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class StepTimer(TrainerCallback):
    """Wall time from the end of step `start` to the end of step `stop`, GPU work included."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop, self.t0, self.ms_per_step = start, stop, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (self.start, self.stop):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            if state.global_step == self.start:
                self.t0 = now
            elif self.t0 is not None:
                self.ms_per_step = 1000 * (now - self.t0) / (self.stop - self.start)


class StepProfiler(TrainerCallback):
    """torch.profiler and CUDA's sync debug mode over steps start+1 .. stop; writes a report to `path`."""

    def __init__(self, start: int, stop: int, path: Path | None):
        self.start, self.stop, self.path, self.prof = start, stop, path, None
        self.syncs, self._warnings = None, None

    def on_step_end(self, args, state, control, **kwargs):
        if self.path is None or not torch.cuda.is_available():
            return
        if state.global_step == self.start:
            torch.cuda.synchronize()
            self._warnings = warnings.catch_warnings(record=True)
            self.syncs = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                           torch.profiler.ProfilerActivity.CUDA])
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif state.global_step == self.stop and self.prof is not None:
            torch.cuda.synchronize()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            torch.cuda.set_sync_debug_mode(0)
            self._warnings.__exit__(None, None, None)
            self.path.write_text(profile_report(self.prof, wall, self.stop - self.start, self.syncs))


def profile_report(prof, wall: float, steps: int, syncs: list) -> str:
    events = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1e3  # ms of kernel time (overlaps counted twice: rare here)
    lines = [f"{steps} steps, wall {1000 * wall / steps:.1f} ms/step, GPU kernels {busy / steps:.1f} ms/step "
             f"({100 * busy / (1000 * wall):.0f}% busy), {len(kernels) / steps:.0f} kernels/step", ""]
    where = Counter(f"{w.filename}:{w.lineno}: {str(w.message)[:80]}" for w in syncs if "synchroniz" in str(w.message))
    lines += [f"host synchronisations in these steps: {sum(where.values())}"] + [f"  {n:4d} x {k}" for k, n in
                                                                                 where.most_common(15)] + [""]
    lines.append(events.table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=90))
    lines.append(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=90))
    return "\n".join(lines)


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


def dense_trainer(folder: Path, rows: torch.Tensor, bench, nosync: bool = False, name: str = "") -> dict:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(DEVICE)
    data = [{"input_ids": r, "labels": r} for r in rows.long()]  # the model shifts the labels itself
    timer, prof = bench.callbacks(name)
    quiet = {"logging_nan_inf_filter": False, "accelerator_config": {"non_blocking": True}} if nosync else {}
    with tempfile.TemporaryDirectory() as work:
        args = TrainingArguments(output_dir=work, max_steps=bench.steps, per_device_train_batch_size=16,
                                 learning_rate=bench.lr, warmup_steps=min(10, bench.steps // 4),
                                 lr_scheduler_type="cosine", bf16=DEVICE == "cuda", use_cpu=DEVICE == "cpu",
                                 optim="adamw_torch_fused", logging_steps=bench.log_every, save_strategy="no",
                                 report_to="none", disable_tqdm=True, dataloader_drop_last=True, **quiet)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[timer, prof])
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


def moekit_run(folder: Path, rows: torch.Tensor, bench, name: str = "", **options) -> dict:
    timer, prof = bench.callbacks(name)
    losses: list[float] = []
    opts = TrainOptions(steps=bench.steps, lr=bench.lr, lr_schedule="cosine", warmup_steps=min(10, bench.steps // 4),
                        batch_size=16, seq_len=rows.shape[1], log_every=bench.log_every, **options)
    with tempfile.TemporaryDirectory() as out:
        summary = train_model(folder, Path(out) / "trained", rows.tolist(), None, None, opts,
                              on_log=lambda logs: losses.append(logs["loss"]) if "loss" in logs else None,
                              callbacks=[timer, prof])
    gc.collect()
    torch.cuda.empty_cache()
    return {"ms_per_step": timer.ms_per_step, "peak_gib": summary["peak_memory_gib"], "losses": losses,
            "first_loss": losses[0], "last_loss": losses[-1], "experts": summary["experts"],
            "weights": summary.get("weights", "fp32, bf16 autocast"), "options": options}  # --before: no key


@dataclass
class Bench:
    steps: int  # timed_to + profile_steps
    timed_from: int
    timed_to: int
    lr: float
    log_every: int
    profile: Path | None

    def callbacks(self, name: str) -> tuple[StepTimer, StepProfiler]:
        return (StepTimer(self.timed_from, self.timed_to),
                StepProfiler(self.timed_to, self.steps, self.profile / f"{name}.txt" if self.profile else None))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("skeleton", type=Path)
    ap.add_argument("rows", type=Path, help="train.pt from code_corpus.py")
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=40, help="the last timed step")
    ap.add_argument("--timed-from", type=int, default=5)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--profile", type=Path, help="a folder: profile --profile-steps steps after the timed ones")
    ap.add_argument("--profile-steps", type=int, default=4)
    ap.add_argument("--before", type=Path, help="a folder holding the moekit package to compare with (*_before runs)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "train-speed")
    ap.add_argument("--runs", default="dense_trainer_bf16,dense_trainer_bf16_nosync,moekit_dense,moekit_8x2")
    ap.add_argument("--in-process", action="store_true", help="run --runs in this process (each run is a child's)")
    args = ap.parse_args()
    extra = args.profile_steps if args.profile else 0
    bench = Bench(args.steps + extra, args.timed_from, args.steps, args.lr, args.log_every, args.profile)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    dense, moe = args.work / "dense", args.work / "moe-8x2"
    if not moe.exists():
        random_model(args.skeleton, dense)
        subprocess.run([sys.executable, "-m", "moekit", "upcycle", str(dense), str(moe), "-n", "8", "-k", "2",
                        "--dtype", "bfloat16"], check=True)
    if not args.runs:  # --runs "": only make the models (for other uses of them)
        return
    rows = torch.load(args.rows)[: bench.steps * 16]
    runs = {
        "dense_trainer_bf16": lambda: dense_trainer(dense, rows, bench, name="dense_trainer_bf16"),
        "dense_trainer_bf16_nosync": lambda: dense_trainer(dense, rows, bench, True, "dense_trainer_bf16_nosync"),
        "moekit_dense": lambda: moekit_run(dense, rows, bench, "moekit_dense"),
        "moekit_8x2": lambda: moekit_run(moe, rows, bench, "moekit_8x2", aux_loss_coef=0.01),
        "moekit_8x2_fp32": lambda: moekit_run(moe, rows, bench, "moekit_8x2_fp32", aux_loss_coef=0.01, weights="fp32"),
        "moekit_8x2_transformers_experts": lambda: moekit_run(moe, rows, bench, "moekit_8x2_transformers_experts",
                                                              aux_loss_coef=0.01, experts_implementation="grouped_mm"),
        "moekit_8x2_checkpointing": lambda: moekit_run(moe, rows, bench, "moekit_8x2_checkpointing",
                                                       aux_loss_coef=0.01, gradient_checkpointing=True),
    }
    import transformers

    results = {"setup": {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
                         "transformers": transformers.__version__, "steps": bench.steps, "timed_steps":
                         f"{args.timed_from + 1}-{args.steps}", "batch": f"16 x {rows.shape[1]}",
                         "log_every": args.log_every, "before": str(args.before) if args.before else None}, "runs": {}}

    def child(run: str, out: Path, env: dict | None = None) -> subprocess.Popen:
        """This script in another process, for one run (of another moekit with `env`)."""
        flags = ["--steps", str(args.steps), "--timed-from", str(args.timed_from), "--lr", str(args.lr),
                 "--log-every", str(args.log_every), "--work", str(args.work), "--runs", run, "--in-process"]
        if args.profile:
            flags += ["--profile", str(args.profile / "before" if env else args.profile),
                      "--profile-steps", str(args.profile_steps)]
        return subprocess.Popen([sys.executable, __file__, str(args.skeleton), str(args.rows), str(out), *flags],
                                stdout=subprocess.DEVNULL, env=env)

    def in_child(run: str, env: dict | None = None, tag: str = "") -> dict:
        """`run` alone in a fresh process: a run after another in the same process (after its
        profiler above all) timed up to 20% slower on the CPU side at equal GPU work."""
        out = args.work / f"{run}{tag}.json"
        if child(run, out, env).wait():
            raise RuntimeError("the run failed")
        return json.loads(out.read_text())["runs"][run]

    def before(run: str) -> dict:
        """`run` with the moekit package of --before, in a child process."""
        if not args.before:
            raise RuntimeError("--before FOLDER is needed for the *_before runs")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(args.before), os.environ.get("PYTHONPATH", "")])}
        return {**in_child(run, env, "-before"), "moekit": str(args.before)}

    def two_at_once() -> dict:
        """moekit_8x2 in two processes at once on the same GPU: does a second run fill what one leaves idle?"""
        outs = [args.work / f"two-{i}.json" for i in range(2)]
        if any(p.wait() for p in [child("moekit_8x2", o) for o in outs]):
            raise RuntimeError("a run failed")
        ms = [json.loads(o.read_text())["runs"]["moekit_8x2"]["ms_per_step"] for o in outs]
        one = results["runs"]["moekit_8x2"]["ms_per_step"]
        return {"ms_per_step_each": ms, "throughput_gain": 2 * one / (sum(ms) / 2)}

    def measure(name: str) -> dict:
        if args.in_process:
            return runs[name]()
        if name.endswith("_before"):
            return before(name.removesuffix("_before"))
        return two_at_once() if name == "moekit_8x2_two_at_once" else in_child(name)

    for name in filter(None, args.runs.split(",")):
        try:
            results["runs"][name] = measure(name)
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
