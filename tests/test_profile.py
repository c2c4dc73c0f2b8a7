"""moekit profile: every metric against an independent computation from the router logits, on
every MoE family's tiny random model; toy counts by hand; the CLI's outputs and errors; a
2-process data-parallel run (gloo) and device_map="auto"."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import typer
from typer.testing import CliRunner

from moekit.commands.profile import profile_command
from moekit.runtime.models import load_model
from moekit.metrics import capacities, coefficient_of_variation, dropped_slots, max_vio, normalised_entropy
from moekit.jobs.profile import Domain, profile
from tests import tiny
from tests.tiny import with_char_tokenizer

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
FAMILIES = list(tiny.MOE_FAMILIES)
SIGMOID = ("glm4_moe", "deepseek_v3", "dots1")
CFS = (1.0, 1.25, 1.5, 2.0)


def profile_app(*args) -> object:
    """`moekit profile ARGS` through Typer (registered in moekit.cli by the lead)."""
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command()(profile_command)
    return CliRunner().invoke(app, [*map(str, args)])


def random_domains(seed: int = 0) -> list[Domain]:
    g = torch.Generator().manual_seed(seed)
    return [Domain("a", list(torch.randint(3, 128, (6, 16), generator=g).split(4))),  # batches of 4 and 2 rows
            Domain("b", list(torch.randint(3, 40, (4, 12), generator=g).split(2)))]


# --------------------------------------------------------------------------- toy counts by hand


def test_metrics_of_toy_counts():
    counts = torch.tensor([6.0, 2.0, 0.0, 0.0])  # T = 4 tokens, K = 2, N = 4: ideal 2 per expert
    assert max_vio(counts) == pytest.approx(2.0)  # (6 - 2) / 2
    assert coefficient_of_variation(counts) == pytest.approx(math.sqrt(6) / 2)  # var = (16 + 0 + 4 + 4) / 4
    assert normalised_entropy(counts) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4))
    caps = capacities(4, 2, 4, CFS)
    assert caps == [2, 3, 3, 4]  # ceil(CF · 2 · 4 / 4)
    assert dropped_slots(counts, torch.tensor(caps, dtype=torch.float32)).tolist() == [4, 3, 3, 2]  # only expert 0 overflows
    balanced = torch.tensor([2.0, 2.0, 2.0, 2.0])
    assert max_vio(balanced) == coefficient_of_variation(balanced) == 0
    assert normalised_entropy(balanced) == pytest.approx(1.0)
    assert capacities(10, 1, 8, [1.1]) == [2]  # ceil(1.375)


# --------------------------------------------------------------------------- an independent reference


def reference_logits(model, model_type: str, ids: torch.Tensor) -> list[np.ndarray]:
    """Router logits per MoE layer: `output_router_logits`, or where transformers 4.57 does not
    return logits (sigmoid routers, GPT-OSS's scores) the router's input times its weight."""
    if TRANSFORMERS_5 or model_type not in (*SIGMOID, "gpt_oss"):
        with torch.no_grad():
            logits = model(input_ids=ids, output_router_logits=True).router_logits
        return [l.double().numpy() for l in logits]
    inputs = []
    routers = [b.mlp.gate if hasattr(b.mlp, "gate") else b.mlp.router for b in model.model.layers
               if hasattr(b.mlp, "gate") or hasattr(b.mlp, "router")]
    handles = [r.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach())) for r in routers]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    out = []
    for r, x in zip(routers, inputs):
        w = r.weight.detach().double().numpy()
        b = r.bias.detach().double().numpy() if getattr(r, "bias", None) is not None else 0.0
        out.append(x.reshape(-1, w.shape[1]).double().numpy() @ w.T + b)
    return out


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference_choice(logits: np.ndarray, k: int, model_type: str, cfg, bias: np.ndarray | None) -> np.ndarray:
    """[T, K] experts, straight from each family's routing (BRIEF §2), token by token."""
    if model_type in ("granitemoe", "gpt_oss"):  # top-k on logits
        return np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    if model_type not in SIGMOID:
        return np.argsort(-softmax(logits), axis=-1, kind="stable")[:, :k]
    scores = 1 / (1 + np.exp(-logits)) + bias
    groups, keep = cfg.n_group, cfg.topk_group
    out = []
    for s in scores:  # group-limited: groups ranked by their two best experts, top-k inside the kept groups
        by_group = s.reshape(groups, -1)
        best = np.argsort(-np.sort(by_group, axis=1)[:, -2:].sum(1), kind="stable")[:keep]
        masked = np.full_like(by_group, -np.inf)
        masked[best] = by_group[best]
        out.append(np.argsort(-masked.reshape(-1), kind="stable")[:k])
    return np.array(out)


def reference_report(model, model_type: str, domains: list[Domain]) -> list[dict]:
    cfg, n = model.config, None
    routers = [m for name, m in model.named_modules() if name.endswith((".gate", ".router"))]
    layers: dict[int, dict] = {}
    for d, domain in enumerate(domains):
        for ids in domain.batches:
            for i, logits in enumerate(reference_logits(model, model_type, ids)):
                n = logits.shape[1]
                a = layers.setdefault(i, {"counts": np.zeros((len(domains), n)), "pairs": np.zeros((n, n)),
                                          "probs": np.zeros(n), "z": 0.0, "h": 0.0, "vio": [], "aux": [],
                                          "drop": np.zeros(len(CFS))})
                router = routers[i]
                bias = router.e_score_correction_bias.double().numpy() if model_type in SIGMOID else None
                chosen = reference_choice(logits, cfg.num_experts_per_tok, model_type, cfg, bias)
                counts = np.bincount(chosen.reshape(-1), minlength=n).astype(float)
                if model_type in SIGMOID:
                    s = 1 / (1 + np.exp(-logits))
                    p = s / s.sum(-1, keepdims=True)
                else:
                    p = softmax(logits)
                a["counts"][d] += counts
                for row in chosen:
                    for x in row:
                        for y in row:
                            a["pairs"][x, y] += x != y
                a["probs"] += p.sum(0)
                a["z"] += (np.log(np.exp(logits).sum(-1)) ** 2).sum()
                a["h"] += -(p * np.log(p)).sum()
                ideal = counts.sum() / n
                a["vio"].append((counts.max() - ideal) / ideal)
                a["aux"].append(n * (counts / counts.sum() * p.mean(0)).sum())
                for c, cf in enumerate(CFS):
                    cap = math.ceil(cf * counts.sum() / n)
                    a["drop"][c] += np.maximum(counts - cap, 0).sum()
    return [layers[i] for i in sorted(layers)]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_metric_matches_router_logits(tiny_models, model_type):
    model, _ = load_model(tiny_models(model_type), device="cpu")
    if model_type in SIGMOID:  # a non-zero correction bias, so that selection on score + bias is what is tested
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    domains = random_domains()
    report = profile(model, domains, CFS)
    ref = reference_report(model, model_type, domains)
    tokens, batches, k = 6 * 16 + 4 * 12, 4, model.config.num_experts_per_tok
    assert (report["tokens"], report["batches"], report["moe_layers"]) == (tokens, batches, len(ref))
    approx = lambda x: pytest.approx(x, rel=1e-5, abs=1e-7)
    for got, a in zip(report["layers"], ref):
        counts = a["counts"].sum(0)
        n = len(counts)
        assert got["tokens_per_expert"] == counts.astype(int).tolist()
        assert got["maxvio_global"] == approx((counts.max() - counts.mean()) / counts.mean())
        assert got["maxvio_batch_mean"] == approx(np.mean(a["vio"]))
        assert got["maxvio_batch_max"] == approx(np.max(a["vio"]))
        assert got["cv"] == approx(counts.std() / counts.mean())
        f = counts / counts.sum()
        assert got["load_entropy"] == approx(-(f[f > 0] * np.log(f[f > 0])).sum() / np.log(n))
        assert got["router_entropy"] == approx(a["h"] / tokens / np.log(n))
        assert got["dead_experts"] == [i for i in range(n) if counts[i] == 0]
        assert got["aux_loss_global"] == approx(n * (f * a["probs"] / tokens).sum())
        assert got["aux_loss_local"] == approx(np.mean(a["aux"]))
        assert got["z_loss"] == approx(a["z"] / tokens)
        assert [got["drop_rate"][str(cf)] for cf in CFS] == approx((a["drop"] / (k * tokens)).tolist())
        assert got["mean_router_prob"] == approx((a["probs"] / tokens).tolist())
        for pair in got["top_pairs"]:
            i, j = pair["experts"]
            assert pair["tokens"] == a["pairs"][i, j]
            assert pair["lift"] == approx(a["pairs"][i, j] * tokens / (counts[i] * counts[j]))
        assert max(p["tokens"] for p in got["top_pairs"]) == np.triu(a["pairs"], 1).max()
        for d, name in enumerate(["a", "b"]):
            assert got["domains"][name]["tokens_per_expert"] == a["counts"][d].astype(int).tolist()
        pa, pb = (a["counts"][d] / a["counts"][d].sum() for d in range(2))
        assert got["specialisation"] == approx(0.5 * np.abs(pa - pb).sum())
    layers = report["layers"]
    assert report["total"]["maxvio_global"] == approx(np.mean([x["maxvio_global"] for x in layers]))
    assert report["total"]["maxvio_batch_max"] == max(x["maxvio_batch_max"] for x in layers)


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    (root / "code.txt").write_text("\n\n".join(f"def f{i}(x):\n    return x * {i} + {i * 7}" for i in range(60)))
    (root / "prose.txt").write_text("\n\n".join(f"The {i}th licence grants every person the right to copy it." for i in range(60)))
    (root / "empty.txt").write_text("\n\n")
    (root / "short.txt").write_text("too short")
    return root


@pytest.fixture(scope="module")
def glm(tiny_models, tmp_path_factory):
    return with_char_tokenizer(tiny_models("glm4_moe"), tmp_path_factory.mktemp("glm") / "m")


def test_profile_writes_json_plots_and_html(glm, texts, tmp_path):
    r = profile_app(glm, "--data", texts / "code.txt", "--data", texts / "prose.txt", "--max-tokens", 512, "--seq-len", 64,
                    "--batch-size", 2, "--device", "cpu", "--json", tmp_path / "p.json", "--plot", tmp_path / "plots",
                    "--html", tmp_path / "p.html")
    assert r.exit_code == 0, r.stderr
    report = json.loads((tmp_path / "p.json").read_text())
    assert [d["name"] for d in report["domains"]] == ["code", "prose"]
    assert report["tokens"] == 1024 and report["batches"] == 8 and report["dtype"] == "float32"
    assert set(report["total"]) >= {"maxvio_global", "maxvio_batch_mean", "cv", "aux_loss_local", "z_loss", "specialisation"}
    assert sum(report["layers"][0]["tokens_per_expert"]) == 2 * 1024
    for name in ("load.png", "maxvio.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "p.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "specialisation" in page
    assert "MaxVio" in r.stdout and "drop" in r.stdout  # the tables


def test_profile_json_to_stdout_with_builtin_text(glm):
    r = profile_app(glm, "--max-tokens", 256, "--seq-len", 64, "--device", "cpu", "--capacity-factors", "1,3", "--json", "-")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["domains"] == [{"name": "builtin", "tokens": 256}]
    assert list(report["total"]["drop_rate"]) == ["1.0", "3.0"] and "specialisation" not in report["total"]


def test_profile_errors_are_one_line(tiny_models, glm, texts, tmp_path):
    dense = with_char_tokenizer(tiny.build("llama", tmp_path / "dense"), tmp_path / "dense-tok")
    cpu = ("--device", "cpu")
    cases = [
        ((dense, *cpu), 3, "nothing to profile: no MoE layers; upcycle it first"),
        ((glm, *cpu, "--data", texts / "empty.txt"), 3, "no text in it"),
        ((glm, *cpu, "--data", texts / "short.txt", "--seq-len", 64), 3, "shorter than one sequence of 64"),
        ((glm, *cpu, "--data", tmp_path / "missing.txt"), 3, "no such data file"),
        ((glm, *cpu, "--capacity-factors", "1,x"), 2, "--capacity-factors"),
        ((glm, *cpu, "--max-tokens", 10, "--seq-len", 64), 2, "less than one sequence"),
    ]
    if not torch.cuda.is_available():
        cases.append(((glm, "--device", "cuda"), 3, "torch sees no CUDA device"))
    for args, code, message in cases:
        r = profile_app(*args)
        assert r.exit_code == code, (args, r.stderr)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# --------------------------------------------------------------------------- several processes, several devices


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _profile_worker(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    """One process of a data-parallel run, configured as `torchrun` / `accelerate launch` would."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model, _ = load_model(model_dir, device="cpu")
    report = profile(model, random_domains(), CFS)
    if rank == 0:
        Path(out).write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


def test_two_processes_count_what_one_counts(tiny_models, tmp_path):
    """gloo on CPU: each process takes every other batch; the all-reduced totals equal one process's."""
    import torch.multiprocessing as mp

    model_dir = tiny_models("qwen3_moe")
    mp.spawn(_profile_worker, args=(2, _free_port(), str(model_dir), str(tmp_path / "dp.json")), nprocs=2)
    both = json.loads((tmp_path / "dp.json").read_text())
    one = profile(load_model(model_dir, device="cpu")[0], random_domains(), CFS)
    assert both["processes"] == 2 and (both["tokens"], both["batches"]) == (one["tokens"], one["batches"])
    for a, b in zip(both["layers"], one["layers"]):
        assert a["tokens_per_expert"] == b["tokens_per_expert"] and a["domains"] == b["domains"]
        assert a["top_pairs"] == b["top_pairs"]
        for key in ("maxvio_batch_mean", "maxvio_batch_max", "aux_loss_local", "aux_loss_global", "z_loss", "router_entropy"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
        assert a["drop_rate"] == pytest.approx(b["drop_rate"])


def test_device_map_auto_counts_the_same(tiny_models):
    model_dir = tiny_models("mixtral")
    spread, _ = load_model(model_dir, device="cpu", device_map="auto")
    a = profile(spread, random_domains(), CFS)
    b = profile(load_model(model_dir, device="cpu")[0], random_domains(), CFS)
    assert [x["tokens_per_expert"] for x in a["layers"]] == [x["tokens_per_expert"] for x in b["layers"]]


# --------------------------------------------------------------------------- GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("model_type", ["mixtral", "glm4_moe", "gpt_oss"])
@pytest.mark.gpu
@needs_cuda
def test_cuda_counts_equal_cpu_counts(tiny_models, model_type):
    path = tiny_models(model_type)
    on_gpu = profile(load_model(path, device="cuda")[0], random_domains(), CFS)
    on_cpu = profile(load_model(path, device="cpu")[0], random_domains(), CFS)
    assert [x["tokens_per_expert"] for x in on_gpu["layers"]] == [x["tokens_per_expert"] for x in on_cpu["layers"]]
    assert on_gpu["total"]["z_loss"] == pytest.approx(on_cpu["total"]["z_loss"], rel=1e-4)


@pytest.mark.gpu
@needs_cuda
def test_counting_never_waits_for_the_gpu(tiny_models):
    """The hook's work per batch issues no host synchronisation (CUDA's sync debug mode raises)."""
    from moekit.jobs.profile import RoutingStats
    from moekit.runtime.moe import RoutingCounter, find_moe_layers

    model, _ = load_model(tiny_models("qwen3_moe"), device="cuda")
    moe = find_moe_layers(model)
    stats = RoutingStats(moe)
    counter = RoutingCounter(moe, on_route=stats.add)
    logits = torch.randn(64, 4, device="cuda")
    chosen = logits.topk(2).indices
    counter.count(0, logits, chosen)  # the first batch allocates the accumulators
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            counter.count(0, logits, chosen)
            counter.count(0, logits, None)  # 4.57's bare gates: selection reproduced on the device
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats.totals()[0]["counts"].sum() == 7 * 64 * 2


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_cli_under_torchrun_on_two_gpus(glm, texts, tmp_path):
    """The real CLI, data-parallel over NCCL, one GPU per process: the report equals one GPU's."""
    import subprocess
    import sys

    args = [glm, "--data", texts / "code.txt", "--data", texts / "prose.txt", "--max-tokens", 512, "--seq-len", 64,
            "--batch-size", 2, "--device", "cuda", "--dtype", "fp32"]
    one = profile_app(*args, "--json", tmp_path / "one.json")
    assert one.exit_code == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "moekit", "profile", *map(str, args), "--json", str(tmp_path / "two.json")],
                         check=False, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (a["processes"], b["processes"]) == (1, 2) and (a["tokens"], a["batches"]) == (b["tokens"], b["batches"])
    assert [x["tokens_per_expert"] for x in a["layers"]] == [x["tokens_per_expert"] for x in b["layers"]]
    assert [x["domains"] for x in a["layers"]] == [x["domains"] for x in b["layers"]]


@pytest.mark.gpu
@needs_cuda
def test_device_map_auto_on_cuda(tiny_models):
    path = tiny_models("qwen2_moe")
    spread = profile(load_model(path, device="cuda", device_map="auto")[0], random_domains(), CFS)
    single = profile(load_model(path, device="cpu")[0], random_domains(), CFS)
    assert [x["tokens_per_expert"] for x in spread["layers"]] == [x["tokens_per_expert"] for x in single["layers"]]
