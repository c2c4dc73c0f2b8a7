"""Every moekit output computes its parent's function in every runtime moekit.arch.runtimes says it
does, and fails or computes something else exactly where the table says so (a change in either
direction fails here). References are the parent's logits as transformers 5.x computes them.

Needs transformers 5.x here, the transformers 4.57 venv (.venv-457, or MOEKIT_PY457) and
llama.cpp (`make llamacpp`); `make test` provides all three and sets MOEKIT_REQUIRE_RUNTIMES=1,
so a missing one fails there instead of skipping.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moekit.arch.runtimes import EXACT, FAILS, WRONG, Facts, verdicts
from tests import runtime_matrix as rm
from tests.conftest import CACHE, run_moekit

TOLERANCE = {"transformers 5.x": 1e-5, "transformers 4.57": 1e-5, "llama.cpp": 1e-4}
MEASURED = tuple(TOLERANCE)
CHILDREN = rm.children()
PY457 = Path(os.environ.get("MOEKIT_PY457", Path(__file__).parents[1] / ".venv-457" / "bin" / "python"))


def missing(why: str):
    if os.environ.get("MOEKIT_REQUIRE_RUNTIMES"):
        pytest.fail(why)
    pytest.skip(why)


def smollm2_tokenizer() -> Path:
    """SmolLM2's real tokenizer (from the built-in GGUF), saved by transformers 5.x, cached."""
    folder = CACHE / "smollm2-tokenizer-5x"
    if not (folder / "tokenizer.json").is_file():
        from moekit.runtime.models import load_tokenizer

        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        load_tokenizer("smollm2-135m").save_pretrained(tmp)
        tmp.rename(folder)
    return folder


def build_parent(p: rm.Parent, folder: Path, tokenizer: Path) -> None:
    """A tiny random parent as transformers 5.x saves it, or rewritten the way 4.57 saves it."""
    from moekit.arch.compat import tokenizer_config_for_both_lines
    from tests.tiny import build

    rope = {"rope_type": p.rope, "rope_theta": p.theta, **rm.ROPE[p.rope]}
    build(p.family, folder, vocab_size=rm.VOCAB, tie_word_embeddings=p.tied, rope_parameters=rope)
    for f in tokenizer.iterdir():
        shutil.copy(f, folder / f.name)
    if p.form == "4x":
        cfg = json.loads((folder / "config.json").read_text())
        params = cfg.pop("rope_parameters")
        cfg["rope_theta"] = params.pop("rope_theta")
        cfg["rope_scaling"] = params if p.rope != "default" else None
        cfg["torch_dtype"] = cfg.pop("dtype", "float32")
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        tokenizer_config_for_both_lines(folder)  # 4.57 writes PreTrainedTokenizerFast
    assert "rope_theta" not in json.loads((folder / "config.json").read_text()) or p.form == "4x"


def logits_5x(folder: Path, ids: list[int]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        np.save(folder / "logits-5x.npy", model.eval()(torch.tensor([ids])).logits[0].numpy())
    return {"ok": True, "problems": {k: sorted(v)[:3] for k, v in info.items() if v},
            "tokens": AutoTokenizer.from_pretrained(folder)(rm.TEXT)["input_ids"]}


def start_worker(python: Path, mode: str, jobs: dict, where: Path):
    """Start `python tests/runtime_matrix.py MODE JOBS`; the returned function waits for its results."""
    path = where / f"jobs-{mode}.json"
    path.write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    log = path.with_suffix(".log")
    with open(log, "w") as stderr:  # a file, not a pipe: a full pipe would stall the worker
        proc = subprocess.Popen([str(python), str(Path(__file__).with_name("runtime_matrix.py")), mode, str(path)],
                                stdout=subprocess.DEVNULL, stderr=stderr, env=env)

    def results() -> dict:
        proc.wait()
        assert proc.returncode == 0, f"{mode} worker failed: {log.read_text()[-2000:]}"
        return json.loads(path.with_suffix(f".{mode}.out.json").read_text())

    return results


def run_worker(python: Path, mode: str, jobs: dict, where: Path) -> dict:
    return start_worker(python, mode, jobs, where)()


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    import transformers

    from moekit.runtime import llamacpp

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("the matrix is driven from transformers 5.x (it runs 4.57 itself)")
    if not PY457.is_file():
        missing(f"no transformers 4.57 interpreter at {PY457} (make .venv-457/bin/moekit)")
    try:
        llamacpp.converter_dir(), llamacpp.load_bindings()
    except Exception as e:
        missing(str(e))

    root, ids = tmp_path_factory.mktemp("runtimes"), rm.input_ids()
    tokenizer = smollm2_tokenizer()
    data = root / "new.txt"
    data.write_text("\n\n".join(f"Paragraph {i}: experts learn new things, {i * 7} of them." for i in range(80)))
    folders = {}
    for p in rm.parents():
        folders[p.name] = root / p.name
        build_parent(p, folders[p.name], tokenizer)
    for c in CHILDREN:
        folders[c.name] = root / c.name
        extra = ("--data", str(data)) if c.command[0] == "train" else ()
        run_moekit(c.command[0], str(folders[c.source]), str(folders[c.name]), *c.command[1:], *extra, check=True)

    results = {"transformers 5.x": {n: logits_5x(f, ids) for n, f in folders.items()}}
    models = {c.name: str(folders[c.name]) for c in CHILDREN}
    in_457 = start_worker(PY457, "transformers", {"ids": ids, "text": rm.TEXT, "tag": "457", "models": models}, root)
    ggufs = {c.name: root / f"{c.name}.gguf" for c in CHILDREN}  # converted while 4.57 runs (2 cores)
    converted = llamacpp.convert_many([(folders[n], g) for n, g in ggufs.items()], python=str(PY457))
    results["transformers 4.57"] = in_457()
    converted = dict(zip(ggufs, converted))
    ran = run_worker(Path(sys.executable), "llama.cpp",
                     {"ids": ids, "models": {n: str(g) for n, g in ggufs.items() if converted[n]["ok"]}}, root)
    results["llama.cpp"] = {n: converted[n] if not converted[n]["ok"] else ran[n] for n in ggufs}
    yield {"folders": folders, "results": results, "ggufs": ggufs}
    shutil.rmtree(root, ignore_errors=True)  # ~2 GB of tiny models with a 49152-token vocabulary


def logits_of(matrix, runtime: str, name: str) -> np.ndarray:
    if runtime == "llama.cpp":
        return np.load(matrix["ggufs"][name].with_suffix(".npy"))
    return np.load(matrix["folders"][name] / ("logits-5x.npy" if runtime == "transformers 5.x" else "logits-457.npy"))


def max_rel_error(reference: np.ndarray, got: np.ndarray) -> float:
    err = float(np.nan_to_num(np.abs(reference - got), nan=np.inf).max())
    return err / float(np.abs(reference).max())


@pytest.mark.parametrize("runtime", MEASURED)
@pytest.mark.parametrize("child", CHILDREN, ids=[c.name for c in CHILDREN])
def test_cell(matrix, child, runtime):
    from moekit.checkpoint import open_checkpoint

    folder = matrix["folders"][child.name]
    verdict = verdicts(Facts.of_folder(folder, tensors=open_checkpoint(folder).tensors))[runtime]
    got = matrix["results"][runtime][child.name]
    record = {"child": child.name, "runtime": runtime, "expected": verdict.status}
    if verdict.status == FAILS:
        assert not got["ok"], f"{record}: the table says it fails ({verdict.why}), but it ran"
        assert verdict.sign in got["error"], f"{record}: failed differently: {got['error']}"
        return
    assert got["ok"], f"{record}: {got.get('error')}"
    reference_model = child.parent or child.name
    reference = logits_of(matrix, "transformers 5.x", reference_model)
    error = max_rel_error(reference, logits_of(matrix, runtime, child.name))
    print(json.dumps({**record, "max_rel_error": error}))
    if verdict.status == EXACT:
        assert error <= TOLERANCE[runtime], f"{record}: {error:.3g}"
        if runtime.startswith("transformers"):
            assert not got["problems"], f"{record}: loading problems {got['problems']}"
            parent_tokens = matrix["results"]["transformers 5.x"][child.parent or child.source]["tokens"]
            assert got["tokens"] == parent_tokens, f"{record}: tokenises differently from the parent in 5.x"
    else:
        assert verdict.status == WRONG
        assert not error <= 1e-2, f"{record}: the table says it computes another function ({verdict.why}), got {error:.3g}"


def test_parents_4x_and_5x_forms_are_the_same_function_in_5x(matrix):
    """The two saved forms of one parent are one model: otherwise the reference itself would be off."""
    for p in rm.parents():
        if p.form == "5x":
            twin = p.name.replace("-5x-", "-4x-")
            assert max_rel_error(logits_of(matrix, "transformers 5.x", p.name), logits_of(matrix, "transformers 5.x", twin)) == 0
