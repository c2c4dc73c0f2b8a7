"""Options of each surgery as one pydantic model, shared by the CLI flags and YAML recipes.

A recipe is the same fields in YAML (see recipes/); flags given on the command line override it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moekit.errors import UsageError, check_utf8, one_line


RouterInit = Literal["random", "uniform", "zero", "kmeans", "prompts"]
# renormalised: the target's renormalised top-k (norm_topk_prob: true), exact with any router.
# softmax-topk: softmax over all N experts, top-K, no renormalisation; exact at init with a zero
# router and every expert's down_proj × N/K (BRIEF §7).
UpcycleRouting = Literal["renormalised", "softmax-topk"]


class SurgeryOptions(BaseModel):
    """What every surgery takes: where from, where to, and how to write."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    source: str
    output: Path
    calibration: Path | None = None
    calibration_tokens: int = Field(8192, gt=0)
    dtype: str | None = None
    max_shard_size: str = "5GB"
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False
    allow_pickle: bool = False

    @field_validator("output")
    @classmethod
    def _utf8_name(cls, path: Path) -> Path:
        check_utf8(path, "output")
        return path


class UpcycleOptions(SurgeryOptions):
    experts: int = Field(8, description="N experts per MoE layer")
    top_k: int = Field(2, description="K experts per token")
    target: str | None = None
    shared_experts: int | None = None
    routing: UpcycleRouting = "renormalised"
    router_init: RouterInit | None = None  # default: random, or zero with --routing softmax-topk
    prompts: list[Path] = []
    negative_prompts: Path | None = None
    noise: float = Field(0.0, ge=0)
    drop_upcycling: float = Field(0.0, ge=0, lt=1)
    moe_layers: str = "all"
    expert_sources: list[str] = []

    @model_validator(mode="after")
    def _default_router_init(self):
        if self.router_init is None:  # only a zero router keeps softmax-topk exact at init
            self.router_init = "zero" if self.routing == "softmax-topk" else "random"
        return self


def load_options(model: type[BaseModel], recipe: Path | None, cli: dict) -> BaseModel:
    """Merge a YAML recipe with the flags that were given (None means not given)."""
    data = read_recipe(recipe) if recipe is not None else {}
    data.update({k: v for k, v in cli.items() if v is not None and v != []})
    try:
        return model(**data)
    except ValidationError as e:
        raise UsageError(first_problem(e) + (f" (in recipe {recipe})" if recipe else "")) from None


def first_problem(e: ValidationError) -> str:
    """pydantic's first complaint as `field: what is wrong, got VALUE`."""
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "options"
    given = "" if first["type"] == "missing" else f", got {first.get('input')!r}"
    return f"{where}: {first['msg']}{given}"


def read_recipe(recipe: Path) -> dict:
    """A YAML recipe as a dict; every way it can be unreadable is one line naming the recipe."""
    try:
        text = Path(recipe).read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except FileNotFoundError:
        raise UsageError(f"recipe {recipe} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"recipe {recipe} is a folder; give the YAML file") from None
    except UnicodeDecodeError:
        raise UsageError(f"recipe {recipe} is not UTF-8 text (a binary file?); a recipe is YAML") from None
    except OSError as e:
        raise UsageError(f"recipe {recipe}: cannot read it: {(e.strerror or str(e)).lower()}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UsageError(f"recipe {recipe} is not valid YAML{where}: {getattr(e, 'problem', None) or one_line(e)}") from None
    except RecursionError:
        raise UsageError(f"recipe {recipe} nests too deeply to be a recipe") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise UsageError(f"recipe {recipe} must be a mapping of option: value")
    return data


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
    drop_upcycling: float = Field(0.5, ge=0, lt=1)  # ratio re-drawn with --init drop-upcycling
    layers: str = "all"
    experts: int = 8  # dense sources only: upcycled to this many experts first
    target: str | None = None  # dense sources only
    drift_tokens: int = Field(2048, ge=0)  # old-domain tokens to measure the drift at init on (0: skip)


class PruneOptions(SurgeryOptions):
    keep: int | None = Field(None, description="experts kept per MoE layer")
    ratio: float | None = Field(None, description="share of experts removed (0.25, 0.5)")
    method: Literal["reap", "frequency", "ean", "random"] = "reap"
    profile: Path | None = None  # a `moekit profile --json` file: counts for --method frequency
    top_k: int | None = None  # lower top-k when it exceeds the experts kept
    layers: str = "all"
