"""grit_models on the kernel backends other than the CPU default.

* CPU, Triton interpreter (TRITON_INTERPRET=1, set by conftest): the whole model through the
  Triton attention, KV-cache attention, MoE and pooling kernels equals the torch backend.
* GPU (marked ``gpu``): on CUDA, embeddings equal gritlm.GritLM's and greedy generation
  equals transformers', fp32; bf16 embeddings stay close to the fp32 ones.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import grit_models as gm
from grit_models.testing import make_checkpoint, random_texts

INSTRUCTION = gm.gritlm_instruction_format("represent the query")


def _run(model):
    texts = random_texts(5, 3, 12, seed=0)
    ids = torch.tensor([[1, 5, 9, 22, 40, 7, 8, 9], [0, 0, 0, 1, 5, 9, 3, 4]])
    emb = model.encode(texts, instruction=INSTRUCTION, convert_to_tensor=True)
    out = model.generate(ids, (ids != 0).long(), max_new_tokens=6, eos_token_id=[])
    ans = model.rag("what is it", "paris is big", cache="docquery", max_new_tokens=4, return_ids=True)
    return emb, out, ans


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="CPU run of the Triton kernels needs the interpreter")
@pytest.mark.parametrize("arch", ["mistral", "mixtral"])
def test_triton_backend_equals_torch_backend(tmp_path, monkeypatch, arch):
    pytest.importorskip("triton")
    path = make_checkpoint(tmp_path / arch, arch, sliding_window=5 if arch == "mistral" else None)
    model = gm.GritModel(str(path), device="cpu")
    monkeypatch.setenv("GRIT_BACKEND", "cpu")
    emb, out, ans = _run(model)
    monkeypatch.setenv("GRIT_BACKEND", "triton")
    emb_t, out_t, ans_t = _run(model)
    torch.testing.assert_close(emb_t, emb, atol=1e-5, rtol=1e-5)
    assert torch.equal(out_t, out) and torch.equal(ans_t, ans)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["mistral", "mixtral"])
def test_cuda_matches_gritlm_and_transformers(tmp_path, arch):
    gritlm = pytest.importorskip("gritlm")
    path = make_checkpoint(tmp_path / arch, arch, sliding_window=8 if arch == "mistral" else None)
    texts = random_texts(20, 1, 60, seed=1)
    ref = gritlm.GritLM(str(path), device="cuda", dtype=torch.float32)
    ours = gm.GritModel(str(path), device="cuda")
    want = ref.encode(texts, instruction=INSTRUCTION)
    got = ours.encode(texts, instruction=INSTRUCTION)
    # Triton's fp32 tl.dot may run in TF32 (10-bit mantissa): ~1e-3 relative on unit vectors
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=2e-3)
    ids = torch.tensor([[1, 5, 9, 22, 40, 7, 8, 9, 30, 31, 32], [0, 0, 0, 1, 5, 9, 3, 4, 50, 51, 52]], device="cuda")
    mask = (ids != 0).long()
    hf = ref.model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, mask, max_new_tokens=10, pad_token_id=0), hf)
    bf16 = gm.GritModel(str(path), device="cuda", torch_dtype="bfloat16").encode(texts, instruction=INSTRUCTION)
    assert np.abs((bf16 * got).sum(-1) - 1).max() < 2e-2  # cosine to the fp32 embedding
