"""Shared fixtures: small seeded Llama-shaped state dicts and a store made from them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sepstore
from sepstore.demo import llama_decider, tiny_llama_state_dict

N_LAYERS = 6


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaNs included), shape and dtype too."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bytes(sepstore.safetensors_io.raw_bytes(a)) == bytes(sepstore.safetensors_io.raw_bytes(b))


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
