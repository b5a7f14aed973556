"""GGUF to transformers: a tiny Hugging Face llama (and qwen2) written as GGUF the way llama.cpp's
converter writes it (gguf's own tensor-name table, Q/K permuted for RoPE, norms kept F32), then
converted. The store must hold exactly the parts of converting the HF checkpoint itself, equal what
transformers' own GGUF loader reads from the file (state dict and logits), keep llama.cpp's layout
with ``--gguf-names``, and carry the embedded tokenizer as assets.

``gguf_model`` (the model transformers loads from a GGUF), ``store_model`` (one built from the
store) and ``from_pretrained`` of the folder ``sepstore.export`` writes are the sides every
comparison here uses, through ``logits``.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from conftest import same_bytes
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import sepstore
import sepstore.hf
from sepstore.cli import main as cli
from sepstore.errors import UnsupportedModelError

TEXT = "hello world, the quick brown fox jumps over the lazy dog"
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
INPUT = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 12]])
#: GGUF's types for the 16-bit floats, written as raw bytes.
GGML = {"F16": gguf.GGMLQuantizationType.F16, "BF16": gguf.GGMLQuantizationType.BF16}
TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class Tiny:
    """A tiny HF model saved as a checkpoint folder (with its tokenizer), and the GGUF architecture
    llama.cpp writes it as."""

    model: transformers.PreTrainedModel
    folder: Path
    arch: gguf.MODEL_ARCH


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """A byte-level BPE of ~300 tokens, trained here (offline), with <s> = 0 and </s> = 1."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT] * 20, trainer)
    return tok


def tiny(
    root: Path,
    tok: Tokenizer,
    config_class: type[transformers.PretrainedConfig],
    arch: gguf.MODEL_ARCH,
    **extra: object,
) -> Tiny:
    config = config_class(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=1,
        **extra,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # every weight (biases, norms too) away from its initial value
    folder = root / "hf"
    model.save_pretrained(folder)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return Tiny(model, folder, arch)


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Tiny:
    return tiny(tmp_path_factory.mktemp("llama"), tokenizer, transformers.LlamaConfig, gguf.MODEL_ARCH.LLAMA)


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py): Q/K rows reordered for its RoPE."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_tensors(model: transformers.PreTrainedModel, arch: gguf.MODEL_ARCH) -> dict[str, torch.Tensor]:
    """The model's tensors as llama.cpp names (gguf's table) and lays them out; no head when tied."""
    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, suffix = key.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        if arch == gguf.MODEL_ARCH.LLAMA and ".attn_q." in name:
            tensor = torch.from_numpy(llama_cpp_permute(tensor.numpy(), config.num_attention_heads, None))
        elif arch == gguf.MODEL_ARCH.LLAMA and ".attn_k." in name:
            heads = config.num_attention_heads
            tensor = torch.from_numpy(llama_cpp_permute(tensor.numpy(), heads, config.num_key_value_heads))
        out[name] = tensor
    return out


def write_gguf(
    tiny: Tiny,
    tok: Tokenizer,
    path: Path,
    dtype: str = "F32",
    *,
    edit: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> Path:
    """The model as llama.cpp's converter writes it: 2-D weights in ``dtype`` (F32, F16, BF16 or
    Q8_0), 1-D tensors (norms, biases) F32, with the tokenizer and its chat template. ``edit``
    changes the tensors first."""
    config = tiny.model.config
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[tiny.arch])
    writer.add_name("tiny")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_file_type({"F32": 0, "F16": 1, "Q8_0": 7, "BF16": 32}[dtype])
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in ("<s>", "</s>") else 1 for t in tokens])  # 3: control
    merges = json.loads(tok.to_str())["model"]["merges"]  # pairs, or "a b" strings in older tokenizers
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_chat_template(CHAT_TEMPLATE)
    tensors = gguf_tensors(tiny.model, tiny.arch)
    if edit is not None:
        edit(tensors)
    for name, tensor in tensors.items():
        if tensor.dim() == 1 or dtype == "F32":
            writer.add_tensor(name, tensor.float().numpy())
        elif dtype == "Q8_0":
            blocks = gguf.quants.quantize(tensor.float().numpy(), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            raw = tensor.to(TORCH[dtype]).view(torch.int16).numpy().view(np.uint8)
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=GGML[dtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_model(path: Path) -> transformers.PreTrainedModel:
    """The model transformers loads from a GGUF: ``from_pretrained(folder, gguf_file=...)`` in float32."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


def hf_state_dict(store: Path) -> dict[str, torch.Tensor]:
    """The store's tensors under Hugging Face names: the llama family's placement undone."""
    loaded = sepstore.load(store, "f")
    out = {f"model.{key}": t for key, t in (loaded.begin or {}).items()}
    for i, layer in loaded.mid.items():
        out.update({f"model.layers.{i}.{key}": t for key, t in layer.items()})
    out.update({key if key.startswith("lm_head.") else f"model.{key}": t for key, t in (loaded.end or {}).items()})
    return out


def store_model(store: Path) -> transformers.PreTrainedModel:
    """A float32 model built from the store alone: its manifest's config, its tensors (strict)."""
    config = transformers.AutoConfig.for_model(**sepstore.read_manifest(store).config)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.load_state_dict(hf_state_dict(store), strict=True)
    return model


def logits(model: transformers.PreTrainedModel) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def part_digests(manifest: sepstore.Manifest) -> list[str]:
    return [part.digest for _, part in manifest.labelled_parts()]


def hf_checkpoint_like(tiny: Tiny, path: Path, out: Path) -> Path:
    """The HF checkpoint folder the GGUF at ``path`` was made from, with the GGUF's dtypes."""
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    names = gguf.get_tensor_name_map(tiny.arch, tiny.model.config.num_hidden_layers)
    state = {}
    for key, tensor in tiny.model.state_dict().items():
        base, suffix = key.rsplit(".", 1)
        kind = kinds.get(f"{names.get_name(base)}.{suffix}")
        if kind is not None:  # a tied head is not in the GGUF, nor in the checkpoint
            state[key] = tensor.to(TORCH[kind]).contiguous()
    out.mkdir()
    shutil.copy(tiny.folder / "config.json", out / "config.json")
    safetensors.torch.save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def alone(tmp_path: Path) -> Path:
    """Where a GGUF goes: a folder of its own (transformers reads a tokenizer_config.json beside it)."""
    folder = tmp_path / "gguf"
    folder.mkdir(exist_ok=True)
    return folder / "tiny.gguf"


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_llama_gguf_converts_to_the_parts_of_its_hf_checkpoint(
    tmp_path: Path, llama: Tiny, tokenizer: Tokenizer, dtype: str
) -> None:
    path = write_gguf(llama, tokenizer, alone(tmp_path), dtype)
    from_gguf = sepstore.convert(path, tmp_path / "store", quiet=True)
    from_hf = sepstore.convert(
        hf_checkpoint_like(llama, path, tmp_path / "checkpoint"), tmp_path / "store2", quiet=True
    )
    assert part_digests(from_gguf) == part_digests(from_hf)  # same names, dtypes and bytes: Q/K exactly un-permuted
    assert from_gguf.metadata["tensor_names"] == "transformers"
    assert from_gguf.metadata["decider"] == "llama"
    assert from_gguf.metadata["architecture"] == "LlamaForCausalLM"
    assert from_gguf.config["torch_dtype"] == str(TORCH[dtype]).removeprefix("torch.")


@pytest.fixture(scope="session")
def llama_gguf(tmp_path_factory: pytest.TempPathFactory, llama: Tiny, tokenizer: Tokenizer) -> Path:
    return write_gguf(llama, tokenizer, alone(tmp_path_factory.mktemp("llama-gguf")))


@pytest.fixture(scope="session")
def llama_store(tmp_path_factory: pytest.TempPathFactory, llama_gguf: Path) -> Path:
    store = tmp_path_factory.mktemp("llama-store")
    sepstore.convert(llama_gguf, store, name="tiny", quiet=True)
    return store


@pytest.mark.parametrize("dtype", ["F32", "F16", "Q8_0"])
def test_store_is_what_transformers_loads_from_the_gguf(
    tmp_path: Path, llama: Tiny, tokenizer: Tokenizer, dtype: str
) -> None:
    path = write_gguf(llama, tokenizer, alone(tmp_path), dtype)
    sepstore.convert(path, tmp_path / "store", quiet=True)
    expected = gguf_model(path)
    got = hf_state_dict(tmp_path / "store")
    assert sorted(got) == sorted(expected.state_dict())
    for key, tensor in got.items():
        wanted = TORCH.get(dtype, torch.float32) if tensor.dim() == 2 else torch.float32  # Q8_0: dequantized
        assert tensor.dtype == wanted, key
        assert same_bytes(tensor.float(), expected.state_dict()[key]), key  # transformers dequantizes to float32
    assert torch.equal(logits(store_model(tmp_path / "store")), logits(expected))


def test_llama_gguf_gives_the_config_transformers_derives(llama_gguf: Path, llama_store: Path) -> None:
    config = sepstore.read_manifest(llama_store).config
    assert config is not None
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["torch_dtype"] == "float32"
    assert config["rms_norm_eps"] == 1e-6  # the float32 in the file, written as the HF config had it
    ours = transformers.AutoConfig.for_model(**config).to_dict()
    theirs = transformers.AutoConfig.from_pretrained(llama_gguf.parent, gguf_file=llama_gguf.name).to_dict()
    for key in ("architectures", "dtype", "_name_or_path", "_model_name_or_path"):  # ours adds, theirs names
        ours.pop(key, None), theirs.pop(key, None)
    ours["rms_norm_eps"], theirs["rms_norm_eps"] = (float(np.float32(c["rms_norm_eps"])) for c in (ours, theirs))
    assert ours == theirs


def test_gguf_without_output_weight_is_tied(tmp_path: Path, tokenizer: Tokenizer) -> None:
    tied = tiny(tmp_path, tokenizer, transformers.LlamaConfig, gguf.MODEL_ARCH.LLAMA, tie_word_embeddings=True)
    path = write_gguf(tied, tokenizer, alone(tmp_path))
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(str(path)).tensors}
    manifest = sepstore.convert(path, tmp_path / "store", quiet=True)
    assert manifest.config is not None and manifest.config["tie_word_embeddings"] is True
    from_hf = sepstore.convert(tied.folder, tmp_path / "store2", quiet=True)
    assert part_digests(manifest) == part_digests(from_hf)
    loaded = sepstore.load(tmp_path / "store", "b e")
    assert same_bytes(loaded.end["lm_head.weight"], loaded.begin["embed_tokens.weight"])
    assert torch.equal(logits(store_model(tmp_path / "store")), logits(gguf_model(path)))


def test_qwen2_gguf_converts_with_its_biases_and_unpermuted(tmp_path: Path, tokenizer: Tokenizer) -> None:
    qwen2 = tiny(tmp_path, tokenizer, transformers.Qwen2Config, gguf.MODEL_ARCH.QWEN2)
    path = write_gguf(qwen2, tokenizer, alone(tmp_path))
    manifest = sepstore.convert(path, tmp_path / "store", quiet=True)
    assert manifest.config is not None and manifest.config["architectures"] == ["Qwen2ForCausalLM"]
    assert "self_attn.q_proj.bias" in manifest.mid[0].tensors
    from_hf = sepstore.convert(
        hf_checkpoint_like(qwen2, path, tmp_path / "checkpoint"), tmp_path / "store2", quiet=True
    )
    assert part_digests(manifest) == part_digests(from_hf)
    assert torch.equal(logits(store_model(tmp_path / "store")), logits(gguf_model(path)))


def test_gguf_names_keep_llama_cpp_names_and_layout(tmp_path: Path, llama: Tiny, llama_gguf: Path) -> None:
    assert cli(["convert", str(llama_gguf), str(tmp_path / "store"), "--gguf-names", "--quiet"]) == 0
    manifest = sepstore.read_manifest(tmp_path / "store", name="tiny", tag="latest")
    assert manifest.metadata["tensor_names"] == "gguf"
    assert manifest.metadata["decider"] == "gguf"
    loaded = sepstore.load(tmp_path / "store/manifests/tiny/latest.json", "f")
    raw = gguf_tensors(llama.model, llama.arch)
    assert sorted(loaded.begin) == ["token_embd.weight"]
    assert sorted(loaded.mid[1]) == sorted(k.removeprefix("blk.1.") for k in raw if k.startswith("blk.1."))
    assert same_bytes(loaded.mid[1]["attn_q.weight"], raw["blk.1.attn_q.weight"])  # still permuted for RoPE
    assert not torch.equal(
        raw["blk.1.attn_q.weight"], llama.model.state_dict()["model.layers.1.self_attn.q_proj.weight"]
    )
    assert sorted(manifest.asset_files) == sorted(sepstore.read_manifest(tmp_path / "store", name="tiny").asset_files)
    with pytest.raises(UnsupportedModelError, match=r"keeps llama\.cpp's tensor names") as refused:
        sepstore.hf.load_model(tmp_path / "store/manifests/tiny/latest.json")
    assert "without --gguf-names" in str(refused.value) and "a 'llama' model" not in str(refused.value)


def test_embedded_tokenizer_is_stored_as_transformers_writes_it(
    tmp_path: Path, llama_gguf: Path, llama_store: Path
) -> None:
    assets = sepstore.assets(llama_store, name="tiny", tag="latest")
    assert sorted(assets) == [
        "chat_template.jinja",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name, local in assets.items():
        shutil.copy(local, folder / name)
    theirs = transformers.AutoTokenizer.from_pretrained(llama_gguf.parent, gguf_file=llama_gguf.name)
    ours = transformers.AutoTokenizer.from_pretrained(folder)
    text = f"{TEXT}</s> the lazy fox"
    assert ours(text).input_ids == theirs(text).input_ids
    assert (ours.bos_token, ours.eos_token) == ("<s>", "</s>")
    assert ours.chat_template == CHAT_TEMPLATE
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (0, 1)


def test_gguf_tensor_without_a_hugging_face_name_is_refused_naming_it(
    tmp_path: Path, llama: Tiny, tokenizer: Tokenizer
) -> None:
    def add_mystery(tensors: dict[str, torch.Tensor]) -> None:
        tensors["blk.0.mystery.weight"] = torch.ones(4)

    path = write_gguf(llama, tokenizer, alone(tmp_path), edit=add_mystery)
    with pytest.raises(sepstore.DeciderError, match=r"blk\.0\.mystery\.weight.*--gguf-names"):
        sepstore.convert(path, tmp_path / "store", quiet=True)
    manifest = sepstore.convert(path, tmp_path / "store", decider="gguf", assets=False, quiet=True)
    assert manifest.metadata["tensor_names"] == "gguf"  # the gguf decider places GGUF names only
    assert "mystery.weight" in manifest.mid[0].tensors and not manifest.asset_files


def test_tokenizer_transformers_cannot_rebuild_stops_the_conversion_unless_no_assets(tmp_path: Path) -> None:
    path = alone(tmp_path)
    writer = gguf.GGUFWriter(str(path), "rwkv6")  # an architecture transformers' GGUF loader does not read
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b"])
    writer.add_tensor("token_embd.weight", np.ones((2, 4), dtype=np.float32))
    writer.add_tensor("blk.0.time_mix_key.weight", np.ones((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(sepstore.StoreError, match=r"cannot rebuild the tokenizer.*--no-assets"):
        sepstore.convert(path, tmp_path / "store", quiet=True)
    manifest = sepstore.convert(path, tmp_path / "store", assets=False, quiet=True)
    assert manifest.metadata["tensor_names"] == "gguf" and sorted(manifest.mid[0].tensors) == ["time_mix_key.weight"]


@pytest.mark.parametrize("dtype", ["F32", "F16"])
def test_gguf_store_exports_to_a_folder_transformers_loads_as_it_loads_the_gguf(
    tmp_path: Path, llama: Tiny, tokenizer: Tokenizer, dtype: str
) -> None:
    path = write_gguf(llama, tokenizer, alone(tmp_path), dtype)
    sepstore.convert(path, tmp_path / "store", name="tiny", quiet=True)
    sepstore.export(tmp_path / "store", tmp_path / "out", name="tiny", quiet=True)
    exported = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    assert "lm_head.weight" in exported  # the GGUF has output.weight: an untied head, under its HF name
    expected = gguf_model(path).state_dict()
    for key, tensor in exported.items():
        assert same_bytes(tensor.float(), expected[key]), key
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert torch.equal(logits(model), logits(gguf_model(path)))
    exported_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    gguf_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert exported_tokenizer(TEXT)["input_ids"] == gguf_tokenizer(TEXT)["input_ids"]


def two_heads_one_kv(writer: gguf.GGUFWriter) -> None:
    writer.add_head_count(2)
    writer.add_head_count_kv(1)


def small_gguf(
    path: Path,
    blocks: list[str],
    *,
    block_count: int | None = None,
    heads: Callable[[gguf.GGUFWriter], None] = two_heads_one_kv,
    metadata: Callable[[gguf.GGUFWriter], None] | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    """A llama GGUF of 16-wide ``blocks`` (``blk.N`` prefixes; ``block_count`` their number unless
    given), its head counts written by ``heads``; ``metadata`` adds keys, ``extra`` tensors."""
    hidden, inter, vocab = 16, 32, 8
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_embedding_length(hidden)
    writer.add_block_count(len(blocks) if block_count is None else block_count)
    writer.add_feed_forward_length(inter)
    writer.add_uint32("llama.vocab_size", vocab)
    heads(writer)
    if metadata is not None:
        metadata(writer)
    ones = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden)}
    for block in blocks:
        ones |= {f"{block}.{name}.weight": (hidden,) for name in ("attn_norm", "ffn_norm")}
        ones |= {f"{block}.{name}.weight": (hidden, hidden) for name in ("attn_q", "attn_output")}
        ones |= {f"{block}.{name}.weight": (hidden // 2, hidden) for name in ("attn_k", "attn_v")}
        ones |= {f"{block}.ffn_gate.weight": (inter, hidden), f"{block}.ffn_up.weight": (inter, hidden)}
        ones[f"{block}.ffn_down.weight"] = (hidden, inter)
    for name, shape in ones.items():
        writer.add_tensor(name, np.ones(shape, dtype=np.float32))
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("blocks", "block_count", "error", "message"),
    [
        (["blk.0"], 2, sepstore.TensorError, r"block_count is 2 but its tensors hold blocks \[0\]"),
        (["blk.0", "blk.1"], 1, sepstore.TensorError, r"block_count is 1 but its tensors hold blocks \[0, 1\]"),
        (["blk.2"], 3, sepstore.TensorError, r"block_count is 3 but its tensors hold blocks \[2\]; .* 0 to 2"),
        (["blk.0", "blk.00"], None, sepstore.DeciderError, r"'blk\.00\.attn_norm\.weight' has no Hugging Face name"),
        (["blk.0", "blk.\u0661"], None, sepstore.DeciderError, "'blk.\u0661.attn_norm.weight' has no Hugging Face"),
    ],
)
def test_gguf_blocks_must_be_0_to_block_count_each_spelled_once(
    tmp_path: Path, blocks: list[str], block_count: int | None, error: type[Exception], message: str
) -> None:
    path = small_gguf(tmp_path / "m.gguf", blocks, block_count=block_count)
    with pytest.raises(error, match=message):
        sepstore.convert(path, tmp_path / "store", assets=False, quiet=True)


@pytest.mark.parametrize(
    ("heads", "message"),
    [
        (lambda w: w.add_float32("llama.attention.head_count", 2.0), r"head_count is 2\.0, not a positive integer"),
        (lambda w: w.add_array("llama.attention.head_count_kv", [1]), r"head_count_kv is an array \(per-layer"),
        (lambda w: w.add_head_count(0), r"head_count is 0, not a positive integer"),
    ],
)
def test_gguf_head_counts_that_are_not_one_positive_integer_are_refused(
    tmp_path: Path, heads: Callable[[gguf.GGUFWriter], None], message: str
) -> None:
    path = small_gguf(tmp_path / "m.gguf", ["blk.0"], heads=heads)
    with pytest.raises(sepstore.TensorError, match=message):
        sepstore.convert(path, tmp_path / "store", assets=False, quiet=True)


def test_gguf_query_tensor_without_rows_is_refused(tmp_path: Path) -> None:
    extra = {"blk.0.attn_q.bias": np.array(1.0, dtype=np.float32)}
    path = small_gguf(tmp_path / "m.gguf", ["blk.0"], extra=extra)
    with pytest.raises(sepstore.TensorError, match=r"'blk\.0\.attn_q\.bias': shape \(\) does not split into 2 heads"):
        sepstore.convert(path, tmp_path / "store", assets=False, quiet=True)


def test_tokenizer_metadata_transformers_fails_on_is_the_error_naming_no_assets(tmp_path: Path) -> None:
    def tokenizer(writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(["a", "b"])
        writer.add_token_merges(["a b"])
        writer.add_bos_token_id(10**6)  # transformers indexes the token list with it (IndexError)

    path = small_gguf(alone(tmp_path), ["blk.0"], metadata=tokenizer)
    with pytest.raises(sepstore.StoreError, match=r"cannot rebuild the tokenizer.*IndexError.*--no-assets"):
        sepstore.convert(path, tmp_path / "store", quiet=True)


def gguf_metadata_only(path: Path, arrays: dict[str, int], cut: int = 0) -> Path:
    """A GGUF 3 header and key/value table, no tensors: each key a uint8 array of the given length;
    ``cut`` bytes short at the end."""
    out = struct.pack("<4sIQQ", b"GGUF", 3, 0, len(arrays))
    for key, count in arrays.items():
        name = key.encode()
        out += struct.pack("<Q", len(name)) + name + struct.pack("<IIQ", 9, 0, count) + bytes(count)
    path.write_bytes(out[: len(out) - cut])
    return path


@pytest.mark.parametrize(
    ("arrays", "cut", "message"),
    [
        ({"junk": 2**19 + 1}, 0, "metadata array 'junk' holds 524289 values, more than 524288"),
        ({f"junk{i}": 2**19 for i in range(4)}, 0, "metadata key 'junk3' takes the metadata past 2097152 values"),
        ({"junk": 10}, 1, "metadata key 'junk' runs past its end"),
    ],
)
def test_gguf_metadata_the_gguf_package_would_blow_up_is_refused_before_it_reads_it(
    tmp_path: Path, arrays: dict[str, int], cut: int, message: str
) -> None:
    path = gguf_metadata_only(tmp_path / "m.gguf", arrays, cut)
    with pytest.raises(sepstore.StoreError, match=message):
        sepstore.convert(path, tmp_path / "store", assets=False, quiet=True)
