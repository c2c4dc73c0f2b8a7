"""Data-driven router init: model loading, MLP-input capture, k-means and prompt rows (calibration text: test_data)."""

from __future__ import annotations

import pytest
import torch

from moekit.checkpoint import open_checkpoint
from moekit.data.text import builtin_calibration_text
from moekit.errors import MoekitError
from moekit.runtime.models import load_dense_model, load_tokenizer
from moekit.runtime import capture
from moekit.surgery import router_init as ri
from tests import tiny


class FakeTokenizer:
    """Characters to ids inside the tiny models' vocabulary of 128 (0-2 are pad/bos/eos)."""

    bos_token_id, eos_token_id = 1, 2

    def encode(self, text, add_special_tokens=False):
        return [3 + ord(ch) % 125 for ch in text]


@pytest.fixture(scope="module")
def llama(tiny_models):
    return load_dense_model(open_checkpoint(tiny_models("llama")), "cpu")


def random_ids(rows=3, seq=24, seed=0):
    return torch.randint(3, 128, (rows, seq), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("tied", [False, True])
def test_load_dense_model_matches_from_pretrained(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    path = tiny.build("llama", tmp_path / "m", tie_word_embeddings=tied)
    model = load_dense_model(open_checkpoint(path), "cpu")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert next(model.parameters()).dtype == torch.float32
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_load_dense_model_reports_missing_tensor(tiny_models):
    ckpt = open_checkpoint(tiny_models("llama"))
    del ckpt.tensors["model.layers.1.mlp.up_proj.weight"]  # the cached header dict
    with pytest.raises(MoekitError, match="lacks 1 tensor"):
        load_dense_model(ckpt, "cpu")


def test_load_tokenizer_without_tokenizer_files(tiny_models):
    with pytest.raises(MoekitError, match="no tokenizer"):
        load_tokenizer(tiny_models("llama"))


# --------------------------------------------------------------------------- capture


def manual_mlp_inputs(model, ids):
    """Each layer's MLP input recomputed by hand from the model's hidden states; the recomputation
    is checked against the next layer's input, so it cannot silently be wrong."""
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
        positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
        rope = model.model.rotary_emb(hidden[0], positions)
        out = {}
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn(layer.input_layernorm(hidden[i]), position_embeddings=rope, attention_mask=None)[0]
            residual = hidden[i] + attn
            out[i] = layer.post_attention_layernorm(residual)
            if i + 1 < len(model.model.layers):  # the last entry of hidden_states is after the final norm
                torch.testing.assert_close(residual + layer.mlp(out[i]), hidden[i + 1], rtol=0, atol=1e-5)
    return out


def test_hooks_capture_exactly_the_mlp_input(llama):
    ids = random_ids()
    manual = manual_mlp_inputs(llama, ids)
    got = capture.collect_mlp_inputs_from_ids(llama, [ids], [0, 1], max_tokens=10_000, device="cpu", skip_first=0)
    for i in (0, 1):
        assert got[i].shape == (ids.numel(), 64)
        torch.testing.assert_close(got[i], manual[i].reshape(-1, 64), rtol=0, atol=1e-6)
    # skip_first drops position 0 of every row; an early stop after layer 0 changes nothing
    skipped = capture.collect_mlp_inputs_from_ids(llama, [ids], [0], max_tokens=10_000, device="cpu")
    torch.testing.assert_close(skipped[0], manual[0][:, 1:].reshape(-1, 64), rtol=0, atol=1e-6)
    # the hooks are gone afterwards
    assert all(not layer.mlp._forward_pre_hooks for layer in llama.model.layers)


def test_collect_respects_max_tokens_and_layers(llama):
    got = capture.collect_mlp_inputs_from_ids(llama, [random_ids(seed=s) for s in range(4)], [1], max_tokens=50, device="cpu")
    assert list(got) == [1] and got[1].shape == (50, 64)
    with pytest.raises(MoekitError, match="layer 5"):
        capture.collect_mlp_inputs_from_ids(llama, [random_ids()], [5], max_tokens=10, device="cpu")


def test_collect_from_text(llama):
    texts = [f"paragraph {n}: the quick brown fox jumps over the lazy dog" for n in range(20)]
    got = capture.collect_mlp_inputs(llama, texts, FakeTokenizer(), [0, 1], max_tokens=300, seq_len=32, device="cpu")
    assert got[0].shape == got[1].shape == (300, 64)
    assert torch.isfinite(got[1]).all()


# --------------------------------------------------------------------------- k-means


def assign(x, centroids):
    return (torch.nn.functional.normalize(x, dim=-1) @ centroids.T).argmax(dim=1)


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(1)
    centres = torch.nn.functional.normalize(torch.randn(5, 64, generator=g), dim=-1)
    truth = torch.arange(5).repeat_interleave(200)
    # different norms per point: spherical k-means must ignore them
    x = (centres[truth] + 0.05 * torch.randn(1000, 64, generator=g)) * torch.rand(1000, 1, generator=g).add(0.5) * 10
    found = ri.balanced_kmeans(x, 5, iters=50, seed=0)
    assert found.shape == (5, 64)
    match = (found @ centres.T).max(dim=1)
    assert (match.values > 0.99).all() and sorted(match.indices.tolist()) == [0, 1, 2, 3, 4]
    labels = assign(x, found)
    assert torch.equal(match.indices[labels], truth)  # every point in its true cluster


def test_kmeans_on_hidden_states_gives_distinct_non_empty_clusters(llama):
    x = capture.collect_mlp_inputs_from_ids(llama, [random_ids(8, 32)], [1], 10_000, "cpu")[1]
    c = ri.balanced_kmeans(x, 8, iters=30, seed=3)
    assert torch.bincount(assign(x, c), minlength=8).min() > 0
    cos = c @ c.T - torch.eye(8) * 2
    assert cos.max() < 0.9999
    torch.testing.assert_close(c.norm(dim=1), torch.ones(8))
    assert torch.equal(c, ri.balanced_kmeans(x, 8, iters=30, seed=3))  # seeded: reproducible


def test_kmeans_reseeds_empty_clusters():
    # one tight blob plus a few scattered points: nothing may be left empty, even with k large
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.ones(500, 16) + 0.01 * torch.randn(500, 16, generator=g), torch.randn(20, 16, generator=g)])
    for seed in range(5):
        c = ri.balanced_kmeans(x, 12, iters=20, seed=seed)
        assert torch.bincount(assign(x, c), minlength=12).min() > 0
    # the helper itself: everything in cluster 0 → every cluster gets a point
    sim = torch.rand(10, 4, generator=g)
    labels = ri._fill_empty(sim, torch.zeros(10, dtype=torch.long), 4)
    assert torch.bincount(labels, minlength=4).min() == 1


def test_kmeans_refuses_too_few_points():
    with pytest.raises(MoekitError, match="at least 8"):
        ri.balanced_kmeans(torch.randn(5, 16), 8, iters=5, seed=0)
    with pytest.raises(MoekitError, match="distinct"):
        ri.balanced_kmeans(torch.randn(3, 16).repeat(10, 1), 4, iters=5, seed=0)


def test_kmeans_router_rows_logit_spread(llama):
    states = capture.collect_mlp_inputs_from_ids(llama, [random_ids(8, 32)], [0, 1], 10_000, "cpu")
    rows = ri.kmeans_router_rows(states, 4, iters=20, seed=0, logit_std=1.5)
    for i, x in states.items():
        assert rows[i].shape == (4, 64)
        spread = (x @ rows[i].T).std(dim=1, unbiased=False).pow(2).mean().sqrt()
        assert spread.item() == pytest.approx(1.5, rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_collect_and_kmeans_on_cuda(tiny_models, llama):
    ids = [random_ids(8, 32)]
    cuda_model = load_dense_model(open_checkpoint(tiny_models("llama")), "cuda")
    on_gpu = capture.collect_mlp_inputs_from_ids(cuda_model, ids, [0, 1], 10_000, "cuda")
    on_cpu = capture.collect_mlp_inputs_from_ids(llama, ids, [0, 1], 10_000, "cpu")
    for i in (0, 1):
        assert on_gpu[i].device.type == "cuda"
        torch.testing.assert_close(on_gpu[i].cpu(), on_cpu[i], rtol=1e-3, atol=1e-3)  # TF32 and kernel order
    rows = ri.kmeans_router_rows(on_gpu, 8, iters=20, seed=0)
    assert rows[1].device.type == "cuda"
    assert torch.bincount(assign(on_gpu[1], rows[1]), minlength=8).min() > 0


# --------------------------------------------------------------------------- prompts

POSITIVE = [["def main(): return 0", "import os; os.path.join(a, b)"],
            ["the integral of x squared is x cubed over three", "prime numbers have two divisors"],
            ["Once upon a time a fox lived in the woods", "the princess opened the door"]]


def test_prompt_router_rows(llama):
    tok = FakeTokenizer()
    rows = capture.prompt_router_rows(llama, tok, POSITIVE, [], [0, 1], "cpu")
    for i in (0, 1):
        assert rows[i].shape == (3, 64)
        torch.testing.assert_close(rows[i].norm(dim=1), torch.ones(3))
        assert (rows[i] @ rows[i].T - torch.eye(3) * 2).max() < 0.9999  # one direction per expert

    # the row is the normalised mean of per-prompt token means (position 0, the BOS, excluded)
    ids = [[1] + tok.encode(p) for p in POSITIVE[0]]
    per_prompt = [capture.collect_mlp_inputs_from_ids(llama, [torch.tensor([i])], [1], 10_000, "cpu")[1].mean(0) for i in ids]
    expected = torch.nn.functional.normalize(torch.stack(per_prompt).mean(0), dim=0)
    torch.testing.assert_close(rows[1][0], expected, rtol=0, atol=1e-5)

    negative = capture.prompt_router_rows(llama, tok, POSITIVE, ["hello", "some generic text"], [0, 1], "cpu")
    for i in (0, 1):
        assert not torch.allclose(negative[i], rows[i], atol=1e-3)
    with pytest.raises(MoekitError, match="positive prompt"):
        capture.prompt_router_rows(llama, tok, [["x"], []], [], [0], "cpu")


# --------------------------------------------------------------------------- real weights


@pytest.mark.slow
def test_smollm2_end_to_end(smollm2):
    ckpt = open_checkpoint(smollm2)
    model, tok = load_dense_model(ckpt, "cpu"), load_tokenizer(ckpt.path)
    layers = [0, 15, 29]
    states = capture.collect_mlp_inputs(model, builtin_calibration_text(40_000), tok, layers, 2048, 256, "cpu")
    rows = ri.kmeans_router_rows(states, 8, iters=30, seed=0)
    for i in layers:
        assert states[i].shape == (2048, 576) and rows[i].shape == (8, 576)
        loads = torch.bincount((states[i] @ rows[i].T).argmax(1), minlength=8)
        assert loads.min() > 0  # every expert is someone's first choice on the calibration text

    prompts = capture.prompt_router_rows(model, tok, [["def f(x):\n    return x + 1"], ["The cat sat on the mat."]],
                                    ["Hello."], layers, "cpu")
    for i in layers:
        assert (prompts[i][0] @ prompts[i][1]).item() < 0.99


@pytest.mark.slow
def test_smollm2_gguf_loads_like_its_folder(smollm2):
    gguf, folder = open_checkpoint("smollm2-135m"), open_checkpoint(smollm2)
    text = "Sparse upcycling copies the dense FFN into every expert."
    ids = load_tokenizer(gguf.path).encode(text)
    assert ids == load_tokenizer(folder.path).encode(text)
    with torch.no_grad():
        a = load_dense_model(gguf, "cpu")(torch.tensor([ids])).logits
        b = load_dense_model(folder, "cpu")(torch.tensor([ids])).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
