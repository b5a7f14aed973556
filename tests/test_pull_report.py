"""Honest pull reports: parts already in the cache get their size checked (a wrong size is fetched
again), ``--verify`` re-hashes them and repairs any that fail, and the summary says which it did."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import StaticServer

import sepstore
from sepstore.demo import llama_decider, tiny_llama_state_dict
from sepstore.hashing import digest_file


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """The manifest URL of a small model on an HTTP server."""
    sd = tiny_llama_state_dict(layers=3, hidden=16, intermediate=32, vocab=64, seed=9)
    sepstore.dump(llama_decider, sd, tmp_path / "www" / "store", name="m", tag="v1", quiet=True)
    server = StaticServer(tmp_path / "www").start()
    yield f"{server.url}/store/manifests/m/v1.json"
    server.stop()


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sepstore", *map(str, args)], capture_output=True, text=True, timeout=300, check=False
    )


def cached(url: str, cache: Path, label: str) -> Path:
    part = dict(sepstore.read_manifest(url).labelled_parts())[label]
    return cache / "parts" / "blake3" / f"{part.digest[7:]}.safetensors"


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(data)


def test_a_truncated_cached_part_is_fetched_again_and_the_summary_says_so(served: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = cli("pull", served, "--cache-dir", cache, "--quiet")
    assert first.returncode == 0, first.stderr
    assert "fetched and verified 5 parts" in first.stdout and "0 already local" in first.stdout
    path = cached(served, cache, "mid.1")
    path.write_bytes(path.read_bytes()[:100])
    again = cli("pull", served, "--cache-dir", cache, "--quiet")
    assert again.returncode == 0, again.stderr
    assert "fetched and verified 1 part " in again.stdout, again.stdout
    assert "4 already local" in again.stdout and "size checked (--verify re-hashes them)" in again.stdout
    assert "repaired 1 damaged local part" in again.stdout and "mid.1 (file is 100 bytes" in again.stdout
    assert "all verified" not in again.stdout
    assert digest_file(path) == f"blake3:{path.stem}"


def test_a_flipped_byte_is_found_and_repaired_only_by_verify_and_each_summary_says_what_was_checked(
    served: str, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    sepstore.pull(served, cache_dir=cache, quiet=True)
    path = cached(served, cache, "end")
    flip_a_byte(path)
    plain = cli("pull", served, "--cache-dir", cache, "--quiet")
    assert plain.returncode == 0, plain.stderr
    assert "fetched and verified 0 parts" in plain.stdout and "size checked" in plain.stdout, plain.stdout
    assert digest_file(path) != f"blake3:{path.stem}", "a size check cannot see a flipped byte, and says so"
    verified = cli("pull", served, "--cache-dir", cache, "--verify", "--json", "--quiet")
    assert verified.returncode == 0, verified.stderr
    report = json.loads(verified.stdout)
    assert report["fetched"] == ["end"] and report["present_checked"] == "digest"
    assert list(report["repaired"]) == ["end"] and "digest is blake3:" in report["repaired"]["end"]
    assert sorted(report["present"]) == ["begin", "mid.0", "mid.1", "mid.2"]
    assert digest_file(path) == f"blake3:{path.stem}"
    text = cli("pull", served, "--cache-dir", cache, "--verify", "--quiet")
    assert "5 already local" in text.stdout and "re-hashed" in text.stdout and "repaired" not in text.stdout


def test_the_python_report_lists_what_was_checked(served: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = sepstore.pull(served, "b 0-1", cache_dir=cache, quiet=True)
    assert (first.fetched, first.present, first.repaired, first.checked) == (["begin", "mid.0"], [], {}, "size")
    second = sepstore.pull(served, "b 0-2", cache_dir=cache, quiet=True, verify=True)
    assert second.fetched == ["mid.1"] and sorted(second.present) == ["begin", "mid.0"]
    sizes = {label: part.size for label, part in sepstore.read_manifest(served).labelled_parts()}
    assert second.checked == "digest"
    assert second.present_bytes + second.fetched_bytes == sizes["begin"] + sizes["mid.0"] + sizes["mid.1"]


def test_a_damaged_part_of_a_local_store_is_an_integrity_error(tmp_path: Path) -> None:
    store = tmp_path / "store"
    sd = tiny_llama_state_dict(layers=2, hidden=16, intermediate=32, vocab=64, seed=9)
    manifest = sepstore.dump(llama_decider, sd, store, name="m", tag="v1", quiet=True)
    assert manifest.end is not None
    path = store / "parts" / "blake3" / f"{manifest.end.digest[7:]}.safetensors"
    flip_a_byte(path)
    assert sepstore.pull(store, name="m", tag="v1", quiet=True).checked == "size"
    with pytest.raises(sepstore.IntegrityError, match=r"part end .*digest is"):
        sepstore.pull(store, name="m", tag="v1", quiet=True, verify=True)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(sepstore.IntegrityError, match=r"part end .*file is 100 bytes"):
        sepstore.pull(store, name="m", tag="v1", quiet=True)
    path.unlink()
    with pytest.raises(sepstore.NotFoundError, match=r"part end .* is missing"):
        sepstore.pull(store, name="m", tag="v1", quiet=True)
