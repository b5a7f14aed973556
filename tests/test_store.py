"""The store layout: parts named by digest, written atomically, never rewritten; manifests by name/tag."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
import torch

import sepstore
from sepstore.demo import llama_decider
from sepstore.hashing import digest_file
from sepstore.store import file_lock


def test_every_part_is_named_by_the_blake3_of_its_bytes(store: Path) -> None:
    files = sorted((store / "parts/blake3").iterdir())
    assert len(files) == 8  # begin, 6 layers, end
    for path in files:
        assert path.suffix == ".safetensors" and len(path.stem) == 64
        assert digest_file(path) == f"blake3:{path.stem}"


def test_no_temporary_files_are_left_behind(store: Path, state_dict: dict[str, torch.Tensor]) -> None:
    sepstore.dump(llama_decider, {k: v + 1 for k, v in state_dict.items()}, store, tag="v2")
    leftovers = [p for p in store.rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []


def test_existing_parts_are_never_rewritten(store: Path, state_dict: dict[str, torch.Tensor]) -> None:
    before = {p.name: (p.stat().st_ino, p.read_bytes()) for p in (store / "parts/blake3").iterdir()}
    sepstore.dump(llama_decider, state_dict, store, name="copy", tag="v1")
    after = {p.name: (p.stat().st_ino, p.read_bytes()) for p in (store / "parts/blake3").iterdir()}
    assert after == before  # same files, same bytes (only their mtime is refreshed, for gc)


def test_files_get_the_permissions_of_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        sepstore.dump(lambda k: ("begin", k), {"w": torch.ones(2)}, tmp_path)
    finally:
        os.umask(old)
    for path in [*(tmp_path / "parts/blake3").iterdir(), tmp_path / "manifests/model/latest.json"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_manifests_are_listed_by_name_and_tag(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    for name, tag in (("org/a", "v1"), ("org/a", "v2"), ("b", "latest")):
        sepstore.dump(llama_decider, state_dict, tmp_path, name=name, tag=tag)
    (tmp_path / "manifests/org/a/.tmp-1234.json").write_text("{}")
    (tmp_path / "manifests/notes.txt").write_text("not a manifest")
    assert sepstore.Store(tmp_path).list_manifests() == [("b", "latest"), ("org/a", "v1"), ("org/a", "v2")]
    assert sepstore.read_manifest(tmp_path, name="b").name == "b"
    with pytest.raises(sepstore.NotFoundError, match=r"org/a:v1, org/a:v2"):
        sepstore.read_manifest(tmp_path, name="org/a")
    with pytest.raises(sepstore.NotFoundError, match="several models"):
        sepstore.read_manifest(tmp_path)
    with pytest.raises(sepstore.NotFoundError, match="no model 'c'"):
        sepstore.read_manifest(tmp_path, name="c")


def test_manifest_lists_parts_relative_to_itself(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    manifest = sepstore.dump(llama_decider, state_dict, tmp_path, name="org/team/model", tag="v1")
    assert manifest.parts == "../../../../parts/blake3"
    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    tmp_path.rename(moved)  # a store is relocatable: nothing in it is an absolute path
    assert sepstore.verify(moved / "manifests/org/team/model/v1.json").ok


def test_file_lock_excludes_and_leaves_no_file_even_while_holders_delete_it(tmp_path: Path) -> None:
    """Each holder deletes the lock file before letting go; waiters that locked the deleted file
    must notice and lock the new one, or two would hold the lock at once."""
    lock, counter = str(tmp_path / "x.lock"), tmp_path / "counter"
    counter.write_text("0")
    inside = 0
    overlaps = 0
    guard = threading.Lock()

    def work() -> None:
        nonlocal inside, overlaps
        for _ in range(200):
            with file_lock(lock):
                with guard:
                    inside += 1
                    overlaps += inside > 1
                value = int(counter.read_text())
                counter.write_text(str(value + 1))
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == 0
    assert counter.read_text() == str(6 * 200)
    assert not os.path.exists(lock)
    with file_lock(lock) as first, file_lock(lock, blocking=False) as second:
        assert first and not second
