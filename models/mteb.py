"""GritModel as an MTEB 2.x model: ``mteb.evaluate(GritMTEB(path), tasks)``.

Implements mteb's encoder protocol (``mteb.models.AbsEncoder``: ``encode(inputs, *,
task_metadata, hf_split, hf_subset, prompt_type)``) with GritLM's instruction format applied
the way mteb's own gritlm-based wrapper (``mteb.models.instruct_wrapper``) applies it: the
task's instruction for the prompt type, formatted as
``"<|user|>\\n{instruction}\\n<|embed|>\\n"`` (``"<|embed|>\\n"`` when the task gives none,
as for retrieval corpora), and left out of the mean pooling. mteb is an optional extra
(``pip install 'grit-kernels[mteb]'``).
"""

from __future__ import annotations

from typing import Any

from .grit import GritModel
from .prompts import instruction_format

try:
    from mteb.models.abs_encoder import AbsEncoder as _AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("grit_models.mteb needs mteb >= 2 (pip install 'grit-kernels[mteb]')") from e


def _gritlm_instruction(instruction: str = "", prompt_type=None) -> str:
    return instruction_format(instruction)


class GritMTEB(GritModel, _AbsEncoder):
    """``GritMTEB(model_name_or_path, **GritModel keyword arguments)``; ``mode`` defaults to
    "embedding" (no lm_head), as MTEB needs only embeddings."""

    def __init__(self, model_name_or_path: str, mode: str = "embedding", **kwargs: Any) -> None:
        GritModel.__init__(self, model_name_or_path, mode=mode, **kwargs)
        self.instruction_template = _gritlm_instruction
        name = str(model_name_or_path)
        self.mteb_model_meta = ModelMeta(
            loader=None, name=name if "/" in name.strip("/") and not name.startswith("/") else f"local/{name.strip('/').split('/')[-1]}",
            revision=None, release_date=None, languages=None, n_parameters=None, memory_usage_mb=None,
            max_tokens=None, embed_dim=self.config.hidden_size, license=None, open_weights=True,
            public_training_code=None, public_training_data=None, framework=["PyTorch"], reference=None,
            similarity_fn_name=ScoringFunction.COSINE, use_instructions=True, training_datasets=None,
        )

    def encode(self, inputs, *args: Any, task_metadata=None, hf_split: str | None = None,
               hf_subset: str | None = None, prompt_type=None, **kwargs: Any):
        """mteb's call: a DataLoader of batches with "text" -> (N, D) float32 numpy embeddings.
        A plain list of strings is GritModel.encode (gritlm's signature)."""
        if task_metadata is None:  # GritModel's own signature (encode_queries, rag, users' code)
            return GritModel.encode(self, inputs, *args, **kwargs)
        instruction = self.get_instruction(task_metadata, prompt_type)
        instruction = self.format_instruction(instruction, prompt_type)
        texts = [text for batch in inputs for text in batch["text"]]
        kwargs.pop("show_progress_bar", None)
        return GritModel.encode(self, texts, instruction=instruction, **kwargs)
