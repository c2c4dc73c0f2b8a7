"""Compare the logits of two causal LMs on the same token ids: does CHILD reproduce PARENT?

Both models are loaded by stock transformers (no remote code), so what is measured is what a
user of the output gets. The pair can be anything that shares a vocabulary: dense -> MoE,
MoE -> finer MoE, MoE -> more experts, or two unrelated checkpoints.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from moekit.errors import MoekitError


def vocab_size(model: torch.nn.Module) -> int:
    """How many token ids the model accepts (its input embedding rows, whatever config says)."""
    return model.get_input_embeddings().num_embeddings


def _texts(data: Path) -> Iterator[str]:
    """Documents of a .jsonl file (its "text" fields) or 64 KB pieces of any other text file."""
    with open(data, encoding="utf-8", errors="replace") as f:  # odd bytes must not stop a check
        if data.suffix != ".jsonl":
            while piece := f.read(1 << 16):  # streaming: only the first --tokens tokens are needed
                yield piece
            return
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                raise MoekitError(f"{data}:{n}: expected a JSON object with a \"text\" field") from None


def make_inputs(vocab: int, tokens: int = 4096, batch: int = 8, seq_len: int = 256, seed: int = 0,
                data: Path | None = None, tokenizer=None, texts: Iterable[str] | None = None,
                what: str = "text") -> list[torch.Tensor]:
    """Batches of token ids [b, seq_len] holding `tokens` ids in all (the last sequence may be
    shorter and then forms its own batch). Random ids below `vocab` from a seeded generator, or
    the first `tokens` ids of `data` (a file) or `texts` tokenised with `tokenizer` (documents
    separated by EOS)."""
    if data is not None:
        data = Path(data)
        if not data.is_file():
            raise MoekitError(f"{data}: no such file")
        texts, what = _texts(data), str(data)
    if texts is None:
        ids = torch.randint(vocab, (tokens,), generator=torch.Generator().manual_seed(seed))
    else:
        ids = _tokenise(texts, tokenizer, tokens, what, separate=data is None or data.suffix == ".jsonl")
        if ids.max() >= vocab:
            raise MoekitError(f"{what}: the tokenizer yields id {ids.max().item()}, but a model accepts only {vocab} ids: "
                              "the two models do not share PARENT's vocabulary")
    full = len(ids) // seq_len * seq_len
    batches = list(ids[:full].view(-1, seq_len).split(batch)) if full else []
    if full < len(ids):
        batches.append(ids[full:].unsqueeze(0))
    return batches


def _tokenise(texts: Iterable[str], tokenizer, tokens: int, what: str, separate: bool) -> torch.Tensor:
    flat: list[int] = []
    for text in texts:
        flat += tokenizer(text, add_special_tokens=False)["input_ids"]
        if separate and tokenizer.eos_token_id is not None:
            flat.append(tokenizer.eos_token_id)
        if len(flat) >= tokens:
            break
    if not flat:
        raise MoekitError(f"{what}: no text to compare on (empty file?)")
    return torch.tensor(flat[:tokens])


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

    from moekit.llamacpp import logits

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
