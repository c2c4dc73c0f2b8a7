"""The one reader and packer of text: files -> texts -> token ids -> fixed-length rows -> batches.

Reading: `.jsonl` (one JSON object per line), `.json` (an array of objects, or JSON lines) and
`.parquet` give each record's "text"; any other suffix is plain UTF-8 text, cut into paragraphs at
blank lines. JSON and parquet are read directly (stdlib json, pyarrow), not through `datasets`:
errors can name the line, nothing is cached on disk, verify can stream the first tokens of a big
file, and the CLI does not pay for importing `datasets`.

Packing: texts are tokenised without special tokens and joined into one stream with a separator
after each, then cut into rows of seq_len ids; every position is a real token, so no padding or
attention mask is needed. The commands differ in a few choices, kept as parameters (`Reading`,
`pack_text`) so that each command gives the same ids as before this module existed.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

from moekit.data import FORMATS
from moekit.errors import MoekitError, one_line

# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Reading:
    """How a command reads a text file. The defaults (DOCUMENTS) are calibration's and profile's."""

    strip: bool = True  # plain-text paragraphs lose their surrounding whitespace
    keep_blank: bool = False  # blank texts are passed on (the packer skips them unless told otherwise)
    paragraphs: bool = True  # False: plain text is one document, streamed in 64 KB pieces
    lenient: bool = False  # bytes that are not UTF-8 become U+FFFD (a binary file is still refused)


DOCUMENTS = Reading()
# train: paragraphs as `datasets` cut them (unstripped), blank records kept so that the groups of
# `pack_text(docs_per_pack=...)` hold the same documents as datasets.map's batches did.
TRAINING = Reading(strip=False, keep_blank=True)
# verify: the file as it is; odd bytes must not stop a check.
COMPARISON = Reading(paragraphs=False, keep_blank=True, lenient=True)

PIECE = 1 << 16  # characters per piece of a streamed plain-text file


def is_plain_text(path: str | Path) -> bool:
    """Plain text (one stream of characters) rather than records with a "text" field."""
    return Path(path).suffix not in (".jsonl", ".json", ".parquet")


def iter_texts(path: str | Path, reading: Reading = DOCUMENTS) -> Iterator[str]:
    """The texts of a file, lazily (a broken record fails when it is reached)."""
    path = existing_data_file(path)
    if path.suffix == ".parquet":
        return _parquet_texts(path, reading)
    if is_plain_text(path):
        return _plain_texts(path, reading)
    return _json_texts(path, reading)


def read_texts(path: str | Path, reading: Reading = DOCUMENTS) -> list[str]:
    """Every text of a file, checked to the end; at least one that is not blank."""
    texts = list(iter_texts(path, reading))
    if not any(t.strip() for t in texts):
        raise MoekitError(f"{existing_data_file(path)}: no text in it")
    return texts


def calibration_texts(path: str | Path | None) -> list[str]:
    """The texts of a --calibration (or profile --data) file, or the built-in sample without one."""
    return read_texts(path) if path else builtin_calibration_text()


def existing_data_file(path: str | Path) -> Path:
    """The path of a data file that is there, or the one-line error every text flag gives."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MoekitError(f"{path}: no such data file")
    return path


@contextmanager
def _errors_of(path: Path):
    """A file that cannot be read or decoded is one line."""
    try:
        yield
    except UnicodeDecodeError:
        raise MoekitError(f"{path}: not UTF-8 text; text files are {FORMATS}") from None
    except OSError as e:
        raise MoekitError(f"{path}: cannot read it: {(e.strerror or str(e)).lower()}") from None


def _open(path: Path, reading: Reading, encoding: str = "utf-8"):
    # text mode: "\r\n" and "\r" read as "\n", as they always have
    return open(path, encoding=encoding, errors="replace" if reading.lenient else "strict")


def _plain_texts(path: Path, reading: Reading) -> Iterator[str]:
    with _errors_of(path), _open(path, reading) as f:
        if not reading.paragraphs:
            while piece := f.read(PIECE):  # streamed: verify needs only its first --tokens tokens
                if "\x00" in piece or piece.count("\ufffd") > len(piece) // 10:
                    raise MoekitError(f"{path}: not UTF-8 text (a binary file?); text files are {FORMATS}")
                yield piece
            return
        raw = f.read()
    for paragraph in raw.split("\n\n"):
        paragraph = paragraph.strip() if reading.strip else paragraph
        if paragraph and (reading.keep_blank or paragraph.strip()):
            yield paragraph


def _json_texts(path: Path, reading: Reading) -> Iterator[str]:
    with _errors_of(path), _open(path, reading, encoding="utf-8-sig") as f:
        if path.suffix == ".json":
            raw = f.read()
            records = _json_array(path, raw) if raw.lstrip().startswith("[") else _json_lines(path, raw.split("\n"))
        else:
            records = _json_lines(path, f)
        for where, record in records:
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise MoekitError(f'{where}: expected an object with a "text" string')
            if reading.keep_blank or text.strip():
                yield text


def _json_lines(path: Path, lines: Iterable[str]) -> Iterator[tuple[str, object]]:
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise MoekitError(f"{path}:{n}: not valid JSON ({e})") from None


def _json_array(path: Path, raw: str) -> Iterator[tuple[str, object]]:
    try:
        items = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise MoekitError(f"{path}: not valid JSON ({one_line(e)})") from None
    return ((f"{path}: item {n}", item) for n, item in enumerate(items, 1))


def _parquet_texts(path: Path, reading: Reading) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _errors_of(path), open(path, "rb") as f:
        try:
            table = pq.ParquetFile(f)
            names = table.schema_arrow.names
            if "text" not in names:
                raise MoekitError(f'{path}: no "text" column (it has {", ".join(names) or "none"})')
            kind = table.schema_arrow.field("text").type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                raise MoekitError(f'{path}: its "text" column holds {kind}, not strings')
            for batch in table.iter_batches(columns=["text"]):
                for text in batch.column(0).to_pylist():
                    text = text or ""  # a null is a missing text
                    if reading.keep_blank or text.strip():
                        yield text
        except pa.ArrowException as e:
            raise MoekitError(f"{path}: cannot read it as parquet: {one_line(e)[:300]}") from None


# --------------------------------------------------------------------------- packing


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, without the special tokens a tokenizer may add on its own."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def separator(tokenizer, bos_fallback: bool = True) -> int | None:
    """The id that ends each document in a stream: EOS, else (with `bos_fallback`) BOS, else none."""
    if tokenizer.eos_token_id is not None or not bos_fallback:
        return tokenizer.eos_token_id
    return tokenizer.bos_token_id


def token_stream(texts: Iterable[str], tokenizer, separator: int | None, budget: int | None = None,
                 every_text: bool = False) -> list[int]:
    """The ids of `texts`, `separator` after each. Tokenising stops once the stream holds `budget`
    ids (no text is read beyond that). Blank texts and texts without ids are left out, unless
    `every_text` (verify: every record of the file, each with its separator)."""
    stream: list[int] = []
    end = [] if separator is None else [separator]
    texts = iter(texts)
    while budget is None or len(stream) < budget:
        text = next(texts, None)
        if text is None:
            break
        if not every_text and not text.strip():
            continue
        ids = encode(tokenizer, text)
        if ids or every_text:
            stream += ids + end
    return stream


def cut_rows(stream: list[int], seq_len: int, min_last: int = 2, max_tokens: int | None = None) -> list[list[int]]:
    """Rows of seq_len ids; what is left after the last full row becomes a shorter last row if it
    has at least `min_last` ids (2: one token is a position 0 with nothing to predict; seq_len:
    full rows only). Then at most `max_tokens` ids are kept."""
    tail = len(stream) % seq_len
    if 0 < tail < min_last:
        stream = stream[: len(stream) - tail]
    if max_tokens is not None:
        stream = stream[:max_tokens]
    return [stream[s : s + seq_len] for s in range(0, len(stream), seq_len)]


def pack_text(texts: Iterable[str], tokenizer, seq_len: int, *, separator: int | None, min_last: int = 2,
              max_tokens: int | None = None, budget: int | None = None, every_text: bool = False,
              docs_per_pack: int | None = None) -> list[list[int]]:
    """`texts` tokenised into one stream (`token_stream`) and cut into rows (`cut_rows`).

    `budget` (default: `max_tokens`) is how many ids to tokenise at least. With `docs_per_pack`,
    each group of that many texts is packed on its own and its remainder dropped: train's rows, as
    `datasets.map(batched=True, batch_size=10_000)` cut them before this module.
    """
    budget = max_tokens if budget is None else budget
    if docs_per_pack is None:
        stream = token_stream(texts, tokenizer, separator, budget, every_text)
        return cut_rows(stream, seq_len, min_last, max_tokens)
    texts, rows = iter(texts), []
    while group := list(islice(texts, docs_per_pack)):
        rows += cut_rows(token_stream(group, tokenizer, separator, every_text=every_text), seq_len, min_last)
    return rows


def batches(rows: list[list[int]], batch_size: int) -> list:
    """[B, seq_len] id tensors of the full rows, batch_size rows each (the last batch may have fewer),
    then a shorter last row on its own."""
    import torch

    full, short = rows, []
    if len(rows) > 1 and len(rows[-1]) < len(rows[0]):
        full, short = rows[:-1], [rows[-1]]
    return [torch.tensor(full[s : s + batch_size]) for s in range(0, len(full), batch_size)] + \
           [torch.tensor([row]) for row in short]


# --------------------------------------------------------------------------- the built-in sample

# Stdlib modules with long, prose-heavy docstrings (module, class and function level).
_DOC_MODULES = ("argparse", "difflib", "textwrap", "heapq", "bisect", "fractions", "decimal", "pickle",
                "threading", "subprocess", "shutil", "tarfile", "zipfile", "logging/__init__", "email/message",
                "http/client", "http/cookiejar", "unittest/case", "collections/__init__", "functools", "inspect",
                "typing", "dataclasses", "enum", "datetime", "calendar", "locale", "gettext", "random", "statistics")


def builtin_calibration_text(max_chars: int = 200_000) -> list[str]:
    """Real English text that ships with every Python install, as paragraphs: the prose of the
    stdlib's LICENSE.txt, then docstrings of a fixed list of stdlib modules. Deterministic for a
    given Python version; no download."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paragraphs: list[str] = []
    license_file = stdlib / "LICENSE.txt"
    if license_file.is_file():  # some distributions strip it
        paragraphs += _joined_paragraphs(license_file.read_text(encoding="utf-8", errors="replace"))
    for module in _DOC_MODULES:
        source = stdlib / f"{module}.py"
        if not source.is_file():
            continue
        try:
            tree = ast.parse(source.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    paragraphs += _joined_paragraphs(doc)
    prose = [p for p in paragraphs if _is_prose(p)]
    out, total = [], 0
    for p in prose:
        if total >= max_chars:
            break
        out.append(p[: max_chars - total])
        total += len(out[-1])
    if not out:
        raise MoekitError(f"{stdlib}: found no built-in calibration text; pass a text file with --calibration")
    return out


def _joined_paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks, each with its wrapped lines joined by single spaces (docstrings
    are wrapped at ~80 columns; a user's file keeps its line breaks)."""
    blocks = text.replace("\r\n", "\n").split("\n\n")
    return [" ".join(line.strip() for line in b.splitlines() if line.strip()) for b in blocks if b.strip()]


def _is_prose(p: str) -> bool:
    """Sentences rather than code samples, tables or rulers: long enough, mostly letters."""
    if len(p) < 80 or p.startswith(">>>") or "===" in p or "---" in p:
        return False
    letters = sum(ch.isalpha() or ch.isspace() for ch in p)
    return letters / len(p) > 0.85
