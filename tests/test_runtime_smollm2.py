"""Issue 9's SmolLM2 rows on the real weights: a parent saved the way transformers 5.x saves it
(RoPE theta 1e5 only inside rope_parameters, tokenizer_class TokenizersBackend), upcycled, and the
child loaded in transformers 4.57 against the parent's logits as 5.x computes them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests import runtime_matrix as rm
from tests.conftest import run_moekit
from tests.test_runtime_matrix import PY457, max_rel_error, missing, run_worker


def saved_by_5x(smollm2, folder):
    """`smollm2` as 5.x's save_pretrained writes it (no top-level rope_theta); weights linked, not copied."""
    folder.mkdir()
    for f in smollm2.iterdir():
        if f.name not in ("config.json", "tokenizer_config.json"):
            os.symlink(f, folder / f.name)
    tokenizer = json.loads((smollm2 / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tokenizer, "tokenizer_class": "TokenizersBackend"}))
    cfg = json.loads((smollm2 / "config.json").read_text())
    for legacy in ("rope_theta", "rope_scaling"):
        cfg.pop(legacy, None)
    assert cfg["rope_parameters"]["rope_theta"] == 1e5
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("target,layers", [("mixtral", "all"), ("glm4_moe", "skip-first:2")])
def test_smollm2_child_in_457_computes_the_parents_5x_function(smollm2, tmp_path, target, layers):
    import torch
    from transformers import AutoModelForCausalLM

    if not PY457.is_file():
        missing(f"no transformers 4.57 interpreter at {PY457}")
    parent = saved_by_5x(smollm2, tmp_path / "parent")
    child = tmp_path / target  # 4 experts, not 8: the same RoPE path in half the disk (fp32)
    run_moekit("upcycle", str(parent), str(child), "-n", "4", "-k", "2", "--target", target, "--moe-layers", layers,
               check=True)
    ids = rm.input_ids()
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32)(torch.tensor([ids])).logits[0].numpy()
    got = run_worker(PY457, "transformers", {"ids": ids, "text": rm.TEXT, "tag": "457", "models": {target: str(child)}},
                     tmp_path)[target]
    assert got["ok"] and not got["problems"], got
    error = max_rel_error(reference, np.load(child / "logits-457.npy"))
    print(json.dumps({"parent": "SmolLM2-135M saved by 5.x", "child": f"{target} 4x2", "runtime": "transformers 4.57",
                      "max_rel_error": error}))
    assert error <= 1e-5
