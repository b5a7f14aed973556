"""``convert`` from hostile servers on 127.0.0.1: a checkpoint whose tensor ranges (or whole pickle)
are answered with 1.5 GiB bodies, and one that trickles. The convert runs in a child process, so
that its peak memory can be measured; it stays bounded and fails with an error naming the URL."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from servers import HostileServer
from test_hostile_server import MEMORY_BOUND, run_child

import sepstore
from sepstore.demo import tiny_llama_state_dict

CHILD = textwrap.dedent("""
    import json, sys
    import sepstore
    url, dest = sys.argv[1:3]
    outcome = {"error": None}
    try:
        sepstore.convert(url, dest, name="m", quiet=True)
    except sepstore.SepstoreError as exc:
        outcome["error"] = [type(exc).__name__, str(exc)]
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    outcome["peak_rss"] = int(status["VmHWM"].split()[0]) * 1024
    print(json.dumps(outcome))
""")


def convert_in_child(url: str, dest: Path, **env: str) -> dict[str, Any]:
    """Convert in a fresh process; its outcome and peak RSS (VmHWM, as test_hostile_server measures)."""
    return run_child(CHILD, [url, str(dest)], timeout=180, env=env)


@pytest.fixture
def www(tmp_path: Path) -> Path:
    """An HF folder served as ``/m/``: ``model.safetensors``, the same tensors as ``pytorch_model.bin``."""
    sd = tiny_llama_state_dict(layers=2, hidden=32, intermediate=64, vocab=128, seed=5)
    folder = tmp_path / "www" / "m"
    folder.mkdir(parents=True)
    save_file(sd, folder / "model.safetensors")
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    return tmp_path / "www"


@pytest.mark.parametrize(
    ("file", "mode"),
    [
        ("model.safetensors", "huge"),
        ("model.safetensors", "huge-chunked"),
        ("pytorch_model.bin", "huge-chunked"),
    ],
)
def test_a_checkpoint_answered_with_huge_bodies_is_refused_in_bounded_memory(
    www: Path, tmp_path: Path, file: str, mode: str
) -> None:
    server = HostileServer(www, mode, spoil=file, spare_heads=file.endswith(".safetensors")).start()
    try:
        url = f"{server.url}/m/{file}"
        outcome = convert_in_child(url, tmp_path / "store", SEPSTORE_CACHE=str(tmp_path / "cache"))
    finally:
        server.stop()
    assert outcome["error"] is not None, outcome
    kind, message = outcome["error"]
    assert kind in ("IntegrityError", "StoreError") and url in message, message
    assert "after" not in message, "a wrong answer is not retried"
    assert outcome["peak_rss"] < MEMORY_BOUND, outcome
    assert not list((tmp_path / "store").glob("manifests/**/*.json"))
    assert not list((tmp_path / "cache").glob("incoming/*")), "no temporary file is left behind"


def test_a_server_trickling_tensor_bytes_fails_the_convert(
    www: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEPSTORE_TIMEOUT", "1")
    monkeypatch.setattr(sepstore.retry, "ATTEMPTS", 2)
    server = HostileServer(www, "trickle", spoil=".safetensors", spare_heads=True).start()
    try:
        url = f"{server.url}/m/model.safetensors"
        with pytest.raises(sepstore.StoreError, match=rf"{url}: stalled.*after 2 tries"):
            sepstore.convert(url, tmp_path / "store", name="m", quiet=True)
    finally:
        server.stop()
