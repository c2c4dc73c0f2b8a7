"""prune benchmark: pruning a sharded multi-GB MoE vs `cp -r` of the same bytes, time and peak RSS.

    .venv/bin/python benchmarks/prune_bench.py [--runs 3] [--json out.json]

Source: a random bf16 Mixtral written by this script (hidden 2048, 16 layers, 8 experts of width
2048, vocab 32000: 2.0B parameters, 4.0 GB in 1 GB shards). Pruned to 4 experts per layer with
`--method random` (no forward pass: this measures the streaming part, which every method shares;
the calibration pass is measured in docs/prune.md). Kept experts are renamed byte ranges of the
source and router rows are row ranges, so the output should be written at copy speed with flat
memory. Rows, interleaved round by round: moekit prune, `cp -r` and `cp -r + sync` of its output.
Method, timing and quiet-machine waits as in benchmarks/upcycle_bench.py, whose helpers this uses.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from upcycle_bench import CACHE, MOEKIT, bench, copy_rows, report_rows  # noqa: E402

TARGETS = {"moekit prune/cp time": 2.0, "moekit prune peak RSS MB": 400}


def build_big_mixtral(dest: Path, hidden=2048, layers=16, experts=8, d_ff=2048, vocab=32000, heads=16) -> Path:
    """A random bf16 Mixtral in 1 GB shards, written tensor by tensor with moekit's streaming writer."""
    import torch

    from moekit.checkpoint import CheckpointWriter, TensorMeta
    from moekit.arch.targets import TARGETS as LAYOUTS

    t = LAYOUTS["mixtral"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)}
        shapes |= {p + f"self_attn.{x}_proj.weight": (hidden, hidden) for x in "qkvo"}
        shapes[t.router.format(i=i)] = (experts, hidden)
        shapes |= t.experts.shapes(i, experts, d_ff, hidden)
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    plan = [TensorMeta(n, s, torch.bfloat16) for n, s in shapes.items()]
    print(f"building {dest.name}: {sum(m.numel for m in plan) / 1e9:.2f}B parameters, bf16, 1 GB shards", flush=True)
    gen = torch.Generator().manual_seed(0)
    with CheckpointWriter(dest, plan, max_shard_size=10**9) as out:
        for m in plan:
            out.write(m.name, torch.ones(m.shape, dtype=torch.bfloat16) if len(m.shape) == 1 else
                      (torch.randn(m.shape, generator=gen) * 0.02).to(torch.bfloat16))
        out.write_json("config.json", {
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": hidden,
            "intermediate_size": d_ff, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": heads, "num_local_experts": experts, "num_experts_per_tok": 2,
            "vocab_size": vocab, "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
            "rope_theta": 1e6, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1,
            "eos_token_id": 2})
        out.commit()
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--quiet-wait", type=float, default=60, help="seconds to wait for an idle machine before each run")
    args = ap.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="prune-", dir=CACHE))  # same filesystem as the outputs
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` deletes the outputs
    try:
        src = build_big_mixtral(work / "mixtral-big")
        tools = {"moekit prune": lambda out, first: [MOEKIT, "prune", str(src), str(out), "--keep", "4",
                                                     "--method", "random", "--max-shard-size", "1GB"], **copy_rows()}
        print("random Mixtral 8 experts, 4.0 GB in shards → 4 experts (random choice)")
        rows = bench("prune", src, tools, args.runs, work, args.quiet_wait)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    wall = {label: r.get("wall_s") for label, r in rows.items()}
    ratios = {"moekit prune/cp time": wall["moekit prune"] / wall["cp -r"],
              "moekit prune/(cp+sync) time": wall["moekit prune"] / wall["cp -r + sync"],
              "moekit prune peak RSS MB": rows["moekit prune"]["rss_mb"]}
    report_rows(rows, ratios, TARGETS, args.runs, args.json, width=16)

if __name__ == "__main__":
    main()
