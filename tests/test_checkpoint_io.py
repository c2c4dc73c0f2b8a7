"""Reader/writer round trips, sharding, atomicity, pickle refusal, GGUF input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit.checkpoint import CheckpointWriter, open_checkpoint
from moekit.checkpoint.writer import TEMP_MARKER, parse_size
from moekit.errors import MoekitError, UsageError
from tests.conftest import run_moekit


def _assert_same_tensors(a: Path, b: Path) -> None:
    ra, rb = open_checkpoint(a), open_checkpoint(b)
    assert ra.tensors.keys() == rb.tensors.keys()
    for name in ra.tensors:
        ta, tb = ra.load(name), rb.load(name)
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), name


def test_reader_matches_safetensors_library(tiny_models):
    from safetensors.torch import load_file

    src = tiny_models("qwen2")
    ref = load_file(src / "model.safetensors")
    ckpt = open_checkpoint(src)
    assert set(ckpt.tensors) == set(ref)
    for name, t in ref.items():
        assert ckpt.tensors[name].shape == tuple(t.shape)
        assert torch.equal(ckpt.load(name), t)
    assert ckpt.config["model_type"] == "qwen2"


def test_convert_round_trip_is_bit_identical(tiny_models, tmp_path):
    src = tiny_models("llama")
    run_moekit("convert", str(src), str(tmp_path / "out"), check=True)
    _assert_same_tensors(src, tmp_path / "out")
    record = json.loads((tmp_path / "out" / "moekit.json").read_text())
    assert record["operation"] == "convert"
    assert set(record["sources"][0]["files"]) == {"model.safetensors", "config.json"}
    assert "moekit" in (tmp_path / "out" / "README.md").read_text()


def test_sharding_writes_an_index_that_transformers_loads(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_models("mistral")
    run_moekit("convert", str(src), str(tmp_path / "out"), "--max-shard-size", "100KB", check=True)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / "out" / s).is_file() for s in shards)
    for s in shards:  # each shard stays under the limit unless it holds a single larger tensor
        ck = open_checkpoint(tmp_path / "out")
        held = [m for n, m in ck.tensors.items() if index["weight_map"][n] == s]
        assert len(held) == 1 or sum(m.nbytes for m in held) <= 100_000
    _assert_same_tensors(src, tmp_path / "out")
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_dtype_cast(tiny_models, tmp_path):
    src = tiny_models("llama")
    run_moekit("convert", str(src), str(tmp_path / "bf16"), "--dtype", "bf16", check=True)
    ck = open_checkpoint(tmp_path / "bf16")
    assert {m.dtype for m in ck.tensors.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(ck.load(name), open_checkpoint(src).load(name).bfloat16())


def _plan(src):
    return list(open_checkpoint(src).tensors.values())


def test_interrupted_write_leaves_no_target(tiny_models, tmp_path):
    src = tiny_models("llama")
    ckpt = open_checkpoint(src)
    plan = _plan(src)
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with CheckpointWriter(target, plan, sources=[src]) as out:
            out.write(plan[0].name, ckpt.load(plan[0].name))
            raise KeyboardInterrupt
    assert not target.exists()
    assert os.listdir(tmp_path) == []  # the temporary folder is gone too


def test_killed_process_leaves_no_target(tiny_models, tmp_path):
    """SIGKILL allows no clean-up: the partial folder stays, hidden, and the target never appears."""
    src = tiny_models("llama")
    target = tmp_path / "out"
    script = f"""
import os, signal
from moekit.checkpoint import CheckpointWriter, open_checkpoint
ck = open_checkpoint({str(src)!r})
plan = list(ck.tensors.values())
with CheckpointWriter({str(target)!r}, plan) as out:
    for meta in plan[:3]:
        out.write(meta.name, ck.load(meta.name))
    os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    assert not target.exists()
    leftovers = os.listdir(tmp_path)
    assert len(leftovers) == 1 and TEMP_MARKER in leftovers[0] and leftovers[0].startswith(".")


def test_writer_refuses_incomplete_commit(tiny_models, tmp_path):
    src = tiny_models("llama")
    plan = _plan(src)
    with pytest.raises(ValueError, match="incomplete"):
        with CheckpointWriter(tmp_path / "out", plan) as out:
            out.commit()
    assert not (tmp_path / "out").exists()


def test_existing_target_refused_and_overwrite_replaces(tiny_models, tmp_path):
    src = tiny_models("llama")
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    proc = run_moekit("convert", str(src), str(target))
    assert proc.returncode == 3 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert (target / "keep.txt").read_text() == "precious"
    run_moekit("convert", str(src), str(target), "--overwrite", check=True)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").is_file()


@pytest.mark.parametrize("where", ["same", "inside"])
def test_target_in_source_refused(tiny_models, tmp_path, where):
    src = tiny_models("llama")
    target = src if where == "same" else src / "sub"
    before = sorted(os.listdir(src))
    proc = run_moekit("convert", str(src), str(target), "--overwrite")
    assert proc.returncode == 2 and "source" in proc.stderr
    assert sorted(os.listdir(src)) == before


def test_truncated_safetensors_is_one_line_error(tiny_models, tmp_path):
    src = tiny_models("llama")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    data = (src / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    for cmd in (["inspect", str(bad)], ["convert", str(bad), str(tmp_path / "out")]):
        proc = run_moekit(*cmd)
        assert proc.returncode == 3, proc.stderr
        assert "truncated" in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing", "not-a-model", "bad-json"])
def test_bad_sources_are_one_line_errors(tmp_path, case):
    path = tmp_path / "src"
    if case != "missing":
        path.mkdir()
        (path / "notes.txt").write_text("hello")
    if case == "bad-json":
        (path / "config.json").write_text("{not json")
        (path / "model.safetensors").write_bytes(b"")
    proc = run_moekit("inspect", str(path))
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_pickle_refused_unless_allowed(tiny_models, tmp_path):
    from safetensors.torch import load_file

    src = tiny_models("llama")
    pkl = tmp_path / "pkl"
    pkl.mkdir()
    (pkl / "config.json").write_text((src / "config.json").read_text())
    torch.save(load_file(src / "model.safetensors"), pkl / "pytorch_model.bin")
    proc = run_moekit("convert", str(pkl), str(tmp_path / "out"))
    assert proc.returncode == 3 and "--allow-pickle" in proc.stderr
    with pytest.raises(MoekitError, match="pickle"):
        open_checkpoint(pkl)
    run_moekit("convert", str(pkl), str(tmp_path / "out"), "--allow-pickle", check=True)
    _assert_same_tensors(src, tmp_path / "out")


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    pkl = tmp_path / "pkl"
    pkl.mkdir()
    (pkl / "config.json").write_text("{}")
    (pkl / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(MoekitError, match="weights_only"):
        open_checkpoint(pkl, allow_pickle=True).tensors


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("100KB") == 100_000
    with pytest.raises(UsageError):
        parse_size("lots")


@pytest.mark.slow
def test_gguf_matches_transformers_gguf_loader():
    """Our streaming GGUF reader gives exactly the tensors transformers' own GGUF loader gives."""
    from transformers import AutoModelForCausalLM

    ckpt = open_checkpoint("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(ckpt.path.parent, gguf_file=ckpt.path.name, dtype=torch.float32)
    state = model.state_dict()
    assert set(ckpt.tensors) == set(state) - {"lm_head.weight"}  # tied to the embeddings
    for name in ckpt.tensors:
        assert torch.equal(ckpt.load(name), state[name]), name
    for field in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                  "vocab_size", "tie_word_embeddings"):
        assert ckpt.config[field] == getattr(model.config, field), field


@pytest.mark.slow
def test_smollm2_round_trip_bit_identical_and_loads(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_moekit("convert", str(smollm2), str(tmp_path / "copy"), check=True)
    _assert_same_tensors(smollm2, tmp_path / "copy")
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "copy", output_loading_info=True)
    assert not any(info.values())
    tok = AutoTokenizer.from_pretrained(tmp_path / "copy")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert ids.shape[1] > 3
    assert model.config.rope_theta if hasattr(model.config, "rope_theta") else model.config.rope_parameters["rope_theta"] == 100000.0


def test_full_disk_is_one_line_exit_4_and_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    import errno

    from moekit.checkpoint import writer

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out"))

    # Every way the writer puts bytes on disk: from Python buffers, and file-to-file copies.
    monkeypatch.setattr(writer, "_write_all", full_disk)
    monkeypatch.setattr(writer, "_copy_range", full_disk)
    out = tmp_path / "out"
    proc = run_moekit("convert", str(tiny_models("llama")), str(out))
    assert proc.returncode == 4 and "disk full" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []


def test_verbatim_tensors_are_copied_file_to_file(tiny_models, tmp_path, monkeypatch):
    """An exact upcycle with no cast loads no expert: every copy goes through copy_bytes."""
    from moekit.checkpoint.reader import SafetensorsCheckpoint

    loaded = []
    real_load = SafetensorsCheckpoint.load
    monkeypatch.setattr(SafetensorsCheckpoint, "load", lambda self, name, dtype=None: (loaded.append(name),
                                                                                     real_load(self, name, dtype))[1])
    src = tiny_models("llama")
    run_moekit("upcycle", str(src), str(tmp_path / "moe"), "-n", "4", "-k", "2", check=True)
    assert loaded == []
    ck = open_checkpoint(tmp_path / "moe")
    assert torch.equal(ck.load("model.layers.1.block_sparse_moe.experts.3.w2.weight"),
                       real_load(open_checkpoint(src), "model.layers.1.mlp.down_proj.weight"))


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_midway_exits_130_and_leaves_nothing(tiny_models, tmp_path, sig):
    import signal
    import time

    src, out = tiny_models("llama"), tmp_path / "out"
    slow_cli = f"""
import sys, time
from moekit.checkpoint.writer import CheckpointWriter
begin = CheckpointWriter._begin  # every tensor, copied or computed, starts here: make each slow
CheckpointWriter._begin = lambda self, name: (time.sleep(0.3), begin(self, name))[1]
sys.argv = ["moekit", "convert", {str(src)!r}, {str(out)!r}]
from moekit.cli import main
main()
"""
    # As from a terminal: a job started in the background by a shell inherits SIGINT ignored
    # (and Python then keeps ignoring it), so the test sets the default disposition itself.
    proc = subprocess.Popen([sys.executable, "-c", slow_cli], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while not any(TEMP_MARKER in p.name for p in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # some tensors are written by now
    proc.send_signal(getattr(signal, sig))
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_shards_end_before_the_safetensors_header_limit():
    from moekit.checkpoint import TensorMeta
    from moekit.checkpoint.writer import MAX_HEADER_BYTES, plan_shards

    plan = [TensorMeta(f"model.layers.{i // 3000}.mlp.experts.{i % 3000}.down_proj.weight", (4,), torch.float32)
            for i in range(700_000)]
    shards = plan_shards(plan, 10**12)
    assert len(shards) > 1 and sum(len(s.tensors) for s in shards) == len(plan)
    assert all(len(s.header()) < MAX_HEADER_BYTES * 1.1 < 100_000_000 for s in shards)


def test_output_may_sit_beside_a_gguf_file_but_not_replace_its_folder(tmp_path):
    from moekit.checkpoint.writer import check_target

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    check_target(tmp_path / "out", [gguf], overwrite=False)  # beside the file: fine
    with pytest.raises(UsageError, match="contains the source"):
        check_target(tmp_path, [gguf], overwrite=True)
