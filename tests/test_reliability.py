"""Reliability and hostile inputs: processes killed mid-write, concurrent writers, a misbehaving
network, and fuzzed part headers. Nothing is lost, nothing is trusted blindly.

``SEPSTORE_SOAK=N`` runs N kills per command instead of the quick default (by hand)."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from servers import CountingMotoServer, FaultProxy, StaticServer

import sepstore
import sepstore.retry
from sepstore.demo import llama_decider, tiny_llama_state_dict
from sepstore.hashing import digest_file
from sepstore.safetensors_io import parse_header

KILLS = int(os.environ.get("SEPSTORE_SOAK", "4"))


def assert_consistent(store: Path) -> None:
    """Every file under a digest name has those bytes; every manifest's parts exist and verify."""
    for path in (store / "parts/blake3").glob("*.safetensors"):
        if path.name.startswith(".tmp-"):
            continue  # a temporary file a killed writer left; gc removes it
        assert digest_file(path) == f"blake3:{path.stem}", f"{path} holds other bytes than its name"
    if (store / "manifests").exists():
        for name, tag in sepstore.Store(store).list_manifests():
            report = sepstore.verify(store, name=name, tag=tag, quiet=True)
            assert report.ok, report.failures


def checkpoint(folder: Path, seed: int) -> dict[str, torch.Tensor]:
    sd = tiny_llama_state_dict(layers=6, hidden=128, intermediate=256, vocab=1024, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return sd


OPERATIONS = {
    "dump": """
        from safetensors.torch import load_file
        from sepstore.demo import llama_decider
        sd = load_file({src!r} + "/model.safetensors")
        run = lambda: sepstore.dump(llama_decider, sd, {dest!r}, name="m", tag="v1", quiet=True)
    """,
    "convert": """
        run = lambda: sepstore.convert({src!r}, {dest!r}, name="m", tag="v1", quiet=True)
    """,
    "push": """
        run = lambda: sepstore.push({src!r} + "-store", {dest!r}, quiet=True)
    """,
}


def child(operation: str, src: Path, dest: Path) -> subprocess.Popen[str]:
    """A process that imports everything, says 'ready', waits for a line, then runs the operation."""
    body = textwrap.dedent(OPERATIONS[operation]).format(src=str(src), dest=str(dest))
    script = "import sys, time, sepstore\n" + body + "\nprint('ready', flush=True)\nsys.stdin.readline()\n"
    script += "t = time.perf_counter(); run(); print(time.perf_counter() - t, flush=True)\n"
    return subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def start(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
    proc.stdin.write("go\n")
    proc.stdin.flush()


@pytest.mark.parametrize("operation", ["dump", "convert", "push"])
def test_killed_writers_leave_a_consistent_store_and_a_rerun_completes(tmp_path: Path, operation: str) -> None:
    src, dest = tmp_path / "checkpoint", tmp_path / "dest"
    sd = checkpoint(src, seed=1)
    sepstore.convert(src, tmp_path / "checkpoint-store", name="m", tag="v1", quiet=True)
    timing = child(operation, src, tmp_path / "timing")
    start(timing)
    out, err = timing.communicate(timeout=120)
    assert timing.returncode == 0, err
    duration = float(out.strip())
    rng = random.Random(1234)
    for _ in range(KILLS):
        proc = child(operation, src, dest)
        start(proc)
        time.sleep(rng.uniform(0, duration))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert_consistent(dest)
    again = child(operation, src, dest)
    start(again)
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert_consistent(dest)
    loaded = sepstore.load(dest, "f", name="m", tag="v1").to_dict()
    assert torch.equal(loaded["mid.5.mlp.up_proj.weight"], sd["model.layers.5.mlp.up_proj.weight"])
    assert sepstore.read_manifest(dest, name="m", tag="v1") == sepstore.read_manifest(tmp_path / "timing")


def test_concurrent_dumps_into_one_tag_combine(tmp_path: Path) -> None:
    sd = tiny_llama_state_dict(layers=8, hidden=32, intermediate=64, vocab=128, seed=2)
    shards = [{k: v for k, v in sd.items() if hash(k) % 4 == i} for i in range(4)]
    for i, shard in enumerate(shards):
        save_file(shard, tmp_path / f"shard{i}.safetensors")
    script = textwrap.dedent(f"""
        import sys, sepstore
        from safetensors.torch import load_file
        from sepstore.demo import llama_decider
        shard = load_file(sys.argv[1])
        sepstore.dump(llama_decider, shard, {str(tmp_path / "store")!r}, tag="v1", quiet=True)
    """)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / f"shard{i}.safetensors")], stderr=subprocess.PIPE
        )
        for i in range(4)
    ]
    for proc in procs:
        assert proc.wait(timeout=180) == 0, proc.stderr.read() if proc.stderr else ""
    whole = sepstore.dump(llama_decider, sd, tmp_path / "whole", tag="v1", quiet=True)
    combined = sepstore.read_manifest(tmp_path / "store")
    assert (combined.begin, combined.mid, combined.end) == (whole.begin, whole.mid, whole.end)
    assert_consistent(tmp_path / "store")


class _PublishesMeanwhile(dict):  # type: ignore[type-arg]
    """A state dict that, when dump first reads a tensor (after it has read the tag's manifest),
    lets another publisher combine its own layer into the same tag."""

    def __init__(self, tensors: dict[str, torch.Tensor], other: Callable[[], object]) -> None:
        super().__init__(tensors)
        self.other: Callable[[], object] | None = other

    def __getitem__(self, key: str) -> torch.Tensor:
        if self.other is not None:
            other, self.other = self.other, None
            other()
        return super().__getitem__(key)


def test_combining_dumps_on_s3_never_lose_another_publishers_layer(moto_server: CountingMotoServer) -> None:
    """S3 has no locks: a dump that combines with a manifest replaces it only if it is unchanged
    (If-Match), so a publisher that lost the race is told to run again instead of dropping a layer."""
    sd = tiny_llama_state_dict(layers=3, hidden=16, intermediate=16, vocab=32, seed=11)
    bucket = f"combine-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(bucket)
    store = f"s3://{bucket}/store"
    layer = {k: v for k, v in sd.items() if k.startswith(("model.layers.0.", "model.embed"))}
    sepstore.dump(llama_decider, layer, store, name="m", quiet=True)
    second = {k: v for k, v in sd.items() if k.startswith("model.layers.1.")}
    third = {k: v for k, v in sd.items() if k.startswith("model.layers.2.")}

    def other() -> object:
        return sepstore.dump(llama_decider, second, store, name="m", quiet=True)

    with pytest.raises(sepstore.StoreError, match=r"another publisher.*run the dump again"):
        sepstore.dump(llama_decider, _PublishesMeanwhile(third, other), store, name="m", quiet=True)
    kept = sepstore.read_manifest(store, name="m")
    assert kept.mid[1] is not None, "the other publisher's layer is still there"
    sepstore.dump(llama_decider, third, store, name="m", quiet=True)  # the retry the error asks for
    final = sepstore.read_manifest(store, name="m")
    assert all(part is not None for part in final.mid) and len(final.mid) == 3
    assert sepstore.verify(store, name="m").ok


def test_concurrent_pushes_of_overlapping_models_into_one_store(tmp_path: Path) -> None:
    base = tiny_llama_state_dict(layers=6, hidden=32, intermediate=64, vocab=128, seed=8)
    for i in range(4):
        variant = dict(base)
        variant[f"model.layers.{i}.mlp.up_proj.weight"] = variant[f"model.layers.{i}.mlp.up_proj.weight"] + 1
        sepstore.dump(llama_decider, variant, tmp_path / "src", tag=f"v{i}", quiet=True)
    script = "import sys, sepstore; sepstore.push(sys.argv[1], sys.argv[2], quiet=True)"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / f"src/manifests/model/v{i}.json"), str(tmp_path / "dest")],
            stderr=subprocess.PIPE,
        )
        for i in range(4)
    ]
    for proc in procs:
        assert proc.wait(timeout=180) == 0, proc.stderr.read() if proc.stderr else ""
    assert sepstore.Store(tmp_path / "dest").list_manifests() == [("model", f"v{i}") for i in range(4)]
    assert_consistent(tmp_path / "dest")
    assert len(list((tmp_path / "dest/parts/blake3").glob("[0-9a-f]*"))) == 8 + 4  # shared parts stored once


def race_pushes(sources: list[Path], dest: str) -> list[BaseException | None]:
    barrier = threading.Barrier(len(sources))
    results: list[BaseException | None] = [None] * len(sources)

    def publish(i: int) -> None:
        barrier.wait()
        try:
            sepstore.push(sources[i], dest, quiet=True)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(len(sources))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_two_publishers_of_one_tag_cannot_silently_overwrite_each_other(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    sources = []
    for seed in (3, 4, 5):
        sd = tiny_llama_state_dict(layers=2, hidden=16, intermediate=16, vocab=32, seed=seed)
        sepstore.dump(llama_decider, sd, tmp_path / f"src{seed}", name="m", tag="v1", quiet=True)
        sources.append(tmp_path / f"src{seed}")
    if backend == "s3":
        request.getfixturevalue("moto_server")
        bucket = f"race-{uuid.uuid4().hex[:12]}"
        fsspec.filesystem("s3").mkdir(bucket)
        dest = f"s3://{bucket}/store"
    else:
        dest = str(tmp_path / "dest")
    results = race_pushes(sources, dest)
    winners = [i for i, r in enumerate(results) if r is None]
    assert len(winners) == 1, results
    assert all(isinstance(r, sepstore.StoreError) for r in results if r is not None)
    published = sepstore.resolve(f"{dest}/manifests/m/v1.json").digest
    assert published == digest_file(sources[winners[0]] / "manifests/m/v1.json")


# -- a hostile network -------------------------------------------------------------------------


@dataclass
class Hostile:
    """A model published behind a fault-injecting proxy: ``url`` is its manifest through the proxy."""

    proxy: FaultProxy
    url: str
    options: dict[str, str]
    state_dict: dict[str, torch.Tensor]

    def load(self, spec: str, cache: Path) -> sepstore.PartStateDict:
        return sepstore.load(self.url, spec, cache_dir=cache, storage_options=self.options)


@pytest.fixture(params=["http", "s3"])
def hostile(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Hostile]:
    sd = tiny_llama_state_dict(layers=2, hidden=32, intermediate=64, vocab=128, seed=6)
    if request.param == "http":
        www = tmp_path / "www"
        sepstore.dump(llama_decider, sd, www / "store", quiet=True)
        upstream: StaticServer | None = StaticServer(www)
        upstream.start()
        proxy = FaultProxy(upstream.url)
        proxy.start()
        hostile = Hostile(proxy, f"{proxy.url}/store/manifests/model/latest.json", {}, sd)
    else:
        server: CountingMotoServer = request.getfixturevalue("moto_server")
        upstream = None
        bucket = f"hostile-{uuid.uuid4().hex[:12]}"
        fsspec.filesystem("s3").mkdir(bucket)
        sepstore.dump(llama_decider, sd, f"s3://{bucket}/store", quiet=True)
        proxy = FaultProxy(server.endpoint)
        proxy.start()
        options = {"endpoint_url": proxy.url, "skip_instance_cache": True}
        hostile = Hostile(proxy, f"s3://{bucket}/store/manifests/model/latest.json", options, sd)  # type: ignore[arg-type]
    proxy.faults.match = "/parts/blake3/"
    yield hostile
    proxy.stop()
    if upstream is not None:
        upstream.stop()


@pytest.mark.parametrize("fault", ["drops", "errors", "flips"])
def test_faults_in_transit_are_survived_with_correct_tensors(hostile: Hostile, tmp_path: Path, fault: str) -> None:
    setattr(hostile.proxy.faults, fault, 1)
    psd = hostile.load("1-2", tmp_path / "cache")
    assert torch.equal(psd.mid[1]["mlp.up_proj.weight"], hostile.state_dict["model.layers.1.mlp.up_proj.weight"])
    assert getattr(hostile.proxy.faults, fault) == 0


def test_a_server_that_always_flips_bits_is_refused_and_the_cache_stays_clean(hostile: Hostile, tmp_path: Path) -> None:
    hostile.proxy.faults.flips = 100
    cache = tmp_path / "cache"
    # sepstore's digest check refuses it (IntegrityError); on S3, botocore's CRC check sees it first (StoreError)
    with pytest.raises((sepstore.IntegrityError, sepstore.StoreError), match=r"parts/blake3/[0-9a-f]{64}"):
        hostile.load("e", cache)
    assert not list((cache / "parts/blake3").iterdir())  # nothing under a digest name; a .partial may wait for resume


def test_a_stalled_server_times_out(hostile: Hostile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEPSTORE_TIMEOUT", "1")
    monkeypatch.setattr(sepstore.retry, "BASE_DELAY", 0.01)
    monkeypatch.setattr(sepstore.retry, "ATTEMPTS", 3)
    hostile.proxy.faults.stalls, hostile.proxy.faults.stall_seconds = 1, 3
    began = time.monotonic()
    psd = hostile.load("b", tmp_path / "cache")  # one stall, then a retry that works
    assert torch.equal(psd.begin["embed_tokens.weight"], hostile.state_dict["model.embed_tokens.weight"])  # type: ignore[index]
    hostile.proxy.faults.stalls = 1000
    with pytest.raises(sepstore.StoreError, match="parts/blake3"):
        hostile.load("e", tmp_path / "cache")
    assert time.monotonic() - began < 60


# -- hostile part headers ---------------------------------------------------------------------


header_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=20,
)
entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "BF16", "U8", "Q4", "", "F64"]) | header_values,
        "shape": st.lists(st.integers(-3, 2**40), max_size=4) | header_values,
        "data_offsets": st.lists(st.integers(-5, 2**62), min_size=0, max_size=3) | header_values,
    }
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.text(max_size=6), entries | header_values, max_size=4),
    st.binary(max_size=64),
    st.integers(0, 2**64 - 1) | st.none(),
)
def test_fuzzed_part_headers_are_refused_with_integrity_errors(
    header: dict[str, object], payload: bytes, length: int | None
) -> None:
    encoded = json.dumps(header).encode()
    data = struct.pack("<Q", len(encoded) if length is None else length) + encoded + payload
    try:
        entries = parse_header(data, len(data), where="fuzz")
    except sepstore.IntegrityError:
        return
    position = 8 + len(encoded)
    for entry in sorted(entries.values(), key=lambda e: e.start):
        assert entry.start == position and entry.end <= len(data)
        position = entry.end
    assert position == len(data)


def test_a_huge_header_length_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    with pytest.raises(sepstore.IntegrityError, match="header length"):
        parse_header(struct.pack("<Q", 2**63) + b"{}", 10, where="x")


def test_no_code_path_unpickles_a_store() -> None:
    source = Path(sepstore.__file__).parent
    for path in source.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "from pickle" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"
