"""Hostile part headers and manifests are refused with the right SepstoreError, in the library and
on the command line (a clean message and exit code, never a traceback)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from test_cli import run
from test_integrity import forged_store, safetensors_bytes, table

import sepstore
from sepstore.convert.sepweight_v0 import decider as sepweight_v0_decider
from sepstore.deciders import get
from sepstore.demo import llama_decider, tiny_llama_state_dict
from sepstore.manifest import decode_manifest
from sepstore.store import Store, check_name, check_tag

DIGEST = "blake3:" + "0" * 64
ONE_TENSOR = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


def nested(levels: int) -> str:
    return '{"a":' * levels + '"x"' + "}" * levels


def part_with_header(
    tmp_path: Path, header_json: str, payload: bytes, tensors: dict[str, tuple[str, tuple[int, ...]]]
) -> Path:
    """A store whose one part has this raw JSON header, its digest and size agreeing with the manifest."""
    encoded = header_json.encode()
    data = len(encoded).to_bytes(8, "little") + encoded + payload
    return forged_store(tmp_path, data, table(**tensors))


def assert_refused_by_cli_verify(store: Path, why: str) -> None:
    result = run("verify", store)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert why in result.stdout


def test_deeply_nested_metadata_is_an_integrity_error(tmp_path: Path) -> None:
    header = '{"__metadata__":' + nested(200_000) + "," + json.dumps(ONE_TENSOR)[1:]
    store = part_with_header(tmp_path, header, b"\0" * 8, {"a": ("F32", (2,))})
    with pytest.raises(sepstore.IntegrityError, match="nested too deeply"):
        sepstore.load(store, "b")
    assert_refused_by_cli_verify(store, "nested too deeply")


@pytest.mark.parametrize("metadata", [{"a": {"b": "c"}}, {"a": 1}, ["format", "pt"], "pt"])
def test_metadata_that_is_not_a_map_of_strings_is_an_integrity_error(tmp_path: Path, metadata: object) -> None:
    header = json.dumps({"__metadata__": metadata, **ONE_TENSOR})
    store = part_with_header(tmp_path, header, b"\0" * 8, {"a": ("F32", (2,))})
    with pytest.raises(sepstore.IntegrityError, match="__metadata__ is not a map of strings to strings"):
        sepstore.load(store, "b")


def test_flat_string_metadata_as_safetensors_writes_it_is_accepted(tmp_path: Path) -> None:
    header = json.dumps({"__metadata__": {"format": "pt"}, **ONE_TENSOR})
    store = part_with_header(tmp_path, header, b"\0" * 8, {"a": ("F32", (2,))})
    assert (sepstore.load(store, "b").begin or {})["a"].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("shape", [[2**63, 0], [2**62, 4, 0], [2**64, 0]])
def test_a_header_shape_torch_cannot_hold_is_an_integrity_error(tmp_path: Path, shape: list[int]) -> None:
    header = json.dumps({"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}})
    store = part_with_header(tmp_path, header, b"", {"a": ("F32", (0,))})
    with pytest.raises(sepstore.IntegrityError, match="invalid shape"):
        sepstore.load(store, "b")
    assert_refused_by_cli_verify(store, "invalid shape")


@pytest.mark.parametrize("shape", [[2**63, 0], [2**62, 4, 0]])
def test_a_manifest_shape_torch_cannot_hold_is_a_manifest_error(tmp_path: Path, shape: list[int]) -> None:
    store = forged_store(tmp_path, safetensors_bytes({}, b""), {})
    path = store / "manifests/forged/v1.json"
    raw = json.loads(path.read_bytes())
    raw["begin"]["tensors"] = {"a": {"dtype": "F32", "shape": shape, "digest": DIGEST}}
    path.write_text(json.dumps(raw))
    with pytest.raises(sepstore.ManifestError, match=r"shape|<= 9223372036854775807"):
        sepstore.load(store, "b")
    result = run("verify", store)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("sepstore: error:") and "begin.tensors" in result.stderr


def test_a_zero_size_tensor_with_a_large_dimension_still_loads(tmp_path: Path) -> None:
    header = json.dumps({"a": {"dtype": "F32", "shape": [2**40, 0], "data_offsets": [0, 0]}})
    store = part_with_header(tmp_path, header, b"", {"a": ("F32", (2**40, 0))})
    assert (sepstore.load(store, "b").begin or {})["a"].shape == (2**40, 0)


# -- a final newline: Python's `$` matches before it, so every pattern must refuse it explicitly ---


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "acme/tiny\n"),
        ("digest", DIGEST + "\n"),
        ("dtype", "F32\n"),
        ("tensor name", "a\n"),
    ],
)
def test_manifest_fields_ending_in_a_newline_are_refused(field: str, value: str) -> None:
    tensor = {"dtype": "F32", "shape": [2], "digest": DIGEST}
    part = {"digest": DIGEST, "size": 100, "tensors": {"a": tensor}}
    raw = {"format": "sepweight", "format_version": 1, "name": "acme/tiny", "parts": "../../parts/blake3"}
    raw.update(begin=part, mid=[], end=None)
    if field == "name":
        raw["name"] = value
    elif field == "digest":
        part["digest"] = value
    elif field == "dtype":
        tensor["dtype"] = value
    else:
        part["tensors"] = {value: tensor}
    with pytest.raises(sepstore.ManifestError, match="matching regex"):
        decode_manifest(json.dumps(raw).encode(), source="test")


@pytest.mark.parametrize("check", [check_name, check_tag])
def test_store_names_and_tags_ending_in_a_newline_are_refused(check: object) -> None:
    with pytest.raises(sepstore.StoreError, match="invalid"):
        check("tiny\n")  # type: ignore[operator]


def test_dump_refuses_a_name_or_tag_ending_in_a_newline_and_writes_nothing(tmp_path: Path) -> None:
    sd = tiny_llama_state_dict(layers=1, hidden=8, intermediate=16, vocab=16, seed=0)
    with pytest.raises(sepstore.StoreError, match="invalid model name"):
        sepstore.dump(llama_decider, sd, tmp_path / "store", name="acme/tiny\n", quiet=True)
    with pytest.raises(sepstore.StoreError, match="invalid tag"):
        sepstore.dump(llama_decider, sd, tmp_path / "store", tag="v1\n", quiet=True)
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").rglob("*\n*"))


@pytest.mark.parametrize("key", ["w\n", "x" * 4097, "__metadata__", ""])
def test_dump_refuses_tensor_names_a_manifest_cannot_hold(tmp_path: Path, key: str) -> None:
    with pytest.raises(sepstore.DeciderError, match="one line"):
        sepstore.dump(lambda k: ("mid", 0, k), {key: torch.ones(2)}, tmp_path / "store", quiet=True)
    assert not (tmp_path / "store" / "manifests").exists()


def test_a_layer_key_ending_in_a_newline_keeps_it_and_is_refused_not_renamed(tmp_path: Path) -> None:
    """``model.layers.0.w\\n`` once became ``w`` in layer 0 (beside, or over, the real ``w``)."""
    assert get("llama").decider("model.layers.0.w\n") == ("mid", 0, "w\n")
    assert sepweight_v0_decider("mid.0.w\n") == ("mid", 0, "w\n")
    with pytest.raises(sepstore.DeciderError, match="one line"):
        sepstore.dump(get("llama").decider, {"model.layers.0.w\n": torch.ones(2)}, tmp_path / "store", quiet=True)


def test_a_lease_id_ending_in_a_newline_is_refused(tmp_path: Path) -> None:
    with pytest.raises(sepstore.StoreError, match="invalid lease id"):
        Store(tmp_path / "store").lease_path("publish-0123456789abcdef\n")


def test_gc_leaves_a_file_named_like_its_temporaries_but_for_a_final_newline(store: Path) -> None:
    stray = store / "parts" / "blake3" / ".tmp-0123456789abcdef.safetensors\n"
    stray.write_bytes(b"not sepstore's")
    os.utime(stray, (time.time() - 7200, time.time() - 7200))
    sepstore.gc(store, grace=0)
    assert stray.exists()


def test_the_cache_does_not_take_a_name_with_a_final_newline_for_a_partial_download(tmp_path: Path) -> None:
    incoming = tmp_path / "cache" / "incoming"
    incoming.mkdir(parents=True)
    (incoming / f"{'0' * 64}.partial\n").write_bytes(b"not sepstore's")
    assert sepstore.cache_ls(tmp_path / "cache").partial == []


def test_export_with_force_leaves_a_file_named_like_a_shard_but_for_a_final_newline(
    manifest_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    stray = out / "model.safetensors\n"
    stray.write_bytes(b"not sepstore's")
    sepstore.export(manifest_path, out, force=True, quiet=True)
    assert stray.exists() and (out / "model.safetensors").exists()


def test_push_of_a_manifest_named_with_a_final_newline_is_refused(tmp_path: Path, store: Path) -> None:
    path = store / "manifests/model/latest.json"
    raw = json.loads(path.read_bytes())
    raw["name"] = "acme/tiny\n"
    path.write_text(json.dumps(raw))
    result = run("push", path, tmp_path / "dest")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("sepstore: error:") and "$.name" in result.stderr
    assert not list(tmp_path.joinpath("dest").rglob("*\n*"))
