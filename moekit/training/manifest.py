"""The freeze manifest `moekit add-experts` writes (on-disk, per-expert tensor names), checked
against a model folder and applied to the model as loaded: `requires_grad=False` for whole frozen
tensors; for frozen *slices* of a trainable tensor (old experts inside transformers 5.x's fused
`experts.gate_up_proj`/`down_proj`, old rows of a router) a gradient mask plus a restore after
every optimiser step (`FrozenSlices.restore`, run by `callbacks.FreezeCallback`), so that no
optimiser update and no decoupled weight decay ever moves them: they stay bit-identical.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.arch.families import MOE_CONFIG, read_field
from moekit.errors import MoekitError
from moekit.runtime.transformers_private import to_disk_names


FROZEN, TRAINABLE = "frozen", "trainable"


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
            raise MoekitError(f'{file}: {name}: expected "frozen", "trainable" or {{"frozen_rows": [start, stop]}}, '
                              f'got {rule!r}')
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
                raise MoekitError(f"freeze manifest marks {name} trainable, but it is a buffer, "
                                  "which gradients never change")
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
