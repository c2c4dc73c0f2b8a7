"""Text for the lifelong-learning experiment (docs/lifelong.md): real prose in two domains.

- B, the new domain: French, from Debian's translated man pages (`apt-get install manpages-fr`),
  rendered by `man` and stripped to paragraphs of prose. Every 10th page is held out for eval.
- A, the old domain: English, moekit's built-in calibration text (the stdlib's licence and
  docstrings); every 4th paragraph is held out for eval, the rest is replay data.

    python benchmarks/lifelong_data.py .bench/lifelong-data
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from moekit.data.text import builtin_calibration_text


def man_paragraphs(page: Path) -> list[str]:
    """A man page rendered as text (one paragraph per line of output), prose paragraphs only."""
    text = subprocess.run(["man", "-E", "UTF-8", "-l", str(page)], capture_output=True, text=True,
                          env={**os.environ, "MANWIDTH": "10000", "MAN_KEEP_FORMATTING": "0"}).stdout
    text = re.sub(r".\x08", "", text)  # overstrike bold/underline, if any survived
    paragraphs = [" ".join(block.split()) for block in text.split("\n\n")]
    return [p for p in paragraphs if len(p) >= 120 and sum(c.isalpha() or c.isspace() for c in p) / len(p) > 0.85]


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pages = sorted(Path("/usr/share/man/fr").glob("man*/*.gz"))
    if not pages:
        sys.exit("no French man pages: apt-get install manpages-fr")
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        rendered = list(pool.map(man_paragraphs, pages))
    fr_train = [p for i, ps in enumerate(rendered) if i % 10 for p in ps]
    fr_eval = [p for i, ps in enumerate(rendered) if not i % 10 for p in ps]
    en = builtin_calibration_text(max_chars=10**7)
    files = {"fr_train.txt": fr_train, "fr_eval.txt": fr_eval,
             "en_replay.txt": [p for i, p in enumerate(en) if i % 4], "en_eval.txt": en[::4]}
    for name, paragraphs in files.items():
        (out / name).write_text("\n\n".join(paragraphs) + "\n")
        print(f"{name}: {len(paragraphs)} paragraphs, {sum(map(len, paragraphs)):,} characters")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".bench/lifelong-data"))
