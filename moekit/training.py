"""Training an MoE with part of it frozen, on the transformers `Trainer` (accelerate underneath).

The pieces `moekit train` assembles, usable one by one with your own Trainer or loop:

- `read_manifest` / `apply_freeze`: the freeze manifest `moekit add-experts` writes (on-disk,
  per-expert tensor names) applied to the model as loaded: `requires_grad=False` for whole frozen
  tensors; for frozen *slices* of a trainable tensor (old experts inside transformers 5.x's fused
  `experts.gate_up_proj`/`down_proj`, old rows of a router) a gradient mask plus a restore after
  every optimiser step (`FrozenSlices.restore`, run by `FreezeCallback`), so that no optimiser
  update and no decoupled weight decay ever moves them: they stay bit-identical.
- `kd_loss`: KL(old model ‖ new model) per token, Lifelong-MoE's output regularisation.
- the Switch/GShard balance loss and the z-loss (`moekit.metrics`), per layer from router logits.
- `RoutingStatsCallback` (MaxVio_batch per step) and `LossFreeBalanceCallback` (DeepSeek's
  loss-free balancing of `e_score_correction_bias`), on `moekit.runtime.moe.RoutingCounter`.
- `LifelongTrainer`: a `Trainer` whose loss is LM + λ·KD + α·aux.
- `train_model`: all of it, from a model folder and token rows to an output folder.

Nothing here prints; the command (`moekit.commands.train`) reports.
"""

from __future__ import annotations

import json
import math
import random
import re
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from moekit.architectures import MOE_CONFIG, SOFTMAX_RENORM, Routing, read_field
from moekit.errors import MoekitError, UsageError
from moekit.metrics import balance_loss, bias_state, bias_step, capacity, dropped_slots, max_vio, z_loss
from moekit.runtime.moe import RoutingCounter, find_moe_layers, moe_layers, router_logits
from moekit.runtime.transformers_private import (experts_functions, experts_implementation, rename_experts_implementation,
                                                 set_experts_implementation, set_loss_is_batch_mean, to_disk_names)

FROZEN, TRAINABLE = "frozen", "trainable"

# --------------------------------------------------------------------------- freeze manifest


def read_manifest(source: str | Path) -> dict:
    """The freeze manifest of a model folder (its moekit.json's "freeze"), or from a JSON file that
    is either a moekit.json or the bare manifest. Checked for form, not yet against a model."""
    path = Path(source).expanduser()
    file = path / "moekit.json" if path.is_dir() else path
    if not file.is_file():
        raise MoekitError(f"{file}: no such file, so no freeze manifest; `moekit add-experts` writes one "
                          "(--freeze none trains every parameter)")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoekitError(f"{file}: not valid JSON ({e})") from None
    manifest = data.get("freeze", data) if isinstance(data, dict) else None
    if not isinstance(manifest, dict) or "tensors" not in manifest:
        raise MoekitError(f"{file}: no freeze manifest in it (made by a command other than add-experts?); "
                          "--freeze none trains every parameter")
    if manifest.get("format") != 1:
        raise MoekitError(f"{file}: freeze manifest format {manifest.get('format')!r}; this moekit reads format 1")
    for name, rule in manifest["tensors"].items():
        if rule not in (FROZEN, TRAINABLE) and not _is_row_rule(rule):
            raise MoekitError(f'{file}: {name}: expected "frozen", "trainable" or {{"frozen_rows": [start, stop]}}, got {rule!r}')
    return manifest


def _is_row_rule(rule) -> bool:
    rows = rule.get("frozen_rows") if isinstance(rule, dict) else None
    return isinstance(rows, list) and len(rows) == 2 and all(isinstance(r, int) for r in rows)


def check_run(source: str | Path, output: str | Path, manifest: dict | None, overwrite: bool = False):
    """What can be checked before loading anything: the source is a safetensors folder, the output
    may be written, and the manifest names exactly the source's on-disk tensors with expert counts
    that agree with its config (old + new = the config's count; router rows frozen = old experts).
    Returns the opened checkpoint."""
    from moekit.checkpoint import open_checkpoint
    from moekit.checkpoint.writer import check_target

    ckpt = open_checkpoint(source)
    if not ckpt.path.is_dir():
        raise MoekitError(f"{ckpt.path}: train needs a safetensors model folder (`moekit convert` makes one)")
    check_target(Path(output).expanduser(), [ckpt.path], overwrite)
    if manifest is None:
        return ckpt
    unknown = sorted(set(manifest["tensors"]) - set(ckpt.tensors))
    unlisted = sorted(set(ckpt.tensors) - set(manifest["tensors"]))
    if unknown or unlisted:
        raise MoekitError("freeze manifest does not match the model: " + (
            f"it lists {len(unknown)} tensor(s) the model does not have, e.g. {unknown[0]}" if unknown else
            f"the model has {len(unlisted)} tensor(s) the manifest does not list, e.g. {unlisted[0]}"))
    config = ckpt.config
    fields = MOE_CONFIG.get(config.get("model_type"))
    experts = read_field(config, fields.experts) if fields else None
    layers = manifest.get("moe_layers", {})
    for layer, c in layers.items():
        total = c.get("old_experts", 0) + c.get("new_experts", 0)
        if experts is not None and total != experts:
            raise MoekitError(f"freeze manifest says layer {layer} has {c.get('old_experts')} old + "
                              f"{c.get('new_experts')} new experts, the config says {experts}")
    for name, rule in manifest["tensors"].items():
        m = re.search(r"layers\.(\d+)\.", name)
        if _is_row_rule(rule) and m and m.group(1) in layers:
            old = layers[m.group(1)]["old_experts"]
            if rule["frozen_rows"] != [0, old]:
                raise MoekitError(f"freeze manifest freezes rows {rule['frozen_rows']} of {name}, "
                                  f"but layer {m.group(1)} has {old} old experts")
    return ckpt


def _named_tensors(model) -> dict[str, torch.Tensor]:
    """Parameters (each tied parameter once, as on disk) and the buffers saved with the model."""
    saved = set(model.state_dict())
    tensors = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if n in saved)
    return tensors


def manifest_masks(model, manifest: dict) -> dict[str, torch.Tensor]:
    """Runtime name -> boolean "trainable" mask over the tensor's rows (every dim but the last;
    elements for 1-D tensors), from a manifest written in on-disk names.

    Each runtime row gets a unique id; the ids go through `to_disk_names` like the weights would,
    so every on-disk tensor comes back holding the ids of the runtime rows it is made of. Only
    rows are tracked (the last dim collapsed to 1), so this costs one integer per row, not per weight.
    """
    tensors = _named_tensors(model)
    probes, spans, start = {}, {}, 0
    for name, t in tensors.items():
        shape = (*t.shape[:-1], 1) if t.dim() > 1 else tuple(t.shape)
        n = math.prod(shape)
        probes[name], spans[name] = torch.arange(start, start + n).view(shape), (start, n)
        start += n
    disk = to_disk_names(model, probes)
    rules = manifest["tensors"]
    unknown = sorted(set(rules) - set(disk))
    unlisted = sorted(set(disk) - set(rules))
    if unknown:
        raise MoekitError(f"freeze manifest does not match the model: it lists {len(unknown)} tensor(s) the model "
                          f"does not have, e.g. {unknown[0]}")
    if unlisted:
        raise MoekitError(f"freeze manifest does not match the model: the model has {len(unlisted)} tensor(s) the "
                          f"manifest does not list, e.g. {unlisted[0]}")
    decided = torch.full((start,), -1, dtype=torch.int8)
    for name, ids in disk.items():
        rows = ids.reshape(ids.shape[0], -1) if ids.dim() > 1 else ids.reshape(-1, 1)
        rule = rules[name]
        if _is_row_rule(rule):
            a, b = rule["frozen_rows"]
            if not 0 <= a <= b <= rows.shape[0]:
                raise MoekitError(f"freeze manifest freezes rows [{a}, {b}) of {name}, which has {rows.shape[0]} rows")
            decided[rows.flatten()] = 1
            decided[rows[a:b].flatten()] = 0
        else:
            decided[rows.flatten()] = int(rule == TRAINABLE)
    if (decided < 0).any():  # a converter that drops rows: we cannot tell what the manifest means
        raise MoekitError("freeze manifest does not match the model: some weights map to no on-disk tensor")
    masks = {}
    for name, t in tensors.items():
        s, n = spans[name]
        masks[name] = decided[s : s + n].bool().view(t.shape[:-1] if t.dim() > 1 else t.shape)
    return masks


@dataclass
class FrozenSlices:
    """Frozen rows inside trainable tensors, and their values when freezing began."""

    slices: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]]  # (param, frozen rows, saved values)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the frozen rows back. Call after every optimiser step: their gradient is zero, but
        AdamW's decoupled weight decay (and other optimisers' updates) would still move them."""
        for param, frozen, saved in self.slices:
            param[frozen.to(param.device)] = saved.to(param.device)


@dataclass
class FreezeReport:
    frozen: FrozenSlices
    trainable_params: int  # weights that can change
    frozen_params: int  # weights that cannot (frozen tensors and frozen slices)
    masked_tensors: list[str]  # tensors with both: gradient-masked


def apply_freeze(model, manifest: dict | None) -> FreezeReport:
    """Apply a freeze manifest (None: train everything) to `model`, in place.

    Whole frozen tensors get `requires_grad=False`; tensors with frozen rows keep it, get a
    gradient hook that zeroes those rows (so clipping and optimiser state see zeros) and a saved
    copy of them for `FrozenSlices.restore`. Buffers are never trained; the manifest must call
    them frozen (the loss-free bias update changes `e_score_correction_bias` outside autograd).
    Call it on the model on its final device, before the optimiser is made.
    """
    params = dict(model.named_parameters())
    if manifest is None:
        for p in params.values():
            p.requires_grad_(True)
        return FreezeReport(FrozenSlices([]), sum(p.numel() for p in params.values()), 0, [])
    masks = manifest_masks(model, manifest)
    slices, masked, trainable, frozen = [], [], 0, 0
    for name, mask in masks.items():
        if name not in params:
            if mask.any():
                raise MoekitError(f"freeze manifest marks {name} trainable, but it is a buffer, which gradients never change")
            continue
        p = params[name]
        row = p.shape[-1] if p.dim() > 1 else 1  # weights per entry of the mask
        trainable += int(mask.sum()) * row
        frozen += int((~mask).sum()) * row
        p.requires_grad_(bool(mask.any()))
        if mask.any() and not mask.all():
            keep = mask.to(p.device)
            keep = keep.unsqueeze(-1) if p.dim() > 1 else keep
            p.register_hook(lambda g, keep=keep: g * keep.to(g.dtype))
            slices.append((p, ~mask.to(p.device), p.detach()[~mask.to(p.device)].clone()))
            masked.append(name)
    return FreezeReport(FrozenSlices(slices), trainable, frozen, masked)


class FreezeCallback(TrainerCallback):
    """Restores frozen slices after every optimiser step (see `FrozenSlices.restore`)."""

    def __init__(self, frozen: FrozenSlices):
        self.frozen = frozen

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.frozen.restore()


# --------------------------------------------------------------------------- losses


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher ‖ student) per token, in fp32, averaged over the tokens of the selected `rows`
    (a boolean over the batch; all rows by default). The teacher's logits carry no gradient."""
    if rows is not None:
        student_logits, teacher_logits = student_logits[rows], teacher_logits[rows]
    if student_logits.numel() == 0:
        return student_logits.sum() * 0.0  # no row to distil on: a zero that keeps the graph
    t = teacher_logits.detach().float().log_softmax(-1)
    s = student_logits.float().log_softmax(-1)
    return F.kl_div(s, t, log_target=True, reduction="none").sum(-1).mean()


# --------------------------------------------------------------------------- fast experts

LOW_PRECISION_SUFFIX = "_autocast"


class _CastExperts:
    """An experts module seen through a cast: its floating parameters read in `dtype`, everything
    else (config, gate function, flags) as it is. The cast is differentiable, so the fp32
    parameters get their gradient in fp32, as autocast gives every nn.Linear."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        self._module, self._dtype = module, dtype

    def __getattr__(self, name):
        value = getattr(self._module, name)
        if isinstance(value, torch.nn.Parameter) and value.is_floating_point():
            return value.to(self._dtype)
        return value


def _autocast_experts(forward: Callable) -> Callable:
    """transformers' experts function `forward`, with the expert weights cast to the autocast dtype
    while autocast is on. transformers' grouped_mm is not autocast-enabled and casts the input to
    the weight's dtype: with fp32 master weights every expert matmul would run in fp32."""

    def run(self, hidden_states, *args, **kwargs):
        device = hidden_states.device.type
        if torch.is_autocast_enabled(device):
            self = _CastExperts(self, torch.get_autocast_dtype(device))
        return forward(self, hidden_states, *args, **kwargs)

    return run


def use_experts_implementation(model, implementation: str = "grouped_mm") -> str:
    """Run the model's fused experts (transformers 5.x) through `implementation` (grouped_mm,
    batched_mm or eager), with their weights cast to bf16 under autocast; returns what runs, for
    the log. transformers 4.x has no such choice: one module per expert, looped in Python, whose
    nn.Linear layers autocast already runs in bf16."""
    functions = experts_functions()
    layers = moe_layers(model)
    if not layers:
        return "none (a dense model)"
    fused = not any(isinstance(layer.experts, torch.nn.ModuleList) for layer in layers)
    if functions is None or not fused or experts_implementation(model.config) is None:
        return "eager (one module per expert, transformers 4.x)"
    if implementation == "eager":
        set_experts_implementation(model, "eager")
        return "eager"
    if implementation not in functions:
        raise UsageError(f"--experts-implementation {implementation!r}: this transformers knows eager, "
                         + ", ".join(sorted(functions)))
    try:  # transformers checks that it can run here (grouped_mm: a recent torch, SM80+ on CUDA)
        set_experts_implementation(model, implementation)
    except (ValueError, ImportError) as e:
        raise MoekitError(f"--experts-implementation {implementation}: {' '.join(str(e).split())[:200]}") from None
    name = implementation + LOW_PRECISION_SUFFIX
    if name not in functions:
        functions.register(name, _autocast_experts(functions[implementation]))
    rename_experts_implementation(model, implementation, name)  # the same function behind the cast
    return f"{implementation} (expert weights cast to the autocast dtype)"


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing, non-reentrant: each layer's forward runs again inside
    backward, which RoutingCounter recognises and does not count twice."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# --------------------------------------------------------------------------- routing counts and balance


class RoutingStatsCallback(TrainerCallback):
    """Per optimiser step and MoE layer, from the step's counts over all micro-batches and
    processes: MaxVio_batch and the share of routed slots a capacity-limited MoE would drop at
    capacity factor 1.0 (`metrics.max_vio`, `metrics.dropped_slots`). Kept on the device until
    a log asks: `log_metrics()` gives the means since it was last called, per layer and overall;
    `last` the latest step's."""

    def __init__(self, counter: RoutingCounter):
        self.counter = counter
        self.last: dict = {}
        self._since_log: list[torch.Tensor] = []  # [2, layers] per step: MaxVio, drop rate

    def on_step_begin(self, args, state, control, **kwargs):
        self.counter.reset()

    def on_step_end(self, args, state, control, **kwargs):
        counts = self.counter.totals()
        if counts:
            c = torch.stack(list(counts.values()))  # [layers, N]
            slots = c.sum(-1)  # K·T
            caps = capacity(slots, c.shape[-1])  # at capacity factor 1.0, on the device
            drop = torch.stack([dropped_slots(layer, cap[None]) for layer, cap in zip(c, caps)]).squeeze(-1)
            self._since_log.append(torch.stack([max_vio(c), drop / slots]))

    def log_metrics(self) -> dict:
        if not self._since_log:
            return {}
        mean = torch.stack(self._since_log).mean(0).tolist()  # the one copy to the host
        self._since_log = []
        self.last = {"maxvio_batch": sum(mean[0]) / len(mean[0]), "drop_rate_cf1": sum(mean[1]) / len(mean[1]),
                     "maxvio_layers": [round(v, 4) for v in mean[0]], "drop_rate_layers": [round(v, 4) for v in mean[1]]}
        return self.last


class LossFreeBalanceCallback(TrainerCallback):
    """DeepSeek's auxiliary-loss-free balancing (arXiv 2408.15664): after each optimiser step,
    `metrics.bias_step` on every router's `e_score_correction_bias` with the tokens each expert
    received in that step (all micro-batches and processes), fixed (`b_i += u · sign(c̄ − c_i)`)
    or adaptive (Rprop step sizes, as `moekit balance`). The bias only shifts which experts are
    selected, never their weights; it is a buffer (no gradient), kept in fp32 here whatever the
    model's dtype. `state_dict` holds what a resumed run needs."""

    def __init__(self, counter: RoutingCounter, rate: float = 1e-3, adaptive: bool = False):
        self.counter, self.rate, self.adaptive = counter, rate, adaptive
        biased = [layer for layer in counter.moe.layers
                  if isinstance(getattr(layer.router, "e_score_correction_bias", None), torch.Tensor)]
        # keyed by block name (model.layers.1.mlp), as checkpoints hold them; counted by layer index
        self.index = {layer.block_name: layer.index for layer in biased}
        self.biases = {layer.block_name: layer.router.e_score_correction_bias for layer in biased}
        self.master = {n: b.detach().float().clone() for n, b in self.biases.items()}
        self.steps = {n: bias_state(b, rate) for n, b in self.master.items()}

    def on_step_begin(self, args, state, control, **kwargs):
        self.counter.reset()

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        counts = self.counter.totals()
        for name, bias in self.biases.items():
            if self.index[name] in counts:
                master = self.master[name] = self.master[name].to(bias.device)
                size, last = self.steps[name] = tuple(t.to(bias.device) for t in self.steps[name])
                bias_step(master, counts[self.index[name]].to(bias.device), size, last, self.rate, self.adaptive)
                bias.copy_(master)

    def state_dict(self) -> dict:
        return {"master": self.master, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.master, self.steps = state["master"], state["steps"]
        with torch.no_grad():
            for name, bias in self.biases.items():
                bias.copy_(self.master[name])


class EvalCallback(TrainerCallback):
    """Held-out loss before the first step, every `every` steps and after the last: mean next-token
    cross-entropy over `rows`, each process taking its share. Routing counts are paused meanwhile.
    `history` holds {step, tokens, eval_loss}; `report` gets each entry as it comes."""

    def __init__(self, rows: list[list[int]], every: int, batch_size: int, tokens_per_step: int,
                 counter: RoutingCounter | None, report: Callable[[dict], None] | None = None):
        self.rows, self.every, self.batch_size, self.tokens_per_step = rows, every, batch_size, tokens_per_step
        self.counter, self.report = counter, report
        self.history: list[dict] = []

    def evaluate(self, model, step: int) -> None:
        if self.history and self.history[-1]["step"] == step:
            return
        if self.counter:
            self.counter.enabled = False
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if (
            torch.distributed.is_available() and torch.distributed.is_initialized()) else (0, 1)
        total, count = token_loss_sum(model, self.rows[rank::world], self.batch_size)
        if world > 1:
            both = torch.tensor([total, count], dtype=torch.float64, device=next(model.parameters()).device)
            torch.distributed.all_reduce(both)
            total, count = both.tolist()
        if self.counter:
            self.counter.enabled = True
        entry = {"step": step, "tokens": step * self.tokens_per_step, "eval_loss": total / max(count, 1)}
        self.history.append(entry)
        if self.report and rank == 0:
            self.report(entry)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.history:  # a resumed run has its history from the checkpoint
            self.evaluate(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.evaluate(model, state.global_step)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = state["history"]


# --------------------------------------------------------------------------- the trainer


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Packed rows are all seq_len long: stack them; `replay` marks rows from the old domain."""
    return {"input_ids": torch.tensor([r["input_ids"] for r in rows]),
            "replay": torch.tensor([bool(r.get("replay", 0)) for r in rows])}


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each position's logits against the next token, in fp32 (zero on no rows)."""
    if ids.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction=reduction)


CHECKPOINT_STATE = "moekit_state.pt"  # callbacks' state (loss-free bias, eval history) in a checkpoint


class LifelongTrainer(Trainer):
    """A `Trainer` whose loss is `LM + kd_weight · KL(teacher ‖ model) + aux_loss_coef · Switch +
    z_loss_coef · z-loss`.

    With replay rows (`kd_on_replay`) and a KD weight, KD runs on the replay rows and LM on the
    new ones (Lifelong-MoE's regulariser on old-domain text); without replay, KD runs on the
    same rows as LM; without a KD weight, replay rows are LM-trained like the rest (plain
    replay). The teacher (the model before training) runs without gradients. Batches
    come from `collate`. Each term is a per-batch mean, logged as lm_loss / kd_loss / aux_loss /
    z_loss, with any callback's `log_metrics()` (MaxVio, drop rate) beside them; terms stay on
    the device until a log (no host synchronisation per step).

    The Switch loss takes `f` from the experts the router actually chose (`counter`): with
    `balance="micro"` this micro-batch's, with `balance="global"` (Qwen, "Demons in the Detail")
    the whole step's so far — every micro-batch of the step up to this one, summed over all
    data-parallel processes — so the step's last micro-batch sees the global batch's `f`.
    """

    def __init__(self, *args, teacher=None, kd_weight: float = 0.0, kd_on_replay: bool = False,
                 aux_loss_coef: float = 0.0, balance: str = "global", z_loss_coef: float = 0.0,
                 routing: Routing = SOFTMAX_RENORM, counter: RoutingCounter | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.kd_weight, self.kd_on_replay = teacher, kd_weight, kd_on_replay
        self.aux_loss_coef, self.balance, self.z_loss_coef = aux_loss_coef, balance, z_loss_coef
        self.routing, self.counter = routing, counter
        set_loss_is_batch_mean(self)
        self._terms: dict[str, list[torch.Tensor]] = defaultdict(list)

    def _balance_counts(self, before: dict[str, torch.Tensor] | None, layers: int) -> list[torch.Tensor]:
        if self.balance == "global":
            counts = list(self.counter.totals().values())
        else:
            counts = [c - before[k] if k in before else c for k, c in self.counter.counts.items()]
        if len(counts) != layers:
            raise MoekitError(f"{layers} layers returned router logits, {len(counts)} MoE blocks were counted")
        return counts

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        routed = bool(self.aux_loss_coef or self.z_loss_coef)
        before = {k: v.clone() for k, v in self.counter.counts.items()} if (
            self.aux_loss_coef and self.balance == "micro") else None
        out = model(input_ids=ids, use_cache=False, **({"output_router_logits": True} if routed else {}))
        replay = inputs["replay"]
        # Replay rows that are distilled from the old model are not also LM-trained: the teacher's
        # distribution is the better target for the old domain, and LM on them would teach the
        # old domain rather than preserve it.
        distil_replay = bool(self.kd_weight) and self.kd_on_replay
        lm = next_token_loss(out.logits[~replay], ids[~replay]) if distil_replay else next_token_loss(out.logits, ids)
        loss, terms = lm, {"lm_loss": lm}
        if self.kd_weight:
            rows = replay if distil_replay else torch.ones_like(replay)
            if rows.any():
                with torch.no_grad():
                    teacher_logits = self.teacher(input_ids=ids[rows], use_cache=False).logits
                terms["kd_loss"] = kd_loss(out.logits[rows], teacher_logits)
            else:  # a batch without replay rows: nothing to distil on
                terms["kd_loss"] = out.logits.sum() * 0.0
            loss = loss + self.kd_weight * terms["kd_loss"]
        if routed:
            logits = router_logits(out)
            if self.aux_loss_coef:
                counts = self._balance_counts(before, len(logits))
                terms["aux_loss"] = balance_loss(logits, counts, self.routing)
                loss = loss + self.aux_loss_coef * terms["aux_loss"]
            if self.z_loss_coef:
                terms["z_loss"] = z_loss(logits)
                loss = loss + self.z_loss_coef * terms["z_loss"]
        for k, v in terms.items():
            self._terms[k].append(v.detach())
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:  # a training log (not the final summary): add the terms and routing stats
            logs.update({k: float(torch.stack(v).float().mean()) for k, v in self._terms.items() if v})
            self._terms.clear()
            for cb in self.callback_handler.callbacks:
                if hasattr(cb, "log_metrics"):
                    logs.update(cb.log_metrics())
        super().log(logs, *args, **kwargs)

    # Checkpoints hold the runtime state dict as it is. Trainer's own goes through save_pretrained,
    # which writes on-disk names (5.x un-fuses the experts), and its resume loads that back with a
    # non-strict load_state_dict, which skips every renamed tensor: an MoE would resume with its
    # experts as they were at the start (transformers issue 48805). Loaded strictly here.

    def _stateful(self) -> dict:
        return {type(cb).__name__: cb for cb in self.callback_handler.callbacks if hasattr(cb, "state_dict")}

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        from safetensors.torch import save_model

        if not self.args.should_save:
            return
        folder = Path(output_dir or self.args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        save_model(self.accelerator.unwrap_model(self.model), str(folder / "model.safetensors"))
        torch.save({name: cb.state_dict() for name, cb in self._stateful().items()}, folder / CHECKPOINT_STATE)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from safetensors.torch import load_model

        folder = Path(resume_from_checkpoint)
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_model(target, str(folder / "model.safetensors"), strict=True, device=str(next(target.parameters()).device))
        states = torch.load(folder / CHECKPOINT_STATE, weights_only=True)
        for name, cb in self._stateful().items():
            if name in states:
                cb.load_state_dict(states[name])


class _LogTo(TrainerCallback):
    def __init__(self, fn: Callable[[dict], None]):
        self.fn = fn

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            self.fn({"step": state.global_step, "max_steps": state.max_steps, **logs})


# --------------------------------------------------------------------------- data


def load_text_rows(path: str | Path, tokenizer, seq_len: int) -> list[list[int]]:
    """Token rows of exactly `seq_len` ids from a .txt (paragraphs), .jsonl/.json or .parquet file
    (its "text" column), read with `datasets`; documents are joined with the EOS token between them
    and cut into rows, so no padding is needed and no token is wasted but the last partial row."""
    import datasets

    path = Path(path).expanduser()
    if not path.is_file():
        raise MoekitError(f"{path}: no such data file")
    builder, kw = {".jsonl": ("json", {}), ".json": ("json", {}), ".parquet": ("parquet", {})}.get(
        path.suffix, ("text", {"sample_by": "paragraph"}))
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kw)
    except Exception as e:  # datasets raises many types for unreadable files
        raise MoekitError(f"{path}: cannot read it as {builder} data: {' '.join(str(e).split())[:300]}") from None
    if "text" not in ds.column_names:
        raise MoekitError(f"{path}: no \"text\" column (it has {', '.join(ds.column_names) or 'none'})")
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id

    def pack(batch):
        stream = [t for text in batch["text"] if text and text.strip()
                  for t in [*tokenizer(text, add_special_tokens=False)["input_ids"], *([sep] if sep is not None else [])]]
        return {"input_ids": [stream[s : s + seq_len] for s in range(0, len(stream) - seq_len + 1, seq_len)]}

    packed = ds.map(pack, batched=True, batch_size=10_000, remove_columns=ds.column_names, keep_in_memory=True)
    rows = packed["input_ids"] if len(packed) else []  # an empty result has no columns at all
    if not rows:
        raise MoekitError(f"{path}: fewer than --seq-len {seq_len} tokens of text in it")
    return rows


def mix_rows(new: list[list[int]], replay: list[list[int]] | None, replay_ratio: float, seed: int = 0) -> list[dict]:
    """Training examples: every new row, plus replay rows (cycled if too few) making up
    `replay_ratio` of the whole; Trainer's sampler shuffles them."""
    examples = [{"input_ids": r, "replay": 0} for r in new]
    if replay and replay_ratio > 0:
        want = round(len(new) * replay_ratio / (1 - replay_ratio))
        order = list(range(len(replay)))
        random.Random(seed).shuffle(order)
        examples += [{"input_ids": replay[order[i % len(order)]], "replay": 1} for i in range(max(want, 1))]
    return examples


@torch.no_grad()
def token_loss_sum(model, rows: list[list[int]], batch_size: int = 8) -> tuple[float, int]:
    """(summed next-token cross-entropy, tokens predicted) of `model` over token rows (no dropout,
    no gradients; one copy to the host at the end)."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for s in range(0, len(rows), batch_size):
        ids = torch.tensor(rows[s : s + batch_size], device=device)
        logits = model(input_ids=ids, use_cache=False).logits
        total += next_token_loss(logits, ids, reduction="sum")
        count += ids[:, 1:].numel()
    model.train(was_training)
    return float(total), count


def mean_token_loss(model, rows: list[list[int]], batch_size: int = 8) -> float:
    """Mean next-token cross-entropy of `model` over token rows."""
    total, count = token_loss_sum(model, rows, batch_size)
    return total / count


# --------------------------------------------------------------------------- the whole run


SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine_with_min_lr", "wsd": "warmup_stable_decay"}
BALANCE_MODES = ("global", "micro")


@dataclass
class TrainOptions:
    steps: int = 100
    lr: float = 1e-4
    lr_schedule: str = "constant"  # constant | cosine | wsd (warm-up, stable, decay), all after warmup_steps
    min_lr_ratio: float = 0.1  # the floor of cosine and wsd, as a share of lr
    decay_share: float = 0.2  # wsd: the share of the steps that decays
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 512
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0: no clipping
    kd_weight: float = 0.0
    aux_loss_coef: float = 0.0
    balance: str = "global"  # global (Qwen) | micro: where the Switch loss's f comes from
    z_loss_coef: float = 0.0
    bias_update_rate: float = 1e-3
    bias_update: str = "fixed"  # fixed (DeepSeek) | adaptive (Rprop steps, as `moekit balance`)
    replay_ratio: float = 0.25
    eval_share: float = 0.0  # rows of the training text held out for evaluation (without eval rows given)
    eval_every: int = 50
    save_every: int = 0  # checkpoint every N steps (0: none)
    gradient_checkpointing: bool = False
    experts_implementation: str = "grouped_mm"  # transformers 5.x: grouped_mm | batched_mm | eager
    seed: int = 0
    log_every: int = 10
    device: str = "auto"  # auto: what accelerate picks (every GPU under `accelerate launch`); cpu


def hold_out(rows: list[list[int]], share: float, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """(training rows, held-out rows): `share` of the rows, at least one, drawn by `seed`."""
    k = max(1, round(len(rows) * share))
    if k >= len(rows):
        raise MoekitError(f"--eval-share {share} of {len(rows)} row(s) leaves nothing to train on")
    held = set(random.Random(seed).sample(range(len(rows)), k))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def checkpoint_folder(output: str | Path, given: str | Path | None = None) -> Path:
    """Where checkpoints go: `given`, or OUTPUT.checkpoints beside OUTPUT."""
    out = Path(output).expanduser()
    return Path(given).expanduser() if given else out.with_name(out.name + ".checkpoints")


def last_checkpoint(folder: Path) -> str:
    """The newest checkpoint-N folder in `folder`, for --resume."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    if last is None:
        raise MoekitError(f"--resume: no checkpoint in {folder} (written with --save-every)")
    return last


def _training_args(opts: TrainOptions, folder: str, cuda: bool) -> TrainingArguments:
    schedule_kwargs = {"cosine": {"min_lr_rate": opts.min_lr_ratio},
                       "wsd": {"num_decay_steps": max(1, round(opts.steps * opts.decay_share)),
                               "min_lr_ratio": opts.min_lr_ratio}}.get(opts.lr_schedule, {})
    return TrainingArguments(
        output_dir=folder, max_steps=opts.steps, learning_rate=opts.lr, weight_decay=opts.weight_decay,
        per_device_train_batch_size=opts.batch_size, gradient_accumulation_steps=opts.grad_accum,
        warmup_steps=opts.warmup_steps, lr_scheduler_type=SCHEDULES[opts.lr_schedule],
        lr_scheduler_kwargs=schedule_kwargs, max_grad_norm=opts.max_grad_norm or None,
        logging_steps=opts.log_every, report_to="none", remove_unused_columns=False,
        save_strategy="steps" if opts.save_every else "no", save_steps=opts.save_every or 500, save_total_limit=2,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        bf16=cuda and torch.cuda.is_bf16_supported(), use_cpu=not cuda, seed=opts.seed, data_seed=opts.seed,
        disable_tqdm=True, dataloader_drop_last=True)


def check_options(opts: TrainOptions) -> None:
    """Options that cannot work together, before anything is loaded."""
    if opts.lr_schedule not in SCHEDULES:
        raise UsageError(f"--lr-schedule {opts.lr_schedule!r}: use {', '.join(SCHEDULES)}")
    if opts.balance not in BALANCE_MODES:
        raise UsageError(f"--balance {opts.balance!r}: use {' or '.join(BALANCE_MODES)}")
    if opts.bias_update not in ("fixed", "adaptive"):
        raise UsageError(f"--bias-update {opts.bias_update!r}: use fixed or adaptive")
    if opts.warmup_steps >= opts.steps and opts.lr_schedule != "constant":
        raise UsageError(f"--warmup-steps {opts.warmup_steps} leaves none of the {opts.steps} steps to the {opts.lr_schedule} schedule")


def train_model(source: str | Path, output: str | Path, new: list[list[int]], replay: list[list[int]] | None,
                manifest: dict | None, opts: TrainOptions, *, eval_rows: list[list[int]] | None = None,
                checkpoints: str | Path | None = None, resume: bool = False, overwrite: bool = False,
                on_log: Callable[[dict], None] | None = None, record: dict | None = None,
                callbacks: Sequence[TrainerCallback] = ()) -> dict:
    """Train the model folder `source` on token rows and write it to `output`.

    Weights train in fp32 under bf16 autocast on GPUs that have it, fused experts included (their
    weights are cast for the forward, `use_experts_implementation`), and are written back in the
    source's own tensor names, shapes and dtypes (per-expert Hub format, loadable by transformers
    4.57 and 5.x), with the source's config.json and side files unchanged, plus the loss curve
    (training_curve.json / .png). With `save_every`, checkpoints go to `checkpoints`
    (OUTPUT.checkpoints by default) and `resume` continues from the last one. `callbacks` are
    added to the Trainer's (a benchmark's timer). Returns a summary.
    """
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.utils import logging as hf_logging

    from moekit.hf import load_model

    start = time.perf_counter()
    check_options(opts)
    ckpt = check_run(source, output, manifest, overwrite)
    if eval_rows is None and opts.eval_share:
        new, eval_rows = hold_out(new, opts.eval_share, opts.seed)
    examples = mix_rows(new, replay, opts.replay_ratio, opts.seed)
    if len(examples) < opts.batch_size:
        raise MoekitError(f"only {len(examples)} row(s) of {opts.seq_len} tokens of data, fewer than --batch-size {opts.batch_size}")
    folder = checkpoint_folder(output, checkpoints) if (opts.save_every or resume) else None
    last = last_checkpoint(folder) if resume else None
    hf_logging.set_verbosity_error()

    work = tempfile.TemporaryDirectory(prefix="moekit-train-")  # Trainer wants a folder: checkpoints or nothing
    cuda = opts.device != "cpu" and torch.cuda.is_available()
    args = _training_args(opts, str(folder or work.name), cuda)
    model, warnings = load_model(ckpt.path, torch.float32, args.device)
    if warnings:
        raise MoekitError(warnings[0])
    experts = use_experts_implementation(model, opts.experts_implementation)
    if opts.gradient_checkpointing:
        enable_checkpointing(model)
    freeze = apply_freeze(model, manifest)
    teacher = None
    if opts.kd_weight:
        teacher, _ = load_model(ckpt.path, _weights_dtype(ckpt), args.device)
        teacher.requires_grad_(False)
    if opts.aux_loss_coef or opts.z_loss_coef:  # a model without router logits fails now, not at the first step
        with torch.no_grad():
            router_logits(model(input_ids=torch.tensor([new[0][:2]], device=args.device), output_router_logits=True))
    counter = RoutingCounter(find_moe_layers(model)) if moe_layers(model) else None  # a dense model trains too
    callbacks = [FreezeCallback(freeze.frozen), *callbacks]
    stats = RoutingStatsCallback(counter) if counter else None
    if stats:
        callbacks.append(stats)
    balance = LossFreeBalanceCallback(counter, opts.bias_update_rate, opts.bias_update == "adaptive") if (
        counter and opts.bias_update_rate) else None
    if balance and balance.biases:
        callbacks.append(balance)
    tokens_per_step = opts.batch_size * opts.grad_accum * opts.seq_len * args.world_size
    evaluation = EvalCallback(eval_rows, opts.eval_every, opts.batch_size, tokens_per_step, counter, on_log) if eval_rows else None
    if evaluation:
        callbacks.append(evaluation)
    if on_log:
        callbacks.append(_LogTo(on_log))

    config = model.config
    fields = MOE_CONFIG.get(config.model_type)
    trainer = LifelongTrainer(
        model=model, args=args, train_dataset=examples, data_collator=collate, callbacks=callbacks,
        teacher=teacher, kd_weight=opts.kd_weight, kd_on_replay=bool(replay), aux_loss_coef=opts.aux_loss_coef,
        balance=opts.balance, z_loss_coef=opts.z_loss_coef, routing=fields.routing if fields else SOFTMAX_RENORM,
        counter=counter)
    for cb in (PrinterCallback, ProgressCallback):  # reporting is the caller's (on_log)
        trainer.remove_callback(cb)
    if cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    result = trainer.train(resume_from_checkpoint=last)
    if counter:
        counter.remove()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    evals = evaluation.history if evaluation else []
    summary = {
        "steps": trainer.state.global_step, "tokens": trainer.state.global_step * tokens_per_step,
        "train_seconds": round(result.metrics.get("train_runtime", 0.0), 1),
        "trainable params": freeze.trainable_params, "frozen params": freeze.frozen_params,
        "gradient-masked tensors": len(freeze.masked_tensors), "first loss": logs[0]["loss"] if logs else None,
        "last loss": logs[-1]["loss"] if logs else None,
        "first eval loss": evals[0]["eval_loss"] if evals else None, "last eval loss": evals[-1]["eval_loss"] if evals else None,
        "maxvio_batch last": stats.last.get("maxvio_batch") if stats else None,
        "experts": experts, "lr schedule": opts.lr_schedule, "balance": opts.balance if opts.aux_loss_coef else None,
        "gradient checkpointing": opts.gradient_checkpointing,
        "peak memory GiB": round(torch.cuda.max_memory_allocated(args.device) / 2**30, 2) if cuda else None,
        "resumed from": last, "devices": f"{args.world_size} x {args.device.type}"}
    if trainer.is_world_process_zero():
        curve = {"train": logs, "eval": evals}
        written = save_trained(model, ckpt, output, overwrite=overwrite, opts=opts, manifest=manifest,
                               summary=summary, log_history=trainer.state.log_history, record=record or {},
                               files={"training_curve.json": json.dumps(curve, indent=1).encode(),
                                      "training_curve.png": plot_curve(curve, title=Path(output).name)})
        summary.update(output=str(written), seconds=round(time.perf_counter() - start, 1))
    trainer.accelerator.wait_for_everyone()
    work.cleanup()
    return summary


def plot_curve(curve: dict, title: str = "") -> bytes:
    """The training loss (per log) and the held-out loss (per evaluation) against tokens, as a PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    train, evals = curve.get("train", []), curve.get("eval", [])
    if train:
        per_step = evals[-1]["tokens"] / max(evals[-1]["step"], 1) if evals and evals[-1]["step"] else None
        xs = [h["step"] * per_step for h in train] if per_step else [h["step"] for h in train]
        ax.plot(xs, [h["loss"] for h in train], lw=1, alpha=0.6, label="training loss")
    if evals:
        ax.plot([e["tokens"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="held-out loss")
    ax.set_xlabel("tokens" if evals else "step")
    ax.set_ylabel("next-token cross-entropy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _weights_dtype(ckpt) -> torch.dtype:
    """The floating dtype most of the checkpoint's bytes are in (the teacher runs in it)."""
    sizes: dict[torch.dtype, int] = defaultdict(int)
    for m in ckpt.tensors.values():
        if m.dtype.is_floating_point:
            sizes[m.dtype] += m.nbytes
    return max(sizes, key=sizes.get) if sizes else torch.float32


def save_trained(model, ckpt, output: Path, *, overwrite: bool, opts: TrainOptions, manifest: dict | None,
                 summary: dict, log_history: list[dict], record: dict, files: dict[str, bytes] | None = None) -> Path:
    """Write `model` under the source checkpoint's own tensor names, shapes and dtypes (mapped back
    from the runtime layout by transformers' own reverse conversion), with its config.json (same
    content: training changes no config) and side files, plus moekit.json and a model card."""
    from moekit.pipeline import OutputTensor, write_model

    with torch.no_grad():
        state = to_disk_names(model, {k: v.detach() for k, v in model.state_dict().items()})
    missing = [m.name for m in ckpt.tensors.values() if m.name not in state]
    if missing:
        raise MoekitError(f"the trained model has no tensor {missing[0]} (and {len(missing) - 1} more) of the source")

    def produce(meta):
        t = state[meta.name]
        if tuple(t.shape) != meta.shape:
            raise MoekitError(f"{meta.name}: trained shape {tuple(t.shape)}, source shape {meta.shape}")
        return t.to("cpu", meta.dtype)

    outputs = [OutputTensor(m, partial(produce, m)) for m in ckpt.tensors.values()]
    options = {**asdict(opts), "freeze": "manifest" if manifest else "none", **record}
    layers = [{"moe_layers": manifest.get("moe_layers", {})}] if manifest else []
    result = write_model(
        output, ckpt, outputs, config=ckpt.config, operation="train", options=options, layers=layers,
        summary=summary, extra={"training_log": log_history},
        title=f"{ckpt.config.get('model_type', 'model')} trained by moekit",
        what=(f"`{ckpt.path.name}` trained for {summary['steps']} steps "
              + ("with its freeze manifest applied (old experts, old router rows and the rest frozen)." if manifest
                 else "with every parameter trainable.")),
        max_shard_size=5 * 1000**3, overwrite=overwrite, files=files)
    return result.path
