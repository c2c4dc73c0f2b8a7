"""Trainer callbacks: frozen slices restored, routing statistics per step, loss-free balancing,
held-out loss, logs passed on."""

from __future__ import annotations

from typing import Callable

import torch
from transformers import TrainerCallback

from moekit.metrics import bias_state, bias_step, capacity, dropped_slots, max_vio
from moekit.runtime.moe import RoutingCounter
from moekit.training.losses import token_loss_sum
from moekit.training.manifest import FrozenSlices


class FreezeCallback(TrainerCallback):
    """Restores frozen slices after every optimiser step (see `FrozenSlices.restore`)."""

    def __init__(self, frozen: FrozenSlices):
        self.frozen = frozen

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.frozen.restore()


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
            drop = dropped_slots(c, caps[:, None]).squeeze(-1)  # every layer at once
            self._since_log.append(torch.stack([max_vio(c), drop / slots]))

    def log_metrics(self) -> dict:
        if not self._since_log:
            return {}
        mean = torch.stack(self._since_log).mean(0).tolist()  # the one copy to the host
        self._since_log = []
        self.last = {"maxvio_batch": sum(mean[0]) / len(mean[0]), "drop_rate_cf1": sum(mean[1]) / len(mean[1]),
                     "maxvio_layers": [round(v, 4) for v in mean[0]],
                     "drop_rate_layers": [round(v, 4) for v in mean[1]]}
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


class LogTo(TrainerCallback):
    """Passes each training log, with its step, to `fn` (the command prints it)."""

    def __init__(self, fn: Callable[[dict], None]):
        self.fn = fn

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            self.fn({"step": state.global_step, "max_steps": state.max_steps, **logs})
