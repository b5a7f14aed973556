"""One conformance suite for every backend: local disk, memory://, S3 (moto's server) and HTTP
(aiohttp), all real servers on 127.0.0.1. Publish, load by URL, fetch only what a spec needs,
dedup on republish, refuse corrupt parts without caching them, survive faults, share a cache."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pytest
import torch
from conftest import same_bytes
from servers import CountingMotoServer, Faults, Request, StaticServer

import sepstore
import sepstore.cache
from sepstore.demo import llama_decider, tiny_llama_state_dict
from sepstore.hashing import digest_file

N_LAYERS = 4


@dataclass
class Backend:
    kind: str
    root: str  # the store as nodes read it
    dest: str  # the store as a publisher writes it (differs only for HTTP, served from disk)
    fs: fsspec.AbstractFileSystem  # where dest's objects are, to corrupt or delete them
    fs_root: str
    requests: list[Request] | None = None
    faults: Faults | None = None

    def manifest_url(self, tag: str = "v1") -> str:
        return f"{self.root}/manifests/tiny/{tag}.json"

    def part_object(self, part: sepstore.ManifestPart) -> str:
        return f"{self.fs_root}/parts/blake3/{part.digest[7:]}.safetensors"

    def part_gets(self) -> list[Request]:
        return [r for r in self.requests or [] if r.method == "GET" and "/parts/blake3/" in r.path]


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[StaticServer, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    server = StaticServer(root).start()
    yield server, root
    server.stop()


def make_backend(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if kind == "local":
        path = str(tmp_path / "remote")
        return Backend(kind, path, path, fsspec.filesystem("file"), path)
    if kind == "memory":
        path = f"/sepstore-{uuid.uuid4().hex}/store"
        return Backend(kind, f"memory://{path}", f"memory://{path}", fsspec.filesystem("memory"), path)
    if kind == "s3":
        server: CountingMotoServer = request.getfixturevalue("moto_server")
        bucket = f"bucket-{uuid.uuid4().hex[:12]}"
        fs = fsspec.filesystem("s3", endpoint_url=server.endpoint)
        fs.mkdir(bucket)
        server.requests.clear()
        server.faults = Faults()
        url = f"s3://{bucket}/store"
        return Backend(kind, url, url, fs, f"{bucket}/store", server.requests, server.faults)
    http, www = request.getfixturevalue("http_root")
    return Backend(kind, f"{http.url}/store", str(www / "store"), fsspec.filesystem("file"), str(www / "store"),
                   http.requests, http.faults)  # fmt: skip


@pytest.fixture(params=["local", "memory", "s3", "http"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Every backend."""
    return make_backend(request.param, request, tmp_path)


@pytest.fixture(params=["memory", "s3", "http"])
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """The backends whose parts are fetched into the cache (a local store is read in place)."""
    return make_backend(request.param, request, tmp_path)


@pytest.fixture(params=["s3", "http"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """The backends behind a real server, which counts requests and injects faults."""
    return make_backend(request.param, request, tmp_path)


@pytest.fixture(params=["local", "s3", "http"])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """The backends several processes can reach (a memory:// store lives in one process)."""
    return make_backend(request.param, request, tmp_path)


def v1() -> dict[str, torch.Tensor]:
    return tiny_llama_state_dict(layers=N_LAYERS, hidden=32, intermediate=64, vocab=128, seed=7)


def publish(tmp_path: Path, backend: Backend, sd: dict[str, torch.Tensor], tag: str) -> sepstore.PushReport:
    local = tmp_path / f"build-{tag}"
    sepstore.dump(llama_decider, sd, local, name="tiny", tag=tag)
    return sepstore.push(local, backend.dest, quiet=True)


@pytest.fixture
def published(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, torch.Tensor]:
    """v1 published to the backend the test asks for (whichever of the backend fixtures it uses)."""
    name = next(n for n in ("backend", "remote", "served", "shared") if n in request.fixturenames)
    backend: Backend = request.getfixturevalue(name)
    sd = v1()
    publish(tmp_path, backend, sd, "v1")
    if backend.requests is not None:
        backend.requests.clear()
    return sd


def test_publish_then_load_by_url(backend: Backend, published: dict[str, torch.Tensor], tmp_path: Path) -> None:
    psd = sepstore.load(backend.manifest_url(), "b 0-2", cache_dir=tmp_path / "cache")
    assert same_bytes(psd.begin["embed_tokens.weight"], published["model.embed_tokens.weight"])  # type: ignore[index]
    assert same_bytes(psd.mid[1]["mlp.down_proj.weight"], published["model.layers.1.mlp.down_proj.weight"])
    assert sepstore.verify(backend.manifest_url()).ok


def test_store_root_with_name_and_tag_loads(
    backend: Backend, published: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    psd = sepstore.load(backend.root, "e", name="tiny", tag="v1", cache_dir=tmp_path / "cache")
    assert same_bytes(psd.end["lm_head.weight"], published["lm_head.weight"])  # type: ignore[index]


def test_only_the_parts_a_spec_needs_are_fetched(
    backend: Backend, published: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    report = sepstore.pull(backend.manifest_url(), "2-4", cache_dir=cache, quiet=True)
    manifest = sepstore.read_manifest(backend.manifest_url())
    wanted = {manifest.mid[2].digest[7:], manifest.mid[3].digest[7:]}  # type: ignore[union-attr]
    cached = {p.stem for p in (cache / "parts/blake3").glob("*")}
    if backend.kind == "local":
        assert report.fetched == [] and cached == set()  # local parts are read in place
        return
    assert sorted(report.fetched) == ["mid.2", "mid.3"]
    assert cached == wanted
    if backend.requests is not None:
        assert {r.path.rsplit("/", 1)[1].removesuffix(".safetensors") for r in backend.part_gets()} == wanted
    again = sepstore.pull(backend.manifest_url(), "2-4", cache_dir=cache, quiet=True)
    assert again.fetched == [] and again.present_bytes == report.fetched_bytes


def test_republishing_one_changed_layer_uploads_one_part(backend: Backend, tmp_path: Path) -> None:
    sd = v1()
    first = publish(tmp_path, backend, sd, "v1")
    assert len(first.uploaded) == N_LAYERS + 2
    sd["model.layers.2.self_attn.v_proj.weight"] = sd["model.layers.2.self_attn.v_proj.weight"] * 2
    if backend.requests is not None:
        backend.requests.clear()
    second = publish(tmp_path, backend, sd, "v2")
    assert second.uploaded == ["mid.2"]
    assert len(second.skipped) == N_LAYERS + 1
    if backend.kind == "s3":
        puts = [r.path for r in backend.requests or [] if r.method == "PUT"]
        assert len([p for p in puts if "/parts/blake3/" in p]) == 1
        assert puts[-1].endswith("/manifests/tiny/v2.json")  # the manifest goes last
    node = tmp_path / "node-cache"
    sepstore.pull(backend.manifest_url("v1"), "f", cache_dir=node, quiet=True)
    upgrade = sepstore.pull(backend.manifest_url("v2"), "f", cache_dir=node, quiet=True)
    if backend.kind != "local":
        assert upgrade.fetched == ["mid.2"]
    changes = sepstore.diff(backend.manifest_url("v1"), backend.manifest_url("v2"))
    assert [p.part for p in changes.changed] == ["mid.2"]
    assert changes.bytes_to_fetch == upgrade.fetched_bytes or backend.kind == "local"


def test_a_part_corrupted_at_the_server_is_refused_and_not_cached(
    backend: Backend, published: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    manifest = sepstore.read_manifest(backend.manifest_url())
    target = manifest.mid[1]
    assert target is not None
    data = bytearray(backend.fs.cat_file(backend.part_object(target)))
    data[len(data) // 2] ^= 0x40
    backend.fs.pipe_file(backend.part_object(target), bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(sepstore.IntegrityError, match=r"mid\.1") as info:
        sepstore.load(backend.manifest_url(), "1-2", cache_dir=cache)
    assert target.digest[7:] in str(info.value)
    assert [p for p in cache.rglob("*") if p.is_file()] == [], "no partial file, no lock file"
    report = sepstore.verify(backend.manifest_url())
    assert [c.part for c in report.failures] == ["mid.1"]
    assert sepstore.load(backend.manifest_url(), "0-1", cache_dir=cache).mid[0]  # the others still load


def test_a_missing_object_is_not_found_naming_the_url(
    backend: Backend, published: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    manifest = sepstore.read_manifest(backend.manifest_url())
    assert manifest.end is not None
    backend.fs.rm(backend.part_object(manifest.end))
    with pytest.raises(sepstore.NotFoundError, match=manifest.end.digest[7:]):
        sepstore.load(backend.manifest_url(), "e", cache_dir=tmp_path / "cache")
    with pytest.raises(sepstore.NotFoundError, match=r"nope\.json"):
        sepstore.read_manifest(f"{backend.root}/manifests/tiny/nope.json")


def test_large_parts_are_fetched_as_concurrent_ranged_reads(
    backend: Backend, published: dict[str, torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sepstore.cache, "CHUNK_BYTES", 4096)
    manifest = sepstore.read_manifest(backend.manifest_url())
    psd = sepstore.load(backend.manifest_url(), "b", cache_dir=tmp_path / "cache")
    assert same_bytes(psd.begin["embed_tokens.weight"], published["model.embed_tokens.weight"])  # type: ignore[index]
    if backend.requests is not None:
        ranges = {r.range for r in backend.part_gets()}
        assert len(ranges) == -(-manifest.begin.size // 4096)  # type: ignore[union-attr]
        assert "bytes=4096-8191" in ranges


def test_a_static_server_without_range_support_serves_large_parts_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m http.server`` answers a ranged GET with the whole file: the part is taken whole
    from the first answer and its other chunks are not asked for again and again."""
    monkeypatch.setattr(sepstore.cache, "CHUNK_BYTES", 1024)
    monkeypatch.setattr(sepstore.retry, "ATTEMPTS", 1)  # no retry may hide a refused answer
    sd = v1()
    manifest = sepstore.dump(llama_decider, sd, tmp_path / "www" / "store", name="tiny", tag="v1", quiet=True)
    server = StaticServer(tmp_path / "www", ranges=False).start()
    try:
        url = f"{server.url}/store/manifests/tiny/v1.json"
        report = sepstore.pull(url, "b 0-2", cache_dir=tmp_path / "cache", quiet=True)  # 8 workers
        psd = sepstore.load(url, "b 0-2", cache_dir=tmp_path / "cache")
        part_gets = [r for r in server.requests if r.method == "GET" and "/parts/" in r.path]
        assert sepstore.verify(url, cache_dir=tmp_path / "verify-cache").ok
    finally:
        server.stop()
    assert manifest.begin is not None and manifest.begin.size > 8 * 1024
    assert len(report.fetched) == 3
    assert same_bytes(psd.begin["embed_tokens.weight"], sd["model.embed_tokens.weight"])  # type: ignore[index]
    assert len(part_gets) == 3, "one GET per part, each answered with the whole part"


@pytest.mark.parametrize("fault", ["drops", "errors"])
@pytest.mark.parametrize("where", ["/parts/blake3/", "/manifests/"])
def test_dropped_connections_and_503s_are_retried(
    served: Backend, published: dict[str, torch.Tensor], tmp_path: Path, fault: str, where: str
) -> None:
    backend = served
    assert backend.faults is not None
    backend.faults.match = where
    setattr(backend.faults, fault, 2)
    psd = sepstore.load(backend.manifest_url(), "3-4 e", cache_dir=tmp_path / "cache")
    assert same_bytes(psd.mid[3]["mlp.up_proj.weight"], published["model.layers.3.mlp.up_proj.weight"])
    assert getattr(backend.faults, fault) == 0


@pytest.mark.parametrize(
    ("where", "named"),
    [("/parts/blake3/", r"parts/blake3/[0-9a-f]{64}\.safetensors"), ("/manifests/", r"manifests/tiny/v1\.json")],
)
def test_a_server_that_keeps_failing_is_a_store_error_naming_the_url(
    served: Backend,
    published: dict[str, torch.Tensor],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    named: str,
) -> None:
    """Not a NotFoundError, even where fsspec's HTTP filesystem reports the 503s as "not found".

    botocore's own retries (five attempts, up to seconds of backoff each) are turned off for S3, so
    that each of sepstore's tries is one request and the test takes a second, not forty."""
    backend = served
    assert backend.faults is not None and backend.requests is not None
    monkeypatch.setattr(sepstore.retry, "BASE_DELAY", 0.01)
    backend.faults.match = where
    backend.faults.errors = 1000
    cache = tmp_path / "cache"
    one_attempt = {"config_kwargs": {"retries": {"total_max_attempts": 1}}} if backend.kind == "s3" else None
    with pytest.raises(sepstore.StoreError, match=named + ".*after 5 tries"):
        sepstore.load(backend.manifest_url(), "0-1", cache_dir=cache, storage_options=one_attempt)
    assert not list(cache.rglob("*.safetensors"))
    assert len([r for r in backend.requests if r.method == "GET" and where in r.path]) == sepstore.retry.ATTEMPTS


def test_an_interrupted_pull_resumes_where_it_stopped(
    remote: Backend, published: dict[str, torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = remote
    monkeypatch.setattr(sepstore.cache, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(sepstore.retry, "ATTEMPTS", 1)
    cache = tmp_path / "cache"
    calls = {"n": 0}
    real = sepstore.cache._Download.fetch_chunk

    def dies_after_one(self: sepstore.cache._Download, index: int, bar: object) -> None:
        calls["n"] += 1
        if calls["n"] > 1:
            raise sepstore.StoreError("killed")
        real(self, index, bar)  # type: ignore[arg-type]

    monkeypatch.setattr(sepstore.cache._Download, "fetch_chunk", dies_after_one)
    with pytest.raises(sepstore.StoreError, match="killed"):
        sepstore.pull(backend.manifest_url(), "b", cache_dir=cache, workers=1, quiet=True)
    assert list((cache / "incoming").glob("*.partial"))
    monkeypatch.setattr(sepstore.cache._Download, "fetch_chunk", real)
    if backend.requests is not None:
        backend.requests.clear()
    report = sepstore.pull(backend.manifest_url(), "b", cache_dir=cache, quiet=True)
    assert report.fetched == ["begin"]
    manifest = sepstore.read_manifest(backend.manifest_url())
    assert report.transferred_bytes == manifest.begin.size - 4096, "the first chunk came in the first call"  # type: ignore[union-attr]
    if backend.requests is not None:
        assert len(backend.part_gets()) == -(-manifest.begin.size // 4096) - 1  # type: ignore[union-attr]
    path = cache / "parts/blake3" / f"{manifest.begin.digest[7:]}.safetensors"  # type: ignore[union-attr]
    assert digest_file(path) == manifest.begin.digest  # type: ignore[union-attr]
    assert not list((cache / "incoming").glob("*.partial*"))


def test_parts_url_reads_parts_from_a_mirror_still_verified(
    backend: Backend, published: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    mirror = tmp_path / "mirror"
    sepstore.push(backend.manifest_url(), mirror, quiet=True)
    manifest = sepstore.read_manifest(backend.manifest_url())
    mirror_parts = str(mirror / "parts/blake3")
    psd = sepstore.load(backend.manifest_url(), "2-3", parts_url=mirror_parts, cache_dir=tmp_path / "cache")
    assert same_bytes(psd.mid[2]["mlp.gate_proj.weight"], published["model.layers.2.mlp.gate_proj.weight"])
    bad = mirror / "parts/blake3" / f"{manifest.mid[3].digest[7:]}.safetensors"  # type: ignore[union-attr]
    bad.write_bytes(bad.read_bytes()[:-1] + b"\x00")
    with pytest.raises(sepstore.IntegrityError, match=str(bad)):
        sepstore.load(backend.manifest_url(), "3-4", parts_url=mirror_parts, cache_dir=tmp_path / "cache")


def test_push_refuses_to_replace_a_tag_holding_another_manifest(backend: Backend, tmp_path: Path) -> None:
    publish(tmp_path, backend, v1(), "v1")
    other = v1()
    other["model.norm.weight"] = other["model.norm.weight"] * 2
    local = tmp_path / "other"
    sepstore.dump(llama_decider, other, local, name="tiny", tag="v1")
    with pytest.raises(sepstore.StoreError, match="force"):
        sepstore.push(local, backend.dest, quiet=True)
    assert sepstore.read_manifest(backend.manifest_url()).end == sepstore.read_manifest(tmp_path / "build-v1").end
    report = sepstore.push(local, backend.dest, force=True, quiet=True)
    assert report.uploaded == ["end"] and report.manifest_written
    assert sepstore.read_manifest(backend.manifest_url()).end == sepstore.read_manifest(local).end


def test_push_keeps_the_manifest_digest(backend: Backend, tmp_path: Path) -> None:
    publish(tmp_path, backend, v1(), "v1")
    local = tmp_path / "build-v1/manifests/tiny/v1.json"
    pinned = digest_file(local)
    assert sepstore.resolve(backend.manifest_url()).digest == pinned
    assert sepstore.load(backend.manifest_url(), "e", digest=pinned, cache_dir=tmp_path / "c").end


def test_files_lists_the_urls_of_the_parts_a_spec_needs(shared: Backend, published: dict[str, torch.Tensor]) -> None:
    backend = shared
    result = subprocess.run(
        [sys.executable, "-m", "sepstore", "files", backend.manifest_url(), "--spec", "b 0-1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = sepstore.read_manifest(backend.manifest_url())
    base = f"{backend.root}/parts/blake3"
    assert (
        result.stdout.split()
        == [
            f"{base}/{manifest.begin.digest[7:]}.safetensors",  # type: ignore[union-attr]
            f"{base}/{manifest.mid[0].digest[7:]}.safetensors",  # type: ignore[union-attr]
        ]
    )


def test_several_processes_pulling_into_one_cache(
    shared: Backend, published: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    backend = shared
    cache = tmp_path / "shared-cache"
    script = textwrap.dedent(f"""
        import sepstore, sepstore.cache
        sepstore.cache.CHUNK_BYTES = 8192
        report = sepstore.pull({backend.manifest_url()!r}, "f", cache_dir={str(cache)!r}, quiet=True)
        print(len(report.fetched))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]  # fmt: skip
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    if backend.kind != "local":
        assert sum(int(out) for out, _ in results) == N_LAYERS + 2  # each part fetched by exactly one process
        files = list((cache / "parts/blake3").iterdir())
        assert len(files) == N_LAYERS + 2
        assert all(digest_file(f) == f"blake3:{f.stem}" for f in files)
    assert sepstore.verify(backend.manifest_url(), cache_dir=cache).ok


# -- backend-specific ----------------------------------------------------------------------------


def test_http_stores_are_read_only(http_root: tuple[StaticServer, Path], store: Path) -> None:
    server, _ = http_root
    with pytest.raises(sepstore.StoreError):
        sepstore.push(store, f"{server.url}/store", quiet=True)


def test_an_http_store_root_is_never_listed_name_picks_the_latest_tag(
    http_root: tuple[StaticServer, Path], store: Path, tmp_path: Path
) -> None:
    """A folder listing over HTTP is an HTML page of any size, at any speed: it is not read."""
    server, www = http_root
    shutil.copytree(store, www / "store")
    url = f"{server.url}/store"
    with pytest.raises(sepstore.StoreError, match=r"folders are not listed .*name= \(--name\) and tag="):
        sepstore.read_manifest(url)
    assert sepstore.read_manifest(url, name="model").name == "model"
    assert not [r for r in server.requests if r.path.rstrip("/").endswith(("/store", "/manifests", "/model"))]


def test_s3_endpoint_from_storage_options(
    moto_server: CountingMotoServer, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    bucket = f"opts-{uuid.uuid4().hex[:12]}"
    options = {"endpoint_url": moto_server.endpoint, "key": "testing", "secret": "testing"}
    fsspec.filesystem("s3", **options).mkdir(bucket)
    sepstore.push(store, f"s3://{bucket}", dest_storage_options=options, quiet=True)
    psd = sepstore.load(f"s3://{bucket}", "b", storage_options=options, cache_dir=tmp_path / "cache")
    assert psd.begin


def test_a_manifest_over_http_cannot_point_at_local_files(
    http_root: tuple[StaticServer, Path], store: Path, tmp_path: Path
) -> None:
    server, www = http_root
    sepstore.push(store, www / "store", quiet=True)
    path = www / "store/manifests/model/latest.json"
    path.write_text(path.read_text().replace('"../../parts/blake3"', f'"{store}/parts/blake3"'))
    with pytest.raises(sepstore.ManifestError, match="another protocol"):
        sepstore.load(f"{server.url}/store/manifests/model/latest.json", "b", cache_dir=tmp_path / "c")
