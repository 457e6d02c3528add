"""GRIT training: one model, two objectives, one optimiser step.

    loss = loss_emb + loss_gen (+ router load-balancing loss for Mixtral)

* ``loss_emb``: in-batch InfoNCE (``grit_kernels.contrastive_loss``, temperature 0.02) between
  bidirectional mean-pooled embeddings of queries and of their documents, documents laid out
  per query as ``[positive, hard negative, ...]`` (``train_group_size`` rows, default 2).
  Instruction tokens are attended to but left out of the mean. Under torch.distributed the
  negatives of every rank are used (``gather=True``). It runs through ``grit_kernels.GradCache``
  when ``emb_chunk_size`` is set, so the embedding batch can be far larger than what fits.
* ``loss_gen``: next-token cross-entropy of causal passes over chat-formatted text,
  ``<s><|user|>\\n{user}\\n<|assistant|>\\n{assistant}</s>`` (turns joined by ``\\n``), with
  only the assistant turns (and their ``</s>``) as targets. Aggregation as gritlm's
  ``NextTokenLoss``: "mixed" = token mean of each chunk, "token" = token sum / sequences; both
  times ``loss_gen_factor``, averaged over chunks and ranks.

Gradient scaling across ranks: DDP and FSDP average gradients over ranks. With cross-device
negatives every rank computes the same global ``loss_emb`` but back-propagates only into its
own embeddings, so the average is 1 / world_size of the true gradient; the embedding loss is
scaled by world_size before its backward so that N ranks train exactly like one process holding
the whole batch (tests/test_training.py checks this). gritlm does not rescale, so under it the
embedding gradient shrinks with the number of GPUs.

Layout: sequences are packed back to back (``cu_seqlens``), never padded. Each decoder layer
is called as a module (so FSDP2's ``fully_shard`` per layer works) and optionally wrapped in
``torch.utils.checkpoint`` (per-layer gradient checkpointing).

Data: ``load_embedding_data`` / ``load_generative_data`` read GritLM's JSONL formats and
report malformed lines by number. The batch of step ``s`` is a pure function of (seed, s), so
resuming needs only the step and every rank knows the global batch; rank r takes the r-th
slice of it.

Modules (the package splits along these seams):

    data.py         reading GritLM's JSONL, tokenising its prompt formats, batching
    model.py        GritTrainModel: pooled embeddings and the generative loss
    step.py         GritStep (one optimiser step of both losses) and the schedule
    export.py       saving a Hugging Face checkpoint
    checkpoints.py  atomic training checkpoints and resume
    distributed.py  loading onto devices, DDP / FSDP2 wrapping
    metrics.py      retrieval accuracy
"""

from .checkpoints import (
    PARTIAL_PREFIX, is_complete_checkpoint, load_training_state, resolve_resume, save_training_state,
)
from .data import (
    IGNORE, SAMPLE_DIR, SAMPLE_EMBEDDING, SAMPLE_GENERATIVE, DataConfig, DataError, EmbeddingExample, GritData,
    TextEncoder, embedding_tensors, generative_tensors, load_embedding_data, load_generative_data,
)
from .distributed import load_model, load_sharded, wrap
from .export import hf_state_dict, save_model
from .metrics import retrieval_accuracy
from .model import GritTrainModel
from .distributed import _dist
from .step import GritStep, StepConfig, warmup_linear

__all__ = [
    "PARTIAL_PREFIX", "is_complete_checkpoint", "load_training_state", "resolve_resume", "save_training_state",
    "IGNORE", "SAMPLE_DIR", "SAMPLE_EMBEDDING", "SAMPLE_GENERATIVE", "DataConfig", "DataError", "EmbeddingExample",
    "GritData", "TextEncoder", "embedding_tensors", "generative_tensors", "load_embedding_data",
    "load_generative_data", "load_model", "load_sharded", "wrap", "hf_state_dict", "save_model",
    "retrieval_accuracy", "GritTrainModel", "GritStep", "StepConfig", "_dist", "warmup_linear",
]
