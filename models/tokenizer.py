"""The checkpoint's tokenizer, read from ``tokenizer.json`` with the ``tokenizers`` library.

Special tokens follow the original: BOS (and EOS) are added where the ``tokenizer.json``
post-processor adds them (Mistral's prepends ``<s>``). That is what transformers 5 does for
Mistral/Mixtral checkpoints (it loads them as a plain ``tokenizers`` backend and ignores
``add_bos_token``/``add_eos_token`` in tokenizer_config.json); for GritLM's tokenizer, which
says add_bos_token=true and add_eos_token=false, transformers 4 agreed. Truncation keeps
the first ``max_length`` tokens including the special ones, like transformers' right-side
truncation. Padding is not needed: sequences are packed.
"""

from __future__ import annotations

from pathlib import Path

from ._json import read_json_object


class Tokenizer:
    def __init__(self, path):
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"model_name_or_path: no tokenizer.json at {file} "
                                    "(grit_models reads the fast tokenizer file only)")
        try:
            self._tok = _Tok.from_file(str(file))
        except Exception as e:  # the Rust library's error names neither the file nor the field
            raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from None
        cfg_file = file.parent / "tokenizer_config.json"
        cfg = read_json_object(cfg_file) if cfg_file.is_file() else {}

        def token(key, default=None):
            t = cfg.get(key, default)
            return t.get("content") if isinstance(t, dict) else t

        self.bos_token, self.eos_token = token("bos_token", "<s>"), token("eos_token", "</s>")
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        # transformers truncates to model_max_length when truncation is on and max_length None;
        # its "unset" value is a huge sentinel (int(1e30)).
        mml = cfg.get("model_max_length")
        self.model_max_length = int(mml) if isinstance(mml, (int, float)) and mml < 1e12 else None
        pad = token("pad_token")
        # gritlm sets pad = eos when the tokenizer has none.
        self.pad_token_id = self._tok.token_to_id(pad) if pad else self.eos_token_id

        # What the post-processor adds around a sequence; added here by hand so that truncation
        # can count them the way transformers does.
        probe = self._tok.encode("", add_special_tokens=True).ids
        self.add_bos = bool(probe) and probe[0] == self.bos_token_id
        self.add_eos = bool(probe) and probe[-1] == self.eos_token_id and (len(probe) > 1 or not self.add_bos)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def _finish(self, ids: list[int], add_special_tokens: bool, max_length: int | None) -> list[int]:
        pre = [self.bos_token_id] if add_special_tokens and self.add_bos else []
        post = [self.eos_token_id] if add_special_tokens and self.add_eos else []
        if max_length is not None:
            ids = ids[:max(max_length - len(pre) - len(post), 0)]
        return pre + ids + post

    def encode(self, text: str, *, add_special_tokens: bool = True, max_length: int | None = None) -> list[int]:
        """Token ids of one text (BOS first when the checkpoint adds it)."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        return self._finish(self._tok.encode(text, add_special_tokens=False).ids, add_special_tokens, max_length)

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool = True,
                     max_length: int | None = None) -> list[list[int]]:
        """Token ids of many texts (tokenised in parallel by the Rust library)."""
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [self._finish(e.ids, add_special_tokens, max_length) for e in encs]

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch, *, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    def __call__(self, texts, *, add_special_tokens: bool = True, max_length: int | None = None):
        """``{"input_ids": ...}`` for a text or a list of texts (lists of ids, unpadded)."""
        if isinstance(texts, str):
            return {"input_ids": self.encode(texts, add_special_tokens=add_special_tokens, max_length=max_length)}
        return {"input_ids": self.encode_batch(texts, add_special_tokens=add_special_tokens, max_length=max_length)}
