"""Every byte is verified: flipped, truncated, missing and forged parts are refused, never returned."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

import sepstore
from sepstore.hashing import digest_buffer
from sepstore.manifest import FORMAT_VERSION, Manifest, Part, Tensor, encode_manifest


def part_file(store: Path, label: str) -> Path:
    part = dict(sepstore.read_manifest(store).labelled_parts())[label]
    return store / "parts/blake3" / f"{part.digest.removeprefix('blake3:')}.safetensors"


def spec_of(label: str) -> str:
    return {"begin": "b", "end": "e"}.get(label) or f"{label[4:]}-{int(label[4:]) + 1}"


def test_every_flipped_byte_in_a_part_is_refused(tmp_path: Path) -> None:
    sd = {"w": torch.arange(6, dtype=torch.float32), "b": torch.tensor([1, 2], dtype=torch.int8)}
    sepstore.dump(lambda k: ("mid", 0, k), sd, tmp_path)
    path = part_file(tmp_path, "mid.0")
    original = path.read_bytes()
    for i in range(len(original)):
        corrupt = bytearray(original)
        corrupt[i] ^= 0x01
        path.write_bytes(corrupt)
        with pytest.raises(sepstore.IntegrityError, match=r"mid\.0"):
            sepstore.load(tmp_path, "0-1")
        assert not sepstore.verify(tmp_path).ok
    path.write_bytes(original)
    assert sepstore.verify(tmp_path).ok


def test_integrity_error_names_part_file_and_both_digests(store: Path) -> None:
    path = part_file(store, "mid.2")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(data)
    with pytest.raises(sepstore.IntegrityError) as info:
        sepstore.load(store, "2-3")
    message = str(info.value)
    assert "mid.2" in message and str(path) in message
    assert path.stem in message  # expected digest
    assert digest_buffer(bytes(data)) in message  # got


def test_truncated_part_is_refused(store: Path) -> None:
    path = part_file(store, "end")
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(sepstore.IntegrityError, match=r"end .*bytes, manifest says"):
        sepstore.load(store, "e")


def test_missing_part_is_not_found_naming_the_file(store: Path) -> None:
    path = part_file(store, "begin")
    path.unlink()
    with pytest.raises(sepstore.NotFoundError, match=path.name):
        sepstore.load(store, "b")
    report = sepstore.verify(store)
    assert [c.part for c in report.failures] == ["begin"]


def test_verification_can_be_skipped_but_headers_are_still_checked(store: Path) -> None:
    path = part_file(store, "mid.1")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a flipped tensor byte: only the digest can see it
    path.write_bytes(data)
    assert sepstore.load(store, "1-2", verify=False).mid[1]
    data[0] ^= 0xFF  # a broken header length: refused even without the digest
    path.write_bytes(data)
    with pytest.raises(sepstore.IntegrityError, match="header"):
        sepstore.load(store, "1-2", verify=False)


def test_pinned_manifest_digest_must_match(store: Path, manifest_path: Path) -> None:
    pinned = digest_buffer(manifest_path.read_bytes())
    assert sepstore.load(manifest_path, "b", digest=pinned).begin
    other = "blake3:" + "0" * 64
    with pytest.raises(sepstore.IntegrityError, match=other):
        sepstore.load(manifest_path, "b", digest=other)


def test_tensor_digest_mismatch_is_reported_by_verify(store: Path, manifest_path: Path) -> None:
    raw = json.loads(manifest_path.read_bytes())
    raw["mid"][0]["tensors"]["mlp.up_proj.weight"]["digest"] = "blake3:" + "1" * 64
    manifest_path.write_text(json.dumps(raw))
    assert sepstore.load(store, "0-1").mid[0]  # load checks file digests and headers, not tensor digests
    report = sepstore.verify(store)
    assert [c.part for c in report.failures] == ["mid.0"]
    assert "mlp.up_proj.weight" in (report.failures[0].error or "")


# -- forged parts: the manifest agrees with the file's digest, but not with its content -----------


def forged_store(tmp_path: Path, data: bytes, tensors: dict[str, Tensor]) -> Path:
    digest = digest_buffer(data)
    (tmp_path / "parts/blake3").mkdir(parents=True)
    (tmp_path / "parts/blake3" / f"{digest[7:]}.safetensors").write_bytes(data)
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        name="forged",
        parts="../../parts/blake3",
        begin=Part(digest, len(data), tensors),
        mid=[],
        end=None,
    )
    (tmp_path / "manifests/forged").mkdir(parents=True)
    (tmp_path / "manifests/forged/v1.json").write_bytes(encode_manifest(manifest))
    return tmp_path


def safetensors_bytes(header: dict[str, object], payload: bytes, length: int | None = None) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded) if length is None else length) + encoded + payload


def table(**shapes: tuple[str, tuple[int, ...]]) -> dict[str, Tensor]:
    return {name: Tensor(dtype, shape, "blake3:" + "0" * 64) for name, (dtype, shape) in shapes.items()}


@pytest.mark.parametrize(
    ("data", "tensors", "why"),
    [
        (struct.pack("<Q", 2**62) + b"{}", table(), "header length"),
        (safetensors_bytes({}, b"", length=10**9), table(), "header length"),
        (safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), table(
            a=("F32", (2,))), "ends at byte"),
        (safetensors_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                            "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 6),
         table(a=("F32", (1,)), b=("F32", (1,))), "overlaps"),
        (safetensors_bytes({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
         table(a=("F32", (3,))), "bytes for shape"),
        (safetensors_bytes({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
         table(a=("Q4", (1,))), "unknown dtype"),
        (safetensors_bytes({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
         table(a=("F32", (1,))), "invalid shape"),
        (safetensors_bytes([1, 2], b""), table(), "not a JSON object"),  # type: ignore[arg-type]
        (struct.pack("<Q", 4) + b"{{{{", table(), "not JSON"),
        (safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
         table(a=("F32", (1, 2))), "manifest"),
        (safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
         table(a=("F16", (2,))), "manifest"),
        (safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
         table(b=("F32", (2,))), "missing"),
    ],
)  # fmt: skip
def test_forged_part_headers_are_integrity_errors(
    tmp_path: Path, data: bytes, tensors: dict[str, Tensor], why: str
) -> None:
    store = forged_store(tmp_path, data, tensors)
    with pytest.raises(sepstore.IntegrityError, match=why):
        sepstore.load(store, "b")


def test_misaligned_tensors_from_other_writers_are_read_correctly(tmp_path: Path) -> None:
    header = {
        "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]},
    }
    payload = bytes([1, 2, 3]) + struct.pack("<2f", 1.5, -2.0)
    store = forged_store(tmp_path, safetensors_bytes(header, payload), table(a=("U8", (3,)), b=("F32", (2,))))
    begin = sepstore.load(store, "b").begin or {}
    assert begin["a"].tolist() == [1, 2, 3]
    assert begin["b"].tolist() == [1.5, -2.0]
