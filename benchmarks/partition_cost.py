"""What split-granularity's neuron partitions cost: `kmeans` (on the weights) and `coactivation`
(on activations over calibration tokens) for one expert, on the CPU and on CUDA when present.

The surgery calls the same functions once per expert and layer, so the model's cost is the
per-expert time × experts × layers (printed for the shapes' models). Weights and hidden states
are random with the real shapes: balanced k-means runs its 20 iterations on them, where trained
weights often converge sooner, so these are upper bounds.

    python benchmarks/partition_cost.py [--tokens 8192] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from moekit.surgery import partition

# name: (hidden, expert width, layers, experts) as upcycled to 8 experts
SHAPES = {"SmolLM2-135M 8x": (576, 1536, 30, 8), "Llama-3-8B 8x": (4096, 14336, 32, 8)}


def timed(fn, device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up kernels and the allocator
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192, help="calibration tokens for coactivation (split's default)")
    ap.add_argument("--groups", default="4,8", help="G values")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    g = torch.Generator().manual_seed(0)
    for name, (hidden, width, layers, experts) in SHAPES.items():
        gate, up = (torch.randn(width, hidden, generator=g) * hidden ** -0.5 for _ in range(2))
        states = torch.randn(args.tokens, hidden, generator=g)
        for device in devices:
            w_gate, w_up, x = gate.to(device), up.to(device), states.to(device)
            for groups in map(int, args.groups.split(",")):
                for method, fn in (("kmeans", lambda: partition.kmeans(w_gate, w_up, groups, seed=0)),
                                   ("coactivation", lambda: partition.coactivation(w_gate, w_up, x, groups, seed=0))):
                    s = timed(fn, device, args.repeats)
                    rows.append({"shape": name, "device": device, "G": groups, "method": method, "expert_s": s,
                                 "model_s": s * layers * experts})
                    print(f"{name:17s} {device:5s} G={groups:<3d} {method:13s} {s * 1e3:9.1f} ms/expert "
                          f"{s * layers * experts:8.1f} s/model ({layers} layers × {experts} experts)", flush=True)
    if args.json:
        names = {"cpu": f"{torch.get_num_threads()} CPU threads"} | (
            {"cuda": torch.cuda.get_device_name()} if torch.cuda.is_available() else {})
        Path(args.json).write_text(json.dumps({"devices": names, "tokens": args.tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
