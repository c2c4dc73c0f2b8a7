"""The MoE blocks of a loaded transformers causal LM, and the one hook that reads their routing.

`find_moe_layers` finds every block and its router once, for profile, balance, prune and train.
`RoutingCounter` hooks the routers and counts, per layer and on the router's device, the experts
the router actually selects: 5.x routers (and 4.57's sigmoid and GPT-OSS routers) return their
choice, which already includes `e_score_correction_bias`; for 4.57's bare nn.Linear gates the
choice is made again from the logits exactly as the block makes it. Consumers that need more
than the load (profile's statistics) get each batch's logits and choice through `on_route`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from moekit.arch.families import MOE_CONFIG, SOFTMAX_RENORM, SOFTMAX_TOPK, TOPK_SOFTMAX, Routing, read_field
from moekit.errors import MoekitError, UsageError
from moekit.runtime.decoder import decoder_layers, ffn_of
from moekit.runtime.transformers_private import experts_call, router_output

NOTHING_TO_PROFILE = "nothing to profile: no MoE layers; upcycle it first"

# --------------------------------------------------------------------------- finding the blocks


@dataclass(frozen=True)
class MoELayer:
    index: int  # decoder layer number
    name: str  # module path of the router: also the prefix of its keys in the checkpoint
    router: torch.nn.Module
    block: torch.nn.Module  # the MoE block (the layer's FFN) the router belongs to

    @property
    def block_name(self) -> str:
        return self.name.rsplit(".", 1)[0]  # the router is a direct child of its block

    @property
    def experts(self) -> torch.nn.Module | None:
        """The block's experts: 5.x's fused module, a ModuleList in 4.57 (None: GraniteMoe 4.57)."""
        return getattr(self.block, "experts", None)


@dataclass(frozen=True)
class MoEModel:
    layers: list[MoELayer]
    experts: int
    top_k: int
    routing: Routing
    model_type: str


def router_of(ffn: torch.nn.Module | None) -> torch.nn.Module | None:
    """The router of an MoE block: `gate` in most families, `router` in GraniteMoe and GPT-OSS.
    Dense MLPs, in MoE models too, have neither."""
    router = getattr(ffn, "gate", None) or getattr(ffn, "router", None)
    return router if isinstance(router, torch.nn.Module) else None


def moe_layers(model) -> list[MoELayer]:
    """Every decoder layer whose FFN has a router, in layer order ([] for a dense model)."""
    names = {m: n for n, m in model.named_modules()}
    layers = []
    for i, layer in enumerate(decoder_layers(model)):
        ffn = ffn_of(layer)
        router = router_of(ffn)
        if router is not None:
            layers.append(MoELayer(i, names[router], router, ffn))
    return layers


def find_moe_layers(model) -> MoEModel:
    """The MoE layers of a transformers causal LM and its routing (architectures.MOE_CONFIG)."""
    config = model.config.to_dict()
    model_type = config.get("model_type", "?")
    fields = MOE_CONFIG.get(model_type)
    if fields is None:
        raise MoekitError(f"{NOTHING_TO_PROFILE} (model type {model_type!r} is not a Mixture-of-Experts family "
                          "moekit knows)")
    layers = moe_layers(model)
    if not layers:
        raise MoekitError(NOTHING_TO_PROFILE)
    return MoEModel(layers, int(read_field(config, fields.experts)), int(read_field(config, fields.top_k)),
                    fields.routing, model_type)


# --------------------------------------------------------------------------- reading router outputs


def logits_from_input(router: torch.nn.Module, args: tuple) -> torch.Tensor:
    """The router's logits recomputed from its input (one [T, H] × [H, N] product), for the 4.57
    routers that return only their choice."""
    x = args[0].reshape(-1, router.weight.shape[1]).float()
    bias = getattr(router, "bias", None)
    return F.linear(x, router.weight.float(), None if bias is None else bias.float())


def block_choice(logits: torch.Tensor, top_k: int, routing: Routing) -> torch.Tensor:
    """The experts a 4.57 block picks from its bare gate's logits, computed as the block does:
    GraniteMoe takes the top-k of the logits, the softmax families the top-k of an fp32 softmax."""
    if routing is TOPK_SOFTMAX:
        return logits.topk(top_k, dim=-1).indices
    if routing in (SOFTMAX_RENORM, SOFTMAX_TOPK):
        return logits.float().softmax(-1).topk(top_k, dim=-1).indices
    raise MoekitError(f"cannot tell which experts this router chose ({routing.formula}); "
                      "use transformers 5.x, whose routers return their choice")


# --------------------------------------------------------------------------- counting on the device

# (layer index, [T, N] fp32 logits, [T, K] chosen experts, [N] fp32 load of this forward)
OnRoute = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def _in_backward() -> bool:
    """A forward run inside backward: gradient checkpointing's recomputation. Checked on torch 2.13
    (`torch._C._current_graph_task_id` is -1 outside the autograd engine)."""
    return torch._C._current_graph_task_id() != -1


class RoutingCounter:
    """Forward hooks on every MoE router that count the experts each token is sent to, per layer,
    into device tensors: nothing is copied to the host while the model runs.

    `counts[layer]`: load since `reset` (fp64); `last[layer]`: the latest forward's load (fp32,
    exact below 2^24 slots). Off while `enabled` is False (held-out text is not a training load)
    and in gradient checkpointing's recomputation (counted once). With `on_route`, each forward's
    logits (recomputed where the router does not return them) and choice go there too. With
    `keep_logits`, each layer's router logits, as the router returned them (in the autograd graph),
    wait in `logits` for `take_logits`: the Switch and z-losses need them, and this costs nothing,
    where transformers' `output_router_logits` also runs the model's own balance loss.
    """

    def __init__(self, moe: MoEModel, on_route: OnRoute | None = None, keep_logits: bool = False):
        self.moe, self.on_route, self.keep_logits = moe, on_route, keep_logits
        self.counts: dict[int, torch.Tensor] = {}
        self.last: dict[int, torch.Tensor] = {}
        self.logits: dict[int, torch.Tensor | None] = {}
        self.enabled = True
        self._handles = [layer.router.register_forward_hook(self._hook(layer)) for layer in moe.layers]

    def __enter__(self) -> RoutingCounter:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _hook(self, layer: MoELayer):
        def hook(router, args, output):
            if not self.enabled or _in_backward():
                return
            logits, chosen = router_output(output)
            if self.keep_logits:
                self.logits[layer.index] = logits
            if logits is None and self.on_route:
                logits = logits_from_input(router, args)
            self.count(layer.index, logits, chosen)

        return hook

    @torch.no_grad()
    def count(self, layer: int, logits: torch.Tensor | None, chosen: torch.Tensor | None) -> None:
        """Add one forward of one layer. Device ops only: no value comes back to the host."""
        n, k = self.moe.experts, self.moe.top_k
        if logits is not None:
            logits = logits.detach().reshape(-1, n).float()
        chosen = (block_choice(logits, k, self.moe.routing) if chosen is None else chosen).reshape(-1, k)
        # 5.x may mark a slot "no expert" with index n (expert parallelism): not a load. A scatter,
        # not bincount: bincount's output size depends on the data, so on CUDA it waits for the GPU.
        flat = chosen.flatten()
        load = torch.zeros(n + 1, device=flat.device).scatter_add_(
            0, flat.clamp(max=n), torch.ones_like(flat, dtype=torch.float32))[:n]
        total = self.counts.get(layer)
        self.counts[layer] = load.double() if total is None else total + load.to(total.device, torch.float64)
        self.last[layer] = load
        if self.on_route:
            self.on_route(layer, logits, chosen, load)

    def reset(self) -> None:
        self.counts.clear()

    def take_logits(self) -> list[torch.Tensor]:
        """The kept router logits of the latest forward, one [tokens, N] tensor per MoE layer in
        layer order, and forget them (`keep_logits`)."""
        logits, self.logits = self.logits, {}
        if len(logits) != len(self.moe.layers) or any(v is None for v in logits.values()):
            raise UsageError("this model's transformers class does not return its router logits, so the Switch "
                             "and z-losses cannot be computed for it (transformers 5.x routers return them)")
        return [logits[layer.index] for layer in self.moe.layers]

    def totals(self) -> dict[int, torch.Tensor]:
        """Counts since the last reset per layer ({} before any), summed over all processes when
        the run is distributed (one all-reduce for all layers)."""
        if not self.counts:
            return {}
        stacked = torch.stack(list(self.counts.values()))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stacked)
        return dict(zip(self.counts, stacked))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


# --------------------------------------------------------------------------- expert output norms


class ExpertNorms:
    """Forward pre-hooks on every MoE block's experts module (5.x: `experts(hidden, top_k_index,
    top_k_weights)`) that add, per expert, Σ‖E_j(x)‖ and Σ g_j(x)·‖E_j(x)‖ over its routed tokens
    into device tensors. Each routed token's expert output is computed once more, in fp32, from the
    fused parameters as 5.x holds them (`gate_up_proj` [N, 2I, H], gate rows first; `down_proj`
    [N, H, I]; `act_fn`), checked on 5.24."""

    def __init__(self, moe: MoEModel):
        self.ean: dict[int, torch.Tensor] = {}
        self.gated: dict[int, torch.Tensor] = {}
        self._handles = []
        for layer in moe.layers:
            i, experts = layer.index, layer.experts
            if not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
                raise MoekitError("reap and ean scores read the fused experts of transformers 5.x "
                                  "(experts.gate_up_proj); with this transformers use --method frequency or random")
            self._handles.append(experts.register_forward_pre_hook(partial(self._add, i), with_kwargs=True))

    def __enter__(self) -> ExpertNorms:
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def _add(self, i, experts, args, kwargs):
        x, index, weights = experts_call(args, kwargs)
        n = experts.gate_up_proj.shape[0]
        x = x.reshape(-1, x.shape[-1])
        chosen = index.reshape(-1)
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(index.shape[-1])
        order = torch.argsort(chosen, stable=True)
        sizes = torch.bincount(chosen, minlength=n + 1)[:n].tolist()  # index n: "no expert" (expert parallelism)
        ean = torch.zeros(n, dtype=torch.float64, device=x.device)
        gated = torch.zeros_like(ean)
        start = 0
        for e, size in enumerate(sizes):
            if size:
                picked = order[start:start + size]
                h = x[token[picked]].float()
                gate, up = F.linear(h, experts.gate_up_proj[e].float()).chunk(2, dim=-1)
                norm = F.linear(experts.act_fn(gate) * up, experts.down_proj[e].float()).norm(dim=-1)
                ean[e] = norm.sum()
                gated[e] = (weights.reshape(-1)[picked].float() * norm).sum()
            start += size
        for acc, add in ((self.ean, ean), (self.gated, gated)):
            acc[i] = acc[i] + add if i in acc else add
