"""split-granularity benchmark: moekit vs `cp -r` of the same bytes, and each partition's cost.

    .venv/bin/python benchmarks/split_bench.py [--runs 3] [--json out.json]

Source: SmolLM2-135M → Mixtral 8 experts top-2, bf16 (made once with `moekit upcycle` and cached).
Split G=4 → 32 experts top-8, bf16, 1.38 GB. Rows, interleaved round by round: the contiguous
split (no partition work: the I/O-bound case), `cp -r` and `cp -r + sync` of its output, then the
same split with `--partition kmeans` and `--partition coactivation` on the CPU (their cost is
the difference to the contiguous row; the GPU's: benchmarks/partition_cost.py). Method, timing
and quiet-machine waits as in benchmarks/upcycle_bench.py, whose helpers this uses.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from upcycle_bench import CACHE, MOEKIT, bench, copy_rows, report_rows, smollm2_source  # noqa: E402

TARGET = ("moekit split/cp time", 2.0)


def upcycled_source() -> Path:
    src = CACHE / "smollm2-8x2-bf16"
    if not (src / "config.json").is_file():
        print(f"making {src} once (moekit upcycle --experts 8 --top-k 2)")
        subprocess.run([MOEKIT, "upcycle", str(smollm2_source()), str(src), "--experts", "8", "--top-k", "2"], check=True)
    return src


def split_tools(src: Path, partitions: list[str]) -> dict:
    def split(partition: str):
        return lambda out, first: [MOEKIT, "split-granularity", str(src), str(out), "-g", "4", "--partition", partition,
                                   "--device", "cpu"]

    return {"moekit split contiguous": split("contiguous"), **copy_rows(),
            **{f"moekit split {p}": split(p) for p in partitions}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--partitions", default="kmeans,coactivation", help="partitions timed beside contiguous")
    ap.add_argument("--quiet-wait", type=float, default=60, help="seconds to wait for an idle machine before each run")
    args = ap.parse_args()
    src = upcycled_source()
    work = Path(tempfile.mkdtemp(prefix="split-", dir=CACHE))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` deletes the outputs
    try:
        print("SmolLM2-135M 8x2 bf16 → split G=4: 32 experts top-8 bf16")
        rows = bench("split", src, split_tools(src, [p for p in args.partitions.split(",") if p]), args.runs, work, args.quiet_wait)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    wall = {label: r.get("wall_s") for label, r in rows.items()}
    base = wall["moekit split contiguous"]
    ratios = {"moekit split/cp time": base / wall["cp -r"], "moekit split/(cp+sync) time": base / wall["cp -r + sync"],
              **{f"{label.split()[-1]} partition cost s": wall[label] - base for label in wall
                 if label.startswith("moekit split") and label != "moekit split contiguous"}}
    report_rows(rows, ratios, {TARGET[0]: TARGET[1]}, args.runs, args.json, width=26, unit="×")

if __name__ == "__main__":
    main()
