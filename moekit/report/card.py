"""moekit.json and the model card: what every output folder says about how it was made."""

from __future__ import annotations

import datetime
import hashlib
import json
import shlex
import sys
from pathlib import Path

from moekit import __version__


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_record(path: Path, files: list[Path]) -> dict:
    """The source path and a sha256 of each file it was read from (weights, config)."""
    folder = path if path.is_dir() else path.parent
    return {"path": str(path), "files": {str(f.relative_to(folder)): sha256(f) for f in files}}


def build_record(operation: str, options: dict, sources: list[dict], layers: list[dict], summary: dict) -> dict:
    return {
        "moekit_version": __version__,
        "operation": operation,
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "options": options,
        "sources": sources,
        "summary": summary,
        "layers": layers,
    }


def model_card(title: str, what: str, record: dict) -> str:
    """A Hugging Face model card: front matter, what the model is, and how to reproduce it."""
    summary = "\n".join(f"| {k} | {v} |" for k, v in record["summary"].items())
    sources = "\n".join(f"- `{s['path']}`" for s in record["sources"])
    notes = "".join(f"- {n}\n" for n in record.get("notes", ()))
    notes = f"\n## Caveats\n\n{notes}" if notes else ""
    return f"""---
library_name: transformers
tags:
- moekit
- mixture-of-experts
---

# {title}

{what}
{notes}
Made by [moekit](https://pypi.org/project/moekit/) {record['moekit_version']} on {record['created']}:

```
{record['command']}
```

| | |
|---|---|
{summary}

Source:
{sources}

`moekit.json` beside this file records every option, the sha256 of each source file, and what
was done to each layer. Load it with stock transformers, no remote code:

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", trust_remote_code=False)
```

Options:

```json
{json.dumps(record['options'], indent=2)}
```
"""
