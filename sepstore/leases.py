"""Leases: how a publish in flight keeps ``gc`` away from the parts it relies on, on every backend.

A publisher (``dump``, ``push``) writes ``leases/publish-<random>.json`` naming each digest it
relies on *before* it looks whether that part is in the store, renews the lease while it works,
and deletes it only after its manifest is written. ``gc``, once it has chosen its victims, writes
``leases/gc-<random>.json`` naming them, *then* reads the publish leases and then the manifests,
deletes only the victims none of them names, and deletes its lease when done.

Each side writes its own lease first and reads the other's second, so on a backend where a read
sees every write that finished before it (local disk; S3 since 2020) at least one of them sees
the other: either gc sees the publish lease and keeps the part, or the publisher sees gc's lease
naming a part it relies on, waits until that gc is done, and only then looks for the part (and
uploads it again if it went). A publisher that finished before gc read the leases wrote its
manifest before deleting its lease, so gc's manifest read, which comes after, sees it. This needs
no timestamps from the backend (S3 cannot refresh an object's age), only the Store interface.

Leases expire (their holder was killed) after :data:`LEASE_SECONDS` (gc's after
:data:`GC_LEASE_SECONDS`) by their writer's clock, and are renewed every quarter of that. Readers
count a lease as expired only :data:`CLOCK_SLACK` later, so clocks may disagree by minutes; gc
deletes leases expired that long. A publisher waits for a gc only while that gc's lease keeps
changing (it is renewed), so a killed gc holds publishers up for :data:`GC_LEASE_SECONDS` at most.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Annotated, Literal

import msgspec

from .errors import SepstoreError, StoreError
from .hashing import DIGEST_PATTERN
from .store import Store

__all__ = ["CLOCK_SLACK", "GC_LEASE_SECONDS", "LEASE_SECONDS", "Held", "Lease", "holding", "live_leases"]

log = logging.getLogger("sepstore")

#: How long a publisher's lease holds without being renewed (its holder renews it every quarter of this).
LEASE_SECONDS = 600.0
#: How long gc's lease holds without being renewed. Publishers wait for a gc that may delete a part
#: they need, so this is short: a killed gc holds them up for this long at most, not for
#: :data:`LEASE_SECONDS`. gc checks its lease before every deletion, so a gc that could not renew it
#: in time (stopped, or cut off from the store) deletes nothing more.
GC_LEASE_SECONDS = 60.0
#: How far apart the clocks of publishers and gc may be: a lease counts as expired only this long
#: after the expiry its writer gave it.
CLOCK_SLACK = 600.0
#: How often a publisher looks again whether a gc that may delete a part it relies on is done.
_POLL_SECONDS = 0.2

Kind = Literal["publish", "gc"]


class Lease(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``leases/<kind>-<random>.json``: the digests a publish relies on, or a gc may delete."""

    kind: Kind
    digests: list[Annotated[str, msgspec.Meta(pattern=DIGEST_PATTERN)]]
    expires: float  # Unix time, by the writer's clock


def live_leases(store: Store, kind: Kind, *, sweep: bool = False) -> dict[str, Lease]:
    """The leases of ``kind`` in ``store`` not expired for :data:`CLOCK_SLACK` yet, by id; with
    ``sweep``, leases of either kind expired that long are deleted on the way (their holders died)."""
    found: dict[str, Lease] = {}
    now = time.time()
    for lease_id in store.list_leases():
        if not (sweep or lease_id.startswith(f"{kind}-")):
            continue
        data = store.read_lease(lease_id)
        if data is None:
            continue  # its holder finished since the listing
        try:
            lease = msgspec.json.decode(data, type=Lease)
        except msgspec.DecodeError as exc:
            url = store.lease_url(lease_id)
            raise StoreError(
                f"{url}: not a sepstore lease ({exc}); delete it if no push, dump or gc is running on this store"
            ) from None
        if lease.expires + CLOCK_SLACK < now:
            if sweep:
                store.delete_lease(lease_id)
        elif lease.kind == kind:
            found[lease_id] = lease
    return found


class Held:
    """A lease this process holds: written at once, renewed in the background, deleted on :meth:`close`."""

    def __init__(self, store: Store, kind: Kind, digests: Iterable[str] = (), *, ttl: float = LEASE_SECONDS) -> None:
        self.store = store
        self.kind: Kind = kind
        self.ttl = ttl
        self.id = f"{kind}-{secrets.token_hex(8)}"
        self.url = store.lease_url(self.id)
        self._digests: set[str] = set(digests)
        self._expires = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._write()
        self._renewer = threading.Thread(target=self._renew, name=f"sepstore-lease-{self.id}", daemon=True)
        self._renewer.start()
        if kind == "publish":
            try:
                self._wait_for_gc(self._digests)
            except BaseException:
                with contextlib.suppress(SepstoreError):
                    self.close()
                raise

    def _write(self) -> None:
        with self._lock:
            expires = time.time() + self.ttl
            lease = Lease(self.kind, sorted(self._digests), expires)
            self.store.put_lease(self.id, msgspec.json.encode(lease))
            self._expires = expires

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            with contextlib.suppress(SepstoreError):  # tried again a quarter later; check() tells if it lapsed
                self._write()

    def protect(self, digests: Iterable[str]) -> None:
        """Name ``digests`` in this publish lease before relying on the parts: call it before
        asking the store whether it has them. Waits while a gc that may delete one of them runs."""
        new = set(digests) - self._digests
        if not new:
            return
        with self._lock:
            self._digests |= new
        self._write()
        self._wait_for_gc(new)

    def _wait_for_gc(self, digests: set[str]) -> None:
        """Return once no gc that may delete one of ``digests`` runs (read after this lease is written).

        A running gc renews its lease every quarter of :data:`GC_LEASE_SECONDS`; one whose lease has
        not changed for that long by this process's clock was killed (or its clock is far ahead,
        so its expiry means nothing here), and is no longer waited for: it deletes nothing more."""
        changed: dict[str, tuple[Lease, float]] = {}  # a gc lease as last read, and since when
        warned = False
        while True:
            now = time.monotonic()
            blocking = []
            for lease_id, lease in live_leases(self.store, "gc").items():
                if not digests.intersection(lease.digests):
                    continue
                if lease_id not in changed or changed[lease_id][0] != lease:
                    changed[lease_id] = (lease, now)
                if now - changed[lease_id][1] < GC_LEASE_SECONDS:
                    blocking.append(lease_id)
            if not blocking:
                return
            if not warned:
                log.warning(
                    "%s: waiting for a gc that may delete parts this publish needs (%s); at most %g s "
                    "if that gc was killed",
                    self.store.url,
                    self.store.lease_url(blocking[0]),
                    GC_LEASE_SECONDS,
                )
                warned = True
            time.sleep(_POLL_SECONDS)

    def check(self) -> None:
        """A :class:`StoreError` if the lease has lapsed (not renewed in time), so gc may have acted."""
        if time.time() >= self._expires:
            raise StoreError(
                f"{self.url}: this process's lease lapsed (it could not be renewed for {self.ttl:g} s), "
                "so gc may have removed parts it relies on; run it again"
            )

    def close(self) -> None:
        self._stop.set()
        self._renewer.join()
        self.store.delete_lease(self.id)


@contextlib.contextmanager
def holding(store: Store, kind: Kind, digests: Iterable[str] = ()) -> Iterator[Held]:
    """Hold a lease of ``kind`` naming ``digests`` (more may be added with :meth:`Held.protect`)
    for the ``with`` block; it is deleted at the end, even on an error."""
    held = Held(store, kind, digests, ttl=GC_LEASE_SECONDS if kind == "gc" else LEASE_SECONDS)
    try:
        yield held
    except BaseException:
        with contextlib.suppress(SepstoreError):  # the error that stopped the block is the one to see
            held.close()
        raise
    held.close()
