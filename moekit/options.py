"""One pydantic model per verb: its positional arguments and flags, their help and validators.

A field is written once: the CLI's Typer parameters are generated from it (`commands/common.py`),
a YAML recipe holds the same fields (see recipes/), and the flags given on the command line
override the recipe. A field's flags are `--its-name` unless `option(...)` names others, and
`argument(...)` makes it a positional argument.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from moekit.data import FORMATS as TEXT_FORMATS
from moekit.errors import UsageError, check_utf8, one_line


def option(default: Any = ..., help: str = "", *names: str, shown: str | None = None, flag_type: type | None = None,
           **constraints) -> Any:
    """A flag: `names` are its short flag and/or a long name other than `--field-name`; `shown` is
    what --help says the default is (else the default itself); `flag_type` what the flag itself
    parses when that differs from the field's type (a comma-separated string for a list)."""
    extra = {"names": list(names), "shown": shown, "flag_type": flag_type}
    return Field(default, description=help, json_schema_extra={k: v for k, v in extra.items() if v}, **constraints)


def argument(help: str, position: int, default: Any = ...) -> Any:
    """A positional argument; `position` orders the ones a verb takes (SOURCE 0, OUTPUT 1)."""
    return Field(default, description=help, json_schema_extra={"position": position})


def position(field: FieldInfo) -> int | None:
    """Where a positional argument goes, or None for a flag."""
    return (field.json_schema_extra or {}).get("position")


def flag_names(name: str, field: FieldInfo) -> list[str]:
    """The flags of a field: `--its-name` unless it names another long flag, plus its short flag."""
    names = (field.json_schema_extra or {}).get("names", [])
    return names if any(n.startswith("--") for n in names) else [f"--{name.replace('_', '-')}", *names]


def cli_fields(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """A verb's fields in --help order: its own first, then those of the models it extends."""
    fields: dict[str, FieldInfo] = {}
    for cls in model.__mro__:
        for name in cls.__dict__.get("__annotations__", {}):
            if name in model.model_fields:
                fields.setdefault(name, model.model_fields[name])
    return fields


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# --------------------------------------------------------------------------- what several verbs share

SOURCE_HELP = "Model folder, .gguf file, or a built-in name (smollm2-135m)."
MOE_MODEL_HELP = "MoE model folder (any MoE family transformers loads)."
BATCH_HELP = "Sequences per forward pass (one batch for MaxVio_batch, local balance loss and capacity)."
SEQ_LEN_HELP = "Tokens per sequence."


class JsonOption(Options):
    # how the result is printed: not an option of the work, so not in moekit.json
    json_output: bool = option(False, "Print the result as JSON on stdout instead of tables.", "--json", exclude=True)


class PickleOption(Options):
    allow_pickle: bool = option(False, "Read pytorch_model.bin (with torch.load(weights_only=True)).")


class OutputOptions(Options):
    output: Path = argument("Output folder; must not exist (see --overwrite). Built in a hidden "
                            ".OUTPUT.moekit-partial-PID folder beside it.", 1)
    overwrite: bool = option(False, "Replace OUTPUT if it exists (only once the new one is complete).")

    @field_validator("output")
    @classmethod
    def _utf8_name(cls, path: Path) -> Path:
        check_utf8(path, "output")
        return path


class WriteOptions(OutputOptions, PickleOption, JsonOption):
    """What every command that writes a checkpoint takes: where from, where to, and how to write."""

    source: str = argument(SOURCE_HELP, 0)
    dtype: str | None = option(None, "Cast floating-point weights: float32, bfloat16, float16.",
                               shown="the source's; GGUF: float32")
    max_shard_size: str = option("5GB", "Largest safetensors shard, e.g. 5GB, 500MB.")


class SurgeryOptions(WriteOptions):
    """What every surgery takes besides: calibration text and the forward passes on it."""

    calibration: Path | None = option(None, f"Calibration text: {TEXT_FORMATS}.", shown="built-in sample of real text")
    calibration_tokens: int = option(8192, "Tokens of calibration text to use.", gt=0)
    seed: int = option(0, "Seed of every random choice.")
    device: str = option("auto", "Device for forward passes on calibration text: auto, cpu, cuda.")


# --------------------------------------------------------------------------- checkpoint verbs


class InspectOptions(PickleOption, JsonOption):
    source: str = argument(SOURCE_HELP, 0)


class ConvertOptions(WriteOptions):
    """Convert takes only what every writer takes."""


RouterInit = Literal["random", "uniform", "zero", "kmeans", "prompts"]
# renormalised: the target's renormalised top-k (norm_topk_prob: true), exact with any router.
# softmax-topk: softmax over all N experts, top-K, no renormalisation; exact at init with a zero
# router and every expert's down_proj × N/K.
UpcycleRouting = Literal["renormalised", "softmax-topk"]
TARGETS_HELP = "mixtral, qwen2_moe, qwen3_moe, glm4_moe, flex_olmo, granitemoe, granitemoeshared."


class UpcycleOptions(SurgeryOptions):
    source: str = argument("Dense model folder, .gguf, or smollm2-135m.", 0)
    experts: int = option(8, "Experts per MoE layer, N ≥ 2.", "-n")
    top_k: int = option(2, "Experts per token, 1 ≤ K ≤ N.", "-k")
    target: str | None = option(None, TARGETS_HELP, shown="the parent family's natural target")
    shared_experts: int | None = option(None, "Shared experts (qwen2_moe: 1, glm4_moe: 1-8, granitemoeshared: 1); "
                                        "they start with zero output.")
    routing: UpcycleRouting = option("renormalised", "renormalised (top-k weights sum to 1) | softmax-topk (softmax "
                                     "over all N, top-K, no renormalisation: qwen2_moe, qwen3_moe, flex_olmo; exact "
                                     "at init with a zero router, down_proj × N/K).")
    router_init: RouterInit | None = option(None, "random | uniform | zero | kmeans | prompts.",
                                            shown="random; zero with --routing softmax-topk")
    prompts: list[Path] = option([], "One prompt file per expert for --router-init prompts (repeat the flag): "
                                 f"{TEXT_FORMATS}, a prompt each.")
    negative_prompts: Path | None = option(None, "Prompts no expert should prefer (with --router-init prompts): "
                                           f"{TEXT_FORMATS}, a prompt each.")
    noise: float = option(0.0, "Relative Gaussian noise σ on expert weights (breaks exactness).", ge=0)
    drop_upcycling: float = option(0.0, "Re-draw this ratio of each expert's neurons (Drop-Upcycling; breaks "
                                   "exactness).", ge=0, lt=1)
    moe_layers: str = option("all", "all | every:2 | 0-3,20-29 | skip-first:2,skip-last:2.")
    expert_sources: list[str] = option([], "A,B,...: expert i's FFN from fine-tune i of the same base "
                                       "(Branch-Train-MiX).", flag_type=str)

    @field_validator("expert_sources", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        return (value.split(",") if value else []) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _default_router_init(self):
        if self.router_init is None:  # only a zero router keeps softmax-topk exact at init
            self.router_init = "zero" if self.routing == "softmax-topk" else "random"
        return self


class SplitOptions(SurgeryOptions):
    source: str = argument("MoE folder moekit can read, or a dense model (upcycled on the fly).", 0)
    granularity: int = option(..., "G: children per expert; must divide the expert width.", "-g")
    top_k: int | None = option(None, "Experts per token after the split.", "-k", shown="K·G, exact")
    partition: Literal["contiguous", "random", "kmeans", "coactivation"] = option(
        "contiguous", "contiguous | random | kmeans | coactivation: which neurons go together.")
    target: str | None = option(None, "Dense sources only: the MoE architecture to write.",
                                shown="the family's natural target")
    shared_experts: int | None = option(None, "Dense sources only: shared experts (zero output at start).")
    moe_layers: str = option("all", "Dense sources only: which layers become MoE (as in upcycle).")


LAYERS_HELP = "Only `all`: every MoE layer shares one expert count."


class AddExpertsOptions(SurgeryOptions):
    source: str = argument("MoE folder (or a dense model, upcycled first).", 0)
    new_experts: int = option(..., "M experts appended to every MoE layer.", "-m")
    init: Literal["copy", "mean", "random", "drop-upcycling"] = option(
        "copy", "copy | mean | random | drop-upcycling: the new experts' weights.")
    copy_from: str = option("most-used", "most-used | least-used | an expert id (with copy / drop-upcycling).")
    router_init: Literal["copy", "kmeans", "zero"] = option("copy", "copy | kmeans | zero: the new router rows.")
    profile: Path | None = option(None, "Routing counts from `moekit profile --json` (for most-used / least-used).")
    top_k: int | None = option(None, "Experts per token after growing.", "-k", shown="unchanged")
    drop_upcycling: float = option(0.5, "Share of each new expert's neurons re-drawn with --init drop-upcycling.",
                                   ge=0, lt=1)
    layers: str = option("all", LAYERS_HELP)
    experts: int = option(8, "Dense sources only: experts to upcycle to first.", "-n")
    target: str | None = option(None, "Dense sources only: the MoE architecture to upcycle to first.",
                                shown="the family's natural target")
    drift_tokens: int = option(2048, "Old-domain tokens to measure the drift at init on; 0 skips.", ge=0)


class PruneOptions(SurgeryOptions):
    source: str = argument("MoE model folder (any family moekit reads).", 0)
    keep: int | None = option(None, "N': experts kept in every MoE layer.", "-n")
    ratio: float | None = option(None, "Share of the experts removed instead of --keep, e.g. 0.25 or 0.5.")
    method: Literal["reap", "frequency", "ean", "random"] = option(
        "reap", "reap | frequency | ean | random: how experts are scored.")
    profile: Path | None = option(None, "Routing counts from `moekit profile --json` instead of a calibration pass "
                                  "(--method frequency).")
    top_k: int | None = option(None, "Lower top-k to this (needed when it exceeds --keep).", "-k", shown="unchanged")
    layers: str = option("all", LAYERS_HELP)


# --------------------------------------------------------------------------- verbs that run models


class VerifyOptions(PickleOption, JsonOption):
    parent: str = argument(SOURCE_HELP, 0)
    child: str = argument(SOURCE_HELP, 1)
    data: Path | None = option(None, f"Compare on this text, tokenised by PARENT's tokenizer: {TEXT_FORMATS} (a .txt "
                               "is compared as it is, not in paragraphs).", shown="random token ids")
    tokens: int = option(4096, "Token positions to compare.", ge=1)
    batch: int = option(8, "Sequences per forward pass.", ge=1)
    seq_len: int = option(256, SEQ_LEN_HELP, ge=1)
    device: str = option("auto", "auto (cuda when available), cpu, cuda, cuda:N.")
    tolerance: float = option(1e-5, "Largest max relative logit error that passes.", ge=0)
    dtype: str = option("float32", "Dtype both models run in: float32, bfloat16, float16.")
    seed: int = option(0, "Seed of the random token ids.")
    prompt: str | None = option(None, "Also generate greedily from this prompt with both models and compare the text.")
    new_tokens: int = option(24, "Tokens to generate with --prompt.", ge=1)
    runtime: Literal["transformers", "llama.cpp"] = option(
        "transformers", "transformers, or llama.cpp: both models converted by llama.cpp's own converter (f32 GGUF; a "
        ".gguf is used as it is) and run by llama.cpp (pip install 'moekit[llamacpp]').")

    @model_validator(mode="after")
    def _llamacpp_runs_f32_logits(self):
        if self.runtime == "llama.cpp" and (self.prompt is not None or self.dtype != "float32"):
            raise ValueError("--runtime llama.cpp compares f32 GGUF logits: --prompt and --dtype are transformers only")
        return self


class RunOptions(Options):
    """What profile and balance share: an MoE run on batches of text (each verb sets its own
    max_tokens, batch_size and seq_len defaults)."""

    model: str = argument(MOE_MODEL_HELP, 0)
    device: str = option("auto", "auto (cuda when available), cpu, cuda, cuda:N.")
    dtype: str = option("auto", "bf16 or fp32; auto: bf16 on CUDA, fp32 on CPU.")

    @model_validator(mode="after")
    def _one_sequence_at_least(self):
        if self.max_tokens < self.seq_len:
            raise ValueError(f"--max-tokens {self.max_tokens} is less than one sequence (--seq-len {self.seq_len})")
        return self


class ProfileOptions(RunOptions, PickleOption):
    data: list[Path] = option([], f"Text file: {TEXT_FORMATS}; repeat for several domains.",
                              shown="built-in sample of real English text")
    max_tokens: int = option(65536, "Tokens per domain (whole sequences of --seq-len).", ge=1)
    batch_size: int = option(8, BATCH_HELP, ge=1)
    seq_len: int = option(512, SEQ_LEN_HELP, ge=2)
    device_map: str | None = option(None, "auto: spread a model larger than one GPU over all GPUs (accelerate).")
    capacity_factors: list[float] = option([1.0, 1.25, 1.5, 2.0], "Capacity factors for drop rates, comma-separated.",
                                           shown="1.0,1.25,1.5,2.0", flag_type=str)
    json_out: Path | None = option(None, "Write every number as JSON to this file (- for stdout).", "--json")
    plot: Path | None = option(None, "Write PNG figures into this folder: layer × expert load per domain, MaxVio per "
                               "layer.")
    html_out: Path | None = option(None, "Write one self-contained HTML report (figures embedded).", "--html")

    @field_validator("capacity_factors", mode="before")
    @classmethod
    def _positive_numbers(cls, value):
        try:
            factors = [float(f) for f in value.split(",")] if isinstance(value, str) else value
        except ValueError:
            factors = []
        if not factors or not all(isinstance(f, (int, float)) and 0 < f < float("inf") for f in factors):
            raise ValueError(f"--capacity-factors takes positive numbers separated by commas, got {value!r}")
        return factors


class BalanceOptions(RunOptions, OutputOptions, JsonOption):
    data: Path | None = option(None, f"Calibration text: {TEXT_FORMATS}.", shown="built-in sample of real English text")
    rate: float = option(1e-3, "Bias update speed u in b_i += u·sign(c̄ − c_i).", ge=1e-9)
    steps: int = option(300, "Bias updates, one per batch (the calibration batches repeat when fewer).", ge=1)
    fixed_rate: bool = option(False, "Every step is --rate (DeepSeek's rule as published). Default: --rate is the "
                              "largest step; an expert's step halves when its direction flips, so saturated sigmoid "
                              "routers settle too.")
    eval_data: Path | None = option(None, f"Held-out text for MaxVio before and after: {TEXT_FORMATS}.",
                                    shown="a random quarter of --data's sequences")
    max_tokens: int = option(65536, "Tokens of --data (and of --eval-data) to use.", ge=1)
    batch_size: int = option(4, BATCH_HELP, ge=1)
    seq_len: int = option(256, SEQ_LEN_HELP, ge=2)


# --------------------------------------------------------------------------- train



class TrainOptions(Options):
    """How `moekit.training.train_model` trains: the hyperparameters, without the files."""

    steps: int = option(100, "Optimiser steps.", ge=1)
    lr: float = option(1e-4, "Peak learning rate (AdamW).", ge=0)
    lr_schedule: Literal["constant", "cosine", "wsd"] = option(
        "constant", "After the warm-up: constant, cosine (down to the floor) or wsd (stable, then a cosine decay over "
        "--decay-share of the steps).")
    min_lr_ratio: float = option(0.1, "Floor of cosine and wsd, as a share of --lr.", ge=0, le=1)
    decay_share: float = option(0.2, "wsd: share of the steps that decay.", ge=0, le=1)
    batch_size: int = option(8, "Rows per device per micro-batch.", ge=1)
    grad_accum: int = option(1, "Micro-batches per optimiser step.", ge=1)
    seq_len: int = option(512, "Tokens per row.", ge=2)
    weight_decay: float = option(0.0, "AdamW decoupled weight decay (never applied to frozen weights).", ge=0)
    warmup_steps: int = option(0, "Linear learning-rate warm-up steps.", ge=0)
    max_grad_norm: float = option(1.0, "Clip the gradient norm to this; 0: no clipping.", ge=0)
    kd_weight: float = option(0.0, "λ of KL(old model ‖ new model) per token (Lifelong-MoE); 0: no teacher.", ge=0)
    aux_loss_coef: float = option(0.0, "α of the Switch balance loss, per layer from router logits.", ge=0)
    balance: Literal["global", "micro"] = option(
        "global", "Where the Switch loss counts expert loads: global (the whole step: every micro-batch so far and "
        "every GPU; Qwen) or micro (each micro-batch).")
    z_loss_coef: float = option(0.0, "Coefficient of the router z-loss mean(logsumexp(logits)²).", ge=0)
    bias_update_rate: float = option(1e-3, "u of loss-free balancing on e_score_correction_bias (GLM-4.5/DeepSeek-V3 "
                                     "family); 0: off.", ge=0)
    bias_update: Literal["fixed", "adaptive"] = option(
        "fixed", "Loss-free step: fixed (u every step, DeepSeek) or adaptive (at most u, Rprop, as `moekit balance`).")
    replay_ratio: float = option(0.25, "Share of training rows taken from --replay.", ge=0, le=0.95)
    eval_share: float = option(0.0, "Without --eval-data: hold out this share of --data's rows for evaluation.",
                               ge=0, le=0.5)
    eval_every: int = option(50, "Evaluate every N steps.", ge=1)
    save_every: int = option(0, "Checkpoint every N steps (into --checkpoint-dir); 0: none.", ge=0)
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass: less memory, about a "
                                          "third more compute.")
    weights: Literal["auto", "bf16", "fp32"] = option(
        "auto", "Weights the forward and backward read: bf16 (fp32 master copies in the optimiser), fp32 (bf16 "
        "autocast on the GPU), or auto: bf16 on a bf16 GPU when every weight trains (no freeze manifest), else fp32.")
    experts_implementation: str = option("moekit_grouped_mm", "transformers 5.x fused experts: moekit_grouped_mm "
                                         "(moekit's own, the least GPU time), or transformers' grouped_mm, "
                                         "batched_mm or eager; bf16 under autocast either way. 4.x loops over "
                                         "expert modules.")
    seed: int = option(0, "Seed of data order and replay sampling.")
    log_every: int = option(10, "Log losses, MaxVio and drop rates every N steps.", ge=1)
    device: str = option("auto", "auto (GPU(s) when present; every GPU under `accelerate launch`) or cpu.")

    @field_validator("device")
    @classmethod
    def _accelerate_picks_gpus(cls, device: str) -> str:
        if device not in ("auto", "cpu"):
            raise ValueError(f"use auto or cpu (accelerate picks the GPUs), got {device!r}")
        return device

    @model_validator(mode="after")
    def _steps_after_warmup(self):
        if self.warmup_steps >= self.steps and self.lr_schedule != "constant":
            raise ValueError(f"--warmup-steps {self.warmup_steps} leaves none of the {self.steps} steps to the "
                             f"{self.lr_schedule} schedule")
        return self


class TrainRunOptions(TrainOptions, OutputOptions, JsonOption):
    """What `moekit train` takes: the files of the run and TrainOptions."""

    model: str = argument("MoE model folder (from `moekit add-experts`, or any safetensors MoE folder).", 0)
    data: Path = option(..., f"New-domain text: {TEXT_FORMATS}.")
    replay: Path | None = option(None, f"Old-domain text mixed in, {TEXT_FORMATS}. With --kd-weight, distilled from "
                                 "the old model (not LM-trained); without, trained on like --data.")
    freeze: str = option("manifest", "manifest (MODEL's moekit.json), none (train everything), or a JSON file holding "
                         "a manifest.")
    eval_data: Path | None = option(None, f"Held-out text, {TEXT_FORMATS}: its loss before training, every "
                                    "--eval-every steps and at the end.")
    checkpoint_dir: Path | None = option(None, "Where checkpoints go.", shown="OUTPUT.checkpoints")
    resume: bool = option(False, "Continue from the last checkpoint in --checkpoint-dir (same options).")

    @field_validator("freeze")
    @classmethod
    def _manifest_none_or_file(cls, freeze: str) -> str:
        if freeze not in ("manifest", "none") and Path(freeze).suffix != ".json" and not Path(freeze).is_file():
            raise ValueError(f"use manifest, none, or a JSON file, got {freeze!r}")
        return freeze

    def training(self) -> TrainOptions:
        """The hyperparameters alone (what moekit.json records as options, beside the files)."""
        given = self.model_dump(include=set(TrainOptions.model_fields))
        return TrainOptions(**{**given, "eval_share": 0.0 if self.eval_data else self.eval_share})


# --------------------------------------------------------------------------- recipes


def load_options(model: type[BaseModel], recipe: Path | None, given: dict) -> BaseModel:
    """The verb's options: a YAML recipe's fields, overridden by the flags that were given."""
    data = {**(read_recipe(recipe) if recipe is not None else {}), **given}
    try:
        return model(**data)
    except ValidationError as e:
        raise UsageError(options_problem(e, model, given, recipe)) from None


def options_problem(e: ValidationError, model: type[BaseModel], given: dict, recipe: Path | None) -> str:
    """pydantic's first complaint in the words of where the value came from: `--flag: what is wrong,
    got VALUE` for a flag, `field: ... (in recipe R)` for a recipe's field."""
    first = min(e.errors(), key=lambda error: cli_order(model, error["loc"]))
    in_recipe = f" (in recipe {recipe})" if recipe else ""
    what = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]
    if not first["loc"]:  # the options as a whole: the validator's message names the flags
        return what + in_recipe
    name, field = first["loc"][0], model.model_fields.get(first["loc"][0])
    if field is not None and first["type"] == "missing":
        wanted = f"argument {name.upper()}" if position(field) is not None else f"option {flag_names(name, field)[0]}"
        return f"missing {wanted}" + (f" (not in recipe {recipe} either)" if recipe else "")
    if first["type"] != "value_error":  # a validator's own message already shows the value
        what += f", got {first.get('input')!r}"
    if field is not None and name in given:
        where = name.upper() if position(field) is not None else flag_names(name, field)[0]
        return f"{where}: {what}"
    return ".".join(str(p) for p in first["loc"]) + f": {what}{in_recipe}"


def cli_order(model: type[BaseModel], loc: tuple) -> tuple[int, int]:
    """Where a field comes in the verb's usage: arguments in order, then flags as --help lists them."""
    fields = list(cli_fields(model))
    if not loc or loc[0] not in fields:
        return (2, 0)
    at = position(model.model_fields[loc[0]])
    return (0, at) if at is not None else (1, fields.index(loc[0]))


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
        raise UsageError(f"recipe {recipe} is not valid YAML{where}: "
                         f"{getattr(e, 'problem', None) or one_line(e)}") from None
    except RecursionError:
        raise UsageError(f"recipe {recipe} nests too deeply to be a recipe") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise UsageError(f"recipe {recipe} must be a mapping of option: value")
    return data
