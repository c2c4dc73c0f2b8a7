"""Names of dtypes in safetensors headers, on the command line and in config.json."""

from __future__ import annotations

import torch

from moekit.errors import UsageError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_NAME = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

_USER_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
}


def parse_dtype(name: str) -> torch.dtype:
    """A dtype from a user's spelling: `bf16`, `bfloat16`, `fp32`, ..."""
    try:
        return _USER_NAMES[name.lower()]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}: use one of float32, bfloat16, float16") from None


def config_name(dtype: torch.dtype) -> str:
    """How config.json spells a dtype (`torch_dtype` / `dtype`)."""
    return str(dtype).removeprefix("torch.")
