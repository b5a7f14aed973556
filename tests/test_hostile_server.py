"""Hostile servers on 127.0.0.1: bodies far longer than asked for, a server that ignores ``Range``
on a large part, one that trickles a byte at a time. A pull runs in a child process, so that its
peak memory can be measured; it stays bounded and fails with an error naming the URL."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from servers import HostileServer, StaticServer

import sepstore
from sepstore.demo import llama_decider, tiny_llama_state_dict

MiB = 2**20
#: Far below the 1.5 GiB a hostile server sends per part, far above what a pull needs (~60 MiB here).
MEMORY_BOUND = 512 * MiB

CHILD = textwrap.dedent("""
    import json, sys, time
    import sepstore, sepstore.cache
    args = json.loads(sys.argv[1])
    sepstore.cache.CHUNK_BYTES = args.get("chunk", sepstore.cache.CHUNK_BYTES)
    began, outcome = time.monotonic(), {"error": None}
    try:
        report = sepstore.pull(args["url"], args["spec"], cache_dir=args["cache"],
                               storage_options=args["options"], quiet=True)
        outcome["fetched"] = report.fetched
    except sepstore.SepstoreError as exc:
        outcome["error"] = [type(exc).__name__, str(exc)]
    outcome["seconds"] = time.monotonic() - began
    # VmHWM, not ru_maxrss: that one also counts the parent's pages the child had before exec
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    outcome["peak_rss"] = int(status["VmHWM"].split()[0]) * 1024
    print(json.dumps(outcome))
""")


def limit_memory() -> None:
    """A child that regresses fails with MemoryError instead of taking the machine with it."""
    resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))


def run_child(code: str, args: list[str], *, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Run ``code`` in a fresh process (``env`` added to the environment, its address space
    limited); the JSON object it prints last."""
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
        preexec_fn=limit_memory,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    outcome: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return outcome


def pull_in_child(
    url: str, spec: str, cache: Path, *, options: dict[str, Any] | None = None, timeout: float = 120, **env: str
) -> dict[str, Any]:
    """Pull in a fresh process; its outcome, wall time and peak RSS."""
    args = json.dumps({"url": url, "spec": spec, "cache": str(cache), "options": options or {}, **env.pop("args", {})})
    return run_child(CHILD, [args], timeout=timeout, env=env)


@pytest.fixture
def www(tmp_path: Path) -> Path:
    sd = tiny_llama_state_dict(layers=4, hidden=32, intermediate=64, vocab=128, seed=21)
    sepstore.dump(llama_decider, sd, tmp_path / "www" / "bucket" / "store", name="m", tag="v1", quiet=True)
    return tmp_path / "www"


@pytest.fixture(params=["huge", "huge-chunked"])
def huge(request: pytest.FixtureRequest, www: Path) -> Iterator[HostileServer]:
    server = HostileServer(www, request.param).start()
    yield server
    server.stop()


PART_URL = r"/parts/blake3/[0-9a-f]{64}\.safetensors"


def test_parts_answered_with_huge_bodies_are_refused_in_bounded_memory(huge: HostileServer, tmp_path: Path) -> None:
    url = f"{huge.url}/bucket/store/manifests/m/v1.json"
    outcome = pull_in_child(url, "f", tmp_path / "cache")
    assert outcome["error"] is not None
    kind, message = outcome["error"]
    assert kind in ("IntegrityError", "StoreError") and "127.0.0.1" in message, message
    assert re.search(PART_URL, message), message
    assert outcome["peak_rss"] < MEMORY_BOUND, outcome
    assert not list((tmp_path / "cache" / "parts" / "blake3").glob("*.safetensors"))
    if kind == "IntegrityError":  # the server's answer was wrong: no partial file is kept to resume
        assert not list((tmp_path / "cache" / "incoming").glob("*.partial")), "left behind for nothing"


def test_an_s3_endpoint_answering_parts_with_huge_bodies_is_refused_in_bounded_memory(
    www: Path, tmp_path: Path
) -> None:
    server = HostileServer(www, "huge-chunked").start()
    try:
        options = {"endpoint_url": server.url, "key": "k", "secret": "s", "skip_instance_cache": True}
        outcome = pull_in_child("s3://bucket/store/manifests/m/v1.json", "e", tmp_path / "cache", options=options)
    finally:
        server.stop()
    assert outcome["error"] is not None, outcome
    assert (
        outcome["error"][0] in ("IntegrityError", "StoreError")
        and "s3://bucket/store/parts/blake3/" in (outcome["error"][1])
    ), outcome
    assert outcome["peak_rss"] < MEMORY_BOUND, outcome


def test_a_large_part_from_a_server_that_ignores_range_is_streamed_not_held_in_memory(tmp_path: Path) -> None:
    weight = torch.arange(64 * MiB, dtype=torch.float32)  # a 256 MiB part
    manifest = sepstore.dump(lambda key: ("begin", key), {"w": weight}, tmp_path / "www" / "store", quiet=True)
    assert manifest.begin is not None
    server = StaticServer(tmp_path / "www", ranges=False).start()
    try:
        url = f"{server.url}/store/manifests/model/latest.json"
        outcome = pull_in_child(url, "b", tmp_path / "cache", args={"chunk": 16 * MiB})  # type: ignore[arg-type]
        gets = [r for r in server.requests if r.method == "GET" and "/parts/" in r.path]
    finally:
        server.stop()
    assert outcome["error"] is None and outcome["fetched"] == ["begin"], outcome
    assert len(gets) == 1, "the whole part came in the first answer; its other chunks were not asked for"
    # the file is hashed from a memory map once it is complete: its pages count, nothing else does
    assert outcome["peak_rss"] < manifest.begin.size + 128 * MiB, outcome
    cached = tmp_path / "cache" / "parts" / "blake3" / f"{manifest.begin.digest[7:]}.safetensors"
    assert cached.stat().st_size == manifest.begin.size


def test_a_trickling_server_fails_the_pull_within_bounded_time(www: Path, tmp_path: Path) -> None:
    """One byte every 0.5 s keeps every read timeout happy; the minimum-progress rule aborts it."""
    server = HostileServer(www, "trickle").start()
    try:
        url = f"{server.url}/bucket/store/manifests/m/v1.json"
        outcome = pull_in_child(url, "0-2", tmp_path / "cache", timeout=180, SEPSTORE_TIMEOUT="2")
    finally:
        server.stop()
    assert outcome["error"] is not None, outcome
    kind, message = outcome["error"]
    assert kind == "StoreError" and "stalled" in message and "after 5 tries" in message, message
    assert re.search(PART_URL, message), message


def test_a_trickling_server_fails_a_load_too(www: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEPSTORE_TIMEOUT", "1")
    monkeypatch.setattr(sepstore.retry, "ATTEMPTS", 2)
    server = HostileServer(www, "trickle").start()
    try:
        with pytest.raises(sepstore.StoreError, match=r"stalled.*after 2 tries"):
            sepstore.load(f"{server.url}/bucket/store/manifests/m/v1.json", "e", cache_dir=tmp_path / "cache")
    finally:
        server.stop()


@pytest.mark.parametrize("mode", ["huge", "huge-chunked", "trickle"])
def test_a_manifest_answered_with_a_huge_or_trickling_body_is_refused_in_bounded_memory_and_time(
    www: Path, tmp_path: Path, mode: str
) -> None:
    server = HostileServer(www, mode, spoil="/manifests/").start()
    try:
        url = f"{server.url}/bucket/store/manifests/m/v1.json"
        outcome = pull_in_child(url, "f", tmp_path / "cache", timeout=180, SEPSTORE_TIMEOUT="2")
    finally:
        server.stop()
    assert outcome["error"] is not None, outcome
    kind, message = outcome["error"]
    why = "stalled" if mode == "trickle" else "larger than 67108864 bytes; not a manifest"
    assert kind == "StoreError" and url in message and why in message, message
    assert outcome["peak_rss"] < MEMORY_BOUND, outcome


@pytest.mark.parametrize(
    ("variable", "value"),
    [("SEPSTORE_MIN_SPEED", v) for v in ("fast", "-1", "nan", "inf")]
    + [("SEPSTORE_TIMEOUT", v) for v in ("0", "-2", "soon")],  # 0 s would fail every read as stalled
)
def test_a_bad_minimum_speed_or_timeout_is_a_store_error(
    variable: str, value: str, www: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    server = StaticServer(www).start()
    try:
        with pytest.raises(sepstore.StoreError, match=f"{variable} must be a number"):
            sepstore.pull(f"{server.url}/bucket/store/manifests/m/v1.json", cache_dir=tmp_path / "cache", quiet=True)
    finally:
        server.stop()
