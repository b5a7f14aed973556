"""gc never breaks a publish in flight, on local disk and on S3 (moto): the three races once
reproduced, each forced deterministically by stopping one party at a real call until the other
has run, and the lease protocol's own interleavings (see sepstore/leases.py)."""

from __future__ import annotations

import importlib
import itertools
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import msgspec
import pytest

import sepstore
import sepstore.leases
from sepstore.demo import llama_decider, tiny_llama_state_dict
from sepstore.gc import DEFAULT_GRACE
from sepstore.store import Store

gc_module = importlib.import_module("sepstore.gc")
TIMEOUT = 60.0


@dataclass
class Dest:
    """A destination store, and the grace that makes its orphans old enough for gc."""

    kind: str
    root: str
    grace: float

    @property
    def cls(self) -> type[Store]:
        """The store implementation the destination opens as (where a test pauses its calls)."""
        return type(Store(self.root))

    def age_orphans(self) -> None:
        """Make every part two hours old where the backend allows it (local disk); S3 cannot
        backdate an object, so its tests run gc with a grace of 0 instead."""
        if self.kind == "local":
            old = time.time() - 7200
            for path in Path(self.root, "parts/blake3").iterdir():
                os.utime(path, (old, old))


@pytest.fixture(params=["local", "s3"])
def dest(request: pytest.FixtureRequest, tmp_path: Path) -> Dest:
    """An empty destination store holding one unrelated model (so gc does not refuse it as empty)."""
    if request.param == "local":
        d = Dest("local", str(tmp_path / "dest"), DEFAULT_GRACE)
    else:
        request.getfixturevalue("moto_server")
        bucket = f"race-{uuid.uuid4().hex[:12]}"
        fsspec.filesystem("s3").mkdir(bucket)
        d = Dest("s3", f"s3://{bucket}/store", 0.0)
    other = tiny_llama_state_dict(layers=1, hidden=8, intermediate=8, vocab=16, seed=99)
    sepstore.dump(llama_decider, other, d.root, name="unrelated", quiet=True)
    return d


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    sepstore.dump(llama_decider, tiny_llama_state_dict(layers=3, hidden=16, intermediate=16, vocab=32), root)
    return root


class Pause:
    """Stops the thread making the ``nth`` call of ``owner.method`` (before it runs, or after it
    returned) until :meth:`release`: the test runs the other party in between."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        owner: object,
        method: str,
        *,
        nth: int = 1,
        after: bool = False,
        when: Callable[[], bool] = lambda: True,
    ) -> None:
        self.reached = threading.Event()
        self._go = threading.Event()
        original = getattr(owner, method)
        calls = itertools.count(1)

        def paused(*args: Any, **kwargs: Any) -> Any:
            stop = when() and next(calls) == nth
            if stop and not after:
                self._stop_here()
            result = original(*args, **kwargs)
            if stop and after:
                self._stop_here()
            return result

        monkeypatch.setattr(owner, method, paused)

    def _stop_here(self) -> None:
        self.reached.set()
        assert self._go.wait(TIMEOUT), "the test never released the paused call"

    def wait(self) -> None:
        assert self.reached.wait(TIMEOUT), "the paused call was never reached"

    def release(self) -> None:
        self._go.set()


class Background:
    """``fn()`` in a thread; :meth:`result` joins it and returns its value or raises its error."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._value = fn()
            except BaseException as exc:
                self._error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self) -> Any:
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "the background publish or gc never finished"
        if self._error is not None:
            raise self._error
        return self._value


def seeing_gc_leases(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Set once a publisher has read the store's gc leases and found one (so it waits for that gc)."""
    seen = threading.Event()
    leases_module = importlib.import_module("sepstore.leases")
    original = leases_module.live_leases

    def live_leases(store: Store, kind: str, **kwargs: Any) -> list[Any]:
        found = original(store, kind, **kwargs)
        if kind == "gc" and found:
            seen.set()
        return found

    monkeypatch.setattr(leases_module, "live_leases", live_leases)
    return seen


def assert_complete(root: str, name: str = "model", tag: str = "latest") -> None:
    """Every part the manifest names is there, with the right bytes."""
    report = sepstore.verify(root, name=name, tag=tag, quiet=True)
    assert report.ok, [c.to_dict() if hasattr(c, "to_dict") else c for c in report.failures]


def orphan_parts(source: Path, dest: Dest) -> None:
    """Leave every part of the source model in ``dest`` as an old orphan (published, then its
    manifest deleted: a model removed two hours ago)."""
    sepstore.push(source, dest.root, quiet=True)
    fs, root = fsspec.url_to_fs(dest.root)
    fs.rm_file(f"{root}/manifests/model/latest.json")
    dest.age_orphans()


# -- the three races once reproduced -----------------------------------------------------------


def test_a_push_relying_on_old_orphans_survives_a_gc_meanwhile(
    source: Path, dest: Dest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Race (a): push finds the parts already there (old orphans) and skips them; a gc runs before
    the push writes its manifest; the manifest must still find every part."""
    orphan_parts(source, dest)
    pause = Pause(monkeypatch, dest.cls, "write_manifest_bytes")
    push = Background(lambda: sepstore.push(source, dest.root, quiet=True))
    pause.wait()
    report = sepstore.gc(dest.root, grace=dest.grace)
    pause.release()
    assert push.result().skipped, "the push relied on the parts that were there"
    assert_complete(dest.root)
    assert report.removed == []


@pytest.mark.parametrize("where", ["between parts", "before the manifest"])
def test_a_dump_survives_a_gc_running_meanwhile(dest: Dest, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Race (b): on S3 no write refreshes an object's age, so a gc with a short grace took the
    parts of a dump in progress; with a lease they stay, whatever the grace."""
    sd = tiny_llama_state_dict(layers=3, hidden=16, intermediate=16, vocab=32, seed=3)
    if where == "between parts":
        pause = Pause(monkeypatch, dest.cls, "_commit", nth=3)  # begin and mid.0 are in, mid.1 is written
    else:
        pause = Pause(monkeypatch, dest.cls, "write_manifest_bytes")
    dump = Background(lambda: sepstore.dump(llama_decider, sd, dest.root, quiet=True))
    pause.wait()
    report = sepstore.gc(dest.root, grace=0)
    pause.release()
    dump.result()
    assert_complete(dest.root)
    assert report.removed == [] and report.leased


def test_a_gc_whose_manifest_scan_is_slow_keeps_parts_published_during_it(
    source: Path, dest: Dest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Race (c): gc listed the parts (old orphans then), then listed the manifests before a push
    relying on those parts wrote its manifest; it must not act on what it saw before."""
    orphan_parts(source, dest)
    listed = threading.Event()
    original = dest.cls.list_blobs

    def listing(store: Store) -> list[dict[str, Any]]:
        found = original(store)
        listed.set()
        return found

    monkeypatch.setattr(dest.cls, "list_blobs", listing)
    pause = Pause(monkeypatch, dest.cls, "list_manifests", after=True, when=listed.is_set)
    gc = Background(lambda: sepstore.gc(dest.root, grace=dest.grace))
    pause.wait()
    sepstore.push(source, dest.root, quiet=True)
    pause.release()
    report = gc.result()
    assert_complete(dest.root)
    assert report.removed == []


# -- the lease protocol's interleavings ---------------------------------------------------------


def test_a_push_starting_while_gc_holds_its_lease_is_seen_by_that_gc(
    source: Path, dest: Dest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc has written its lease naming the orphans and not yet read the publish leases: a push
    relying on them waits for that gc, which then sees the push's lease and keeps them."""
    orphan_parts(source, dest)
    pause = Pause(monkeypatch, gc_module, "live_leases")
    waiting = seeing_gc_leases(monkeypatch)
    gc = Background(lambda: sepstore.gc(dest.root, grace=dest.grace))
    pause.wait()
    push = Background(lambda: sepstore.push(source, dest.root, quiet=True))
    assert waiting.wait(TIMEOUT)
    pause.release()
    report = gc.result()
    assert report.removed == [] and len(report.leased) == 5
    assert push.result().uploaded == []
    assert_complete(dest.root)


def test_a_push_starting_after_gc_read_the_leases_waits_and_uploads_what_gc_removed(
    source: Path, dest: Dest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc read the leases before the push wrote its own, so it deletes the orphans: the push sees
    gc's lease naming them, waits until that gc is done, then finds them gone and uploads them."""
    orphan_parts(source, dest)
    pause = Pause(monkeypatch, gc_module, "live_leases", after=True)
    waiting = seeing_gc_leases(monkeypatch)
    gc = Background(lambda: sepstore.gc(dest.root, grace=dest.grace))
    pause.wait()
    push = Background(lambda: sepstore.push(source, dest.root, quiet=True))
    assert waiting.wait(TIMEOUT)
    pause.release()
    assert len(gc.result().removed) == 5
    assert len(push.result().uploaded) == 5
    assert_complete(dest.root)


def test_leases_are_gone_after_a_publish_and_after_a_failed_one(source: Path, dest: Dest) -> None:
    sepstore.push(source, dest.root, quiet=True)
    assert Store(dest.root).list_leases() == []
    end = sepstore.read_manifest(source).end
    assert end is not None
    damaged = source / f"parts/blake3/{end.digest[7:]}.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"!")
    Store(dest.root).remove(Store(dest.root).part_path(end.digest))
    with pytest.raises(sepstore.IntegrityError):
        sepstore.push(source, dest.root, dest_tag="v2", quiet=True)
    assert Store(dest.root).list_leases() == []


def test_an_expired_lease_is_swept_and_protects_nothing_but_a_live_one_protects(source: Path, dest: Dest) -> None:
    orphan_parts(source, dest)
    store = Store(dest.root)
    manifest = sepstore.read_manifest(source)
    begin = manifest.begin
    assert begin is not None
    lease = {"kind": "publish", "digests": [begin.digest], "expires": time.time() + 600}
    store.put_lease("publish-00000000000000aa", msgspec.json.encode(lease))
    expired = time.time() - sepstore.leases.CLOCK_SLACK - 1  # expired, even for a clock that is behind
    store.put_lease("publish-00000000000000bb", msgspec.json.encode({**lease, "expires": expired}))
    dry = sepstore.gc(dest.root, grace=dest.grace, dry_run=True)
    assert dry.leased == [f"{begin.digest[7:]}.safetensors"] and len(dry.removed) == 4
    assert len(store.list_leases()) == 2, "a dry run deletes nothing, not even expired leases"
    report = sepstore.gc(dest.root, grace=dest.grace)
    assert report.leased == dry.leased and report.removed == dry.removed
    assert store.list_leases() == ["publish-00000000000000aa"]
    store.delete_lease("publish-00000000000000aa")
    assert sepstore.gc(dest.root, grace=dest.grace).removed == [f"{begin.digest[7:]}.safetensors"]


def test_a_killed_gc_holds_a_publish_up_only_until_its_lease_stops_changing(
    source: Path, dest: Dest, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A gc killed by SIGTERM leaves its lease behind, expiring minutes later (or, from a clock far
    ahead, much later): a publisher waits while it is renewed, not until it expires."""
    monkeypatch.setattr(sepstore.leases, "GC_LEASE_SECONDS", 0.5)
    orphan_parts(source, dest)
    manifest = sepstore.read_manifest(source)
    victims = [part.digest for _, part in manifest.labelled_parts()]
    dead = {"kind": "gc", "digests": victims, "expires": time.time() + 10 * 24 * 3600}
    Store(dest.root).put_lease("gc-00000000000000dd", msgspec.json.encode(dead))
    report = sepstore.push(source, dest.root, quiet=True)
    assert report.manifest_written
    assert "waiting for a gc that may delete parts this publish needs" in caplog.text
    assert sepstore.verify(dest.root, name="model", tag="latest", quiet=True).ok


def test_a_lease_that_is_not_json_stops_gc_naming_it(source: Path, dest: Dest) -> None:
    orphan_parts(source, dest)
    Store(dest.root).put_lease("publish-00000000000000cc", b"{not json")
    with pytest.raises(sepstore.StoreError, match=r"publish-00000000000000cc\.json: not a sepstore lease"):
        sepstore.gc(dest.root, grace=dest.grace)


def test_a_part_written_again_after_gc_listed_it_is_kept_as_young(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publisher without leases (an older sepstore) only refreshes a part's age: gc looks at the
    age again right before deleting, not only at what it listed."""
    root = tmp_path / "dest"
    sepstore.dump(llama_decider, tiny_llama_state_dict(layers=1, hidden=8, intermediate=8, vocab=16), root, name="x")
    orphan_parts(source, Dest("local", str(root), DEFAULT_GRACE))
    begin = sepstore.read_manifest(source).begin
    assert begin is not None
    pause = Pause(monkeypatch, gc_module, "live_leases", after=True)
    gc = Background(lambda: sepstore.gc(root, grace=DEFAULT_GRACE))
    pause.wait()
    os.utime(root / f"parts/blake3/{begin.digest[7:]}.safetensors")
    pause.release()
    report = gc.result()
    assert report.young == [f"{begin.digest[7:]}.safetensors"] and len(report.removed) == 4
