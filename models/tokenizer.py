"""The checkpoint's Hugging Face tokenizer, loaded as gritlm loads it.

``GritModel.tokenizer`` is ``transformers.AutoTokenizer.from_pretrained(path)`` itself (so
``apply_chat_template``, ``tokenizer(..., return_tensors="pt")``, ``pad_token`` and every
other transformers idiom work), with gritlm's settings: right padding, and the pad token set
to EOS when the checkpoint has none. Token ids for ``encode`` come from the same call gritlm
makes (``tokenizer(texts, truncation=True, max_length=..., add_special_tokens=...)``),
without the padding, since sequences are packed.
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def load_tokenizer(path, **kwargs):
    """``AutoTokenizer.from_pretrained(path, padding_side="right", **kwargs)`` with pad = EOS
    when missing. ``path``: a checkpoint folder with ``tokenizer.json`` (or ``tokenizer.model``
    for sentencepiece-only checkpoints) and usually ``tokenizer_config.json``."""
    from transformers import AutoTokenizer

    from ._json import read_json_object

    folder = Path(path)
    if folder.is_dir():
        if not any((folder / f).is_file() for f in TOKENIZER_FILES):
            raise FileNotFoundError(f"model_name_or_path: no tokenizer.json or tokenizer.model in {folder}")
        # Checked here so that the error names the file (transformers' would not).
        if (folder / "tokenizer_config.json").is_file():
            read_json_object(folder / "tokenizer_config.json")
        if (folder / "tokenizer.json").is_file():
            try:
                read_json_object(folder / "tokenizer.json")
            except ValueError as e:
                raise ValueError(f"{folder / 'tokenizer.json'}: not a valid tokenizer file ({e})") from None
    kwargs.setdefault("padding_side", "right")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), **kwargs)
    except Exception as e:  # the Rust library's errors name neither the file nor the field
        raise ValueError(f"{path}: transformers could not load its tokenizer ({type(e).__name__}: {e})") from None
    if not tok.pad_token and tok.eos_token:
        tok.pad_token = tok.eos_token
    return tok


def token_ids(tokenizer, texts, *, add_special_tokens: bool = True, max_length: int | None = None) -> list[list[int]]:
    """Token ids of ``texts`` exactly as gritlm's ``encode`` computes them (its padding left out)."""
    return tokenizer(list(texts), padding=False, truncation=True, max_length=max_length,
                     add_special_tokens=add_special_tokens)["input_ids"]
