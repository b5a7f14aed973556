"""Shared fixtures: small seeded Llama-shaped state dicts and a store made from them."""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from registry import DistributionRegistry
from servers import CountingMotoServer

import sepstore
from sepstore.demo import llama_decider, tiny_llama_state_dict
from sepstore.directio import DirectFile, address_of
from sepstore.tensors import raw_bytes

N_LAYERS = 6


def resident_pages(path: str | os.PathLike[str]) -> list[bool]:
    """Which pages of the file at ``path`` the page cache holds (``mincore`` of a private map of
    it, which reports the file's cached pages until one is written)."""
    mincore = ctypes.CDLL(None, use_errno=True).mincore
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
        vec = (ctypes.c_ubyte * -(-len(mapped) // mmap.PAGESIZE))()
        view = memoryview(mapped)
        assert mincore(address_of(view), len(mapped), vec) == 0, ctypes.get_errno()
        view.release()
    return [bool(v & 1) for v in vec]


def has_direct_io(folder: Path) -> bool:
    """Whether files in ``folder`` take ``O_DIRECT`` writes (tests of what bypasses the page cache
    assert it only there, and the bytes everywhere)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "probe").touch()
    try:
        with DirectFile(str(folder / "probe")) as probe:
            return probe.direct
    finally:
        os.unlink(folder / "probe")


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaNs included), shape and dtype too."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bytes(raw_bytes(a)) == bytes(raw_bytes(b))


@pytest.fixture
def state_dict() -> dict[str, torch.Tensor]:
    return tiny_llama_state_dict(layers=N_LAYERS, hidden=16, intermediate=32, vocab=64, seed=0)


@pytest.fixture
def store(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    root = tmp_path / "store"
    sepstore.dump(llama_decider, state_dict, root)
    return root


@pytest.fixture
def manifest_path(store: Path) -> Path:
    return store / "manifests" / "model" / "latest.json"


@pytest.fixture(scope="session")
def moto_server() -> Iterator[CountingMotoServer]:
    server = CountingMotoServer()
    server.start()
    saved = dict(os.environ)
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=server.endpoint,
    )
    yield server
    os.environ.clear()
    os.environ.update(saved)
    server.stop()


@pytest.fixture(scope="session")
def plain_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributionRegistry]:
    """A distribution registry without auth on 127.0.0.1 (deletion enabled)."""
    registry = DistributionRegistry(tmp_path_factory.mktemp("registry")).start()
    yield registry
    registry.stop()
