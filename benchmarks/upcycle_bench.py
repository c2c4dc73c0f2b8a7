"""Upcycle benchmark: moekit vs `cp -r` of the same bytes vs mergekit-moe, time and peak RSS.

    .venv/bin/python benchmarks/upcycle_bench.py [--skip-mergekit] [--big] [--runs 3] [--json out.json]

SmolLM2-135M (bf16) → Mixtral 8 experts, top-2, bf16 (1.38 GB). With --big, also a random
~1B-parameter Llama (hidden 2048, 16 layers, d_ff 5632, vocab 32000) → 4 experts, top-2 (5.2 GB).

Fairness: every tool runs `--runs` times, interleaved round by round. Before each run the
previous outputs are deleted, the input files are read once (so they are in the page cache) and
`sync` flushes pending writes. The machine may be shared: each run first waits (up to
--quiet-wait s) for a quiet second, and "others" says how many cores other processes kept busy
during it. Wall time is timed here; CPU time (user+sys) and peak RSS ("Maximum resident set
size") come from GNU /usr/bin/time. Medians are reported. moekit fsyncs its output before
renaming it into place; cp and mergekit do not, so a `cp -r + sync` row shows what durability costs.

Sources and mergekit's venv are cached in ~/.cache/moekit-bench; outputs are deleted at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("MOEKIT_BENCH_CACHE", "~/.cache/moekit-bench")).expanduser()
BIN = Path(sys.executable).parent
MOEKIT = str(BIN / "moekit")
MERGEKIT_VENV = CACHE / "mergekit-venv"
TARGETS = {"moekit/cp time": ("≤", 2.0), "mergekit/moekit time": ("≥", 5.0),
           "moekit peak RSS MB": ("≤", 400), "big moekit peak RSS MB": ("≤", 400)}


def cpu_busy() -> float:
    """CPU-seconds spent busy by the whole machine since boot (all cores, from /proc/stat)."""
    with open("/proc/stat") as stat:
        f = [int(x) for x in stat.readline().split()[1:]]
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def wait_quiet(max_s: float) -> None:
    """The machine is shared: wait (up to max_s) for a second with under 0.15 busy cores."""
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline:
        b = cpu_busy()
        time.sleep(1)
        if cpu_busy() - b < 0.15:
            return


def measure(cmd: list[str], log: Path) -> dict:
    """Run cmd under GNU time: wall seconds, CPU seconds (user+sys), peak RSS, and the cores other
    processes kept busy meanwhile ("others"); or the error. (os.wait4 would report this Python's
    RSS for a small child: maxrss survives fork+exec.)"""
    stats = log.with_suffix(".time")
    busy, start = cpu_busy(), time.perf_counter()
    with open(log, "ab") as out:
        proc = subprocess.Popen(["/usr/bin/time", "-o", str(stats), "-f", "%U %S %M", *cmd], stdout=out, stderr=out,
                                start_new_session=True)
        try:
            code = proc.wait()
        except BaseException:  # Ctrl-C / SIGTERM: stop the tool too (not just `time`), then clean up
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    wall, busy = time.perf_counter() - start, cpu_busy() - busy
    if code:
        tail = log.read_text(errors="replace").strip().splitlines()[-4:]
        return {"error": f"exit {code}: " + " | ".join(tail)}
    user, sys_, rss_kb = stats.read_text().split()[-3:]
    cpu = float(user) + float(sys_)
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 2), "rss_mb": round(int(rss_kb) / 1024, 1),
            "others": round(max(0.0, busy - cpu) / wall, 2)}


def warm(*folders: Path) -> None:
    """Same page-cache state before every run: inputs read in, no dirty pages pending."""
    for f in (f for folder in folders for f in folder.iterdir()):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    subprocess.run(["sync"], check=True)


def rmtree(*paths: Path) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


def smollm2_source() -> Path:
    src = CACHE / "smollm2-bf16"
    if not (src / "config.json").is_file():
        print(f"making {src} once (moekit convert smollm2-135m --dtype bfloat16)")
        subprocess.run([MOEKIT, "convert", "smollm2-135m", str(src), "--dtype", "bfloat16"], check=True)
    return src


def build_big_llama(dest: Path, hidden=2048, layers=16, d_ff=5632, vocab=32000, heads=32) -> Path:
    """A random bf16 Llama written tensor by tensor with moekit's streaming writer (no model in memory)."""
    import torch

    from moekit.checkpoint import CheckpointWriter, TensorMeta

    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)}
        shapes |= {p + f"self_attn.{x}_proj.weight": (hidden, hidden) for x in "qkvo"}
        shapes |= {p + "mlp.gate_proj.weight": (d_ff, hidden), p + "mlp.up_proj.weight": (d_ff, hidden),
                   p + "mlp.down_proj.weight": (hidden, d_ff)}
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    plan = [TensorMeta(n, s, torch.bfloat16) for n, s in shapes.items()]
    print(f"building {dest.name}: {sum(m.numel for m in plan) / 1e9:.2f}B parameters, bf16")
    gen = torch.Generator().manual_seed(0)
    with CheckpointWriter(dest, plan) as out:
        for m in plan:
            out.write(m.name, torch.ones(m.shape, dtype=torch.bfloat16) if len(m.shape) == 1 else
                      (torch.randn(m.shape, generator=gen) * 0.02).to(torch.bfloat16))
        out.write_json("config.json", {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": d_ff, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": heads, "vocab_size": vocab, "hidden_act": "silu", "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False,
            "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02, "torch_dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2})
        out.commit()
    return dest


def mergekit_moe() -> tuple[str | None, str]:
    """Path of mergekit-moe in its own venv (installed on first use: CPU torch first), or None and why."""
    exe = MERGEKIT_VENV / "bin" / "mergekit-moe"
    if exe.is_file():
        return str(exe), ""
    print(f"installing mergekit into {MERGEKIT_VENV} (torch==2.13.0 first, then mergekit)")
    pip = [str(MERGEKIT_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    for cmd in ([sys.executable, "-m", "venv", str(MERGEKIT_VENV)], pip + ["torch==2.13.0"], pip + ["mergekit"]):
        r = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if r.returncode:
            return None, f"{' '.join(cmd[-3:])} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    return (str(exe), "") if exe.is_file() else (None, "mergekit installed but has no mergekit-moe script")


def mergekit_config(src: Path, path: Path, experts=8, k=2) -> Path:
    # gate_mode random needs no positive_prompts (mergekit/moe/config.py: is_bad_config)
    lines = [f"base_model: {src}", "architecture: mixtral", "gate_mode: random", "dtype: bfloat16",
             f"experts_per_token: {k}", "experts:"] + [f"  - source_model: {src}"] * experts
    path.write_text("\n".join(lines) + "\n")
    return path


def output(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=False, capture_output=True, text=True).stdout.strip()


def copy_rows() -> dict:
    """The two `cp` rows: copy the output the suite's first tool wrote this round."""
    return {"cp -r": lambda out, first: ["cp", "-r", str(first), str(out)],
            "cp -r + sync": lambda out, first: ["sh", "-c", 'cp -r "$0" "$1" && sync "$1"/*', str(first), str(out)]}


def tools_for(src: Path, experts: int) -> dict:
    """label -> function(out folder, first tool's out folder) giving the command."""
    return {"moekit upcycle": lambda out, first: [MOEKIT, "upcycle", str(src), str(out), "--experts", str(experts),
                                                  "--top-k", "2", "--dtype", "bfloat16"], **copy_rows()}


def bench(name: str, src: Path, tools: dict, runs: int, work: Path, quiet_s: float) -> dict:
    """Run every tool `runs` times, interleaved; the first tool's output stays until the next
    round (the cp rows copy it), every other output is deleted once measured."""
    results = {label: [] for label in tools}
    first_label = next(iter(tools))
    for r in range(runs):
        first = work / f"{name}-first-{r}"
        rmtree(*work.glob(f"{name}-first-*"))
        for label, make_cmd in tools.items():
            out = first if label == first_label else work / f"{name}-other-{r}"
            wait_quiet(quiet_s)
            warm(src, *work.glob(f"{name}-first-*"))
            res = measure(make_cmd(out, first), work / f"{name}.log")
            results[label].append(res)
            print(f"  {name} run {r + 1}/{runs} {label:22s}" + (res.get("error") or
                  f"{res['wall_s']:7.2f} s wall {res['cpu_s']:7.2f} s cpu {res['rss_mb']:8.1f} MB"
                  f"  others {res['others']:.2f}"), flush=True)
            if out != first:
                rmtree(out)
    summary = {}
    for label, rs in results.items():
        ok = [x for x in rs if "error" not in x]
        medians = {k: statistics.median(x[k] for x in ok) for k in ("wall_s", "cpu_s", "rss_mb", "others")}
        summary[label] = {"runs": rs, **(medians if ok else {"error": rs[-1]["error"]})}
    rmtree(*work.glob(f"{name}-*"))
    return summary


def report_rows(rows: dict, ratios: dict, targets: dict, runs: int, json_path: Path | None, width: int,
           unit: str = "") -> None:
    """Print the medians and the ratios (with their goals, `targets`), and write them as JSON."""
    print(f"\nmedians of {runs} runs")
    for label, r in rows.items():
        print(f"  {label:{width}s} {r['wall_s']:7.2f} s wall {r['cpu_s']:7.2f} s cpu {r['rss_mb']:8.1f} MB")
    for k, v in ratios.items():
        goal = f"  target ≤ {targets[k]:g}{unit}: " + ("met" if v <= targets[k] else "MISSED") if k in targets else ""
        print(f"  {k:30s} {v:8.2f}{goal}")
    if json_path:
        json_path.write_text(json.dumps({"command": " ".join(sys.argv), "commit": output(["git", "rev-parse", "--short", "HEAD"]),
                                         "results": rows, "ratios": ratios}, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--big", action="store_true", help="also a random ~1B Llama → 4 experts (5.2 GB output)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--quiet-wait", type=float, default=60, help="seconds to wait for an idle machine before each run")
    args = ap.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=CACHE))  # same filesystem as the sources
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` deletes the outputs
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "host": platform.node(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_start": os.getloadavg(),
            "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
            "moekit_commit": output(["git", "rev-parse", "--short", "HEAD"]),
            "runs": args.runs, "method": __doc__.split("\n\n")[3].replace("\n", " ")}
    print(f"{info['date']}  {info['cpus']} CPUs  load average {info['loadavg_start']}")
    suites = {}
    try:
        src = smollm2_source()
        tools = tools_for(src, 8)
        if args.skip_mergekit:
            info["mergekit"] = "skipped (--skip-mergekit)"
        else:
            exe, why = mergekit_moe()
            if exe:
                cfg = mergekit_config(src, work / "mergekit.yml")
                tools["mergekit-moe"] = lambda out, first: [exe, str(cfg), str(out), "--random-seed", "0", "--quiet",
                                                     "--i-understand-this-is-not-useful-without-training"]
                info["mergekit"] = output([str(MERGEKIT_VENV / "bin" / "python"), "-c",
                                           "import importlib.metadata as m; print(m.version('mergekit'))"])
            else:
                info["mergekit"] = f"not run: {why}"
                print(f"mergekit-moe not run: {why}")
        print("SmolLM2-135M bf16 → Mixtral 8 experts top-2 bf16")
        suites["small"] = bench("small", src, tools, args.runs, work, args.quiet_wait)
        if args.big:
            print("random 1B Llama bf16 → Mixtral 4 experts top-2 bf16")
            big = build_big_llama(work / "llama-1b")
            suites["big"] = bench("big", big, tools_for(big, 4), args.runs, work, args.quiet_wait)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["loadavg_end"] = os.getloadavg()
    report(info, suites, args.json)


def report(info: dict, suites: dict, json_path: Path | None) -> None:
    print(f"\nmedian of {info['runs']} runs, warm page cache, interleaved; "
          f"load average {info['loadavg_start'][0]:.1f} → {info['loadavg_end'][0]:.1f} on {info['cpus']} CPUs")
    print(f"{'':6s}{'tool':18s}{'wall s':>9s}{'cpu s':>9s}{'peak RSS MB':>13s}{'others':>8s}   wall per run")
    for suite, rows in suites.items():
        for label, r in rows.items():
            runs = " ".join(f"{x['wall_s']:.2f}" for x in r["runs"] if "error" not in x)
            print(f"{suite:6s}{label:18s}" + (f"  {r['error']}" if "error" in r else
                  f"{r['wall_s']:9.2f}{r['cpu_s']:9.2f}{r['rss_mb']:13.1f}{r['others']:8.2f}   {runs}"))

    def get(suite, label, key="wall_s"):
        return suites.get(suite, {}).get(label, {}).get(key)

    pairs = {"moekit/cp time": ("small", "moekit upcycle", "small", "cp -r", "wall_s"),
             "moekit/(cp+sync) time": ("small", "moekit upcycle", "small", "cp -r + sync", "wall_s"),
             "mergekit/moekit time": ("small", "mergekit-moe", "small", "moekit upcycle", "wall_s"),
             "mergekit/moekit peak RSS": ("small", "mergekit-moe", "small", "moekit upcycle", "rss_mb"),
             "big moekit/cp time": ("big", "moekit upcycle", "big", "cp -r", "wall_s"),
             "big moekit/(cp+sync) time": ("big", "moekit upcycle", "big", "cp -r + sync", "wall_s"),
             "moekit RSS big/small": ("big", "moekit upcycle", "small", "moekit upcycle", "rss_mb")}
    ratios = {k: get(a, b, key) / get(c, d, key) for k, (a, b, c, d, key) in pairs.items()
              if get(a, b, key) and get(c, d, key)}
    for k, suite in (("moekit peak RSS MB", "small"), ("big moekit peak RSS MB", "big")):
        if get(suite, "moekit upcycle", "rss_mb"):
            ratios[k] = get(suite, "moekit upcycle", "rss_mb")
    print()
    verdicts = {}
    for k, v in ratios.items():
        op, t = TARGETS.get(k, (None, None))
        ok = None if t is None else (v <= t if op == "≤" else v >= t)
        verdicts[k] = {"value": round(v, 2), "target": t and f"{op} {t:g}", "met": ok}
        unit = " MB" if k.endswith("MB") else "×"
        goal = "" if t is None else f"  target {op} {t:g}{unit}: " + ("met" if ok else "MISSED")
        print(f"  {k:26s}{v:8.2f}{unit}{goal}")
    if json_path:
        json_path.write_text(json.dumps({**info, "results": suites, "ratios": verdicts}, indent=2) + "\n")
        print(f"\nwrote {json_path}")


if __name__ == "__main__":
    main()
