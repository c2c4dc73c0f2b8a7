"""moekit.data.text: every format gives the same texts on every reader path; the packer against a
hand computation; and each command's token ids equal to what the code before moekit.data gave."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from moekit.data import text as dt
from moekit.errors import MoekitError


class CharTokenizer:
    """Characters to ids (0-2 are pad/bos/eos), both ways the old packers called a tokenizer."""

    bos_token_id, eos_token_id = 1, 2

    def encode(self, text, add_special_tokens=False):
        return [3 + ord(ch) % 125 for ch in text]

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.encode(text)}


TOK = CharTokenizer()
DOCS = ["first paragraph\nstill first", "second one, café", "  third: indented  ", "x" * 300, "last"]


def write_all(root, docs=DOCS) -> dict:
    """The same documents as .txt, .jsonl, .json (an array and JSON lines) and .parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = {f: root / f for f in ("d.txt", "d.jsonl", "d.json", "lines.json", "d.parquet")}
    files["d.txt"].write_text("\n\n".join(docs) + "\n")
    files["d.jsonl"].write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(docs)))
    files["d.json"].write_text(json.dumps([{"text": t} for t in docs], indent=1))
    files["lines.json"].write_text(files["d.jsonl"].read_text())
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), files["d.parquet"])
    return files


@pytest.fixture
def files(tmp_path):
    return write_all(tmp_path)


# --------------------------------------------------------------------------- reading


def test_every_format_gives_the_same_texts(files):
    stripped = [d.strip() for d in DOCS]  # a .txt paragraph loses surrounding whitespace; a record keeps it
    for name, path in files.items():
        want = stripped if name == "d.txt" else DOCS
        assert dt.read_texts(path) == want, name
        assert dt.calibration_texts(path) == want, name
        assert list(dt.iter_texts(path, dt.COMPARISON)) == (["\n\n".join(DOCS) + "\n"] if name == "d.txt" else DOCS)
    assert dt.read_texts(files["d.txt"], dt.TRAINING) == DOCS[:-1] + ["last\n"]  # as `datasets` cut it


def test_every_reader_path_gives_the_same_ids_for_every_format(tmp_path):
    from moekit import training
    from moekit.jobs import profile, prune, verify

    clean = [d.strip() for d in DOCS]  # no whitespace for a .txt paragraph to lose
    files = write_all(tmp_path, clean)
    records = [p for name, p in files.items() if name != "d.txt"]  # train and verify read .txt differently
    for path in records[1:]:
        assert training.load_text_rows(path, TOK, 16) == training.load_text_rows(records[0], TOK, 16)
        compared = zip(verify.make_inputs(128, 200, 2, 16, data=path, tokenizer=TOK),
                       verify.make_inputs(128, 200, 2, 16, data=records[0], tokenizer=TOK), strict=True)
        assert all(torch.equal(a, b) for a, b in compared)
    for path in files.values():
        calibration = zip(prune.calibration_batches(dt.calibration_texts(path), TOK, 300, 16),
                          prune.calibration_batches(clean, TOK, 300, 16), strict=True)
        assert all(torch.equal(a, b) for a, b in calibration)
        (domain,) = profile.read_domains([path], TOK, 16, 4, 200)
        assert torch.equal(torch.cat(domain.batches), profile.token_rows(clean, TOK, 16, 200, "x"))


def test_blank_records_and_nulls(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"text": "a"}\n\n{"text": "  "}\n{"text": ""}\n{"text": "b"}\n')
    assert dt.read_texts(jsonl) == ["a", "b"]
    assert dt.read_texts(jsonl, dt.TRAINING) == ["a", "  ", "", "b"]  # the packer skips them
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": ["a", None, " ", "b"]}), parquet)
    assert dt.read_texts(parquet) == ["a", "b"]
    assert dt.read_texts(parquet, dt.TRAINING) == ["a", "", " ", "b"]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n')
    assert dt.read_texts(bom) == ["a"]


@pytest.mark.parametrize("name,content,match", [
    ("missing.txt", None, "no such data file"),
    ("empty.txt", "\n\n  \n", "no text in it"),
    ("latin.txt", "caf\xe9".encode("latin-1"), "not UTF-8"),
    ("bad.jsonl", '{"text": "ok"}\n{oops\n', "bad.jsonl:2: not valid JSON"),
    ("nofield.jsonl", '{"content": "x"}\n', 'nofield.jsonl:1: expected an object with a "text" string'),
    ("number.jsonl", '{"text": 5}\n', '"text" string'),
    ("array.json", '[{"text": "a"}, {"body": "b"}]', 'array.json: item 2: expected an object with a "text" string'),
    ("broken.json", '[{"text": "a"}', "broken.json: not valid JSON"),
    ("lines.json", '{"text": "a"}\n{"text"\n', "lines.json:2: not valid JSON"),
    ("notparquet.parquet", "just text", "cannot read it as parquet"),
    ("nocolumn.parquet", {"body": ["a"]}, 'no "text" column (it has body)'),
    ("ints.parquet", {"text": [1, 2]}, '"text" column holds int64'),
])
def test_reader_errors_are_one_line(tmp_path, name, content, match):
    path = tmp_path / name
    if isinstance(content, dict):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(content), path)
    elif content is not None:
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(MoekitError) as e:
        dt.read_texts(path)
    assert match in str(e.value) and "\n" not in str(e.value)


def test_comparison_reading_streams_and_is_lenient(tmp_path):
    odd = tmp_path / "odd.txt"
    odd.write_bytes(b"mostly text \xff " + b"a" * 100)
    assert list(dt.iter_texts(odd, dt.COMPARISON)) == ["mostly text \ufffd " + "a" * 100]
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\x00\xff" * 100)
    with pytest.raises(MoekitError, match="not UTF-8"):
        list(dt.iter_texts(binary, dt.COMPARISON))
    late = tmp_path / "late.jsonl"  # a broken line after the tokens verify needs is never read
    late.write_text('{"text": "enough"}\n{oops\n')
    assert dt.token_stream(dt.iter_texts(late, dt.COMPARISON), TOK, 2, budget=3) == TOK.encode("enough") + [2]
    big = tmp_path / "big.txt"
    big.write_text("y" * (dt.PIECE + 5))
    assert [len(p) for p in dt.iter_texts(big, dt.COMPARISON)] == [dt.PIECE, 5]


def test_builtin_calibration_text():
    texts = dt.builtin_calibration_text(50_000)
    total = sum(map(len, texts))
    assert 10_000 < total <= 50_000 and len(texts) > 20
    words = " ".join(texts).lower().split()
    for common in ("the", "of", "and", "is"):
        assert words.count(common) > 20  # English prose, not code
    assert not any(t.startswith(">>>") for t in texts)
    assert dt.builtin_calibration_text(50_000) == texts  # deterministic


# --------------------------------------------------------------------------- packing, by hand


def test_token_stream_by_hand():
    class Ids:
        bos_token_id, eos_token_id = 1, None

        def encode(self, text, add_special_tokens=False):
            return [int(t) for t in text.split()]

    tok = Ids()
    assert dt.separator(tok) == 1 and dt.separator(tok, bos_fallback=False) is None
    texts = ["5 6 7", " ", "", "8 9", "10"]
    assert dt.token_stream(texts, tok, 0) == [5, 6, 7, 0, 8, 9, 0, 10, 0]
    assert dt.token_stream(texts, tok, None) == [5, 6, 7, 8, 9, 10]
    assert dt.token_stream(texts, tok, 0, every_text=True) == [5, 6, 7, 0, 0, 0, 8, 9, 0, 10, 0]
    assert dt.token_stream(texts, tok, 0, budget=4) == [5, 6, 7, 0]  # stops before the next text
    assert dt.token_stream(texts, tok, 0, budget=5) == [5, 6, 7, 0, 8, 9, 0]  # a text is never cut


@pytest.mark.parametrize("length,min_last,max_tokens,want", [
    (10, 2, None, [4, 4, 2]),
    (9, 2, None, [4, 4]),  # a lone last token has nothing to predict
    (9, 1, None, [4, 4, 1]),
    (11, 4, None, [4, 4]),  # full rows only
    (9, 2, 5, [4, 1]),  # the cut comes after the tail rule: --calibration-tokens 5 keeps 5
    (10, 2, 6, [4, 2]),
    (3, 4, None, []),
])
def test_cut_rows_by_hand(length, min_last, max_tokens, want):
    stream = list(range(length))
    rows = dt.cut_rows(stream, 4, min_last, max_tokens)
    assert [len(r) for r in rows] == want
    assert sum(rows, []) == stream[: sum(want)]


def test_pack_and_batches_by_hand():
    rows = dt.pack_text(["ab", "cde", "f"], TOK, 3, separator=0)  # a b 0 | c d e | 0 f 0
    ids = {ch: TOK.encode(ch)[0] for ch in "abcdef"}
    assert rows == [[ids["a"], ids["b"], 0], [ids["c"], ids["d"], ids["e"]], [0, ids["f"], 0]]
    grouped = dt.pack_text(["ab", "cde", "f"], TOK, 3, separator=0, min_last=3, docs_per_pack=2)
    assert grouped == rows[:2]  # the group ["f"] packs to 2 ids: no full row
    shaped = dt.batches([[1] * 3] * 5 + [[2, 2]], 2)
    assert [tuple(b.shape) for b in shaped] == [(2, 3), (2, 3), (1, 3), (1, 2)]
    assert all(b.dtype == torch.int64 for b in shaped)
    assert [tuple(b.shape) for b in dt.batches([[7, 8]], 4)] == [(1, 2)]


# --------------------------------------------------------------------------- the same ids as before


def old_case_inputs(root) -> dict:
    """Awkward files: a byte-order mark, CRLF, runs of blank lines, a whitespace-only paragraph,
    more paragraphs than train's 10,000-document groups, more than one 64 KB piece; blank records."""
    words = "the quick brown fox jumps over the lazy dog and routes to an expert".split()
    paragraphs = [" ".join(words[(i * 7 + k) % len(words)] for k in range(1 + i % 13)) for i in range(12_000)]
    txt = root / "awk.txt"
    txt.write_bytes(("\ufeffOne\r\ntwo\r\n\r\n\n\n \n\n  spaced  \n\n" + "\n\n".join(paragraphs) + "\n").encode())
    records = [{"text": p} for p in paragraphs[:300]]
    records[3]["text"], records[5]["text"] = "", "   "
    jsonl = root / "r.jsonl"
    jsonl.write_text("\n".join(map(json.dumps, records)) + "\n\n")
    return {"txt": txt, "jsonl": jsonl}


def old_case_outputs(files) -> dict:
    """Each command's ids on the awkward files, through the functions the commands call."""
    from moekit import training
    from moekit.jobs import profile, prune, verify
    from moekit.runtime import capture

    def router_batches(texts, max_tokens, seq_len):
        got = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(capture, "collect_mlp_inputs_from_ids", lambda _m, batches, *a, **k: got.extend(batches))
            capture.collect_mlp_inputs(None, texts, TOK, [0], max_tokens, seq_len, "cpu")
        return got

    out = {}
    for kind, path in files.items():
        texts = dt.calibration_texts(path)
        out[f"router/{kind}"] = router_batches(texts, 2048, 64)
        out[f"profile/{kind}"] = profile.token_rows(texts, TOK, 64, 1000, "x")
        out[f"prune/{kind}"] = prune.calibration_batches(texts, TOK, 1025, 64)
        out[f"verify/{kind}"] = verify.make_inputs(128, 70_000, 8, 1000, data=path, tokenizer=TOK)
        out[f"train/{kind}"] = training.load_text_rows(path, TOK, 32)
    out["random"] = verify.make_inputs(50, 40, 2, 16, seed=3)
    return out


def digest(value) -> str:
    def plain(x):
        if isinstance(x, torch.Tensor):
            return [list(x.shape), str(x.dtype), x.tolist()]
        return [plain(y) for y in x] if isinstance(x, (list, tuple)) else x

    return hashlib.sha256(json.dumps(plain(value)).encode()).hexdigest()[:16]


# sha256 of old_case_outputs computed with the readers and packers before moekit.data (commit be65781:
# router_init.read_text_file/pack_token_ids, profile.token_rows, prune.calibration_batches,
# verify._texts/_tokenise, training.load_text_rows through `datasets`).
OLD_DIGESTS = {
    "router/txt": "83d75447229763e5", "profile/txt": "c9f00e92b7e6276f", "prune/txt": "075968995ba0d28e",
    "verify/txt": "8c858867d621770a", "train/txt": "480d611160591a10",
    "router/jsonl": "3590bd4089805ae4", "profile/jsonl": "67a03c4c3bc15982", "prune/jsonl": "7ec542a95366add3",
    "verify/jsonl": "d0cca8a8005c195f", "train/jsonl": "d1d3393d4f69a400",
    "random": "b6d595dbe05a7551",
}


def test_same_ids_as_the_code_before(tmp_path):
    got = {name: digest(v) for name, v in old_case_outputs(old_case_inputs(tmp_path)).items()}
    assert got == OLD_DIGESTS


def test_builtin_text_packs_as_each_command_packed_it():
    """The built-in sample varies with the Python version, so its ids are checked against a hand
    computation of each command's rule instead of a digest."""
    from moekit.jobs import profile, prune, verify

    texts = dt.builtin_calibration_text(20_000)
    stream = [i for t in texts for i in TOK.encode(t) + [TOK.eos_token_id]]
    drift = verify.make_inputs(128, 3000, 4, 256, tokenizer=TOK, texts=texts)  # add-experts' drift check
    assert torch.cat([b.flatten() for b in drift]).tolist() == stream[:3000]
    assert [tuple(b.shape) for b in drift] == [(4, 256)] * 2 + [(3, 256), (1, 184)]
    assert profile.token_rows(texts, TOK, 100, 1050, "x").tolist() == [stream[s : s + 100] for s in range(0, 1000, 100)]
    calibration = prune.calibration_batches(texts, TOK, 1025, 64)
    assert [tuple(b.shape) for b in calibration] == [(8, 64), (8, 64), (1, 1)]
    assert torch.cat([b.flatten() for b in calibration]).tolist() == stream[:1025]


def test_the_awkward_inputs_exercise_each_difference(tmp_path):
    """The digests above mean something only if the cases reach the places where the commands differ."""
    files = old_case_inputs(tmp_path)
    train_texts = dt.read_texts(files["txt"], dt.TRAINING)
    assert len(train_texts) > 10_000 and train_texts[-1].endswith("\n") and " " in train_texts
    assert files["txt"].stat().st_size > dt.PIECE
    stream = dt.token_stream(dt.calibration_texts(files["txt"]), TOK, 2)
    assert len(stream) > 70_000 and TOK.encode("\ufeff")[0] in stream[:1]
    assert "" in list(dt.iter_texts(files["jsonl"], dt.COMPARISON))
