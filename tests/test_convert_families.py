"""Built-in deciders on real (tiny) transformers checkpoints: every family converts with
``decider="auto"``, each layer part loads strictly into the family's own layer module, and a model
rebuilt from the parts alone gives bit-identical outputs."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import transformers

import sepstore
from sepstore.convert import open_checkpoint
from sepstore.deciders import Family, detect, families, get

VOCAB = 128
DECODER = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
ENCODER = {**DECODER, "pad_token_id": 1, "bos_token_id": 0}  # RoBERTa's ids: <s>=0, <pad>=1, </s>=2


@dataclass(frozen=True)
class Case:
    """A tiny model of one family: its transformers class, its config, the family ``auto`` picks."""

    model_class: str
    make_config: Callable[[], Any]
    family: str


T = transformers
CASES: dict[str, Case] = {
    "llama": Case("LlamaForCausalLM", lambda: T.LlamaConfig(**{**DECODER, "num_hidden_layers": 3}), "llama"),
    "mistral": Case("MistralForCausalLM", lambda: T.MistralConfig(**DECODER, num_key_value_heads=2), "llama"),
    "mixtral": Case(
        "MixtralForCausalLM",
        lambda: T.MixtralConfig(**DECODER, num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2),
        "llama",
    ),
    "qwen2": Case("Qwen2ForCausalLM", lambda: T.Qwen2Config(**DECODER, num_key_value_heads=2), "llama"),
    "qwen3": Case("Qwen3ForCausalLM", lambda: T.Qwen3Config(**DECODER, num_key_value_heads=2, head_dim=8), "llama"),
    "gemma": Case("GemmaForCausalLM", lambda: T.GemmaConfig(**DECODER, num_key_value_heads=1, head_dim=8), "llama"),
    "gemma2": Case("Gemma2ForCausalLM", lambda: T.Gemma2Config(**DECODER, num_key_value_heads=2, head_dim=8), "llama"),
    "phi3": Case("Phi3ForCausalLM", lambda: T.Phi3Config(**DECODER, num_key_value_heads=2), "llama"),
    "phi": Case("PhiForCausalLM", lambda: T.PhiConfig(**DECODER), "llama"),
    "gpt2": Case(
        "GPT2LMHeadModel",
        lambda: T.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
        ),
        "gpt2",
    ),
    "gpt_neox": Case("GPTNeoXForCausalLM", lambda: T.GPTNeoXConfig(**DECODER), "gpt_neox"),
    "falcon": Case(
        "FalconForCausalLM",
        lambda: T.FalconConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "falcon",
    ),
    "bloom": Case(
        "BloomForCausalLM",
        lambda: T.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2),
        "bloom",
    ),
    "opt": Case(
        "OPTForCausalLM",
        lambda: T.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=64,
            max_position_embeddings=64,
            word_embed_proj_dim=16,  # exercises project_in (begin) and project_out (end)
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "opt",
    ),
    "bert": Case("BertForMaskedLM", lambda: T.BertConfig(**ENCODER), "bert"),
    "roberta": Case("RobertaForMaskedLM", lambda: T.RobertaConfig(**ENCODER), "roberta"),
}
#: Families whose tiny config ties the LM head to the word embeddings (the checkpoint has no head).
TIED = {"gemma", "gemma2", "gpt2", "falcon", "bloom", "opt", "bert", "roberta"}
#: Checkpoint names transformers 5 renames when it loads (GPT-NeoX's head is ``lm_head`` in memory).
RUNTIME_NAMES = {"embed_out.weight": "lm_head.weight"}
INPUT = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))


def build(name: str, seed: int) -> transformers.PreTrainedModel:
    case = CASES[name]
    torch.manual_seed(seed)
    model = getattr(transformers, case.model_class)(case.make_config())
    return model.eval()


def legacy_buffers(name: str, config: Any) -> dict[str, torch.Tensor]:
    """Buffers that older checkpoints carry and the model rebuilds itself; convert keeps them."""
    family, n = CASES[name].family, config.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for i in range(n):
        if family == "llama":
            out[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
        elif family == "gpt2":
            out[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64, dtype=torch.bool))
            out[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        elif family == "gpt_neox":
            out[f"gpt_neox.layers.{i}.attention.bias"] = torch.tril(torch.ones(1, 1, 64, 64, dtype=torch.bool))
            out[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
            out[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(4)
    if family in ("bert", "roberta"):
        out[f"{family}.embeddings.position_ids"] = torch.arange(config.max_position_embeddings)[None]
    if family == "falcon":
        out["transformer.rotary_emb.inv_freq"] = torch.ones(4)
    return out


def save_bin_shards(model: transformers.PreTrainedModel, folder: Path, extra: dict[str, torch.Tensor]) -> None:
    """An HF ``pytorch_model-0000i-of-00003.bin`` sharded checkpoint of the model's own state dict
    (so in its in-memory layout: Mixtral's fused experts, GPT-NeoX's ``lm_head``), tied tensors
    stored once as ``save_pretrained`` does, plus ``extra`` (legacy buffers)."""
    folder.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    seen = set()
    for key, value in model.state_dict().items():
        where = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if where not in seen:
            seen.add(where)
            tensors[key] = value.clone()
    tensors.update(extra)
    keys = list(tensors)
    n = 3
    weight_map = {}
    for i in range(n):
        shard = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
        chunk = {k: tensors[k] for k in keys[i::n]}
        torch.save(chunk, folder / shard)
        weight_map.update(dict.fromkeys(chunk, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    model.config.save_pretrained(folder)


def save_checkpoint(model: transformers.PreTrainedModel, name: str, fmt: str, folder: Path) -> set[str]:
    """Save ``model`` as ``fmt``; the legacy buffer keys it added."""
    if fmt == "safetensors":
        model.save_pretrained(folder, max_shard_size="20KB")
        assert len(list(folder.glob("*.safetensors"))) > 1
        return set()
    extra = legacy_buffers(name, model.config)
    save_bin_shards(model, folder, extra)
    return set(extra)


def checkpoint_keys(folder: Path) -> tuple[list[str], dict[str, Any]]:
    checkpoint = open_checkpoint(folder)
    return [key for source in checkpoint.sources for key in source.index], checkpoint.config or {}


def runtime_layout(layer: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A layer part in the layout ``module`` keeps in memory. Only Mixtral differs: its checkpoint
    has per-expert weights, which transformers 5 fuses into 3-D tensors when it loads them."""
    if set(layer) == set(module.state_dict()) or not any(k.startswith("block_sparse_moe.") for k in layer):
        return dict(layer)
    out = {k: v for k, v in layer.items() if not k.startswith("block_sparse_moe.")}
    n = 1 + max(int(k.split(".")[2]) for k in layer if k.startswith("block_sparse_moe.experts."))

    def w(expert: int, j: int) -> torch.Tensor:
        return layer[f"block_sparse_moe.experts.{expert}.w{j}.weight"]

    out["mlp.gate.weight"] = layer["block_sparse_moe.gate.weight"]
    out["mlp.experts.gate_up_proj"] = torch.stack([torch.cat([w(e, 1), w(e, 3)]) for e in range(n)])
    out["mlp.experts.down_proj"] = torch.stack([w(e, 2) for e in range(n)])
    return out


def signed_and_placing(keys: list[str]) -> list[str]:
    """The families whose key signature matches and whose decider places every key."""

    def places(family: Family, key: str) -> bool:
        try:
            family.decider(key)
        except sepstore.DeciderError:
            return False
        return True

    return [
        f.name
        for f in families().values()
        if f.signature and any(f.signature.search(k) for k in keys) and all(places(f, k) for k in keys)
    ]


def outputs(model: transformers.PreTrainedModel) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def convert(folder: Path, store: Path) -> tuple[sepstore.Manifest, sepstore.PartStateDict]:
    manifest = sepstore.convert(folder, store, name="m", quiet=True)
    return manifest, sepstore.load(store, "f", name="m")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("name", list(CASES))
def test_family_converts_and_rebuilds_bit_exact(tmp_path: Path, name: str, fmt: str) -> None:
    family = get(CASES[name].family)
    original = build(name, seed=0)
    folder = tmp_path / name
    legacy = save_checkpoint(original, name, fmt, folder)
    keys, config = checkpoint_keys(folder)
    assert legacy <= set(keys)

    manifest, psd = convert(folder, tmp_path / "store")
    assert manifest.metadata["decider"] == family.name
    n_layers = original.config.num_hidden_layers
    assert len(manifest.mid) == n_layers
    assert psd.begin is not None and psd.end is not None
    assert detect(keys).name == family.name  # the key patterns alone pick the same family...
    assert signed_and_placing(keys) == [family.name]  # ... and no other one could

    # Layer parts hold the checkpoint's keys made relative to the layer, legacy buffers kept.
    for i in range(n_layers):
        prefix = f"{family.layers}.{i}."
        expected = {k.removeprefix(prefix) for k in keys if k.startswith(prefix)}
        assert set(psd.mid[i]) == expected
    assert all(family.is_buffer(k) for k in legacy)

    # A differently initialized model takes each layer part strictly into its own layer module
    # (less the buffers it rebuilds itself, as the family names them)...
    rebuilt = build(name, seed=1)
    assert not torch.equal(outputs(rebuilt), outputs(original))
    layers = rebuilt.get_submodule(family.layers)
    for i in range(n_layers):
        layer = family.skip_buffers(psd.mid[i], layers[i].state_dict())
        layers[i].load_state_dict(runtime_layout(layer, layers[i]), strict=True)

    # ... and begin/end under the checkpoint's names (the decider run backwards) fill the rest.
    aliases = family.tied_head(keys, config)
    back: dict[tuple[str, str], str] = {}
    for key in [*keys, *aliases]:
        placed = family.decider(key)
        if placed is not None and placed[0] in ("begin", "end"):
            back[placed[0], placed[1]] = key
    in_memory = rebuilt.state_dict().keys()
    rest = {}
    for slot, tensors in (("begin", psd.begin), ("end", psd.end)):
        for part_name, tensor in tensors.items():
            key = back[slot, part_name]
            rest[key if key in in_memory else RUNTIME_NAMES.get(key, key)] = tensor
    result = rebuilt.load_state_dict(rest, strict=False)
    assert all(family.is_buffer(k) for k in result.unexpected_keys)
    assert [k for k in result.missing_keys if not k.startswith(f"{family.layers}.")] == []

    assert torch.equal(outputs(rebuilt), outputs(original))

    # A tied head is in end, equal to the embedding it is tied to.
    tie = config.get("tie_word_embeddings", family.ties_by_default)
    assert bool(tie) == (name in TIED)
    if name in TIED:
        assert family.head_key not in keys
        head = family.decider(family.head_key)[1]
        embed = family.decider(family.embed_key)[1]
        assert torch.equal(psd.end[head], psd.begin[embed])
        assert manifest.end.tensors[head].digest == manifest.begin.tensors[embed].digest


@pytest.mark.parametrize("name", list(CASES))
def test_checkpoint_of_the_base_model_gives_the_same_parts(tmp_path: Path, name: str) -> None:
    """Saved from ``LlamaModel`` (keys without ``model.``) or ``LlamaForCausalLM``: same layers."""
    family = get(CASES[name].family)
    model = build(name, seed=0)
    model.save_pretrained(tmp_path / "full", max_shard_size="20KB")
    model.base_model.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    base_keys, _ = checkpoint_keys(tmp_path / "base")
    assert not any(k.startswith(family.base) for k in base_keys)

    full = sepstore.convert(tmp_path / "full", tmp_path / "store", name="full", quiet=True)
    base = sepstore.convert(tmp_path / "base", tmp_path / "store", name="base", quiet=True)
    assert base.metadata["decider"] == family.name
    assert [p.digest for p in base.mid] == [p.digest for p in full.mid]
    assert base.begin == full.begin
    # The end of a base model is its final norm (and a tied head); a masked-LM encoder has none.
    base_end = base.end.tensors if base.end is not None else {}
    assert bool(base_end) == (family.name not in ("bert", "roberta"))
    assert all(full.end.tensors[k] == tensor for k, tensor in base_end.items())
    # Keys alone place the base model's checkpoint the same way (BERT and RoBERTa share a layout).
    guessed = detect(base_keys)
    assert [guessed.decider(k) for k in base_keys] == [family.decider(k) for k in base_keys]


def test_gpt2_hub_checkpoint_without_prefix_gets_its_tied_head(tmp_path: Path) -> None:
    """openai-community/gpt2 is stored as ``wte.weight``, ``h.0.attn.bias``, ... with no head."""
    model = build("gpt2", seed=0)
    tensors = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    tensors |= {k.removeprefix("transformer."): v for k, v in legacy_buffers("gpt2", model.config).items()}
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 3}  # no tie_word_embeddings
    folder = tmp_path / "gpt2"
    folder.mkdir()
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    _, psd = convert(folder, tmp_path / "store")
    assert len(psd.mid) == 3
    assert torch.equal(psd.end["lm_head.weight"], psd.begin["wte.weight"])
    layers = build("gpt2", seed=1).get_submodule("transformer.h")
    for i in range(3):
        assert {"attn.bias", "attn.masked_bias"} <= psd.mid[i].keys()  # kept, and skipped by the loader
        layers[i].load_state_dict(get("gpt2").skip_buffers(psd.mid[i], layers[i].state_dict()), strict=True)


def test_mixtral_part_keeps_the_checkpoint_layout_that_transformers_fuses(tmp_path: Path) -> None:
    """The fusing in ``runtime_layout`` is what transformers 5 does to the saved per-expert weights."""
    model = build("mixtral", seed=0)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    checkpoint = {}
    for shard in tmp_path.glob("*.safetensors"):
        checkpoint |= safetensors.torch.load_file(shard)
    layer = {k.removeprefix("model.layers.0."): v for k, v in checkpoint.items() if k.startswith("model.layers.0.")}
    assert "block_sparse_moe.experts.0.w1.weight" in layer
    memory = model.model.layers[0].state_dict()
    fused = runtime_layout(layer, model.model.layers[0])
    assert fused.keys() == memory.keys()
    assert all(torch.equal(fused[k], memory[k]) for k in memory)


# -- deciders without a model ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "key", "placement"),
    [
        ("llama", "model.layers.0.self_attn.rotary_emb.inv_freq", ("mid", 0, "self_attn.rotary_emb.inv_freq")),
        ("llama", "model.rotary_emb.inv_freq", ("begin", "rotary_emb.inv_freq")),
        ("llama", "layers.2.mlp.up_proj.weight", ("mid", 2, "mlp.up_proj.weight")),
        ("llama", "embed_tokens.weight", ("begin", "embed_tokens.weight")),
        ("llama", "model.final_layernorm.bias", ("end", "final_layernorm.bias")),
        ("gpt2", "h.0.attn.bias", ("mid", 0, "attn.bias")),
        ("gpt2", "transformer.h.11.attn.masked_bias", ("mid", 11, "attn.masked_bias")),
        ("gpt2", "h.0.attn.c_attn.bias", ("mid", 0, "attn.c_attn.bias")),
        ("gpt2", "wpe.weight", ("begin", "wpe.weight")),
        ("gpt2", "lm_head.weight", ("end", "lm_head.weight")),
        ("gpt_neox", "gpt_neox.layers.3.attention.bias", ("mid", 3, "attention.bias")),
        ("gpt_neox", "gpt_neox.layers.3.attention.rotary_emb.inv_freq", ("mid", 3, "attention.rotary_emb.inv_freq")),
        ("gpt_neox", "gpt_neox.layers.3.attention.dense.bias", ("mid", 3, "attention.dense.bias")),
        ("gpt_neox", "embed_out.weight", ("end", "embed_out.weight")),
        (
            "falcon",
            "transformer.h.1.self_attention.maybe_rotary.inv_freq",
            ("mid", 1, "self_attention.maybe_rotary.inv_freq"),
        ),
        ("falcon", "transformer.rotary_emb.inv_freq", ("begin", "rotary_emb.inv_freq")),
        ("bloom", "word_embeddings_layernorm.weight", ("begin", "word_embeddings_layernorm.weight")),
        ("opt", "decoder.project_out.weight", ("end", "decoder.project_out.weight")),
        ("bert", "bert.embeddings.position_ids", ("begin", "embeddings.position_ids")),
        ("bert", "cls.seq_relationship.weight", ("end", "cls.seq_relationship.weight")),
        ("bert", "pooler.dense.weight", ("end", "pooler.dense.weight")),
        ("roberta", "roberta.embeddings.token_type_ids", ("begin", "embeddings.token_type_ids")),
        ("roberta", "lm_head.dense.weight", ("end", "lm_head.dense.weight")),
        ("gguf", "token_embd.weight", ("begin", "token_embd.weight")),
        ("gguf", "blk.12.ffn_down.weight", ("mid", 12, "ffn_down.weight")),
        ("gguf", "output_norm.weight", ("end", "output_norm.weight")),
        ("gguf", "output.weight", ("end", "output.weight")),
        ("gguf", "rope_freqs.weight", ("end", "rope_freqs.weight")),
    ],
)
def test_decider_places_key(family: str, key: str, placement: tuple[object, ...] | None) -> None:
    assert get(family).decider(key) == placement


@pytest.mark.parametrize(
    ("family", "key"),
    [
        ("llama", "transformer.h.0.attn.c_attn.weight"),
        ("gpt2", "model.norm.weight"),
        ("falcon", "word_embeddings_layernorm.weight"),
        ("gguf", "mystery.weight"),
    ],
)
def test_decider_refuses_a_key_it_cannot_place_naming_it(family: str, key: str) -> None:
    with pytest.raises(sepstore.DeciderError, match=key.replace(".", r"\.")):
        get(family).decider(key)


def test_deciders_are_importable_modules() -> None:
    from sepstore.deciders import bert, bloom, falcon, gguf, gpt2, gpt_neox, llama, opt

    modules = (bert, bloom, falcon, gguf, gpt2, gpt_neox, llama, opt)
    assert all(isinstance(m.family, Family) and m.__doc__ for m in modules)
    assert bert.roberta_family is get("roberta")
    assert get("mistral") is llama.family  # a model_type names its family too


def test_gguf_names_are_detected_without_a_config() -> None:
    keys = ["token_embd.weight", "blk.0.attn_q.weight", "blk.1.attn_q.weight", "output_norm.weight"]
    family = detect(keys)
    assert family.name == "gguf"
    assert family.tied_head(keys, None) == {"output.weight": "token_embd.weight"}


def test_unknown_keys_fail_listing_them(tmp_path: Path) -> None:
    path = tmp_path / "mystery.safetensors"
    safetensors.torch.save_file({"foo.bar": torch.zeros(2), "baz": torch.ones(3)}, path)
    with pytest.raises(sepstore.DeciderError) as info:
        sepstore.convert(path, tmp_path / "store", quiet=True)
    assert "foo.bar" in str(info.value) and "baz" in str(info.value)
    assert not (tmp_path / "store" / "manifests").exists()


def test_key_the_configured_family_cannot_place_is_listed() -> None:
    keys = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.mystery.weight"]
    with pytest.raises(sepstore.DeciderError, match=r"model\.mystery\.weight") as info:
        detect(keys, {"model_type": "llama"})
    assert "model.embed_tokens.weight" not in str(info.value)


def test_unknown_decider_name_lists_the_known_ones() -> None:
    with pytest.raises(sepstore.DeciderError, match="nope") as info:
        get("nope")
    for known in ("bert", "bloom", "falcon", "gguf", "gpt2", "gpt_neox", "llama", "opt", "roberta"):
        assert known in str(info.value)


@pytest.mark.parametrize("name", sorted(families()))
def test_every_family_names_the_buffers_sepstore_hf_ignores_in_a_part(name: str) -> None:
    """One rule for rebuilt buffers: a ``masked_bias`` in a llama layer is one too (sepstore.hf
    ignores it through ``is_buffer``); a name with a newline after it is not."""
    family = get(name)
    for key in (
        "model.layers.0.self_attn.rotary_emb.inv_freq",
        "rotary_emb.original_inv_freq",
        "layers.0.self_attn.masked_bias",
        "embeddings.position_ids",
        "roberta.embeddings.token_type_ids",
    ):
        assert family.is_buffer(key), key
    assert not family.is_buffer("layers.0.self_attn.masked_bias\n")
    assert not family.is_buffer("layers.0.mlp.up_proj.weight")
    assert not family.is_buffer("embeddings.position_ids_scale")
