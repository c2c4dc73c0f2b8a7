"""Compare the logits of two causal LMs on the same token ids: does CHILD reproduce PARENT?

Both models are loaded by stock transformers (no remote code), so what is measured is what a
user of the output gets. The pair can be anything that shares a vocabulary: dense -> MoE,
MoE -> finer MoE, MoE -> more experts, or two unrelated checkpoints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from contextlib import nullcontext
from typing import Callable, ContextManager
from pathlib import Path

import torch
import torch.nn.functional as F

from moekit.checkpoint import open_checkpoint
from moekit.checkpoint.dtypes import config_name, parse_dtype
from moekit.checkpoint.sources import resolve_source
from moekit.data.text import COMPARISON, batches, cut_rows, is_plain_text, iter_texts, token_stream
from moekit.errors import MoekitError
from moekit.options import VerifyOptions
from moekit.runtime import llamacpp
from moekit.runtime.models import custom_code, load_model, load_tokenizer, refuse_custom_model_code, resolve_device


def vocab_size(model: torch.nn.Module) -> int:
    """How many token ids the model accepts (its input embedding rows, whatever config says)."""
    return model.get_input_embeddings().num_embeddings


def make_inputs(vocab: int, tokens: int = 4096, batch: int = 8, seq_len: int = 256, seed: int = 0,
                data: Path | None = None, tokenizer=None, texts: Iterable[str] | None = None,
                what: str = "text") -> list[torch.Tensor]:
    """Batches of token ids [b, seq_len] holding `tokens` ids in all (the last sequence may be
    shorter and then forms its own batch). Random ids below `vocab` from a seeded generator, or
    the first `tokens` ids of `data` (a file) or `texts` tokenised with `tokenizer`: records and
    `texts` each end with EOS, a plain-text file is one document."""
    if texts is None and data is None:
        stream = torch.randint(vocab, (tokens,), generator=torch.Generator().manual_seed(seed)).tolist()
    else:
        end = tokenizer.eos_token_id
        if data is not None:
            texts, what = iter_texts(data, COMPARISON), str(data)
            end = None if is_plain_text(data) else end
        stream = token_stream(texts, tokenizer, end, budget=tokens, every_text=True)
        if not stream:
            raise MoekitError(f"{what}: no text to compare on (empty file?)")
        if (top := max(stream[:tokens])) >= vocab:
            raise MoekitError(f"{what}: the tokenizer yields id {top}, but a model accepts only {vocab} ids: "
                              "the two models do not share PARENT's vocabulary")
    return batches(cut_rows(stream, seq_len, min_last=1, max_tokens=tokens), batch)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    """[positions, vocab] in fp32 whatever the model dtype; `model` is a transformers module or a
    function of the ids batch (another runtime, e.g. llama.cpp)."""
    if not isinstance(model, torch.nn.Module):
        return torch.as_tensor(model(ids)).float().flatten(0, -2)
    logits = model(input_ids=ids.to(model.device), use_cache=False).logits
    return logits.float().flatten(0, -2)


def llamacpp_runner(gguf: Path):
    """A function of an ids batch [b, s] giving llama.cpp's logits [b, s, vocab] for `gguf`."""
    import numpy as np

    def run(ids: torch.Tensor):
        return np.stack(llamacpp.logits(gguf, ids.tolist()))

    return run


@torch.no_grad()
def compare_models(parent_model, child_model, input_ids_batches: list[torch.Tensor]) -> dict:
    """Run both models on every batch and measure how far CHILD's logits are from PARENT's.

    max_rel_error = max |a - b| / max |a| over all positions and vocabulary entries (a: PARENT);
    NaN or inf in either model counts as an infinite error. KL(PARENT || CHILD) is per token.
    If the vocabularies differ in size, the first min(V_parent, V_child) logits are compared.
    """
    start = time.perf_counter()
    max_err = max_ref = abs_sum = kl_sum = 0.0
    agree = positions = elements = 0
    for ids in input_ids_batches:
        a = _logits(parent_model, ids)
        b = _logits(child_model, ids).to(a.device)
        v = min(a.shape[-1], b.shape[-1])
        a, b = a[:, :v], b[:, :v]
        diff = (a - b).abs().nan_to_num(nan=math.inf)  # python's max() would silently skip a NaN
        max_err = max(max_err, diff.max().item())
        max_ref = max(max_ref, a.abs().max().item())
        abs_sum += diff.sum(dtype=torch.float64).item()
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        kl_sum += F.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="sum").item()
        positions += a.shape[0]
        elements += a.numel()
    if not positions:
        raise MoekitError("no tokens to compare")
    return {
        "max_rel_error": max_err / max_ref if max_ref else max_err,  # all-zero parent logits: absolute error
        "max_abs_error": max_err,
        "mean_abs_error": abs_sum / elements,
        "max_abs_logit": max_ref,
        "top1_agreement": agree / positions,
        "kl_per_token": max(kl_sum / positions, 0.0),  # rounding can make a zero KL a hair negative
        "tokens": positions,
        "sequences": sum(ids.shape[0] for ids in input_ids_batches),
        "vocab_compared": v,
        "seconds": time.perf_counter() - start,
    }


def greedy_continuations(parent_model, child_model, tokenizer, prompt: str, new_tokens: int) -> tuple[str, str]:
    """Both models' greedy continuations of `prompt` (what a user sees when generation is equal)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    texts = []
    for model in (parent_model, child_model):
        with torch.no_grad():
            out = model.generate(ids.to(model.device), max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts[0], texts[1]


def run_verify(opts: VerifyOptions, status: Callable[[str], ContextManager]) -> dict:
    """The verify job: the child's logits against the parent's, in transformers or llama.cpp; the
    report `commands/verify` prints. `status(label)` wraps each slow step (a spinner)."""
    # Bad options and missing paths fail now, not after minutes of loading.
    torch_dtype, where = parse_dtype(opts.dtype), resolve_device(opts.device)
    resolve_source(opts.parent), resolve_source(opts.child)
    if opts.data is not None and not opts.data.is_file():
        raise MoekitError(f"{opts.data}: no such file")
    if opts.runtime == "llama.cpp":
        return verify_in_llamacpp(opts, status)
    start = time.perf_counter()
    parent_model, warnings = load_model(opts.parent, torch_dtype, where, allow_pickle=opts.allow_pickle)
    child_model, child_warnings = load_model(opts.child, torch_dtype, where, allow_pickle=opts.allow_pickle)
    warnings += child_warnings
    vocab = min(vocab_size(parent_model), vocab_size(child_model))
    batches = make_inputs(vocab, opts.tokens, opts.batch, opts.seq_len, opts.seed, opts.data,
                          load_tokenizer(opts.parent) if opts.data else None)
    load_seconds = time.perf_counter() - start
    with status(f"comparing on {sum(b.numel() for b in batches):,} tokens"):
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
    return report


def inputs_name(opts: VerifyOptions) -> str:
    return str(opts.data) if opts.data else f"random ids (seed {opts.seed})"


def verify_in_llamacpp(opts: VerifyOptions, status: Callable[[str], ContextManager]) -> dict:
    """Both models converted by llama.cpp's own converter (one process) and run by llama.cpp."""
    import tempfile

    llamacpp.load_bindings()  # a missing extra fails now, with the install hint
    start = time.perf_counter()
    paths = {"parent": resolve_source(opts.parent), "child": resolve_source(opts.child)}
    for path in paths.values():
        if path.suffix != ".gguf":
            refuse_unsafe_folder(path, opts.allow_pickle)
    with tempfile.TemporaryDirectory(prefix="moekit-verify-") as tmp:
        ggufs = {n: p if p.suffix == ".gguf" else Path(tmp) / f"{n}.gguf" for n, p in paths.items()}
        todo = [(paths[n], g) for n, g in ggufs.items() if g != paths[n]]
        with status("converting with llama.cpp's converter") if todo else nullcontext():
            converted = llamacpp.convert_many(todo) if todo else []
        for (src, _), r in zip(todo, converted):
            if not r["ok"]:
                raise MoekitError(f"{src}: llama.cpp's converter refuses it: {r['error'][:300]}")
        vocab = min(_gguf_vocab(g) for g in ggufs.values())
        batches = make_inputs(vocab, opts.tokens, 1, opts.seq_len, opts.seed, opts.data,
                              load_tokenizer(opts.parent) if opts.data else None)
        load_seconds = time.perf_counter() - start
        with status(f"comparing on {sum(b.numel() for b in batches):,} tokens"):
            result = compare_models(llamacpp_runner(ggufs["parent"]), llamacpp_runner(ggufs["child"]), batches)
    commit = llamacpp.vendored_commit()
    report = {"parent": opts.parent, "child": opts.child, "parent_type": _gguf_arch(ggufs["parent"], paths["parent"]),
              "child_type": _gguf_arch(ggufs["child"], paths["child"]), "inputs": inputs_name(opts),
              "device": "llama.cpp" + (f" {commit[:12]}" if commit else ""), "dtype": "float32 (GGUF f32, f32 KV cache)",
              **result, "load_seconds": load_seconds, "tolerance": opts.tolerance, "warnings": []}
    return report


def refuse_unsafe_folder(path: Path, allow_pickle: bool) -> None:
    """llama.cpp's converter unpickles weights and, for some architectures, loads the tokenizer with
    trust_remote_code=True: the pickle and remote-code rules are checked here, before it runs."""
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
