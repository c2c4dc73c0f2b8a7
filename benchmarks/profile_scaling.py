"""Data-parallel speed-up of `moekit profile`: the same batches counted by 1 process on 1 GPU and
by W processes on W GPUs (NCCL, launched by torchrun as `accelerate launch` would), in one run.

Each process builds the same random-weight Qwen3-MoE as benchmarks/profile_bench.py on its own GPU
and runs `count_routing` (the profile's whole counting pass: hooks, forward passes, the final
all-reduce of the counts) over its share of the batches. Time per round: from a barrier to the
moment the last process has its totals. Median of --rounds rounds, after one warm-up round.

    python benchmarks/profile_scaling.py [--gpus 2] [--iters 16] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from profile_bench import build  # noqa: E402  (the same model as the overhead benchmark)

from moekit.jobs.profile import Domain, count_routing, find_moe_layers  # noqa: E402


def worker(args) -> None:
    """One process of the data-parallel run (or the only one)."""
    rank = int(os.environ.get("RANK", 0))
    args.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    if args.device != "cpu":
        torch.cuda.set_device(args.device)
    model = build(args)
    moe = find_moe_layers(model)
    g = torch.Generator().manual_seed(0)  # every process makes the same batches and takes its share
    batches = [torch.randint(32000, (args.batch, args.seq_len), generator=g) for _ in range(args.iters)]
    domains = [Domain("bench", batches)]
    times = []
    for _ in range(args.rounds + 1):  # the first round warms up kernels, NCCL and the allocator
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        start = time.perf_counter()
        totals, run = count_routing(model, moe, domains)
        times.append(time.perf_counter() - start)
    if torch.distributed.is_initialized():  # the round lasts until the slowest process is done
        slowest = torch.tensor(times, device=args.device, dtype=torch.float64)
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
        times = slowest.tolist()
    if rank == 0:
        seconds = statistics.median(times[1:])
        Path(args.worker_json).write_text(json.dumps({
            "processes": run["processes"], "tokens": run["tokens"], "round_seconds": times[1:],
            "tokens_per_s": run["tokens"] / seconds, "counted_slots": sum(int(t["counts"].sum()) for t in totals.values()),
            "device": torch.cuda.get_device_name() if args.device != "cpu" else "cpu"}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def launch(processes: int, argv: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           __file__, *argv, "--worker-json", str(out)]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("layers", 24), ("hidden", 2048), ("experts", 64), ("top-k", 8), ("moe-width", 768),
                          ("batch", 8), ("seq-len", 2048), ("iters", 16), ("rounds", 3), ("gpus", 2)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--json", help="write the numbers here")
    ap.add_argument("--worker-json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_json:
        return worker(args)
    if not torch.cuda.is_available():
        print("no CUDA: processes share the CPU (gloo); a smoke run of this script, not a measurement")
    elif torch.cuda.device_count() < args.gpus:
        sys.exit(f"needs {args.gpus} CUDA devices, found {torch.cuda.device_count()}")
    argv = [a for a in sys.argv[1:] if not a.startswith("--json") and a != args.json]
    with tempfile.TemporaryDirectory() as tmp:
        one = launch(1, argv, Path(tmp) / "one.json")
        many = launch(args.gpus, argv, Path(tmp) / "many.json")
    assert one["counted_slots"] == many["counted_slots"], "the processes did not count the same routed slots"
    speedup = many["tokens_per_s"] / one["tokens_per_s"]
    result = {"model": f"qwen3_moe {args.layers}L h{args.hidden} {args.experts}e top-{args.top_k} w{args.moe_width}",
              "batches": args.iters, "tokens_per_batch": args.batch * args.seq_len, "one": one, "many": many,
              "speedup": speedup}
    print(f"{result['model']} (bf16) on {one['device']}, {args.iters} batches of {args.batch}×{args.seq_len}")
    print(f"1 GPU    {one['tokens_per_s']:>12,.0f} tokens/s")
    print(f"{args.gpus} GPUs   {many['tokens_per_s']:>12,.0f} tokens/s   speed-up {speedup:.2f}×")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
