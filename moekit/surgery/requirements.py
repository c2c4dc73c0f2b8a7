"""Checks before a surgery plans anything: the config holds the numbers the surgery reads, as
positive integers, and the checkpoint holds every tensor the architecture needs (the tables in
`moekit.arch.families`), in the shapes the config implies. A surgery that skipped a missing
tensor would write a complete-looking model that does not load, or loads with random weights.
"""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from moekit.arch.families import (ATTENTION_TENSORS, DENSE_FFN_TENSORS, DENSE_LAYER_NORMS, LATENT_ATTENTION,
                                  MODEL_TENSORS, UNTIED_HEAD, read_field)
from moekit.checkpoint import Checkpoint
from moekit.errors import MoekitError
from moekit.arch.targets import TARGETS, Target

Positive = Annotated[StrictInt, Field(gt=0)]


class ModelShape(BaseModel):
    """The config fields every surgery reads."""

    model_config = ConfigDict(extra="ignore")

    num_hidden_layers: Positive
    hidden_size: Positive
    num_attention_heads: Positive
    vocab_size: Positive
    num_key_value_heads: Optional[Positive] = None
    head_dim: Optional[Positive] = None
    intermediate_size: Optional[Positive] = None
    tie_word_embeddings: StrictBool = False

    def size(self, name: str) -> int:
        head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        derived = {"head_dim": head_dim, "q": self.num_attention_heads * head_dim,
                   "kv": (self.num_key_value_heads or self.num_attention_heads) * head_dim}
        value = derived[name] if name in derived else getattr(self, name)
        if value is None:
            raise MoekitError(f"the config has no {name}, which the shape of the model's tensors needs")
        return value


def first_problem(e: ValidationError) -> str:
    """pydantic's first complaint as `field: what is wrong, got VALUE`."""
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "options"
    given = "" if first["type"] == "missing" else f", got {first.get('input')!r}"
    return f"{where}: {first['msg']}{given}"


def model_shape(ckpt: Checkpoint, extra: list[str | tuple[str, ...]] = ()) -> ModelShape:
    """The validated config numbers; `extra`: further fields that must be positive integers
    (a tuple: the first present of several names)."""
    cfg = ckpt.config
    try:
        shape = ModelShape.model_validate(cfg)
    except ValidationError as e:
        raise MoekitError(f"{ckpt.path}: config {first_problem(e)}") from None
    for field in extra:
        value = read_field(cfg, field)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            name = field if isinstance(field, str) else " / ".join(field)
            raise MoekitError(f"{ckpt.path}: config " + (f"has no {name}" if value is None else
                              f"{name} = {value!r}: must be a positive integer"))
    return shape


def check_dense(ckpt: Checkpoint) -> ModelShape:
    """A dense parent of one of `DENSE_LAYER_NORMS`' families holds its whole architecture."""
    shape = model_shape(ckpt)
    per_layer = {**ATTENTION_TENSORS, **DENSE_FFN_TENSORS, **DENSE_LAYER_NORMS.get(ckpt.config.get("model_type"), {})}
    _require(ckpt, shape, _expand(shape, per_layer, range(shape.num_hidden_layers)))
    return shape


def check_moe(ckpt: Checkpoint, target: Target, moe_layers: list[int]) -> ModelShape:
    """An MoE source holds embeddings, attention, and in every MoE layer its router and N experts."""
    fields = target.fields
    shape = model_shape(ckpt, [fields.expert_fields, fields.expert_width, "num_experts_per_tok"])
    n, width = read_field(ckpt.config, fields.expert_fields), ckpt.config[fields.expert_width]
    attention = {} if ckpt.config.get("model_type") in LATENT_ATTENTION else ATTENTION_TENSORS
    required = _expand(shape, attention, range(shape.num_hidden_layers))
    h = shape.hidden_size
    for i in moe_layers:
        required[target.router.format(i=i)] = (n, h)
        if target.router_bias:
            required[target.router_bias.format(i=i)] = (n,)
        required.update(target.experts.shapes(i, n, width, h))
    _require(ckpt, shape, required)
    return shape


def moe_layer_indices(ckpt: Checkpoint, target: Target) -> list[int]:
    """The layers that hold a router, once every one of them is checked to hold what an MoE layer
    of the target needs (and no layer holds experts without a router)."""
    n_layers = model_shape(ckpt).num_hidden_layers
    layers = [i for i in range(n_layers) if target.router.format(i=i) in ckpt.tensors]
    for i in set(range(n_layers)) - set(layers):
        prefix = target.experts.prefix(i)
        if any(name.startswith(prefix) for name in ckpt.tensors):
            raise MoekitError(f"{ckpt.path}: layer {i} holds experts but no router ({target.router.format(i=i)}); "
                              "the checkpoint is incomplete")
    if not layers:
        raise MoekitError(f"{ckpt.path} has no MoE layers in the {target.model_type} layout")
    check_moe(ckpt, target, layers)
    return layers


def _expand(shape: ModelShape, per_layer: dict, layers) -> dict[str, tuple[int, ...]]:
    tables = {**MODEL_TENSORS, **({} if shape.tie_word_embeddings else UNTIED_HEAD)}
    required = {name: tuple(shape.size(d) for d in dims) for name, dims in tables.items()}
    for i in layers:
        required.update({name.format(i=i): tuple(shape.size(d) for d in dims) for name, dims in per_layer.items()})
    return required


def _require(ckpt: Checkpoint, shape: ModelShape, required: dict[str, tuple[int, ...]]) -> None:
    tensors = ckpt.tensors
    missing = [name for name in required if name not in tensors]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise MoekitError(f"{ckpt.path}: the checkpoint lacks {missing[0]}{more}, which a "
                          f"{ckpt.config.get('model_type')} model of {shape.num_hidden_layers} layers needs")
    for name, expected in required.items():
        if tuple(tensors[name].shape) != expected:
            raise MoekitError(f"{ckpt.path}: {name} has shape {tuple(tensors[name].shape)}, the config implies "
                              f"{expected}; the config and the weights disagree")
        if not tensors[name].dtype.is_floating_point:
            raise MoekitError(f"{ckpt.path}: {name} holds {str(tensors[name].dtype).removeprefix('torch.')} "
                              "values; weights of this architecture are floating point")


def check_complete(ckpt: Checkpoint) -> None:
    """For the model types moekit knows: the whole architecture is there (the MoE checks of
    split/add-experts, the dense ones of upcycle). Other types are left to their loader."""
    model_type = ckpt.config.get("model_type")
    if model_type in TARGETS:
        moe_layer_indices(ckpt, TARGETS[model_type])
    elif model_type in DENSE_LAYER_NORMS:
        check_dense(ckpt)
