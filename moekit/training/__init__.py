"""Training an MoE with part of it frozen, on the transformers `Trainer` (accelerate underneath).

The pieces `moekit train` assembles, usable one by one with your own Trainer or loop:

- `manifest`: `read_manifest` / `check_run` / `apply_freeze`, the freeze manifest `moekit
  add-experts` writes, applied to the model as loaded (frozen tensors and frozen slices stay
  bit-identical).
- `losses`: next-token cross-entropy and `kd_loss`, KL(old model ‖ new model) per token,
  Lifelong-MoE's output regularisation; the Switch/GShard balance loss and the z-loss are
  `moekit.metrics`'.
- `callbacks`: `FreezeCallback`, `RoutingStatsCallback` (MaxVio_batch per step),
  `LossFreeBalanceCallback` (DeepSeek's loss-free balancing of `e_score_correction_bias`) on
  `moekit.runtime.moe.RoutingCounter`, `EvalCallback` (held-out loss).
- `experts`: fused experts in bf16 under autocast, activation checkpointing.
- `trainer`: `LifelongTrainer`, a `Trainer` whose loss is LM + λ·KD + α·aux + β·z, and
  `train_model`: all of it, from a model folder and token rows to an output folder.
- `data`: token rows from text files, replay mixing, the held-out share.

Nothing here prints; the command (`moekit.commands.train`) reports.
"""

from moekit.options import TrainOptions  # tests and benchmarks import it from here
from moekit.training.data import hold_out, load_text_rows, mix_rows
from moekit.training.experts import enable_checkpointing, use_experts_implementation
from moekit.training.losses import kd_loss, mean_token_loss, next_token_loss, token_loss_sum
from moekit.training.manifest import apply_freeze, check_run, manifest_masks, read_manifest
from moekit.training.trainer import (LifelongTrainer, check_options, checkpoint_folder, collate, last_checkpoint,
                                     train_model)

__all__ = ["LifelongTrainer", "TrainOptions", "apply_freeze", "check_options", "check_run", "checkpoint_folder",
           "collate", "enable_checkpointing", "hold_out", "kd_loss", "last_checkpoint", "load_text_rows",
           "manifest_masks", "mean_token_loss", "mix_rows", "next_token_loss", "read_manifest", "token_loss_sum",
           "train_model", "use_experts_implementation"]
