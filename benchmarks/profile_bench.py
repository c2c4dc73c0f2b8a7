"""What `moekit profile` costs: its counting hooks against a bare forward pass over the same batches
(same model, dtype and batch), on a random-weight MoE built from a config on the GPU.

Rounds alternate bare and profiled passes so that clock drift hits both alike; the medians are
compared. Also reports tokens/s and the share of the GPU's dense bf16 peak the forward reaches
(matmul FLOPs: 2 per active weight per token, plus causal attention).

    python benchmarks/profile_bench.py [--layers 24 --hidden 2048 --experts 64 --top-k 8 ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from moekit.jobs.profile import Domain, count_routing, find_moe_layers

# Dense bf16 tensor-core peak (no sparsity), by device name.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}


def build(args) -> torch.nn.Module:
    """A Qwen3-MoE of the asked size with random weights, built on the device (no CPU copy)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.for_model(
        "qwen3_moe", hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
        num_key_value_heads=max(1, args.hidden // 512), head_dim=128, num_experts=args.experts,
        num_experts_per_tok=args.top_k, moe_intermediate_size=args.moe_width, intermediate_size=args.moe_width * 4,
        vocab_size=32000, max_position_embeddings=max(4096, args.seq_len), norm_topk_prob=True)
    with torch.device(args.device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval()


def flops_per_token(model, seq_len: int) -> float:
    """2 × active weights of the decoder (experts counted K/N) + causal attention scores and values."""
    cfg = model.config
    share = cfg.num_experts_per_tok / cfg.num_experts
    active = sum(p.numel() * (share if ".experts." in n else 1) for n, p in model.model.named_parameters()
                 if "embed_tokens" not in n)
    attention = 2 * seq_len * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers  # QKᵀ and AV, half masked
    return 2 * active + attention


@torch.no_grad()
def bare(model, batches) -> float:
    start = time.perf_counter()
    for ids in batches:
        model.model(input_ids=ids, use_cache=False)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def profiled(model, moe, batches) -> float:
    start = time.perf_counter()
    count_routing(model, moe, [Domain("bench", batches)])  # hooks, the final sync and the copy to the CPU
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("layers", 24), ("hidden", 2048), ("experts", 64), ("top-k", 8), ("moe-width", 768),
                          ("batch", 8), ("seq-len", 2048), ("iters", 10), ("rounds", 5)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()

    model = build(args)
    moe = find_moe_layers(model)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(32000, (args.batch, args.seq_len), generator=g).to(args.device) for _ in range(args.iters)]
    bare(model, batches[:2]), profiled(model, moe, batches[:2])  # warm-up: kernels, allocator, capacity tensors
    times = {"bare": [], "profile": []}
    for _ in range(args.rounds):
        times["bare"].append(bare(model, batches))
        times["profile"].append(profiled(model, moe, batches))
    tokens = args.iters * args.batch * args.seq_len
    t_bare, t_prof = statistics.median(times["bare"]), statistics.median(times["profile"])
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    fpt = flops_per_token(model, args.seq_len)
    result = {
        "device": name, "model": f"qwen3_moe {args.layers}L h{args.hidden} {args.experts}e top-{args.top_k} w{args.moe_width}",
        "params": sum(p.numel() for p in model.parameters()), "tokens_per_batch": args.batch * args.seq_len,
        "batches": args.iters, "rounds": args.rounds, "seconds": times,
        "bare_tokens_per_s": tokens / t_bare, "profile_tokens_per_s": tokens / t_prof,
        "overhead": t_prof / t_bare - 1, "flops_per_token": fpt,
        "bf16_peak_share": fpt * tokens / t_bare / peak if peak else None,
    }
    print(f"{result['model']} ({result['params'] / 1e9:.2f}B params, bf16) on {name}, "
          f"{args.iters} batches of {args.batch}×{args.seq_len}, median of {args.rounds} rounds")
    print(f"bare forward   {result['bare_tokens_per_s']:>12,.0f} tokens/s")
    print(f"profile        {result['profile_tokens_per_s']:>12,.0f} tokens/s   overhead {result['overhead']:+.2%}")
    if peak:
        print(f"forward at {result['bf16_peak_share']:.1%} of the {peak / 1e12:.0f} TFLOP/s dense bf16 peak "
              f"({fpt / 1e9:.2f} GFLOP/token)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
