"""Compare the logits of two causal LMs on the same token ids: does CHILD reproduce PARENT?

Both models are loaded by stock transformers (no remote code), so what is measured is what a
user of the output gets. The pair can be anything that shares a vocabulary: dense -> MoE,
MoE -> finer MoE, MoE -> more experts, or two unrelated checkpoints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from moekit.data.text import COMPARISON, batches, cut_rows, is_plain_text, iter_texts, token_stream
from moekit.errors import MoekitError


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

    from moekit.runtime.llamacpp import logits

    def run(ids: torch.Tensor):
        return np.stack(logits(gguf, ids.tolist()))

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
