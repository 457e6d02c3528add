"""GRIT's prompt formats and option names, in one place (importable without torch, so that
``python -m grit_models.train --help`` answers at once).

GritLM (gritlm/gritlm.py, gritlm/training/run.py, rag/eval.py) marks the two tasks with
special tokens written into the text:

    embedding:   <s><|user|>\\n{instruction}\\n<|embed|>\\n{text}        (no instruction: <s><|embed|>\\n{text})
    generation:  <s><|user|>\\n{user}\\n<|assistant|>\\n{assistant}</s>   (turns joined by "\\n")

The instruction's tokens are attended to but left out of the embedding's mean.
"""

USER = "<|user|>\n"
EMBED = "<|embed|>\n"
ASSISTANT = "\n<|assistant|>\n"
TURN_SEP = "\n"


def instruction_format(instruction: str | None = None) -> str:
    """GritLM's embedding prompt before the text: ``"<|user|>\\n{instruction}\\n<|embed|>\\n"``,
    or ``"<|embed|>\\n"`` without an instruction (gritlm's ``gritlm_instruction``). BOS is
    the tokenizer's."""
    return USER + instruction + "\n" + EMBED if instruction else EMBED


# GritLM's chat format as a transformers chat template ("<s><|user|>\n{user}\n<|assistant|>\n"),
# written into the test checkpoints' tokenizer_config.json.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def chat_turn(user: str) -> str:
    """One user turn up to where the assistant's answer starts (no BOS)."""
    return USER + user + ASSISTANT


# --- options ------------------------------------------------------------------------------

MODES = ("unified", "embedding", "generative")          # what a GritModel loads / training computes
POOLING_METHODS = ("cls", "lasttoken", "mean", "weightedmean")  # GritModel's pooling
TRAIN_POOLING_METHODS = ("mean", "weightedmean")        # pooling in training
ATTN_MODES = ("bbcc", "cccc", "bb", "cc")               # gritlm's attn (embedding/generation attention)
LOSS_GEN_TYPES = ("mixed", "token")                     # gritlm's loss_gen_type

# --- retrieval-augmented generation (gritlm rag/eval.py) -----------------------------------

RAG_MODES = (None, "doc", "query", "docquery", "querydoc")
ANSWER_PREFIX = "The answer is"
FORMAT_QUERY_FIRST = (USER + "{query}\n\n{doc}\n\nOptionally using the prior context answer the query "
                      "prior to it" + ASSISTANT)
FORMAT_DOC_FIRST = (USER + "{doc}\n\n{query}\n\nAnswer the prior query while optionally using the context "
                    "prior to it" + ASSISTANT)
CACHED_QUERY = "\n" + USER + "{doc}\n\nOptionally using the prior context answer the query prior to it" + ASSISTANT
CACHED_DOC = "\n" + USER + "{query}\n\nAnswer the prior query while optionally using the context prior to it" + ASSISTANT
CACHED_DOC_QUERY = "\n" + USER + "Answer the prior query while optionally using the context prior to it" + ASSISTANT
CACHED_QUERY_DOC = "\n" + USER + "Optionally using the prior context answer the query prior to it" + ASSISTANT
