"""Durability: on local disk every part and manifest (in a store or the cache) is fsynced before it
is renamed into place, and its folder after, so a power loss leaves it whole or absent. The test
records the real system calls (``os.fsync``, ``os.replace``, ``os.link``) the library makes."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pytest
from servers import CountingMotoServer

import sepstore
from sepstore.demo import llama_decider, tiny_llama_state_dict


@dataclass
class Calls:
    """In order: ``("fsync", path)`` and ``("rename", source, destination)`` (a replace or a link)."""

    log: list[tuple[str, ...]] = field(default_factory=list)

    def renamed_into(self, folder: Path) -> list[tuple[str, ...]]:
        return [c for c in self.log if c[0] == "rename" and Path(c[2]).parent == folder]

    def assert_durable(self, folder: Path, suffix: str) -> int:
        """Every file renamed into ``folder`` had its bytes fsynced before, and the folder after."""
        renames = [c for c in self.renamed_into(folder) if c[2].endswith(suffix)]
        assert renames, f"nothing was renamed into {folder}"
        for call in renames:
            at = self.log.index(call)
            assert ("fsync", call[1]) in self.log[:at], (
                f"{call[2]} was renamed into place before its bytes were fsynced"
            )
            assert ("fsync", str(folder)) in self.log[at:], f"{folder} was not fsynced after {call[2]} arrived"
        return len(renames)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    recorded = Calls()
    fsync, replace, link = os.fsync, os.replace, os.link

    def spy_fsync(fd: int) -> None:
        recorded.log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def spy_replace(src: Any, dst: Any, **kwargs: Any) -> None:
        replace(src, dst, **kwargs)
        recorded.log.append(("rename", os.fspath(src), os.fspath(dst)))

    def spy_link(src: Any, dst: Any, **kwargs: Any) -> None:
        link(src, dst, **kwargs)
        recorded.log.append(("rename", os.fspath(src), os.fspath(dst)))

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    monkeypatch.setattr(os, "link", spy_link)
    return recorded


def test_dump_fsyncs_parts_and_manifest_and_the_folders_it_creates(tmp_path: Path, calls: Calls) -> None:
    store = tmp_path / "store"
    sepstore.dump(llama_decider, tiny_llama_state_dict(layers=2, hidden=16, intermediate=16, vocab=32), store)
    assert calls.assert_durable(store / "parts/blake3", ".safetensors") == 4
    assert calls.assert_durable(store / "manifests/model", ".json") == 1
    assert ("fsync", str(tmp_path)) in calls.log, "the new store's folder itself was not made durable"
    (manifest,) = calls.renamed_into(store / "manifests/model")
    later = calls.log[calls.log.index(manifest) :]
    assert not set(later) & set(calls.renamed_into(store / "parts/blake3")), "the manifest comes last"


def test_push_to_local_disk_fsyncs_what_it_writes(tmp_path: Path, calls: Calls) -> None:
    sd = tiny_llama_state_dict(layers=2, hidden=16, intermediate=16, vocab=32)
    sepstore.dump(llama_decider, sd, tmp_path / "src")
    calls.log.clear()
    sepstore.push(tmp_path / "src", tmp_path / "dest", quiet=True)
    assert calls.assert_durable(tmp_path / "dest/parts/blake3", ".safetensors") == 4
    assert calls.assert_durable(tmp_path / "dest/manifests/model", ".json") == 1


def test_parts_fetched_into_the_cache_are_fsynced(
    tmp_path: Path, calls: Calls, moto_server: CountingMotoServer
) -> None:
    bucket = f"durable-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(bucket)
    sd = tiny_llama_state_dict(layers=2, hidden=16, intermediate=16, vocab=32)
    sepstore.dump(llama_decider, sd, f"s3://{bucket}/store", quiet=True)
    calls.log.clear()
    sepstore.pull(f"s3://{bucket}/store/manifests/model/latest.json", "f", cache_dir=tmp_path / "cache", quiet=True)
    assert calls.assert_durable(tmp_path / "cache/parts/blake3", ".safetensors") == 4
