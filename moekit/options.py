"""Options of each surgery as one pydantic model, shared by the CLI flags and YAML recipes.

A recipe is the same fields in YAML (see recipes/); flags given on the command line override it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moekit.errors import UsageError

RouterInit = Literal["random", "uniform", "zero", "kmeans", "prompts"]
# renormalised: the target's renormalised top-k (norm_topk_prob: true), exact with any router.
# softmax-topk: softmax over all N experts, top-K, no renormalisation; exact at init with a zero
# router and every expert's down_proj × N/K (BRIEF §7).
UpcycleRouting = Literal["renormalised", "softmax-topk"]


class SurgeryOptions(BaseModel):
    """What every surgery takes: where from, where to, and how to write."""

    model_config = ConfigDict(extra="forbid")

    source: str
    output: Path
    calibration: Path | None = None
    calibration_tokens: int = 8192
    dtype: str | None = None
    max_shard_size: str = "5GB"
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False
    allow_pickle: bool = False


class UpcycleOptions(SurgeryOptions):
    experts: int = Field(8, description="N experts per MoE layer")
    top_k: int = Field(2, description="K experts per token")
    target: str | None = None
    shared_experts: int | None = None
    routing: UpcycleRouting = "renormalised"
    router_init: RouterInit | None = None  # default: random, or zero with --routing softmax-topk
    prompts: list[Path] = []
    negative_prompts: Path | None = None
    noise: float = 0.0
    drop_upcycling: float = 0.0
    moe_layers: str = "all"
    expert_sources: list[str] = []

    @model_validator(mode="after")
    def _default_router_init(self):
        if self.router_init is None:  # only a zero router keeps softmax-topk exact at init
            self.router_init = "zero" if self.routing == "softmax-topk" else "random"
        return self


def load_options(model: type[BaseModel], recipe: Path | None, cli: dict) -> BaseModel:
    """Merge a YAML recipe with the flags that were given (None means not given)."""
    data = {}
    if recipe is not None:
        try:
            data = yaml.safe_load(Path(recipe).read_text()) or {}
        except FileNotFoundError:
            raise UsageError(f"recipe {recipe} does not exist") from None
        except yaml.YAMLError as e:
            raise UsageError(f"recipe {recipe} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise UsageError(f"recipe {recipe} must be a mapping of option: value")
    data.update({k: v for k, v in cli.items() if v is not None and v != []})
    try:
        return model(**data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "options"
        raise UsageError(f"{where}: {first['msg']}" + (f" (in recipe {recipe})" if recipe else "")) from None


class SplitOptions(SurgeryOptions):
    granularity: int = Field(description="G children per expert")
    top_k: int | None = Field(None, description="experts per token after the split; default K·G (exact)")
    partition: Literal["contiguous", "random", "kmeans", "coactivation"] = "contiguous"
    target: str | None = None  # dense sources only: which MoE architecture to write
    shared_experts: int | None = None  # dense sources only
    moe_layers: str = "all"  # dense sources only


class AddExpertsOptions(SurgeryOptions):
    new_experts: int = Field(description="M experts appended to every MoE layer")
    init: Literal["copy", "mean", "random", "drop-upcycling"] = "copy"
    copy_from: str = "most-used"  # most-used | least-used | an expert id
    router_init: Literal["copy", "kmeans", "zero"] = "copy"
    profile: Path | None = None  # a `moekit profile --json` file with routing counts
    top_k: int | None = None
    drop_upcycling: float = 0.5  # ratio re-drawn with --init drop-upcycling
    layers: str = "all"
    experts: int = 8  # dense sources only: upcycled to this many experts first
    target: str | None = None  # dense sources only
    drift_tokens: int = 2048  # old-domain tokens to measure the drift at init on (0: skip)
