"""convert: HF folders, single files, sharded indexes, fsspec URLs, GGUF and llm_sepweight sources."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import fsspec
import gguf
import llm_sepweight
import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import same_bytes
from servers import StaticServer

import sepstore
from sepstore.convert import files as convert_files
from sepstore.convert.files import SafetensorsFile
from sepstore.convert.source import TensorInfo
from sepstore.deciders.llama import decider as llama_decider
from sepstore.demo import tiny_llama_state_dict
from sepstore.hashing import digest_file
from sepstore.safetensors_io import RawTensor
from sepstore.tensors import to_torch

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 3}
N = 3


def small_llama(dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    sd = tiny_llama_state_dict(layers=N, hidden=16, intermediate=32, vocab=64, seed=1)
    return {k: v.to(dtype) for k, v in sd.items()}


def sepstore_name(key: str) -> tuple[str, str]:
    """Where the llama decider puts an HF key: (part label, name in the part)."""
    if key.startswith("model.layers."):
        layer, rest = key.removeprefix("model.layers.").split(".", 1)
        return f"mid.{layer}", rest
    label = "begin" if key.startswith("model.embed_tokens.") else "end"
    return label, key.removeprefix("model.")


def flat(store: Path | str, **kwargs: object) -> dict[str, torch.Tensor]:
    return sepstore.load(store, "f", **kwargs).to_dict()


def assert_same_model(store: Path | str, want: dict[str, torch.Tensor], **kwargs: object) -> None:
    got = flat(store, **kwargs)
    expected = {".".join(sepstore_name(k)): v for k, v in want.items()}
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert same_bytes(got[key], value), key


def hf_folder(folder: Path, sd: dict[str, torch.Tensor], *, shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    if shards == 1:
        safetensors.torch.save_file(sd, str(folder / "model.safetensors"))
        return folder
    keys = list(sd)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = keys[i::shards]  # interleaved, so every layer spans several shards
        safetensors.torch.save_file({k: sd[k] for k in chunk}, str(folder / name))
        weight_map |= dict.fromkeys(chunk, name)
    index = {"metadata": {"total_size": sum(t.nbytes for t in sd.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def part_digests(manifest: sepstore.Manifest) -> list[tuple[str, str]]:
    return [(label, part.digest) for label, part in manifest.labelled_parts()]


# --- HF folders, dtype cast -------------------------------------------------------------------


def test_hf_folder_converts_bit_exact(tmp_path: Path) -> None:
    sd = small_llama()
    src = hf_folder(tmp_path / "tiny-llama", sd)
    manifest = sepstore.convert(src, tmp_path / "store")
    assert manifest.name == "tiny-llama"
    assert manifest.n_layers == N
    assert manifest.config == CONFIG
    assert manifest.metadata["source_format"] == "hf"
    assert manifest.metadata["decider"] == "llama"
    assert manifest.metadata["architecture"] == "LlamaForCausalLM"
    assert "dtype" not in manifest.metadata
    assert_same_model(tmp_path / "store", sd)


def test_dtype_casts_floating_tensors_only(tmp_path: Path) -> None:
    sd = small_llama(torch.float32)
    sd["model.layers.0.mlp.expert_ids"] = torch.arange(7, dtype=torch.int64)
    src = hf_folder(tmp_path / "fp32", sd)
    manifest = sepstore.convert(src, tmp_path / "store", dtype="bf16")
    assert manifest.metadata["dtype"] == "bfloat16"
    assert manifest.config == {**CONFIG, "torch_dtype": "bfloat16"}  # a model built from it (or exported) is bf16
    got = flat(tmp_path / "store")
    for key, value in sd.items():
        label, name = sepstore_name(key)
        tensor = got[f"{label}.{name}"]
        if value.is_floating_point():
            assert tensor.dtype == torch.bfloat16, key
            assert same_bytes(tensor, value.to(torch.bfloat16)), key
        else:
            assert same_bytes(tensor, value), key
    for _, part in manifest.labelled_parts():
        for name, tensor in part.tensors.items():
            assert tensor.dtype == ("I64" if name == "mlp.expert_ids" else "BF16"), name


@pytest.mark.parametrize("dtype", ["int3", "fp8", torch.complex128, torch.int64, torch.float8_e4m3fn, 5])
def test_unknown_dtype_is_a_tensor_error(tmp_path: Path, dtype: object) -> None:
    src = hf_folder(tmp_path / "m", small_llama())
    with pytest.raises(sepstore.TensorError, match=r"unknown dtype .*use one of bf16, fp16, fp32, fp64"):
        sepstore.convert(src, tmp_path / "store", dtype=dtype)  # type: ignore[arg-type]
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("dtype", ["fp64", torch.float64])
def test_dtype_fp64(tmp_path: Path, dtype: object) -> None:
    sd = small_llama(torch.float32)
    manifest = sepstore.convert(hf_folder(tmp_path / "m", sd), tmp_path / "store", dtype=dtype)  # type: ignore[arg-type]
    assert manifest.metadata["dtype"] == "float64"
    assert_same_model(tmp_path / "store", {k: v.double() for k, v in sd.items()})


# --- single files -------------------------------------------------------------------------------


def _save_safetensors(sd: dict[str, torch.Tensor], path: Path) -> None:
    safetensors.torch.save_file(sd, str(path))


def _save_pth(sd: dict[str, torch.Tensor], path: Path) -> None:
    torch.save(sd, path)


def _save_legacy_bin(sd: dict[str, torch.Tensor], path: Path) -> None:
    torch.save(sd, path, _use_new_zipfile_serialization=False)


@pytest.mark.parametrize("decider", ["llama", "auto"])
@pytest.mark.parametrize(
    ("filename", "save"),
    [
        ("weights.safetensors", _save_safetensors),
        ("weights.pth", _save_pth),
        ("pytorch_model.bin", _save_pth),
        ("legacy.bin", _save_legacy_bin),
    ],
)
def test_single_file(tmp_path: Path, filename: str, save: object, decider: str) -> None:
    sd = small_llama()
    (tmp_path / "src").mkdir()
    path = tmp_path / "src" / filename
    save(sd, path)  # type: ignore[operator]
    manifest = sepstore.convert(path, tmp_path / "store", decider=decider, name="m")
    assert manifest.metadata["decider"] == "llama"
    assert manifest.metadata["source_format"] == "file"
    assert_same_model(tmp_path / "store", sd)


TRIPPED: list[str] = []


def _trip(what: str) -> None:
    TRIPPED.append(what)


class Booby:
    """Pickles as a call to ``_trip``: loading it with full unpickling would run code."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return _trip, ("reduce",)


class Stateful:
    def __setstate__(self, state: object) -> None:
        _trip("setstate")


def test_pickle_with_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    for i, evil in enumerate([Booby(), Stateful()]):
        path = tmp_path / f"evil{i}.pth"
        torch.save({"model.embed_tokens.weight": torch.ones(2, 2), "extra": evil}, path)
        with pytest.raises(sepstore.StoreError, match="weights only"):
            sepstore.convert(path, tmp_path / "store", decider="llama", name="m")
    assert TRIPPED == []
    assert not (tmp_path / "store" / "manifests").exists()


# --- fsspec URLs, sharded indexes -------------------------------------------------------------


def test_memory_url_converts_as_local_disk(tmp_path: Path) -> None:
    sd = small_llama()
    local = hf_folder(tmp_path / "m", sd, shards=2)
    local_manifest = sepstore.convert(local, tmp_path / "local-store", name="m")
    fs = fsspec.filesystem("memory")
    root = f"/convert-test-{uuid.uuid4().hex}/m"
    try:
        for file in local.iterdir():
            fs.pipe_file(f"{root}/{file.name}", file.read_bytes())
        remote_manifest = sepstore.convert(f"memory://{root}", tmp_path / "remote-store", name="m")
    finally:
        fs.rm(root.rsplit("/", 1)[0], recursive=True)
    assert remote_manifest.metadata["source_format"] == "hf-sharded"
    assert remote_manifest.metadata["source"].startswith("memory://")
    assert part_digests(remote_manifest) == part_digests(local_manifest)
    assert remote_manifest.config == local_manifest.config == CONFIG
    assert_same_model(tmp_path / "remote-store", sd)


def test_an_http_checkpoint_is_read_by_concurrent_ranged_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(convert_files, "_RANGE_BYTES", 256)  # several reads per tensor
    sd = small_llama()
    local = hf_folder(tmp_path / "www" / "m", sd, shards=2)
    want = sepstore.convert(local, tmp_path / "local-store", name="m")
    server = StaticServer(tmp_path / "www").start()
    try:
        got = sepstore.convert(f"{server.url}/m/model.safetensors.index.json", tmp_path / "store", name="m")
    finally:
        server.stop()
    assert part_digests(got) == part_digests(want)
    assert got.config == CONFIG
    ranged = [r for r in server.requests if r.method == "GET" and r.path.endswith(".safetensors") and r.range]
    lengths = [int(b) - int(a) + 1 for a, b in (r.range.removeprefix("bytes=").split("-") for r in ranged if r.range)]
    assert lengths.count(256) > len(sd), "tensors larger than _RANGE_BYTES are read in several ranges"
    assert_same_model(tmp_path / "store", sd)


def test_a_folder_over_plain_http_or_a_registry_reference_is_refused_saying_what_to_give(tmp_path: Path) -> None:
    hf_folder(tmp_path / "www" / "m", small_llama())
    server = StaticServer(tmp_path / "www").start()
    try:
        with pytest.raises(sepstore.StoreError, match=r"cannot be listed; give the URL of its model.safetensors"):
            sepstore.convert(f"{server.url}/m", tmp_path / "store", name="m")
    finally:
        server.stop()
    assert not [r for r in server.requests if r.path.rstrip("/") == "/m"]  # never read as a listing
    with pytest.raises(sepstore.StoreError, match="holds sepstore models, not checkpoints"):
        sepstore.convert("oci://127.0.0.1:5000/acme/model:v1", tmp_path / "store")


def test_an_http_server_that_ignores_ranges_is_a_clear_error(tmp_path: Path) -> None:
    hf_folder(tmp_path / "www" / "m", small_llama(), shards=2)
    server = StaticServer(tmp_path / "www", ranges=False).start()
    try:
        with pytest.raises(sepstore.StoreError, match=r"ignores Range requests.*download the checkpoint"):
            sepstore.convert(f"{server.url}/m/model.safetensors.index.json", tmp_path / "store", name="m")
    finally:
        server.stop()
    assert not list((tmp_path / "store").glob("manifests/**/*.json"))


@pytest.mark.parametrize("save", [_save_pth, _save_legacy_bin])
def test_an_http_pickle_is_streamed_into_a_temporary_file_and_converts_as_the_local_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, save: object
) -> None:
    monkeypatch.setenv("SEPSTORE_CACHE", str(tmp_path / "cache"))
    sd = small_llama()
    (tmp_path / "www").mkdir()
    save(sd, tmp_path / "www" / "pytorch_model.bin")  # type: ignore[operator]
    want = sepstore.convert(tmp_path / "www" / "pytorch_model.bin", tmp_path / "local-store", name="m")
    server = StaticServer(tmp_path / "www").start()
    try:
        got = sepstore.convert(f"{server.url}/pytorch_model.bin", tmp_path / "store", name="m")
    finally:
        server.stop()
    assert part_digests(got) == part_digests(want)
    assert_same_model(tmp_path / "store", sd)
    assert not list((tmp_path / "cache").glob("incoming/*")), "the temporary file is gone"


def test_sharded_folder_given_by_its_index_json(tmp_path: Path) -> None:
    sd = small_llama()
    src = hf_folder(tmp_path / "sharded-llama", sd, shards=3)
    by_folder = sepstore.convert(src, tmp_path / "a")
    by_index = sepstore.convert(src / "model.safetensors.index.json", tmp_path / "b")
    assert by_index.name == by_folder.name == "sharded-llama"
    assert by_index.metadata["source_format"] == "hf-index"
    assert by_index.config == CONFIG
    assert part_digests(by_index) == part_digests(by_folder)
    assert_same_model(tmp_path / "b", sd)


def test_local_safetensors_parts_equal_a_dump_of_the_tensors_with_or_without_copy_file_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Local shards are copied into parts by the kernel; a filesystem that cannot (EXDEV across
    mounts, no copy_file_range) gets the same bytes through a buffer; both equal a plain dump."""
    sd = small_llama()
    src = hf_folder(tmp_path / "m", sd, shards=2)
    dumped = sepstore.dump(llama_decider, sd, tmp_path / "dumped", name="m", quiet=True)
    kernel = sepstore.convert(src, tmp_path / "kernel", name="m")
    calls: list[int] = []

    def no_copy_file_range(*args: object) -> int:
        calls.append(1)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", no_copy_file_range)
    buffered = sepstore.convert(src, tmp_path / "buffered", name="m")
    assert calls, "the kernel copy was tried first"
    assert part_digests(kernel) == part_digests(buffered) == part_digests(dumped)
    assert_same_model(tmp_path / "buffered", sd)


def test_converting_safetensors_never_imports_torch(tmp_path: Path) -> None:
    src = hf_folder(tmp_path / "m", small_llama(), shards=2)
    code = (
        "import sys, sepstore\n"
        f"sepstore.convert({str(src)!r}, {str(tmp_path / 'store')!r}, quiet=True)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert sepstore.verify(tmp_path / "store", name="m").ok


def test_a_shard_truncated_during_convert_is_an_integrity_error_and_leaves_no_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = hf_folder(tmp_path / "m", small_llama())
    shard = src / "model.safetensors"
    original = SafetensorsFile.__init__

    def truncate_after_index(self: SafetensorsFile, *args: object) -> None:
        original(self, *args)  # type: ignore[arg-type]
        os.truncate(shard, shard.stat().st_size - 100)  # the last tensor loses its tail

    monkeypatch.setattr(SafetensorsFile, "__init__", truncate_after_index)
    with pytest.raises(sepstore.IntegrityError, match=r"model\.safetensors.*truncated"):
        sepstore.convert(src, tmp_path / "store")
    assert not list((tmp_path / "store").rglob(".tmp-*")), "the part being written is removed"
    assert not list((tmp_path / "store").glob("manifests/**/*.json"))
    written = list((tmp_path / "store").glob("parts/blake3/*.safetensors"))
    assert len(written) < N + 2, "the truncated part was not filed"
    for part in written:  # the parts done before it are whole: each is named by its digest
        assert digest_file(part) == f"blake3:{part.stem}"


# --- what is not a checkpoint -----------------------------------------------------------------


def test_folder_without_checkpoint_lists_what_it_holds(tmp_path: Path) -> None:
    src = tmp_path / "empty-ish"
    src.mkdir()
    (src / "README.md").write_text("hi")
    (src / "tokenizer.json").write_text("{}")
    with pytest.raises(sepstore.NotFoundError, match=r"README\.md.*tokenizer\.json"):
        sepstore.convert(src, tmp_path / "store")


def test_missing_path_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(sepstore.NotFoundError):
        sepstore.convert(tmp_path / "nope", tmp_path / "store")
    with pytest.raises(sepstore.NotFoundError):
        sepstore.convert(tmp_path / "nope.safetensors", tmp_path / "store")


# --- streaming ----------------------------------------------------------------------------------


def test_reads_are_grouped_by_part_and_never_repeated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sd = small_llama()
    src = hf_folder(tmp_path / "m", sd, shards=3)
    reads: list[str] = []
    original = SafetensorsFile.read_many

    def recording_read(self: SafetensorsFile, keys: Sequence[str]) -> dict[str, RawTensor]:
        reads.extend(keys)
        return original(self, keys)

    monkeypatch.setattr(SafetensorsFile, "read_many", recording_read)
    sepstore.convert(src, tmp_path / "store")
    assert sorted(reads) == sorted(sd), "every key read exactly once"
    labels = [sepstore_name(key)[0] for key in reads]
    runs = [label for i, label in enumerate(labels) if i == 0 or labels[i - 1] != label]
    assert len(runs) == len(set(runs)), f"reads of a part are interleaved with another's: {runs}"
    assert runs == ["begin", *(f"mid.{i}" for i in range(N)), "end"]


# --- llm_sepweight migration ------------------------------------------------------------------


def _sepweight_v0_decider(key: str) -> list[str]:
    if key.startswith("model.embed_tokens."):
        return ["start", key.removeprefix("model.")]
    if key.startswith("model.layers."):
        layer, rest = key.removeprefix("model.layers.").split(".", 1)
        return ["mid", layer, rest]
    return ["end", key.removeprefix("model.")]


def test_llm_sepweight_directory_migrates(tmp_path: Path) -> None:
    sd = small_llama()
    src = tmp_path / "old-sepweight"
    llm_sepweight.dump(_sepweight_v0_decider, {k: v.clone() for k, v in sd.items()}, src)
    assert (src / "begin.pth").is_file() and (src / "mid.00002.pth").is_file() and (src / "end.pth").is_file()
    manifest = sepstore.convert(src, tmp_path / "store")
    assert manifest.name == "old-sepweight"
    assert manifest.metadata["source_format"] == "llm_sepweight"
    assert manifest.n_layers == N
    assert_same_model(tmp_path / "store", sd)
    loaded = sepstore.load(tmp_path / "store", "f")
    assert sorted(loaded.mid[1]) == sorted(k.removeprefix("model.layers.1.") for k in sd if ".layers.1." in k)


# --- GGUF -----------------------------------------------------------------------------------------

Q8_0 = gguf.GGMLQuantizationType.Q8_0


def _gguf_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "token_embd.weight": rng.standard_normal((64, 32)).astype(np.float32),
        "blk.0.attn_q.weight": rng.standard_normal((32, 32)).astype(np.float16),
        "blk.0.attn_norm.weight": np.ones(32, dtype=np.float32),
        "blk.1.attn_q.weight": rng.standard_normal((16, 32)).astype(np.float32),
        "blk.1.ffn_ids": np.arange(12, dtype=np.int32).reshape(3, 4),
        "output_norm.weight": rng.standard_normal(32).astype(np.float32),
        "output.weight": rng.standard_normal((64, 32)).astype(np.float32),
    }


def write_gguf(path: Path, tensors: dict[str, np.ndarray]) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_embedding_length(32)
    writer.add_head_count(4)
    writer.add_layer_norm_rms_eps(1e-5)
    for name, array in tensors.items():
        if name == "output.weight":
            quantized = gguf.quants.quantize(array, Q8_0)
            writer.add_tensor(name, quantized, raw_shape=quantized.shape, raw_dtype=Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def gguf_file(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    tensors = _gguf_tensors()
    path = tmp_path / "tiny-llama.Q8_0.gguf"
    write_gguf(path, tensors)
    return path, tensors


def test_gguf_index_and_reads(gguf_file: tuple[Path, dict[str, np.ndarray]]) -> None:
    from sepstore.convert.gguf import GGUFFile

    path, tensors = gguf_file
    source = GGUFFile(fsspec.filesystem("file"), str(path), str(path))
    assert list(source.index) == list(tensors)
    assert source.index["blk.1.attn_q.weight"] == TensorInfo("F32", (16, 32))
    assert source.index["blk.1.ffn_ids"].dtype == "I32"
    assert source.index["output.weight"] == TensorInfo("F32", (64, 32))
    assert source.config == {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "rms_norm_eps": 1e-5,
    }
    for name, array in tensors.items():
        if name != "output.weight":
            assert same_bytes(to_torch(source.read(name)), torch.from_numpy(array)), name
    head = to_torch(source.read("output.weight"))
    assert head.dtype == torch.float32 and head.shape == (64, 32)
    assert torch.allclose(head, torch.from_numpy(tensors["output.weight"]), atol=0.05)


def test_gguf_converts_keeping_its_names(tmp_path: Path, gguf_file: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, tensors = gguf_file
    manifest = sepstore.convert(path, tmp_path / "store", gguf_names=True)
    assert manifest.name == "tiny-llama.Q8_0"
    in_folder = sepstore.convert(path.parent, tmp_path / "store2", gguf_names=True)  # a folder holding one GGUF
    assert part_digests(in_folder) == part_digests(manifest)
    assert manifest.metadata["source_format"] == "gguf"
    assert manifest.metadata["decider"] == "gguf"
    assert manifest.metadata["tensor_names"] == "gguf"
    assert manifest.config is not None and manifest.config["model_type"] == "llama"
    loaded = sepstore.load(tmp_path / "store", "f")
    assert sorted(loaded.begin or {}) == ["token_embd.weight"]
    assert sorted(loaded.mid[0]) == ["attn_norm.weight", "attn_q.weight"]
    assert sorted(loaded.mid[1]) == ["attn_q.weight", "ffn_ids"]
    assert sorted(loaded.end or {}) == ["output.weight", "output_norm.weight"]
    assert same_bytes(loaded.begin["token_embd.weight"], torch.from_numpy(tensors["token_embd.weight"]))
    assert same_bytes(loaded.mid[0]["attn_q.weight"], torch.from_numpy(tensors["blk.0.attn_q.weight"]))
    assert same_bytes(loaded.mid[1]["attn_q.weight"], torch.from_numpy(tensors["blk.1.attn_q.weight"]))
    assert same_bytes(loaded.mid[1]["ffn_ids"], torch.from_numpy(tensors["blk.1.ffn_ids"]))
    assert same_bytes(loaded.end["output_norm.weight"], torch.from_numpy(tensors["output_norm.weight"]))
    head = loaded.end["output.weight"]
    dequantized = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(tensors["output.weight"], Q8_0), Q8_0))
    assert same_bytes(head, dequantized)  # no dtype: quantized tensors stay float32
    assert torch.allclose(head, torch.from_numpy(tensors["output.weight"]), atol=0.05)


def test_gguf_with_dtype(tmp_path: Path, gguf_file: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, tensors = gguf_file
    manifest = sepstore.convert(path, tmp_path / "store", dtype="bf16", gguf_names=True)
    assert manifest.metadata["dtype"] == "bfloat16"
    loaded = sepstore.load(tmp_path / "store", "f")
    head = loaded.end["output.weight"]
    assert head.dtype == torch.bfloat16 and head.shape == (64, 32)
    assert torch.allclose(head.float(), torch.from_numpy(tensors["output.weight"]), atol=0.06)
    assert loaded.mid[0]["attn_q.weight"].dtype == torch.bfloat16
    assert same_bytes(loaded.mid[1]["ffn_ids"], torch.from_numpy(tensors["blk.1.ffn_ids"]))


def test_gguf_bf16_is_bit_exact(tmp_path: Path) -> None:
    from sepstore.convert.gguf import GGUFFile

    weight = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    path = tmp_path / "bf16.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    raw = weight.view(torch.int16).numpy().view(np.uint8)
    writer.add_tensor("blk.0.w", raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    source = GGUFFile(fsspec.filesystem("file"), str(path), str(path))
    assert source.index["blk.0.w"] == TensorInfo("BF16", (3, 8))
    assert same_bytes(to_torch(source.read("blk.0.w")), weight)


def test_gguf_decider() -> None:
    from sepstore.deciders.gguf import decider

    assert decider("token_embd.weight") == ("begin", "token_embd.weight")
    assert decider("blk.12.ffn_down.weight") == ("mid", 12, "ffn_down.weight")
    assert decider("output_norm.weight") == ("end", "output_norm.weight")
    assert decider("output.weight") == ("end", "output.weight")
    assert decider("rope_freqs.weight") == ("end", "rope_freqs.weight")
    with pytest.raises(sepstore.DeciderError, match=r"mystery\.weight"):
        decider("mystery.weight")


def test_gguf_must_be_local_and_valid(tmp_path: Path, gguf_file: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, _ = gguf_file
    fs = fsspec.filesystem("memory")
    remote = f"/convert-test-{uuid.uuid4().hex}/m.gguf"
    fs.pipe_file(remote, path.read_bytes())
    try:
        with pytest.raises(sepstore.StoreError, match="local"):
            sepstore.convert(f"memory://{remote}", tmp_path / "store")
    finally:
        fs.rm(remote)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(sepstore.StoreError, match="GGUF"):
        sepstore.convert(bad, tmp_path / "store")


def test_gguf_without_head_ties_it_to_the_embeddings(tmp_path: Path) -> None:
    tensors = _gguf_tensors()
    del tensors["output.weight"]
    path = tmp_path / "tied.gguf"
    write_gguf(path, tensors)
    sepstore.convert(path, tmp_path / "store", gguf_names=True)
    loaded = sepstore.load(tmp_path / "store", "f")
    assert sorted(loaded.end or {}) == ["output.weight", "output_norm.weight"]
    assert same_bytes(loaded.end["output.weight"], torch.from_numpy(tensors["token_embd.weight"]))
