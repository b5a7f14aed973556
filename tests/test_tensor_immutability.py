"""A verified tensor does not change after it is returned: what happens to the part file later (a
write, a truncation) reaches neither the tensors nor the process, and ``mmap=True``, which keeps
the file's pages, is refused where another user could change them."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import same_bytes
from servers import StaticServer
from test_integrity import part_file

import sepstore


def overwrite_tensor_bytes(path: Path) -> None:
    """Write 12345.0 over the whole data section of a part file, in place (same inode)."""
    data = path.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    with open(path, "r+b") as file:
        file.seek(start)
        file.write((struct.pack("<f", 12345.0) * len(data))[: len(data) - start])


@pytest.fixture
def served(store: Path) -> Iterator[str]:
    """The store over HTTP, so that parts are loaded from the cache."""
    server = StaticServer(store.parent).start()
    yield f"{server.url}/{store.name}/manifests/model/latest.json"
    server.stop()


def test_writing_into_a_local_part_after_load_does_not_change_the_tensors(store: Path) -> None:
    loaded = sepstore.load(store, "0-1").mid[0]
    before = {k: v.clone() for k, v in loaded.items()}
    overwrite_tensor_bytes(part_file(store, "mid.0"))
    assert all(same_bytes(loaded[k], before[k]) for k in before)
    with pytest.raises(sepstore.IntegrityError):
        sepstore.load(store, "0-1")  # the next load sees the change, and refuses it


def test_writing_into_a_cached_part_after_load_does_not_change_the_tensors(
    served: str, store: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    loaded = sepstore.load(served, "0-1", cache_dir=cache).mid[0]
    before = {k: v.clone() for k, v in loaded.items()}
    (cached,) = (p for p in cache.rglob("*.safetensors") if p.name == part_file(store, "mid.0").name)
    overwrite_tensor_bytes(cached)
    assert all(same_bytes(loaded[k], before[k]) for k in before)
    again = sepstore.load(served, "0-1", cache_dir=cache).mid[0]  # the damaged copy is fetched again
    assert all(same_bytes(again[k], before[k]) for k in before)


def test_truncating_a_part_after_load_does_not_crash_the_process(store: Path) -> None:
    script = textwrap.dedent(
        """
        import os, sys
        import sepstore
        store, path = sys.argv[1], sys.argv[2]
        tensors = sepstore.load(store, "0-1").mid[0]
        before = {k: v.sum().item() for k, v in tensors.items()}
        os.truncate(path, 0)
        after = {k: (v + 0).sum().item() for k, v in tensors.items()}
        print("same" if after == before else "changed")
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", script, str(store), str(part_file(store, "mid.0"))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (child.returncode, child.stdout.strip()) == (0, "same"), child.stderr


def test_mmap_loads_the_same_tensors_without_copying(store: Path, state_dict: dict[str, torch.Tensor]) -> None:
    copied = sepstore.load(store, "b 0-2 e").to_dict()
    mapped = sepstore.load(store, "b 0-2 e", mmap=True).to_dict()
    assert copied.keys() == mapped.keys()
    assert all(same_bytes(copied[k], mapped[k]) for k in copied)
    storages = {t.untyped_storage().data_ptr() for k, t in mapped.items() if k.startswith("mid.0.")}
    assert len(storages) == 1  # views of one mapping


def test_mmap_is_refused_for_part_files_other_users_can_write(store: Path) -> None:
    os.chmod(part_file(store, "end"), 0o666)
    with pytest.raises(sepstore.StoreError, match="other users can write"):
        sepstore.load(store, "e", mmap=True)
    assert sepstore.load(store, "e").end  # the default copies, so it needs no such condition


def test_mmap_onto_another_device_is_refused(store: Path) -> None:
    with pytest.raises(sepstore.TensorError, match="mmap=True"):
        sepstore.load(store, "e", mmap=True, device="meta")


def test_loading_onto_another_device_moves_the_verified_bytes_in_one_piece(store: Path) -> None:
    on_cpu = sepstore.load(store, "b 0-1").to_dict()
    elsewhere = sepstore.load(store, "b 0-1", device="meta").to_dict()
    assert {k: (v.device.type, v.dtype, v.shape) for k, v in elsewhere.items()} == {
        k: ("meta", v.dtype, v.shape) for k, v in on_cpu.items()
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loading_onto_a_gpu_gives_the_verified_bytes(store: Path) -> None:
    on_cpu = sepstore.load(store, "f").to_dict()
    on_gpu = sepstore.load(store, "f", device="cuda").to_dict()
    assert all(v.is_cuda and same_bytes(v.cpu(), on_cpu[k]) for k, v in on_gpu.items())
    overwrite_tensor_bytes(part_file(store, "mid.0"))
    with pytest.raises(sepstore.IntegrityError):
        sepstore.load(store, "0-1", device="cuda")


@pytest.mark.parametrize("mmap", [False, True])
def test_lazy_load_copies_the_verified_bytes_into_the_module(tmp_path: Path, mmap: bool) -> None:
    sepstore.dump(lambda k: ("end", k), {"w": torch.arange(4.0)}, tmp_path, quiet=True)
    module = torch.nn.Module()
    module.end = torch.nn.Module()
    module.end.w = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
    sepstore.lazy_load(module, tmp_path, "e", mmap=mmap)
    overwrite_tensor_bytes(part_file(tmp_path, "end"))
    assert module.end.w.tolist() == [0.0, 1.0, 2.0, 3.0]
