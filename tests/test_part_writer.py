"""The part writer under adverse conditions: kernel copies that stop or refuse part-way, files
that cannot be memory-mapped, a hasher that fails, a full disk; and the torch-free start-up."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import sepstore
import sepstore.safetensors_io
from sepstore.demo import llama_decider, tiny_llama_state_dict
from sepstore.hashing import digest_file


def state_dict() -> dict[str, torch.Tensor]:
    # hidden 64, intermediate 128: some tensors span several pieces when HASH_PIECE is small
    return tiny_llama_state_dict(layers=2, hidden=64, intermediate=128, vocab=64, seed=4)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')
    safetensors.torch.save_file(state_dict(), str(folder / "model.safetensors"))
    return folder


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sepstore.safetensors_io, "HASH_PIECE", 4096)


def digests(manifest: sepstore.Manifest) -> list[str]:
    return [part.digest for _, part in manifest.labelled_parts()]


def reference(tmp_path: Path) -> list[str]:
    return digests(sepstore.dump(llama_decider, state_dict(), tmp_path / "reference", name="m", quiet=True))


def assert_clean(store: Path) -> None:
    """No temporary file left, and every part named by its digest."""
    assert not list(store.rglob(".tmp-*"))
    for part in store.glob("parts/blake3/*.safetensors"):
        assert digest_file(part) == f"blake3:{part.stem}"


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize("how", ["refuses-after-a-while", "copies-nothing"])
def test_a_kernel_copy_that_stops_part_way_falls_back_to_the_same_bytes(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    real = os.copy_file_range
    calls = 0

    def flaky(src: int, dst: int, count: int, offset_src: int, offset_dst: int) -> int:
        nonlocal calls
        calls += 1
        if calls % 3 == 0:  # every third call: EXDEV, or a filesystem that copies 0 bytes
            if how == "copies-nothing":
                return 0
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst, min(count, 1000), offset_src, offset_dst)  # short copies

    monkeypatch.setattr(os, "copy_file_range", flaky)
    manifest = sepstore.convert(checkpoint, tmp_path / "store", name="m")
    assert calls >= 3
    assert digests(manifest) == reference(tmp_path)
    assert_clean(tmp_path / "store")


@pytest.mark.usefixtures("small_pieces")
def test_a_destination_that_cannot_be_memory_mapped_is_read_back_instead(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_mmap(*args: object, **kwargs: object) -> object:
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(sepstore.safetensors_io, "mmap", no_mmap)
    want = reference(tmp_path)
    assert digests(sepstore.convert(checkpoint, tmp_path / "store", name="m")) == want
    assert_clean(tmp_path / "store")


@pytest.mark.usefixtures("small_pieces")
def test_a_failing_hasher_surfaces_its_own_error_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FailingHasher:
        def update(self, data: object) -> None:
            raise MemoryError("no memory for this piece")

    real = sepstore.safetensors_io.Hasher
    made = 0

    def hasher() -> object:
        nonlocal made
        made += 1
        return FailingHasher() if made == 2 else real()

    monkeypatch.setattr(sepstore.safetensors_io, "Hasher", hasher)
    with pytest.raises(MemoryError, match="no memory for this piece"):
        sepstore.dump(llama_decider, state_dict(), tmp_path / "store", name="m", quiet=True)
    assert_clean(tmp_path / "store")
    assert not list((tmp_path / "store").glob("parts/blake3/*.safetensors"))


def test_a_full_disk_is_a_store_error_naming_the_store(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", full)
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(sepstore.StoreError, match=r"store/parts/blake3: cannot write a part .*No space left"):
        sepstore.convert(checkpoint, tmp_path / "store", name="m")
    assert_clean(tmp_path / "store")


@pytest.mark.parametrize(
    "code",
    ["import sepstore", "import sepstore.cli", "import sepstore.convert, sepstore.pull, sepstore.push, sepstore.gc"],
)
def test_starting_up_imports_neither_torch_nor_aiohttp(code: str) -> None:
    check = f"{code}\nimport sys\nprint(sorted({{'torch', 'aiohttp'}} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", check], check=True, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_verifying_a_store_never_imports_torch(tmp_path: Path) -> None:
    sepstore.dump(llama_decider, state_dict(), tmp_path / "store", name="m", quiet=True)
    code = (
        "import sys, sepstore\n"
        f"report = sepstore.verify({str(tmp_path / 'store')!r}, name='m', quiet=True)\n"
        "assert report.ok and len(report.checks) == 4, report\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False"


def test_the_part_module_is_imported_on_first_use() -> None:
    assert issubclass(sepstore.Part, torch.nn.Module)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        sepstore.Nope  # type: ignore[attr-defined]  # noqa: B018
