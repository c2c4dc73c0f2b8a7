"""Text for every text flag (--data, --calibration, --replay, --eval-data, --prompts, --negative-prompts):
one reader of .txt / .jsonl / .json / .parquet files and one packer of token ids, in `moekit.data.text`.

This module imports nothing heavy: the CLI's help strings read FORMATS from it.
"""

FORMATS = '.txt (paragraphs at blank lines), or .jsonl, .json or .parquet with a "text" field'
