from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path

import typer
from rich.table import Table

from moekit.commands.common import command, err, out, print_json, warn
from moekit.errors import EXIT_CHECK_FAILED, MoekitError
from moekit.options import VerifyOptions


@command(VerifyOptions)
def verify_command(opts: VerifyOptions) -> None:
    """Check that CHILD computes what PARENT computes: run both on the same tokens, compare logits.

    Both models are loaded by stock transformers (no remote code) and run on the same token ids:
    random ones by default (seeded, below the smaller vocabulary), or text from --data. Reports
    the max relative logit error (max |parent - child| / max |parent| over every position), the
    mean absolute error, top-1 agreement and KL(parent || child) per token.

    Exit 0 when the max relative error is within --tolerance, 1 beyond it. An exact surgery
    (upcycle, split-granularity) stays near 1e-6 in float32; bfloat16 needs a looser tolerance.

    Examples:

        moekit verify smollm2-135m ./smollm2-moe
        moekit verify ./moe ./moe-fine --data notes.txt --tokens 2048 --device cuda
        moekit verify ./base ./grown --tolerance 1e-3 --json | jq .top1_agreement
        moekit verify ./smollm2 ./smollm2-8x2 --runtime llama.cpp --tolerance 1e-4 --tokens 512
    """
    from moekit.checkpoint.dtypes import config_name, parse_dtype
    from moekit.checkpoint.sources import resolve_source
    from moekit.runtime.models import load_model, load_tokenizer, resolve_device
    from moekit.jobs.verify import compare_models, greedy_continuations, make_inputs, vocab_size

    # Bad options and missing paths fail now, not after minutes of loading.
    torch_dtype, where = parse_dtype(opts.dtype), resolve_device(opts.device)
    resolve_source(opts.parent), resolve_source(opts.child)
    if opts.data is not None and not opts.data.is_file():
        raise MoekitError(f"{opts.data}: no such file")
    if opts.runtime == "llama.cpp":
        return verify_in_llamacpp(opts)
    start = time.perf_counter()
    parent_model, warnings = load_model(opts.parent, torch_dtype, where, allow_pickle=opts.allow_pickle)
    child_model, child_warnings = load_model(opts.child, torch_dtype, where, allow_pickle=opts.allow_pickle)
    warnings += child_warnings
    vocab = min(vocab_size(parent_model), vocab_size(child_model))
    batches = make_inputs(vocab, opts.tokens, opts.batch, opts.seq_len, opts.seed, opts.data,
                          load_tokenizer(opts.parent) if opts.data else None)
    load_seconds = time.perf_counter() - start
    comparing = f"comparing on {sum(b.numel() for b in batches):,} tokens"
    with err.status(comparing, spinner="dots") if not opts.json_output and err.is_terminal else nullcontext():
        result = compare_models(parent_model, child_model, batches)

    if opts.prompt is not None:
        tokenizer = load_tokenizer(opts.parent)
        texts = greedy_continuations(parent_model, child_model, tokenizer, opts.prompt, opts.new_tokens)
        result.update(prompt=opts.prompt, parent_generation=texts[0], child_generation=texts[1],
                      same_generation=texts[0] == texts[1])
    report = {"parent": opts.parent, "child": opts.child,
              "parent_type": parent_model.config.model_type, "child_type": child_model.config.model_type,
              "inputs": inputs_name(opts), "device": str(where), "dtype": config_name(torch_dtype),
              **result, "load_seconds": load_seconds, "tolerance": opts.tolerance, "warnings": warnings}
    finish(report, opts.json_output)


def inputs_name(opts: VerifyOptions) -> str:
    return str(opts.data) if opts.data else f"random ids (seed {opts.seed})"


def verify_in_llamacpp(opts: VerifyOptions) -> None:
    """Both models converted by llama.cpp's own converter (one process) and run by llama.cpp."""
    import tempfile

    from moekit.runtime import llamacpp
    from moekit.checkpoint.sources import resolve_source
    from moekit.runtime.models import load_tokenizer
    from moekit.jobs.verify import compare_models, llamacpp_runner, make_inputs

    llamacpp.load_bindings()  # a missing extra fails now, with the install hint
    start = time.perf_counter()
    paths = {"parent": resolve_source(opts.parent), "child": resolve_source(opts.child)}
    for path in paths.values():
        if path.suffix != ".gguf":
            refuse_unsafe_folder(path, opts.allow_pickle)
    with tempfile.TemporaryDirectory(prefix="moekit-verify-") as tmp:
        ggufs = {n: p if p.suffix == ".gguf" else Path(tmp) / f"{n}.gguf" for n, p in paths.items()}
        todo = [(paths[n], g) for n, g in ggufs.items() if g != paths[n]]
        converting = err.status("converting with llama.cpp's converter", spinner="dots")
        with converting if todo and not opts.json_output else nullcontext():
            converted = llamacpp.convert_many(todo) if todo else []
        for (src, _), r in zip(todo, converted):
            if not r["ok"]:
                raise MoekitError(f"{src}: llama.cpp's converter refuses it: {r['error'][:300]}")
        vocab = min(_gguf_vocab(g) for g in ggufs.values())
        batches = make_inputs(vocab, opts.tokens, 1, opts.seq_len, opts.seed, opts.data,
                              load_tokenizer(opts.parent) if opts.data else None)
        load_seconds = time.perf_counter() - start
        comparing = err.status(f"comparing on {sum(b.numel() for b in batches):,} tokens", spinner="dots")
        with comparing if not opts.json_output else nullcontext():
            result = compare_models(llamacpp_runner(ggufs["parent"]), llamacpp_runner(ggufs["child"]), batches)
    commit = llamacpp.vendored_commit()
    report = {"parent": opts.parent, "child": opts.child, "parent_type": _gguf_arch(ggufs["parent"], paths["parent"]),
              "child_type": _gguf_arch(ggufs["child"], paths["child"]), "inputs": inputs_name(opts),
              "device": "llama.cpp" + (f" {commit[:12]}" if commit else ""), "dtype": "float32 (GGUF f32, f32 KV cache)",
              **result, "load_seconds": load_seconds, "tolerance": opts.tolerance, "warnings": []}
    finish(report, opts.json_output)


def refuse_unsafe_folder(path: Path, allow_pickle: bool) -> None:
    """llama.cpp's converter unpickles weights and, for some architectures, loads the tokenizer with
    trust_remote_code=True: the pickle and remote-code rules are checked here, before it runs."""
    from moekit.checkpoint import open_checkpoint
    from moekit.runtime.models import custom_code, refuse_custom_model_code

    open_checkpoint(path, allow_pickle=allow_pickle)
    refuse_custom_model_code(path)
    code = custom_code(path, "config.json") or custom_code(path, "tokenizer_config.json")
    if code:
        raise MoekitError(f"{path}: it names its own code ({code}, in auto_map) and llama.cpp's converter may run it; "
                          "moekit never runs code from a checkpoint")


def _gguf_vocab(path: Path) -> int:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return len(reader.fields["tokenizer.ggml.tokens"].data)


def _gguf_arch(gguf: Path, source: Path) -> str:
    cfg = source / "config.json"
    if cfg.is_file():
        import json

        return json.loads(cfg.read_text()).get("model_type", "unknown")
    return gguf.stem


def finish(report: dict, json_output: bool) -> None:
    """Print the report and the verdict; exit 1 beyond the tolerance (or on a different generation)."""
    tolerance, warnings = report["tolerance"], report["warnings"]
    # NaN/inf errors compare False, so broken logits fail; with --prompt the text must match too
    passed = report["max_rel_error"] <= tolerance and report.get("same_generation", True)
    report["passed"] = passed
    for w in warnings:
        warn(w)
    if json_output:  # JSON has no NaN/inf: those (broken logits) print as null
        print_json({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in report.items()})
    else:
        out.print(report_table(report))
    verdict = (f"{report['max_rel_error']:.3g} {'≤' if passed else '>'} tolerance {tolerance:.3g} "
               f"over {report['tokens']:,} tokens ({report['top1_agreement']:.2%} same top-1)")
    err.print(f"[bold green]PASS[/] {verdict}" if passed else f"[bold red]FAIL[/] {verdict}", highlight=False)
    if not passed:
        raise typer.Exit(EXIT_CHECK_FAILED)


def report_table(r: dict) -> Table:
    t = Table(title="verify: CHILD against PARENT", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("parent", f"{r['parent']} ({r['parent_type']})")
    t.add_row("child", f"{r['child']} ({r['child_type']})")
    t.add_row("inputs", f"{r['inputs']}: {r['tokens']:,} tokens in {r['sequences']:,} sequences")
    t.add_row("run", f"{r['device']}, {r['dtype']}, vocab {r['vocab_compared']:,}")
    t.add_row("max relative error", f"{r['max_rel_error']:.3g}  (tolerance {r['tolerance']:.3g})")
    t.add_row("max / mean abs error", f"{r['max_abs_error']:.3g} / {r['mean_abs_error']:.3g}  (max |logit| {r['max_abs_logit']:.3g})")
    t.add_row("top-1 agreement", f"{r['top1_agreement']:.2%}")
    t.add_row("KL(parent‖child)", f"{r['kl_per_token']:.3g} per token")
    if "prompt" in r:
        t.add_row("prompt", r["prompt"])
        t.add_row("parent generates", r["parent_generation"])
        t.add_row("child generates", r["child_generation"])
        t.add_row("same generation", "[green]yes[/]" if r["same_generation"] else "[red]no[/]")
    t.add_row("seconds", f"{r['seconds']:.1f} compare, {r['load_seconds']:.1f} load")
    return t
