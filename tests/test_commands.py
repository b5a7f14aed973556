"""The everyday commands: ``tags``/``ls`` over a store, ``cache ls|verify|prune``, and
``diff --exit-code``, through the command line (a subprocess, as a user runs them) and Python."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pytest
import torch
from servers import CountingMotoServer, StaticServer

import sepstore
import sepstore.reader
from sepstore.cache import Cache
from sepstore.cli import main as cli
from sepstore.delta import INDEX_DIR
from sepstore.demo import llama_decider, tiny_llama_state_dict
from sepstore.hashing import digest_file, digest_hex
from sepstore.manifest import Part
from sepstore.store import file_lock

OLD = 1_600_000_000  # a time of last use long before any test ran


def run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sepstore", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def two_versions(root: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """``acme/llama`` v1 and v2 (layer 2 changed) and ``other:latest`` in the store at ``root``."""
    sepstore.dump(llama_decider, state_dict, root, name="acme/llama", tag="v1")
    changed = dict(state_dict)
    changed["model.layers.2.mlp.up_proj.weight"] = changed["model.layers.2.mlp.up_proj.weight"] * 2
    sepstore.dump(llama_decider, changed, root, name="acme/llama", tag="v2")
    sepstore.dump(llama_decider, changed, root, name="other")


# -- tags ------------------------------------------------------------------------------------------


def test_tags_lists_every_model_and_tag_with_digest_layers_bytes_and_date(
    tmp_path: Path, state_dict: dict[str, torch.Tensor]
) -> None:
    root = tmp_path / "store"
    two_versions(root, state_dict)
    rows = sepstore.tags(root)
    assert [(r.name, r.tag) for r in rows] == [("acme/llama", "v1"), ("acme/llama", "v2"), ("other", "latest")]
    for row in rows:
        path = root / "manifests" / row.name / f"{row.tag}.json"
        manifest = sepstore.read_manifest(path)
        assert row.url == str(path) and row.digest == digest_file(path)
        assert row.layers == 6 and row.bytes == manifest.total_bytes and row.error is None
        assert row.modified is not None and row.modified.timestamp() == pytest.approx(path.stat().st_mtime)
    result = run("tags", root, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [r.to_dict() for r in rows]
    text = run("tags", root)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["NAME", "TAG", "DIGEST", "LAYERS", "SIZE", "MODIFIED", "(UTC)"]
    assert lines[1].split()[:4] == ["acme/llama", "v1", rows[0].digest[7:19], "6"]  # type: ignore[index]


def test_ls_is_tags_and_name_keeps_one_models_tags(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    two_versions(tmp_path / "store", state_dict)
    assert [r.tag for r in sepstore.tags(tmp_path / "store", name="acme/llama")] == ["v1", "v2"]
    result = run("ls", tmp_path / "store", "--name", "other", "--json")
    assert result.returncode == 0, result.stderr
    assert [(r["name"], r["tag"]) for r in json.loads(result.stdout)] == [("other", "latest")]
    none = run("ls", tmp_path / "store", "--name", "absent")
    assert none.returncode == 0 and "no models in" in none.stdout


def test_tags_lists_an_s3_store(
    tmp_path: Path, state_dict: dict[str, torch.Tensor], moto_server: CountingMotoServer
) -> None:
    two_versions(tmp_path / "store", state_dict)
    bucket = f"bucket-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", endpoint_url=moto_server.endpoint).mkdir(bucket)
    url = f"s3://{bucket}/store"
    for tag in ("v1", "v2"):
        sepstore.push(tmp_path / f"store/manifests/acme/llama/{tag}.json", url, quiet=True)
    rows = sepstore.tags(url)
    assert [(r.name, r.tag, r.layers) for r in rows] == [("acme/llama", "v1", 6), ("acme/llama", "v2", 6)]
    assert [r.digest for r in rows] == [r.digest for r in sepstore.tags(tmp_path / "store", name="acme/llama")]
    assert all(r.modified is not None and r.url == f"{url}/manifests/acme/llama/{r.tag}.json" for r in rows)
    result = run("tags", url, "--json")
    assert result.returncode == 0, result.stderr
    assert [r["digest"] for r in json.loads(result.stdout)] == [r.digest for r in rows]


def test_tags_over_http_is_refused_with_a_hint_to_give_a_manifest_url() -> None:
    with pytest.raises(sepstore.StoreError, match="HTTP server cannot list") as caught:
        sepstore.tags("http://127.0.0.1:9/store")
    assert "http://127.0.0.1:9/store/manifests/<name>/<tag>.json" in str(caught.value)
    result = run("tags", "https://models.example.com/store")
    assert result.returncode == 2 and "give a manifest URL" in result.stderr


def test_tags_refuses_a_manifest_url_and_a_missing_store(tmp_path: Path, manifest_path: Path) -> None:
    with pytest.raises(sepstore.RefError, match="tags lists a store root"):
        sepstore.tags(manifest_path)
    with pytest.raises(sepstore.NotFoundError, match="no store there"):
        sepstore.tags(tmp_path / "nothing")
    assert run("tags", tmp_path / "nothing").returncode == 2


def test_a_manifest_that_does_not_decode_is_listed_with_its_error(store: Path) -> None:
    (store / "manifests/model/broken.json").write_text("{}")
    rows = sepstore.tags(store)
    assert [(r.tag, r.error is None) for r in rows] == [("broken", False), ("latest", True)]
    assert "not a sepstore manifest" in (rows[0].error or "")
    result = run("tags", store)
    assert result.returncode == 0 and "unreadable:" in result.stdout


# -- the cache -------------------------------------------------------------------------------------


@dataclass
class Cached:
    """A model published to an in-memory store and pulled whole into the cache at ``root``."""

    url: str
    root: Path
    manifest: sepstore.Manifest

    def path(self, label: str) -> Path:
        part = dict(self.manifest.labelled_parts())[label]
        return Path(Cache(self.root).path(part))

    def digest(self, label: str) -> str:
        return dict(self.manifest.labelled_parts())[label].digest


@pytest.fixture
def cached(tmp_path: Path, manifest_path: Path) -> Iterator[Cached]:
    remote = f"memory://sepstore-{uuid.uuid4().hex}/store"
    sepstore.push(manifest_path, remote, quiet=True)
    url = f"{remote}/manifests/model/latest.json"
    root = tmp_path / "cache"
    sepstore.pull(url, cache_dir=root, quiet=True)
    yield Cached(url, root, sepstore.read_manifest(url))
    fsspec.filesystem("memory").rm(remote.removeprefix("memory://"), recursive=True)


def age(cached: Cached, order: list[str]) -> None:
    """Make the parts of ``order`` used long ago, the first longest ago (and the others later still)."""
    labels = [label for label, _ in cached.manifest.labelled_parts()]
    for i, label in enumerate([*order, *(x for x in labels if x not in order)]):
        os.utime(cached.path(label), (OLD + i, OLD + i))


def test_cache_ls_lists_parts_by_last_use_and_partial_downloads_apart(cached: Cached) -> None:
    age(cached, ["mid.3", "begin"])
    partial = cached.root / "incoming" / f"{'ab' * 32}.partial"
    with open(partial, "wb") as f:  # a stopped download: 8 KiB of a 1 MiB part
        f.write(b"x" * 8192)
        f.truncate(1 << 20)
    listing = sepstore.cache_ls(cached.root)
    parts = list(cached.manifest.labelled_parts())
    assert len(listing.parts) == len(parts)
    assert [f.digest for f in listing.parts[-2:]] == [cached.digest("begin"), cached.digest("mid.3")]
    assert {f.digest: f.size for f in listing.parts} == {p.digest: p.size for _, p in parts}
    assert listing.parts[-1].last_used.timestamp() == OLD
    assert [(f.digest, f.active) for f in listing.partial] == [(f"blake3:{'ab' * 32}", False)]
    assert 8192 <= listing.partial[0].size < 1 << 20  # what it holds, not its length
    assert listing.total_bytes == sum(p.size for _, p in parts) + listing.partial[0].size
    result = run("cache", "ls", "--json", env={"SEPSTORE_CACHE": str(cached.root)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == listing.to_dict()
    text = run("cache", "ls", "--cache-dir", cached.root)
    assert text.returncode == 0, text.stderr
    assert "partial downloads" in text.stdout and "stopped" in text.stdout
    assert f"{len(parts)} parts" in text.stdout


def test_an_empty_or_missing_cache_lists_nothing(tmp_path: Path) -> None:
    listing = sepstore.cache_ls(tmp_path / "no-cache-yet")
    assert listing.parts == [] and listing.partial == [] and listing.total_bytes == 0
    assert sepstore.cache_prune(0, cache_dir=tmp_path / "no-cache-yet").removed == []


def test_cache_verify_finds_a_corrupted_part_and_repair_removes_it(cached: Cached) -> None:
    path = cached.path("mid.2")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(data)
    found = run("cache", "verify", "--cache-dir", cached.root)
    assert found.returncode == 1
    assert cached.digest("mid.2")[7:19] in found.stdout and "DAMAGED" in found.stdout and "--repair" in found.stdout
    report = json.loads(run("cache", "verify", "--cache-dir", cached.root, "--json").stdout)
    assert [p["digest"] for p in report["parts"] if not p["ok"]] == [cached.digest("mid.2")]
    assert report["ok"] is False and path.exists()
    repaired = run("cache", "verify", "--repair", "--cache-dir", cached.root)
    assert repaired.returncode == 0, repaired.stdout
    assert "removed 1 damaged part" in repaired.stdout and "next load or pull" in repaired.stdout
    assert not path.exists()
    assert sepstore.cache_verify(cached.root).ok
    assert sepstore.load(cached.url, "2-3", cache_dir=cached.root).mid[2]  # fetched again, verified
    assert digest_file(path) == cached.digest("mid.2")


def test_cache_prune_removes_least_recently_used_first(cached: Cached) -> None:
    age(cached, ["mid.4", "end", "mid.0"])
    sizes = {label: part.size for label, part in cached.manifest.labelled_parts()}
    total = sum(sizes.values())
    keep_below = total - sizes["mid.4"] - sizes["end"]  # the two least recently used must go
    dry = sepstore.cache_prune(keep_below, cache_dir=cached.root, dry_run=True)
    assert [f.digest for f in dry.removed] == [cached.digest("mid.4"), cached.digest("end")]
    assert cached.path("mid.4").exists() and dry.bytes_after == keep_below
    result = run("cache", "prune", "--max-size", f"{keep_below}B", "--cache-dir", cached.root, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [f["digest"] for f in report["removed"]] == [cached.digest("mid.4"), cached.digest("end")]
    assert report["bytes_before"] == total and report["bytes_after"] == keep_below
    assert not cached.path("mid.4").exists() and not cached.path("end").exists() and cached.path("mid.0").exists()
    text = run("cache", "prune", "--max-size", "0", "--cache-dir", cached.root, "--dry-run")
    assert text.returncode == 0 and f" in {len(sizes) - 2} files (" in text.stdout
    assert cached.path("mid.0").exists()
    bad = run("cache", "prune", "--max-size", "20 gigs", "--cache-dir", cached.root)
    assert bad.returncode == 2 and "as a size" in bad.stderr


def test_reading_a_cached_part_marks_it_used(cached: Cached) -> None:
    age(cached, [])
    sepstore.load(cached.url, "3-4", cache_dir=cached.root)
    listing = sepstore.cache_ls(cached.root)
    assert listing.parts[0].digest == cached.digest("mid.3")
    assert listing.parts[0].last_used.timestamp() > OLD + 100
    assert all(f.last_used.timestamp() < OLD + 100 for f in listing.parts[1:])


def test_a_part_being_read_is_not_pruned(cached: Cached, monkeypatch: pytest.MonkeyPatch) -> None:
    reading, release = threading.Event(), threading.Event()
    copy = sepstore.reader._copied

    def paused(*args: object, **kwargs: object) -> torch.Tensor:  # the read, held open halfway
        reading.set()
        assert release.wait(120)
        return copy(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sepstore.reader, "_copied", paused)
    loaded: list[sepstore.PartStateDict] = []
    reader = threading.Thread(target=lambda: loaded.append(sepstore.load(cached.url, "1-2", cache_dir=cached.root)))
    reader.start()
    try:
        assert reading.wait(120)
        result = run("cache", "prune", "--max-size", "0", "--cache-dir", cached.root, "--json")
    finally:
        release.set()
        reader.join()
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [f["digest"] for f in report["in_use"]] == [cached.digest("mid.1")]
    assert len(report["removed"]) == len(list(cached.manifest.labelled_parts())) - 1
    assert cached.path("mid.1").exists() and loaded and loaded[0].mid[1]
    after = sepstore.cache_prune(0, cache_dir=cached.root)  # read finished: now it goes
    assert [f.digest for f in after.removed] == [cached.digest("mid.1")] and after.bytes_after == 0


def test_a_part_another_process_is_fetching_is_not_pruned(cached: Cached) -> None:
    with file_lock(Cache(cached.root).lock_path(cached.digest("begin"))):  # as Cache.fetch holds it
        report = sepstore.cache_prune(0, cache_dir=cached.root)
        assert [f.digest for f in report.in_use] == [cached.digest("begin")]
        assert cached.path("begin").exists() and report.bytes_after == cached.path("begin").stat().st_size
        assert [f.active for f in sepstore.cache_ls(cached.root).partial] == []


def test_shared_lock_holders_exclude_only_exclusive_ones(tmp_path: Path) -> None:
    path = str(tmp_path / "x.lock")
    with file_lock(path, shared=True) as first, file_lock(path, shared=True, blocking=False) as second:
        assert first and second
        with file_lock(path, blocking=False) as exclusive:
            assert not exclusive
    assert not os.path.exists(path)  # the last holder deleted it
    with file_lock(path, shared=True), file_lock(path, shared=True):
        pass
    with file_lock(path, blocking=False) as exclusive:
        assert exclusive


def test_cache_commands_refuse_a_store_root(store: Path) -> None:
    with pytest.raises(sepstore.StoreError, match="is a store"):
        sepstore.cache_prune(0, cache_dir=store)
    result = run("cache", "prune", "--max-size", "0", "--cache-dir", store)
    assert result.returncode == 2 and "sepstore gc" in result.stderr
    assert sepstore.verify(store).ok


# -- diff --exit-code --------------------------------------------------------------------------------


def test_diff_exit_code_is_1_when_versions_differ_and_0_when_equal(
    tmp_path: Path, state_dict: dict[str, torch.Tensor]
) -> None:
    root = tmp_path / "store"
    two_versions(root, state_dict)
    v1, v2 = (root / f"manifests/acme/llama/{t}.json" for t in ("v1", "v2"))
    differ = run("diff", v1, v2, "--exit-code")
    assert differ.returncode == 1 and "1 part differs" in differ.stdout
    assert run("diff", v1, v2, "--exit-code", "--json").returncode == 1
    assert run("diff", v1, v1, "--exit-code").returncode == 0
    assert run("diff", v2, root / "manifests/other/latest.json", "--exit-code").returncode == 0
    assert run("diff", v1, v2).returncode == 0  # without the flag, a difference is no failure
    assert sepstore.diff(v1, v2).differs and not sepstore.diff(v1, v1).differs


def test_diff_exit_code_keeps_1_for_differ_only_errors_exit_2(tmp_path: Path, manifest_path: Path) -> None:
    sepstore.keygen(tmp_path / "k.key")
    trusting = ("--trust-key", tmp_path / "k.key.pub")  # the manifest is not signed: a TrustError
    assert run("diff", manifest_path, manifest_path, *trusting).returncode == 1
    failed = run("diff", manifest_path, manifest_path, *trusting, "--exit-code")
    assert failed.returncode == 2 and "sepstore: error:" in failed.stderr


def test_a_part_pruned_between_its_fetch_and_its_read_is_fetched_again(
    cached: Cached, monkeypatch: pytest.MonkeyPatch
) -> None:
    reading = Cache.reading
    calls: list[str] = []

    def pruned_first(self: Cache, blob: Part) -> contextlib.AbstractContextManager[None]:
        if not calls:  # a prune in another process, right before the reader takes the lock
            os.unlink(self.path(blob))
        calls.append(blob.digest)
        return reading(self, blob)

    monkeypatch.setattr(Cache, "reading", pruned_first)
    loaded = sepstore.load(cached.url, "0-1", cache_dir=cached.root)
    assert calls == [cached.digest("mid.0")] * 2 and loaded.mid[0]
    assert digest_file(cached.path("mid.0")) == cached.digest("mid.0")


@pytest.mark.parametrize(
    "command", [["tags"], ["ls"], ["cache"], ["cache", "ls"], ["cache", "verify"], ["cache", "prune"]]
)
def test_every_new_command_has_help_with_an_example(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0
    shown = "tags" if command == ["ls"] else " ".join(command)
    assert "example:" in result.stdout and f"sepstore {shown}" in result.stdout


#: The exit status of a child that could not become ``nobody`` (what it wrote says why).
CANNOT_DROP_PRIVILEGES = 77


def write_all(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd`` (a pipe takes only what fits at once)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def in_a_child_that_cannot_write(call: Callable[[], None]) -> None:
    """``call()`` in a forked child that cannot write to read-only folders: one that has become
    ``nobody`` where this process is root (as in CI), whom permissions would not stop. The child has
    every module this process has imported (it may not be allowed to read this venv); its failure
    is raised here, and it is killed if it hangs. Skipped where root cannot become ``nobody``."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: it never returns to pytest
        status = 1
        try:
            os.close(read)
            signal.alarm(120)
            if os.geteuid() == 0:
                try:
                    nobody = pwd.getpwnam("nobody")
                    os.setgroups([])
                    os.setgid(nobody.pw_gid)
                    os.setuid(nobody.pw_uid)
                except (KeyError, OSError) as exc:
                    write_all(write, f"root cannot become nobody here ({type(exc).__name__}: {exc})".encode())
                    os._exit(CANNOT_DROP_PRIVILEGES)
            call()
            status = 0
        except BaseException:
            write_all(write, traceback.format_exc().encode())
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as failure:
        told = failure.read().decode()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == CANNOT_DROP_PRIVILEGES:
        pytest.skip(told)
    assert code == 0, f"in the child (exit status {code}):\n{told}"


def test_a_cache_this_user_cannot_write_to_is_still_read(cached: Cached) -> None:
    # a folder of its own that `nobody` may enter (pytest's folders are its owner's only)
    cache = Path(tempfile.mkdtemp(prefix="sepstore-read-only-")) / "cache"
    cache.parent.chmod(0o755)
    try:
        sepstore.pull(cached.url, cache_dir=cache, quiet=True)
        assert sepstore.load(cached.url, "0-1", cache_dir=cache).mid[0]  # imports what the child needs
        (cache / "incoming" / f"{'cd' * 32}.partial").write_bytes(b"x")
        for folder in [cache, cache / "parts", cache / "parts/blake3", cache / "incoming"]:
            folder.chmod(0o555)

        def reads() -> None:
            assert sepstore.load(cached.url, "0-1", cache_dir=cache).mid[0]
            assert [f.active for f in sepstore.cache_ls(cache).partial] == [False]
            assert sepstore.cache_verify(cache).ok
            with pytest.raises(sepstore.StoreError, match="Permission"):
                sepstore.cache_prune(0, cache_dir=cache)

        in_a_child_that_cannot_write(reads)
        assert sorted(f.digest for f in sepstore.cache_ls(cache).parts) == sorted(
            part.digest for _, part in cached.manifest.labelled_parts()
        ), "nothing was pruned"
    finally:
        for folder in [cache.parent, cache, *cache.rglob("*")]:  # rglob does not yield cache itself
            if folder.is_dir():
                folder.chmod(0o755)
        shutil.rmtree(cache.parent)


def test_cache_commands_count_cached_assets_too(tmp_path: Path) -> None:
    """Assets live in the cache as bare ``<hex>`` files beside the parts: ls, verify and prune see them."""
    store = tmp_path / "store"
    sepstore.dump(
        llama_decider,
        tiny_llama_state_dict(layers=1, hidden=8, intermediate=8, vocab=16),
        store,
        assets={"README.md": b"# tiny\n"},
        quiet=True,
    )
    cache = tmp_path / "cache"
    server = StaticServer(tmp_path).start()
    try:
        sepstore.pull(f"{server.url}/store/manifests/model/latest.json", cache_dir=cache, quiet=True)
    finally:
        server.stop()
    asset = sepstore.read_manifest(store).assets["README.md"]
    listed = {f.digest for f in sepstore.cache_ls(cache).parts}
    assert asset.digest in listed
    (cache / "parts/blake3" / asset.file_name).write_bytes(b"# evil\n")
    report = sepstore.cache_verify(cache, repair=True)
    assert [v.digest for v in report.parts if v.error] == [asset.digest]
    assert not (cache / "parts/blake3" / asset.file_name).exists()


def test_cache_prune_removes_a_pruned_parts_tensor_index_file_with_it(cached: Cached) -> None:
    age(cached, ["mid.4"])
    index = cached.root / INDEX_DIR / f"{digest_hex(cached.digest('mid.4'))}.json"
    kept = cached.root / INDEX_DIR / f"{digest_hex(cached.digest('mid.0'))}.json"
    index.parent.mkdir(parents=True, exist_ok=True)
    for path in (index, kept):  # written as a pull of a later version would
        path.write_text('{"size": 1, "tensors": {}}')
    total = sum(part.size for _, part in cached.manifest.labelled_parts())
    report = sepstore.cache_prune(total - 1, cache_dir=cached.root)
    assert [f.digest for f in report.removed] == [cached.digest("mid.4")]
    assert not index.exists() and kept.exists()


def test_summaries_count_parts_and_assets_apart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """push, pull, verify and the cache commands say "3 parts and 2 assets", not "5 parts"."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SEPSTORE_CACHE", str(cache))
    store = tmp_path / "store"
    state = tiny_llama_state_dict(layers=1, hidden=8, intermediate=8, vocab=16)
    sepstore.dump(llama_decider, state, store, assets={"README.md": b"# tiny\n", "LICENSE": b"MIT\n"}, quiet=True)
    manifest = sepstore.read_manifest(store)
    n = len({part.digest for _, part in manifest.labelled_parts()})
    blobs = f"{n} parts and 2 assets"

    def said(*args: str | Path, code: int = 0) -> str:
        capsys.readouterr()
        assert cli(list(map(str, args))) == code
        return capsys.readouterr().out

    assert f"uploaded {blobs} (" in said("push", store, tmp_path / "copy", "--quiet")
    server = StaticServer(tmp_path).start()
    try:
        url = f"{server.url}/copy/manifests/model/latest.json"
        assert f"fetched and verified {blobs} (" in said("pull", url, "--cache-dir", cache, "--quiet")
        [asset] = (tmp_path / "copy").rglob(manifest.assets["LICENSE"].file_name)
        asset.write_bytes(b"GPL\n")
        assert f"1 of {blobs} failed" in said("verify", url, "--quiet", code=1)
    finally:
        server.stop()
    assert f"cache {cache}: {blobs}, " in said("cache", "ls", "--cache-dir", cache)
    assert f"checked {n} cached parts and 2 cached assets in" in said("cache", "verify", "--cache-dir", cache)
    pruned = said("cache", "prune", "--max-size", "0", "--dry-run", "--cache-dir", cache)
    assert f" in {n + 2} files ({blobs}), least recently used first" in pruned and ") (" not in pruned
