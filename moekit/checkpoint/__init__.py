"""Checkpoint I/O: streaming readers for HF folders and GGUF files, and an atomic streaming writer."""

from moekit.checkpoint.reader import Checkpoint, TensorMeta, open_checkpoint
from moekit.checkpoint.writer import CheckpointWriter

__all__ = ["Checkpoint", "TensorMeta", "open_checkpoint", "CheckpointWriter"]
