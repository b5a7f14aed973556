"""Absurd part sizes: a size must agree with the part's tensor table when the manifest is decoded,
and a pull checks the cache's free space before it writes anything. Every failure is a
SepstoreError; no sparse file of terabytes is created, no time is spent chunking one."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest

import sepstore
from sepstore.demo import llama_decider, tiny_llama_state_dict
from sepstore.manifest import decode_manifest
from sepstore.safetensors_io import MAX_HEADER_BYTES

SOURCE = "test://store/manifests/m/v1.json"
TiB = 2**40


def manifest_dict() -> dict[str, Any]:
    sd = tiny_llama_state_dict(layers=2, hidden=8, intermediate=16, vocab=16, seed=3)
    store = f"memory://sizes-{uuid.uuid4().hex}/store"
    sepstore.dump(llama_decider, sd, store, name="m", tag="v1", quiet=True)
    return json.loads(fsspec.filesystem("memory").cat_file(f"{store}/manifests/m/v1.json"))


def with_end(d: dict[str, Any], size: int, tensors: dict[str, Any] | None = None) -> bytes:
    d["end"]["size"] = size
    if tensors is not None:
        d["end"]["tensors"] = tensors
    return json.dumps(d).encode()


def one_tensor(dtype: str, shape: list[int]) -> dict[str, Any]:
    return {"w": {"dtype": dtype, "shape": shape, "digest": "blake3:" + "1" * 64}}


@pytest.mark.parametrize("size", [2**62, 2**64, 8 * TiB, 2**64 + 1])
def test_a_size_its_tensors_do_not_account_for_is_a_manifest_error_naming_the_part(size: int) -> None:
    with pytest.raises(sepstore.ManifestError, match=r"part end: field `size` is \d+, which does not fit"):
        decode_manifest(with_end(manifest_dict(), size), source=SOURCE)


def test_a_size_smaller_than_its_tensors_is_a_manifest_error() -> None:
    with pytest.raises(sepstore.ManifestError, match=r"part end: field `size` is 11, .*does not fit 4 bytes of"):
        decode_manifest(with_end(manifest_dict(), 11, one_tensor("F32", [1])), source=SOURCE)


def test_a_header_beyond_the_header_bound_is_a_manifest_error() -> None:
    with pytest.raises(sepstore.ManifestError, match="header of at most"):
        decode_manifest(with_end(manifest_dict(), 8 + 4 + MAX_HEADER_BYTES + 1, one_tensor("F32", [1])), source=SOURCE)
    ok = decode_manifest(with_end(manifest_dict(), 8 + 4 + MAX_HEADER_BYTES, one_tensor("F32", [1])), source=SOURCE)
    assert ok.end is not None and ok.end.size == 8 + 4 + MAX_HEADER_BYTES


def test_a_dtype_this_sepstore_does_not_know_leaves_only_the_lower_bound(tmp_path: Path) -> None:
    """A newer writer's dtype has a size this sepstore cannot compute: the manifest still decodes
    (info, diff and gc read it), and a pull of an absurd size is refused for space instead."""
    tensors = {**one_tensor("F32", [4]), "q": {"dtype": "Q4", "shape": [8], "digest": "blake3:" + "2" * 64}}
    with pytest.raises(sepstore.ManifestError, match="does not fit 16 bytes of tensors"):
        decode_manifest(with_end(manifest_dict(), 8 + 15, tensors), source=SOURCE)
    store = f"memory://sizes-{uuid.uuid4().hex}/store"
    url = f"{store}/manifests/m/v1.json"
    fsspec.filesystem("memory").pipe_file(url, with_end(manifest_dict(), 2**62, tensors))
    assert sepstore.read_manifest(url).end.size == 2**62  # type: ignore[union-attr]
    with pytest.raises(sepstore.StoreError, match="is free there"):
        sepstore.pull(url, "e", cache_dir=tmp_path / "cache", quiet=True)


def test_a_hostile_shape_is_refused_without_huge_integer_arithmetic() -> None:
    data = with_end(manifest_dict(), 1000, one_tensor("F64", [2**63 - 1] * 200_000))
    # refused by the shape bound (the element count stops growing past 2**63), before any size sum
    with pytest.raises(sepstore.ManifestError, match="more than 9223372036854775807 elements"):
        decode_manifest(data, source=SOURCE)


def test_a_tensor_of_2_to_the_64_bytes_is_refused_when_the_manifest_is_read() -> None:
    d = manifest_dict()
    with pytest.raises(sepstore.ManifestError, match="end"):
        decode_manifest(with_end(d, 2**64 + 8 + 120, one_tensor("U8", [2**64])), source=SOURCE)


@pytest.mark.parametrize("tensor_bytes", [8 * TiB, 2**62])
def test_a_part_larger_than_the_free_space_is_refused_before_anything_is_written(
    tmp_path: Path, tensor_bytes: int
) -> None:
    """Sizes that agree with a (huge) tensor table pass decoding; the pull refuses them for space."""
    d = manifest_dict()
    store = f"memory://sizes-{uuid.uuid4().hex}/store"
    url = f"{store}/manifests/m/v1.json"
    fsspec.filesystem("memory").pipe_file(url, with_end(d, tensor_bytes + 8 + 120, one_tensor("U8", [tensor_bytes])))
    cache = tmp_path / "cache"
    with pytest.raises(sepstore.StoreError, match=r"needs \d+\.\d TiB, only .* is free there"):
        sepstore.pull(url, "e", cache_dir=cache, quiet=True)
    with pytest.raises(sepstore.StoreError, match="is free there"):
        sepstore.load(url, "e", cache_dir=cache)
    assert not [p for p in cache.rglob("*") if p.is_file()], "no partial file, sparse or not"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("config", {"a": [[]] * 3_000_000}),  # 22 million empty lists took 1.6 GiB to decode
        ("metadata", {"k": "v" * 2_000_000}),
    ],
)
def test_a_free_form_field_over_its_byte_limit_is_refused_before_it_is_decoded(field: str, value: object) -> None:
    d = manifest_dict()
    d[field] = value
    with pytest.raises(sepstore.ManifestError, match=rf"field `{field}` is \d+ bytes of JSON, over the \d+ limit"):
        decode_manifest(json.dumps(d).encode(), source=SOURCE)
