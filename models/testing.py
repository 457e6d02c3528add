"""Tiny random GRIT checkpoints for tests and benchmarks (no model hub needed).

``make_checkpoint(path, ...)`` writes what a hub checkpoint holds: ``config.json``, safetensors
weights (one file, or shards with ``model.safetensors.index.json``), ``tokenizer.json`` and
``tokenizer_config.json``. The weights come from ``transformers`` (its own random init and its
own ``save_pretrained``), so that both ``transformers``/``gritlm`` and ``grit_models`` load the
very same files. The tokenizer is a word-level one over a small vocabulary, built with the
``tokenizers`` library, with a post-processor that prepends ``<s>`` like Mistral's.

transformers and tokenizers are imported inside the functions: ``grit_models`` itself does not
need transformers.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from .prompts import CHAT_TEMPLATE

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|user|>", "<|embed|>", "<|assistant|>", "\n"]

# A small, fixed word list: ids are stable across runs, so tests can name token ids.
WORDS = (
    "the a an of to in and or is are was were be been it this that these those with for on at by "
    "from as not no yes what which who whom whose when where why how all any both each few more most "
    "other some such only own same so than too very can will just should now query document answer "
    "question retrieve represent passage title text model language paris france capital city river "
    "water fire earth air sun moon star sky blue red green cat dog bird fish tree leaf root stone "
    "gold iron paper book page word line number one two three four five six seven eight nine ten "
    "zero first last next time day night year old new big small long short high low good bad "
    "hot cold fast slow open close run walk read write speak listen think know see look find give "
    "take make use work call try ask need feel become leave put mean keep let begin seem help show "
    "hear play move live believe hold bring happen"
).split()


def build_tokenizer(vocab_words=WORDS):
    """A ``tokenizers.Tokenizer``: word level, newline kept as a token, BOS added by the
    post-processor (as Mistral's tokenizer.json does)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in vocab_words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Keep "\n" and every run of non-space characters; drop spaces.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|[^\s]+"), behavior="removed", invert=True)
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "<|user|>", "<|embed|>", "<|assistant|>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return tok


def tiny_config(arch: str = "mistral", **overrides) -> dict:
    """HF config.json content of a tiny model (hidden 64, 2 layers, 4 heads, 2 KV heads)."""
    n_vocab = len(SPECIAL_TOKENS) + len(dict.fromkeys(WORDS))
    cfg = dict(
        vocab_size=n_vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "mixtral":
        cfg.update(num_local_experts=4, num_experts_per_tok=2, intermediate_size=96)
    elif arch in ("llama", "qwen2"):
        del cfg["sliding_window"]  # Llama has none; Qwen2's is switched on by use_sliding_window
        if arch == "llama":
            cfg.update(head_dim=24)  # head_dim != hidden / heads (16), as Llama configs allow
    elif arch != "mistral":
        raise ValueError(f"arch: expected 'mistral', 'mixtral', 'llama' or 'qwen2', got {arch!r}")
    cfg.update(overrides)
    return cfg


MISTRAL_WHEEL = "mistral_common-1.13.1-py3-none-any.whl"
MISTRAL_TOKENIZER = "mistral_common/data/tokenizer.model.v1"  # Mistral-7B's sentencepiece model
MISTRAL_VOCAB = 32000


def write_mistral_tokenizer(path, wheels=None) -> Path:
    """Mistral-7B's real tokenizer in ``path``: the sentencepiece model shipped in the
    ``mistral-common`` wheel, converted by transformers into ``tokenizer.json`` (with
    ``tokenizer.model`` and ``tokenizer_config.json`` as Mistral's hub folder has them).

    The wheel is read as a zip, not installed: an installed mistral_common changes how
    transformers loads Mistral tokenizers (and needs tiktoken, pydantic-extra-types).
    ``wheels``: where ``pip download --no-deps -d DIR mistral-common==1.13.1`` put it
    (default ``$GRIT_WHEELS`` or ``.cache/wheels`` of the repository). Needs sentencepiece."""
    import zipfile

    from transformers import AutoTokenizer

    folder = Path(wheels or os.environ.get("GRIT_WHEELS") or Path(__file__).resolve().parent.parent / ".cache/wheels")
    wheel = folder / MISTRAL_WHEEL
    if not wheel.is_file():
        raise FileNotFoundError(f"{wheel}: Mistral's tokenizer comes from this wheel; get it with "
                                f"pip download --no-deps -d {folder} mistral-common==1.13.1")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        (path / "tokenizer.model").write_bytes(z.read(MISTRAL_TOKENIZER))
    (path / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="LlamaTokenizer", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        add_bos_token=True, add_eos_token=False, legacy=False, model_max_length=32768, chat_template=CHAT_TEMPLATE,
    )))
    AutoTokenizer.from_pretrained(str(path)).save_pretrained(str(path))  # writes tokenizer.json
    return path


def make_checkpoint(path, arch: str = "mistral", *, seed: int = 0, max_shard_size=None, dtype="float32",
                    init_std: float = 0.1, tokenizer: str = "word", **config_overrides) -> Path:
    """Write a random tiny checkpoint (weights, config, tokenizer) into ``path``; returns it.

    ``init_std``: weights are drawn N(0, init_std) (norm weights around 1) rather than
    transformers' 0.02 so that logits are far from uniform and greedy decoding has no near-ties.
    ``max_shard_size`` (e.g. "20KB") writes a sharded checkpoint with an index json.
    ``tokenizer``: "word" (the tiny word-level one) or "mistral" (Mistral-7B's real
    sentencepiece tokenizer, ``write_mistral_tokenizer``; vocab_size becomes 32000).
    """
    if tokenizer == "mistral":
        config_overrides.setdefault("vocab_size", MISTRAL_VOCAB)
    elif tokenizer != "word":
        raise ValueError(f"tokenizer: expected 'word' or 'mistral', got {tokenizer!r}")
    import torch
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(arch, **config_overrides)
    cls = dict(mistral=(transformers.MistralConfig, transformers.MistralForCausalLM),
               mixtral=(transformers.MixtralConfig, transformers.MixtralForCausalLM),
               llama=(transformers.LlamaConfig, transformers.LlamaForCausalLM),
               qwen2=(transformers.Qwen2Config, transformers.Qwen2ForCausalLM))[arch]
    torch.manual_seed(seed)
    model = cls[1](cls[0](**cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, init_std)
    model = model.to(getattr(torch, dtype))
    kwargs = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
    model.save_pretrained(path, **kwargs)
    if tokenizer == "mistral":
        write_mistral_tokenizer(path)
        return path
    build_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=4096, chat_template=CHAT_TEMPLATE,
    )))
    return path


def random_texts(n: int, min_words: int = 1, max_words: int = 40, seed: int = 0) -> list[str]:
    """``n`` texts of known words with lengths spread over [min_words, max_words]."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def main(argv=None) -> int:
    """``python -m grit_models.testing OUT``: a tiny random GRIT checkpoint to try GritModel,
    the trainer and the benchmarks without a model hub (needs transformers)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m grit_models.testing", description=main.__doc__.split("\n")[0])
    p.add_argument("out", help="folder to write (config.json, model.safetensors, tokenizer files)")
    p.add_argument("--arch", choices=("mistral", "mixtral", "llama", "qwen2"), default="mistral",
                   help="default: mistral")
    p.add_argument("--seed", type=int, default=0, help="weights' seed (default: 0)")
    args = p.parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        p.error("needs transformers (pip install transformers) to write the checkpoint")
    path = make_checkpoint(args.out, args.arch, seed=args.seed)
    cfg = tiny_config(args.arch)
    print(f"wrote a random {args.arch} checkpoint (hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
          f"vocabulary {cfg['vocab_size']} words) to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
