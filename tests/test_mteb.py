"""grit_models.mteb.GritMTEB under mteb 2.x, offline (mteb's mock tasks): the same embeddings
and the same scores as mteb's own gritlm-based wrapper (``mteb.models.instruct_wrapper`` around
gritlm.GritLM, with GritLM's instruction template) on the same checkpoint."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

mteb = pytest.importorskip("mteb")
pytest.importorskip("gritlm")

from mteb.mocks import mock_tasks as M  # noqa: E402
from mteb.types import PromptType  # noqa: E402

from grit_models.mteb import GritMTEB  # noqa: E402
from grit_models.testing import make_checkpoint  # noqa: E402

TASKS = [M.MockRetrievalTask, M.MockInstructionRetrieval, M.MockClassificationTask, M.MockPairClassificationTask,
         M.MockSTSTask, M.MockRerankingTask, M.MockBitextMiningTask, M.MockSummarizationTask]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("mteb") / "m", "mistral", seed=8)
    from mteb.models.instruct_wrapper import instruct_wrapper
    from mteb.models.model_implementations.gritlm_models import gritlm_instruction

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        theirs = instruct_wrapper(str(path), mode="embedding", instruction_template=gritlm_instruction, device="cpu",
                                  torch_dtype=torch.float32)
    return GritMTEB(str(path), device="cpu"), theirs


def _main_scores(model, task_cls):
    result = mteb.evaluate(model, [task_cls()], cache=None, overwrite_strategy="always", show_progress_bar=False)
    return {split: [s["main_score"] for s in scores] for split, scores in result.task_results[0].scores.items()}


@pytest.mark.parametrize("task_cls", TASKS, ids=lambda t: t.__name__)
def test_scores_equal_mtebs_gritlm_wrapper(models, task_cls):
    ours, theirs = models
    got, want = _main_scores(ours, task_cls), _main_scores(theirs, task_cls)
    assert got.keys() == want.keys()
    for split in want:
        np.testing.assert_allclose(got[split], want[split], atol=1e-6)


def test_embeddings_equal_with_task_instructions(models):
    """The encoder protocol itself: a task with an instruction, queries and documents."""
    ours, theirs = models
    task = M.MockRetrievalTask()
    meta = task.metadata
    texts = ["what is a cat", "the cat sat on the mat", "dogs bark at night"]
    loader = [{"text": texts[:2]}, {"text": texts[2:]}]
    for prompt_type in (PromptType.query, PromptType.document, None):
        for inst in ("", "Retrieve passages that answer the question"):
            meta_i = meta.model_copy(update={"prompt": inst} if inst else {})
            kw = dict(task_metadata=meta_i, hf_split="test", hf_subset="default", prompt_type=prompt_type)
            np.testing.assert_allclose(ours.encode(loader, **kw), theirs.encode(loader, **kw), atol=2e-6, rtol=1e-5)


def test_is_still_a_grit_model(models):
    ours, _ = models
    assert ours.encode("a text").shape == (ours.config.hidden_size,)  # gritlm: one string, one row
    assert ours.mteb_model_meta.embed_dim == ours.config.hidden_size
