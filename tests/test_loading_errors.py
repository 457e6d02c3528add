"""Broken checkpoints, configs and tokenizers: every error names the file (and the field or
tensor) and what was expected, instead of a bare library exception or a silently different
model. Each case corrupts one file of a tiny checkpoint that loads fine untouched."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

import grit_models as gm
from grit_models.checkpoint import CheckpointError, load_checkpoint
from grit_models.config import MistralConfig
from grit_models.testing import make_checkpoint, tiny_config


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    single = make_checkpoint(tmp_path_factory.mktemp("load") / "single", "mistral", seed=3)
    sharded = make_checkpoint(tmp_path_factory.mktemp("load") / "sharded", "mistral", seed=3,
                              max_shard_size="40KB")
    return single, sharded


@pytest.fixture
def single(pristine, tmp_path):
    return shutil.copytree(pristine[0], tmp_path / "single")


@pytest.fixture
def sharded(pristine, tmp_path):
    return shutil.copytree(pristine[1], tmp_path / "sharded")


def test_the_untouched_checkpoints_load(single, sharded):
    assert load_checkpoint(single) is not None
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    assert load_checkpoint(sharded) is not None


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_bad_safetensors_file_is_named(single, damage):
    f = single / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                   "random": bytes(range(256)) * 64}[damage])
    with pytest.raises(CheckpointError, match=re.escape(str(f))):
        load_checkpoint(single)


def test_one_bad_shard_of_many_is_named(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=re.escape(str(shard))):
        load_checkpoint(sharded)


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object with a 'weight_map', got list"),
    ('{"weight_map": {}}', "expected a non-empty 'weight_map'"),
    ('{"weight_map": {"model.norm.weight": 3}}', r"weight_map\['model.norm.weight'\] = 3"),
    ('{"weight_map": {"model.norm.weight": null}}', r"weight_map\['model.norm.weight'\] = None"),
])
def test_bad_index_json(sharded, content, match):
    index = sharded / "model.safetensors.index.json"
    index.write_text(content)
    with pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint(sharded)
    assert str(index) in str(e.value)


def test_index_naming_a_missing_shard(sharded):
    index = sharded / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    first = next(iter(content["weight_map"]))
    content["weight_map"][first] = "model-99999-of-99999.safetensors"
    index.write_text(json.dumps(content))
    with pytest.raises(FileNotFoundError, match="model-99999-of-99999.safetensors"):
        load_checkpoint(sharded)


def _rewrite_tensors(path, change):
    from safetensors.torch import load_file, save_file

    f = path / "model.safetensors"
    tensors = load_file(str(f))
    change(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_integer_or_bool_weights_are_rejected(single, dtype):
    _rewrite_tensors(single, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(dtype)}))
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' is stored as (I32|BOOL); expected floating"):
        load_checkpoint(single)


def test_a_tensor_in_two_shards_is_an_error(sharded):
    from safetensors.torch import load_file, save_file

    shards = sorted(sharded.glob("model-*.safetensors"))
    a, b = load_file(str(shards[0])), load_file(str(shards[1]))
    name = next(iter(a))
    b[name] = a[name].clone()
    save_file(b, str(shards[1]), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tensor '{re.escape(name)}' is also in"):
        load_checkpoint(sharded)


def test_invalid_tokenizer_files(single):
    (single / "tokenizer.json").write_text('{"model": "nope"')
    with pytest.raises(ValueError, match=re.escape(str(single / "tokenizer.json")) + ": not a valid tokenizer"):
        gm.GritModel(str(single), device="cpu")


def test_invalid_tokenizer_config(single):
    (single / "tokenizer_config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match=re.escape(str(single / "tokenizer_config.json")) + ": not valid UTF-8"):
        gm.GritModel(str(single), device="cpu")


def test_non_utf8_config(single):
    (single / "config.json").write_bytes(b'{"model_type": "mistral\xff"}')
    with pytest.raises(ValueError, match=re.escape(str(single / "config.json")) + ": not valid UTF-8"):
        load_checkpoint(single)


@pytest.mark.parametrize("field,value", [
    ("rms_norm_eps", "1e-5"), ("rms_norm_eps", None), ("rope_theta", "10000"), ("rope_theta", None),
    ("rope_theta", float("inf")), ("tie_word_embeddings", "yes"), ("tie_word_embeddings", 1),
    ("sliding_window", True), ("eos_token_id", "x"), ("eos_token_id", [2, "x"]), ("bos_token_id", 1.5),
    ("hidden_size", 64.0), ("num_hidden_layers", True),
])
def test_config_fields_of_the_wrong_type_are_named(field, value):
    d = dict(tiny_config(), model_type="mistral", **{field: value})
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        MistralConfig.from_dict(d)


@pytest.mark.parametrize("arch", ["mistral", "mixtral"])
def test_missing_fields_take_transformers_defaults(arch):
    """A field config.json leaves out means what transformers makes of it."""
    transformers = pytest.importorskip("transformers")
    ours = MistralConfig.from_dict({"model_type": arch})
    theirs = {"mistral": transformers.MistralConfig, "mixtral": transformers.MixtralConfig}[arch]()
    rope = getattr(theirs, "rope_parameters", None) or {}
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "sliding_window", "max_position_embeddings",
                 "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.rope_theta == rope.get("rope_theta", getattr(theirs, "rope_theta", None))
    assert "hidden_size" in ours.defaulted and "model_type" not in ours.defaulted


def test_shape_error_names_the_defaulted_field(single):
    cfg_file = single / "config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["hidden_size"]  # transformers' default 4096 then applies, and no tensor fits it
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(single)
    msg = str(e.value)
    assert "embed_tokens.weight" in msg and "hidden_size=4096" in msg
    assert "not in config.json, so transformers' default was used: hidden_size" in msg


def test_encode_with_ids_past_the_vocabulary(single):
    cfg_file = single / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["vocab_size"] = 8  # the tokenizer's ids go far beyond
    cfg_file.write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    f = single / "model.safetensors"
    t = load_file(str(f))
    t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"][:8].contiguous()
    t["lm_head.weight"] = t["lm_head.weight"][:8].contiguous()
    save_file(t, str(f), metadata={"format": "pt"})
    model = gm.GritModel(str(single), device="cpu")
    with pytest.raises(ValueError, match=r"sentences\[0\]: the tokenizer gave token id \d+, outside the model's "
                                         r"vocabulary \[0, 8\)"):
        model.encode(["paris is the capital of france"])
