"""llama.cpp as a runtime to check outputs in: its own converter, then its own runtime.

The converter (`convert_hf_to_gguf.py` with its `conversion/` and `gguf-py/`) comes from the
llama.cpp tree vendored in the llama-cpp-python sdist (`make llamacpp` extracts it into
~/.cache/moekit-llamacpp/src/llama.cpp; MOEKIT_LLAMACPP_SRC points elsewhere). The runtime is
the `llama_cpp` bindings (`pip install moekit[llamacpp]`). The converter runs in a separate
process (MOEKIT_LLAMACPP_PYTHON, default this interpreter), several models per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from moekit.errors import MoekitError

INSTALL_HINT = "pip install 'moekit[llamacpp]' and run `make llamacpp` (builds llama-cpp-python 0.3.36, extracts its converter)"
DEFAULT_SRC = Path.home() / ".cache" / "moekit-llamacpp" / "src" / "llama.cpp"

# One process converts many models: the converter's imports (torch, transformers) cost seconds.
_DRIVER = r"""
import json, logging, sys
src, jobs = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, src)
import convert_hf_to_gguf as converter

class Errors(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.ERROR:
            self.lines.append(record.getMessage())

handler = Errors()
logging.getLogger().addHandler(handler)
results = []
for model, out in jobs:
    handler.lines = []
    sys.argv = ["convert_hf_to_gguf.py", model, "--outtype", "f32", "--outfile", out]
    try:
        converter.main()
        results.append({"ok": True})
    except SystemExit as e:
        results.append({"ok": e.code in (0, None), "error": " ".join(handler.lines) or f"exit {e.code}"})
    except Exception as e:
        results.append({"ok": False, "error": f"{type(e).__name__}: {e}"})
print("MOEKIT-RESULTS " + json.dumps(results))
"""


def converter_dir() -> Path:
    src = Path(os.environ.get("MOEKIT_LLAMACPP_SRC", DEFAULT_SRC))
    if not (src / "convert_hf_to_gguf.py").is_file():
        raise MoekitError(f"llama.cpp's converter not found in {src} (set MOEKIT_LLAMACPP_SRC); {INSTALL_HINT}")
    return src


def vendored_commit(src: Path | None = None) -> str | None:
    """The llama.cpp commit of the vendored tree, when `make llamacpp` recorded it."""
    stamp = (src or converter_dir()) / "COMMIT"
    return stamp.read_text().strip() if stamp.is_file() else None


def convert_many(jobs: list[tuple[Path, Path]], python: str | None = None) -> list[dict]:
    """Convert each HF folder to an f32 GGUF with llama.cpp's own converter, all in one process.
    Returns {"ok": bool, "error": str} per job (a model the converter refuses is not an exception)."""
    python = python or os.environ.get("MOEKIT_LLAMACPP_PYTHON", sys.executable)
    payload = json.dumps([[str(a), str(b)] for a, b in jobs])
    proc = subprocess.run([python, "-c", _DRIVER, str(converter_dir()), payload], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ""})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MOEKIT-RESULTS ")), None)
    if line is None:
        tail = " ".join(proc.stderr.strip().splitlines()[-2:])
        raise MoekitError(f"llama.cpp's converter crashed under {python}: {tail[:300]}")
    return json.loads(line.removeprefix("MOEKIT-RESULTS "))


def load_bindings():
    try:
        import llama_cpp
    except ImportError:
        raise MoekitError(f"the llama.cpp runtime (llama_cpp bindings) is not installed; {INSTALL_HINT}") from None
    return llama_cpp


def logits(gguf: Path, sequences: list[list[int]], threads: int | None = None) -> list:
    """llama.cpp's logits [len(ids), vocab] (numpy, fp32) for each sequence, one model load: f32 KV
    cache, no flash attention, every position's logits."""
    import numpy as np

    llama_cpp = load_bindings()
    n = max(max(len(s) for s in sequences), 8)
    llm = llama_cpp.Llama(str(gguf), logits_all=True, n_ctx=n, n_batch=n, n_ubatch=n, embedding=False, verbose=False,
                          flash_attn=False, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                          n_threads=threads or min(os.cpu_count() or 1, 8))
    try:
        out = []
        for ids in sequences:
            llm.reset()
            llm.eval(ids)
            out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
        return out
    finally:
        llm.close()
