"""Hidden states entering chosen layers' FFNs (what a new router of that layer will receive),
captured with forward pre-hooks during a pass that stops after the last chosen layer."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from moekit.data.text import batches, calibration_texts, encode, pack_text, separator
from moekit.errors import MoekitError
from moekit.runtime.decoder import decoder_layers, ffn_of, run_decoder


class _Done(Exception):
    """Raised by the last hook: the layers after it are not needed."""


def _hooks(model, layers: list[int], sink: Callable[[int, torch.Tensor], None]) -> list:
    """Register pre-hooks that pass each chosen layer's FFN input to `sink(layer, tensor)`."""
    blocks = decoder_layers(model)
    for i in layers:
        if not 0 <= i < len(blocks):
            raise MoekitError(f"layer {i} does not exist (the model has {len(blocks)})")
    last = max(layers)

    def make(i):
        def hook(_module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            sink(i, x)
            if i == last:
                raise _Done

        return hook

    return [ffn_of(blocks[i]).register_forward_pre_hook(make(i), with_kwargs=True) for i in layers]


@torch.no_grad()
def capture_ffn_inputs(model, input_ids: torch.Tensor, layers: list[int],
                       sink: Callable[[int, torch.Tensor], None]) -> None:
    """One forward pass of the decoder stack up to the last chosen layer, each chosen layer's FFN
    input passed to `sink` (no lm_head: the logits of a large vocabulary would cost more memory
    than everything captured)."""
    handles = _hooks(model, layers, sink)
    try:
        run_decoder(model, input_ids)
    except _Done:
        pass
    finally:
        for h in handles:
            h.remove()


def collect_mlp_inputs_from_ids(
    model, batches: Iterable[torch.Tensor], layers: list[int], max_tokens: int, device, skip_first: int = 1
) -> dict[int, torch.Tensor]:
    """The hidden states entering each chosen layer's MLP, [T, H] fp32 on `device`, T <= max_tokens.

    `batches` are [B, S] token-id tensors with no padding (packed text). The first `skip_first`
    positions of each sequence still serve as context but are not kept: the first position is an
    attention sink whose hidden state is an outlier that would claim a k-means cluster by itself
    (on SmolLM2's layer 15 its direction is opposite to the mean of the other tokens).
    Memory on `device`: len(layers) × max_tokens × H × 4 bytes (32 layers × 64k tokens × 4096 =
    34 GB): collect layers in groups when that is too much.
    """
    out: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    kept = 0
    for ids in batches:
        if kept >= max_tokens:
            break
        room = max_tokens - kept

        def sink(i, x, room=room):
            out[i].append(x[:, skip_first:].reshape(-1, x.shape[-1])[:room].float())

        capture_ffn_inputs(model, ids.to(device), layers, sink)
        kept += out[layers[0]][-1].shape[0]
    if kept == 0:
        raise MoekitError("no calibration tokens to collect hidden states from")
    return {i: torch.cat(xs) for i, xs in out.items()}


def prompt_mlp_inputs(model, prompts: list[list[int]], layers: list[int], device) -> dict[int, torch.Tensor]:
    """Per layer, [P, H]: each prompt's MLP input averaged over its tokens. Prompts run one at a
    time: there are few, and no padding means no mask to get wrong in the average. A leading BOS
    (position 0, the attention sink) is context only, as in `collect_mlp_inputs_from_ids`."""
    means: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    for ids in prompts:
        skip = 1 if len(ids) > 1 else 0

        def sink(i, x, skip=skip):
            means[i].append(x[0, skip:].float().mean(dim=0))

        capture_ffn_inputs(model, torch.tensor([ids], device=device), layers, sink)
    return {i: torch.stack(m) for i, m in means.items()}


def collect_mlp_inputs(
    model, texts: list[str], tokenizer, layers: list[int], max_tokens: int, seq_len: int, device, batch_size: int = 8
) -> dict[int, torch.Tensor]:
    """`collect_mlp_inputs_from_ids` on calibration text: tokenised, packed into seq_len rows."""
    # Tokenise only what can be used: max_tokens, the skipped first position of each row, a row of slack.
    budget = max_tokens + max_tokens // max(seq_len - 1, 1) + seq_len
    rows = pack_text(texts, tokenizer, seq_len, separator=separator(tokenizer), budget=budget)
    return collect_mlp_inputs_from_ids(model, batches(rows, batch_size), layers, max_tokens, device)


def calibration_mlp_inputs(source, layers: list[int], calibration, max_tokens: int, device,
                           allow_pickle: bool = False) -> dict[int, torch.Tensor]:
    """MLP inputs of `layers` on calibration text (a user's file, or the built-in sample), with the
    model loaded by `from_pretrained` (which maps per-expert keys onto 5.x's fused experts)."""
    from moekit.runtime.models import load_model, load_tokenizer

    model, tokenizer = load_model(source, torch.float32, device, allow_pickle=allow_pickle)[0], load_tokenizer(source)
    texts = calibration_texts(calibration)
    return collect_mlp_inputs(model, texts, tokenizer, layers, max_tokens, seq_len=512, device=device)


def prompt_router_rows(
    model, tokenizer, positive: list[list[str]], negative: list[str], layers: list[int], device
) -> dict[int, torch.Tensor]:
    """Per layer, [N, H] unit router rows from prompts (mergekit-moe's "hidden" gate mode).

    Expert i's row is the mean MLP input over `positive[i]` minus the mean over `negative` (when
    given), normalised to unit length. Differences from mergekit, on purpose: the states are the
    MLP inputs (what the router receives), not the residual stream before the layer's attention;
    each prompt is averaged over its tokens (mergekit's default keeps only the last position,
    which with right padding can be a pad token); every prompt weighs the same in the mean.
    Negative prompts remove the component all prompts share, which otherwise dominates every row
    and makes the experts' rows nearly parallel.
    """
    if not positive or any(not p for p in positive):
        raise MoekitError("prompt router init needs at least one positive prompt for every expert")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    def mean_state(prompts: list[str]) -> dict[int, torch.Tensor]:
        ids = [bos + encode(tokenizer, p) for p in prompts]
        if any(len(i) <= len(bos) for i in ids):
            raise MoekitError("a router prompt tokenises to nothing; remove empty prompts")
        return {i: s.mean(dim=0) for i, s in prompt_mlp_inputs(model, ids, layers, device).items()}

    per_expert = [mean_state(p) for p in positive]
    neg = mean_state(negative) if negative else None
    rows = {}
    for layer in layers:
        r = torch.stack([e[layer] for e in per_expert])
        if neg is not None:
            r = r - neg[layer]
        rows[layer] = torch.nn.functional.normalize(r, dim=-1)
    return rows
