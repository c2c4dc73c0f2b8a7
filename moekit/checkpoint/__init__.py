"""Checkpoint I/O: streaming readers for HF folders and GGUF files, the plan types of an output, and an
atomic streaming writer."""

from moekit.checkpoint.base import Checkpoint, TensorMeta
from moekit.checkpoint.plan import OutputTensor, passthrough
from moekit.checkpoint.reader import open_checkpoint
from moekit.checkpoint.writer import CheckpointWriter

__all__ = ["Checkpoint", "TensorMeta", "OutputTensor", "passthrough", "open_checkpoint", "CheckpointWriter"]
