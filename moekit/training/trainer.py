"""`LifelongTrainer` (LM + λ·KD + α·Switch + β·z-loss on the transformers `Trainer`) and
`train_model`, the whole run from a model folder and token rows to an output folder."""

from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from moekit.arch.families import MOE_CONFIG, SOFTMAX_RENORM, Routing
from moekit.errors import MoekitError, UsageError
from moekit.metrics import balance_loss, z_loss
from moekit.options import TrainOptions
from moekit.runtime.moe import RoutingCounter, find_moe_layers, moe_layers
from moekit.runtime.transformers_private import set_loss_is_batch_mean, to_disk_names
from moekit.training.callbacks import EvalCallback, FreezeCallback, LogTo, LossFreeBalanceCallback, RoutingStatsCallback
from moekit.training.data import hold_out, mix_rows
from moekit.training.experts import enable_checkpointing, use_experts_implementation
from moekit.training.losses import kd_loss, next_token_loss
from moekit.training.manifest import apply_freeze, check_run
from moekit.training.precision import WEIGHTS, MasterWeights, resolve_weights


SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine_with_min_lr", "wsd": "warmup_stable_decay"}
BALANCE_MODES = ("global", "micro")


def check_options(opts: TrainOptions) -> None:
    """Options that cannot work together, before anything is loaded."""
    if opts.lr_schedule not in SCHEDULES:
        raise UsageError(f"--lr-schedule {opts.lr_schedule!r}: use {', '.join(SCHEDULES)}")
    if opts.balance not in BALANCE_MODES:
        raise UsageError(f"--balance {opts.balance!r}: use {' or '.join(BALANCE_MODES)}")
    if opts.bias_update not in ("fixed", "adaptive"):
        raise UsageError(f"--bias-update {opts.bias_update!r}: use fixed or adaptive")
    if opts.warmup_steps >= opts.steps and opts.lr_schedule != "constant":
        raise UsageError(f"--warmup-steps {opts.warmup_steps} leaves none of the {opts.steps} steps "
                         f"to the {opts.lr_schedule} schedule")


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
        disable_tqdm=True, dataloader_drop_last=True,
        # No host synchronisation per micro-batch: Trainer's NaN filter (which would also hide a
        # diverged step from the log) reads every loss, and a blocking copy sends every batch.
        logging_nan_inf_filter=False, accelerator_config={"non_blocking": True})


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


CHECKPOINT_STATE = "moekit_state.pt"  # callbacks' state (loss-free bias, eval history) in a checkpoint
CHECKPOINT_MASTERS = "moekit_masters.safetensors"  # the fp32 masters of bf16 weights


def check_resume(checkpoint: Path, weights: str) -> None:
    """A checkpoint resumes with the weights it was written with: bf16 ones need their masters, and
    fp32 ones loaded from a bf16 checkpoint would silently lose the masters' precision."""
    written = "bf16" if (checkpoint / CHECKPOINT_MASTERS).is_file() else "fp32"
    if written != weights:
        raise UsageError(f"--resume: {checkpoint.name} was written with --weights {written}; "
                         f"resume with --weights {written}, not {weights}")


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Packed rows are all seq_len long: stack them; `replay` marks rows from the old domain."""
    return {"input_ids": torch.tensor([r["input_ids"] for r in rows]),
            "replay": torch.tensor([bool(r.get("replay", 0)) for r in rows])}


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
                 routing: Routing = SOFTMAX_RENORM, counter: RoutingCounter | None = None,
                 masters: MasterWeights | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.kd_weight, self.kd_on_replay = teacher, kd_weight, kd_on_replay
        self.aux_loss_coef, self.balance, self.z_loss_coef = aux_loss_coef, balance, z_loss_coef
        self.routing, self.counter, self.masters = routing, counter, masters
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
        out = model(input_ids=ids, use_cache=False)  # the counter keeps the router logits (keep_logits)
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
            logits = self.counter.take_logits()
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

    def create_optimizer(self, *args, **kwargs):
        """Trainer's optimiser (its decay groups, its AdamW), stepping the fp32 masters of bf16 weights."""
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.masters:
            self.masters.attach(optimizer)
        return optimizer

    # Checkpoints hold the runtime state dict as it is, with the fp32 masters of bf16 weights.
    # Trainer's own goes through save_pretrained, which writes on-disk names (5.x un-fuses the
    # experts), and its resume loads that back with a non-strict load_state_dict, which skips every
    # renamed tensor: an MoE would resume with its experts as they were at the start (transformers
    # issue 48805). Loaded strictly here. `_save` and `_load_from_checkpoint` are Trainer's private
    # hooks (overridden, so not wrapped in runtime.transformers_private): checked on 5.24 and 4.57.6.

    def _stateful(self) -> dict:
        return {type(cb).__name__: cb for cb in self.callback_handler.callbacks if hasattr(cb, "state_dict")}

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        from safetensors.torch import save_file, save_model

        if not self.args.should_save:
            return
        folder = Path(output_dir or self.args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        save_model(self.accelerator.unwrap_model(self.model), str(folder / "model.safetensors"))
        if self.masters:
            save_file(self.masters.state_dict(), str(folder / CHECKPOINT_MASTERS))
        torch.save({name: cb.state_dict() for name, cb in self._stateful().items()}, folder / CHECKPOINT_STATE)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from safetensors.torch import load_file, load_model

        folder = Path(resume_from_checkpoint)
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        device = str(next(target.parameters()).device)
        load_model(target, str(folder / "model.safetensors"), strict=True, device=device)
        if self.masters:  # check_resume: the checkpoint has them
            self.masters.load_state_dict(load_file(str(folder / CHECKPOINT_MASTERS), device=device))
        states = torch.load(folder / CHECKPOINT_STATE, weights_only=True)
        for name, cb in self._stateful().items():
            if name in states:
                cb.load_state_dict(states[name])


def train_model(source: str | Path, output: str | Path, new: list[list[int]], replay: list[list[int]] | None,
                manifest: dict | None, opts: TrainOptions, *, eval_rows: list[list[int]] | None = None,
                checkpoints: str | Path | None = None, resume: bool = False, overwrite: bool = False,
                on_log: Callable[[dict], None] | None = None, record: dict | None = None,
                callbacks: Sequence[TrainerCallback] = ()) -> dict:
    """Train the model folder `source` on token rows and write it to `output`.

    Weights (`opts.weights`, `resolve_weights`) train in bf16 with fp32 master copies in the
    optimiser (`MasterWeights`), or in fp32 under bf16 autocast on GPUs that have it, fused experts
    included (`use_experts_implementation`); they are written back from fp32 in the
    source's own tensor names, shapes and dtypes (per-expert Hub format, loadable by transformers
    4.57 and 5.x), with the source's config.json and side files unchanged, plus the loss curve
    (training_curve.json / .png). With `save_every`, checkpoints go to `checkpoints`
    (OUTPUT.checkpoints by default) and `resume` continues from the last one. `callbacks` are
    added to the Trainer's (a benchmark's timer). Returns a summary.
    """
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.utils import logging as hf_logging

    from moekit.runtime.models import load_model

    start = time.perf_counter()
    check_options(opts)
    ckpt = check_run(source, output, manifest, overwrite)
    if eval_rows is None and opts.eval_share:
        new, eval_rows = hold_out(new, opts.eval_share, opts.seed)
    examples = mix_rows(new, replay, opts.replay_ratio, opts.seed)
    if len(examples) < opts.batch_size:
        raise MoekitError(f"only {len(examples)} row(s) of {opts.seq_len} tokens of data, "
                          f"fewer than --batch-size {opts.batch_size}")
    folder = checkpoint_folder(output, checkpoints) if (opts.save_every or resume) else None
    last = last_checkpoint(folder) if resume else None
    hf_logging.set_verbosity_error()

    work = tempfile.TemporaryDirectory(prefix="moekit-train-")  # Trainer wants a folder: checkpoints or nothing
    cuda = opts.device != "cpu" and torch.cuda.is_available()
    weights = resolve_weights(opts.weights, cuda, frozen=manifest is not None)
    if last:
        check_resume(Path(last), weights)
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
    routed = bool(opts.aux_loss_coef or opts.z_loss_coef)
    moe = find_moe_layers(model) if moe_layers(model) else None  # a dense model trains too
    counter = RoutingCounter(moe, keep_logits=routed) if moe else None
    if routed and counter is None:
        raise UsageError("--aux-loss-coef and --z-loss-coef need an MoE model; this one is dense")
    if routed:  # a model whose routers return no logits fails now, not at the first step
        with torch.no_grad():
            model(input_ids=torch.tensor([new[0][:2]], device=args.device), use_cache=False)
        counter.take_logits()
        counter.reset()
    masters = MasterWeights(model) if weights == "bf16" else None
    callbacks = [FreezeCallback(freeze.frozen), *callbacks]
    stats = RoutingStatsCallback(counter) if counter else None
    if stats:
        callbacks.append(stats)
    balance = LossFreeBalanceCallback(counter, opts.bias_update_rate, opts.bias_update == "adaptive") if (
        counter and opts.bias_update_rate) else None
    if balance and balance.biases:
        callbacks.append(balance)
    tokens_per_step = opts.batch_size * opts.grad_accum * opts.seq_len * args.world_size
    evaluation = EvalCallback(eval_rows, opts.eval_every, opts.batch_size, tokens_per_step, counter,
                              on_log) if eval_rows else None
    if evaluation:
        callbacks.append(evaluation)
    if on_log:
        callbacks.append(LogTo(on_log))

    config = model.config
    fields = MOE_CONFIG.get(config.model_type)
    trainer = LifelongTrainer(
        model=model, args=args, train_dataset=examples, data_collator=collate, callbacks=callbacks,
        teacher=teacher, kd_weight=opts.kd_weight, kd_on_replay=bool(replay), aux_loss_coef=opts.aux_loss_coef,
        balance=opts.balance, z_loss_coef=opts.z_loss_coef, routing=fields.routing if fields else SOFTMAX_RENORM,
        counter=counter, masters=masters)
    for cb in (PrinterCallback, ProgressCallback):  # reporting is the caller's (on_log)
        trainer.remove_callback(cb)
    if cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    result = trainer.train(resume_from_checkpoint=last)
    if counter:
        counter.remove()
    if masters:
        masters.restore()  # the output is written from the fp32 masters
    logs = [h for h in trainer.state.log_history if "loss" in h]
    evals = evaluation.history if evaluation else []
    summary = {
        "steps": trainer.state.global_step, "tokens": trainer.state.global_step * tokens_per_step,
        "train_seconds": round(result.metrics.get("train_runtime", 0.0), 1),
        "trainable_params": freeze.trainable_params, "frozen_params": freeze.frozen_params,
        "gradient_masked_tensors": len(freeze.masked_tensors), "first_loss": logs[0]["loss"] if logs else None,
        "last_loss": logs[-1]["loss"] if logs else None,
        "first_eval_loss": evals[0]["eval_loss"] if evals else None,
        "last_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "last_maxvio_batch": stats.last.get("maxvio_batch") if stats else None,
        "experts": experts, "weights": WEIGHTS[weights], "lr_schedule": opts.lr_schedule,
        "balance": opts.balance if opts.aux_loss_coef else None, "gradient_checkpointing": opts.gradient_checkpointing,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(args.device) / 2**30, 2) if cuda else None,
        "resumed_from": last, "devices": f"{args.world_size} x {args.device.type}"}
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
    if train or evals:  # a run with no log yet (0 steps logged) has nothing to label
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
    from moekit.checkpoint import OutputTensor
    from moekit.report.write import write_model

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
    options = {**opts.model_dump(), "freeze": "manifest" if manifest else "none", **record}
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
