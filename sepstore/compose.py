"""Tensor-level delta for push to S3: a new part whose unchanged tensors already sit in part objects
of the destination is written as a multipart upload whose unchanged runs are server-side copies
(``UploadPartCopy`` with a byte range), so that only about the changed bytes are uploaded.

**Where the unchanged tensors are.** The destination's manifests of the same model name (every
tag) say which of its part objects hold which tensor digests; one ranged read of each such object's
header (only of objects that hold a tensor being pushed) says where. A byte range is copied only
from a part object filed under its digest, and only where the tensor digests match.

**Plan.** The new part's bytes are cut into runs: a run copied from one source object (tensors
that are adjacent there too, the header when the source's header is byte for byte the same) or a
run uploaded from the local file. S3 wants every part of a multipart upload but the last to be at
least 5 MiB: a copy run shorter than that is uploaded instead, and an uploaded run shorter than
that takes bytes from the start of the copy run after it.

**Verified.** S3 answers each part, copied or uploaded, with its ETag, the MD5 of its bytes
(for objects without KMS or customer keys); each must be the MD5 of the local file's same bytes,
which were verified against the part's digest before the push, else the upload is aborted and the
part is uploaded whole (and composing stops for the rest of the push: such a bucket's ETags are
not MD5s). Where S3 says, as it creates the upload, that it encrypts the object with KMS or a
customer key, composing stops before any part is copied or sent. The object's size is checked once
the upload is complete.

This module plans and checks through the store interface only (headers by
:meth:`~sepstore.stores.base.Store.read_blob_range`); the multipart upload is the store's
(:meth:`~sepstore.stores.base.Store.put_blob_composed`, S3's in :mod:`sepstore.stores.s3`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .delta import header_bound, predicted_head
from .errors import IntegrityError, SepstoreError
from .manifest import Blob, Manifest, Part, decode_manifest
from .safetensors_io import HeaderEntry, header_end, parse_header, pread_exact
from .store import Store
from .stores.s3 import EncryptedUploadError, Run

__all__ = ["MIN_PART", "Composed", "Composer", "Run", "plan_runs"]

log = logging.getLogger("sepstore")

#: S3's least size of a multipart upload's part (all but the last).
MIN_PART = 5 * 1024 * 1024
#: S3's largest ``UploadPartCopy`` range.
MAX_COPY = 5 * 1024**3
#: Uploaded runs are sent in parts of at most this many bytes (each held in memory while it is sent,
#: ``workers`` of them at most in one push).
MAX_UPLOAD = 16 * 1024 * 1024
#: S3's most parts in one multipart upload.
MAX_PARTS = 10_000


def _joined(runs: Iterable[Run]) -> list[Run]:
    """Adjacent uploads joined, and adjacent copies of adjacent bytes of one source."""
    out: list[Run] = []
    for run in runs:
        prev = out[-1] if out else None
        if (
            prev is not None
            and prev.end == run.start
            and prev.source == run.source
            and (run.source is None or prev.source_start + prev.length == run.source_start)
        ):
            out[-1] = Run(prev.start, run.end, prev.source, prev.source_start)
        else:
            out.append(run)
    return out


def plan_runs(runs: Iterable[Run]) -> list[Run]:
    """S3 parts for ``runs`` (which tile the new part in order): every part but the last at least
    :data:`MIN_PART` bytes, copies at most :data:`MAX_COPY`, uploads at most :data:`MAX_UPLOAD`."""
    out: list[Run] = []
    for run in _joined(runs):
        if run.source is not None and run.length < MIN_PART:
            run = Run(run.start, run.end)
        prev = out[-1] if out else None
        if prev is not None and prev.source is None and (run.source is None or prev.length < MIN_PART):
            if run.source is None or run.length - (MIN_PART - prev.length) < MIN_PART:
                out[-1] = Run(prev.start, run.end)  # joined, or a short upload takes all of a short copy
                continue
            taken, run = run.cut(MIN_PART - prev.length)  # a short upload takes the copy's first bytes
            out[-1] = Run(prev.start, taken.end)
        out.append(run)
    parts: list[Run] = []
    for run in out:
        most = MAX_COPY if run.source is not None else MAX_UPLOAD
        pieces = -(-run.length // most)
        for i in range(pieces):  # equal pieces, each above MIN_PART (a run is cut only when it is large)
            lo, hi = run.length * i // pieces, run.length * (i + 1) // pieces
            parts.append(run.cut(lo)[1].cut(hi - lo)[0] if pieces > 1 else run)
    return parts


@dataclass
class Composed:
    """Whether a part was composed, the bytes sent for it (also when composing failed halfway) and
    the bytes copied server-side; ``tried`` when a failed attempt may have left an object behind
    (to be replaced by the whole upload)."""

    done: bool
    sent: int = 0
    copied: int = 0
    tried: bool = False


@dataclass
class _Source:
    """Bytes ``start:end`` of the destination's part of digest ``digest``."""

    digest: str
    start: int
    end: int


class Composer:
    """Composes new parts of one push from the part objects an S3 destination already holds."""

    def __init__(self, store: Store, manifest: Manifest, *, workers: int) -> None:
        self.store = store
        self.name = manifest.name
        self.wanted = {t.digest for _, part in manifest.labelled_parts() for t in part.tensors.values()}
        self.workers = workers
        self._lock = threading.Lock()
        self._tensors: dict[str, list[_Source]] | None = None
        self._headers: dict[str, bytes] = {}  # the header bytes of each source part, by its digest
        self._disabled = False
        # Pieces of local bytes in memory at once, across all the parts being composed (each part
        # sends ``workers`` runs at once, and ``workers`` parts are pushed at once).
        self._buffers = asyncio.Semaphore(workers)

    @classmethod
    def for_store(cls, store: Store, manifest: Manifest, *, workers: int) -> Composer | None:
        """A composer for pushing ``manifest`` to ``store`` when it copies server-side (S3; other
        backends upload whole parts)."""
        return cls(store, manifest, workers=workers) if store.server_side_copy else None

    def _index(self) -> dict[str, list[_Source]]:
        """Where the destination's part objects (of this model's manifests) hold the pushed tensors;
        read once, by the first part to compose."""
        with self._lock:
            if self._tensors is None:
                self._tensors = {}
                with contextlib.suppress(SepstoreError):
                    self._read_index(self.wanted)
            return self._tensors

    def _read_index(self, wanted: set[str]) -> None:
        assert self._tensors is not None
        candidates: dict[str, Part] = {}
        for name, tag in self.store.list_manifests():
            if name != self.name:
                continue
            with contextlib.suppress(SepstoreError):
                url = self.store.manifest_url(name, tag)
                manifest = decode_manifest(self.store.read_manifest_bytes(name, tag), source=url)
                for _, part in manifest.labelled_parts():
                    if any(t.digest in wanted for t in part.tensors.values()):
                        candidates.setdefault(part.digest, part)

        def read(part: Part) -> tuple[Part, dict[str, HeaderEntry], bytes] | None:
            try:
                return (part, *_remote_header(self.store, part))
            except (SepstoreError, OSError):  # gone, not readable, or not a header this sepstore reads: not a source
                return None

        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sepstore-compose") as pool:
            for found in pool.map(read, candidates.values()):
                if found is None:
                    continue
                part, header, self._headers[part.digest] = found
                for tensor, entry in header.items():
                    if tensor in part.tensors and entry.end > entry.start:
                        source = _Source(part.digest, entry.start, entry.end)
                        self._tensors.setdefault(part.tensors[tensor].digest, []).append(source)

    def put(self, path: str, part: Blob) -> Composed:
        """Write the local, verified part file ``path`` to the destination composed from server-side
        copies, if it can (else the part is to be uploaded whole: too little to copy, or a failure)."""
        # a part with a dtype this sepstore does not know (header_bound None) is uploaded as it is
        if self._disabled or not isinstance(part, Part) or part.size <= MIN_PART or header_bound(part) is None:
            return Composed(False)
        known = self._index()
        try:
            with open(path, "rb", buffering=0) as file:
                head = bytes(pread_exact(file.fileno(), header_end(pread_exact(file.fileno(), 8, 0), part.size), 0))
            header = parse_header(head, part.size, where=path)
        except (SepstoreError, OSError):  # the whole upload reads the file again, and says what is wrong
            return Composed(False)
        # Each tensor is copied from the object that holds most of this part (then from the next
        # one...): runs copied from one object stay long, and adjacent where they were adjacent.
        found = {
            name: [s for s in known.get(part.tensors[name].digest, ()) if s.end - s.start == e.end - e.start]
            for name, e in header.items()
            if name in part.tensors
        }
        held = Counter(s.digest for sources in found.values() for s in sources)
        rank = {digest: i for i, (digest, _) in enumerate(held.most_common())}
        same_head = [digest for digest, bytes_ in self._headers.items() if bytes_ == head and digest in rank]
        runs = [Run(0, len(head), min(same_head, key=rank.__getitem__) if same_head else None)]
        for name, entry in sorted(header.items(), key=lambda item: item[1].start):
            sources = found.get(name)
            if sources:
                last = runs[-1]
                after = last.source_start + last.length  # the same tensor may be in several places there

                def preference(s: _Source, last: Run = last, after: int = after) -> tuple[int, bool]:
                    return rank[s.digest], not (s.digest == last.source and s.start == after)

                source = min(sources, key=preference)
                runs.append(Run(entry.start, entry.end, source.digest, source.start))
            else:
                runs.append(Run(entry.start, entry.end))
        runs = [r for r in runs if r.length]
        parts = plan_runs(runs)
        copied = sum(r.length for r in parts if r.source is not None)
        if copied < MIN_PART or len(parts) > MAX_PARTS:
            return Composed(False)
        outcome = Composed(False, tried=True)

        def check(number: int, run: Run, data: bytes | None, etag: str) -> None:
            """S3 answers a part with the MD5 of its bytes: those of the local file's same bytes."""
            expected = hashlib.md5(data, usedforsecurity=False).hexdigest() if data is not None else _md5(path, run)
            if etag.strip('"') != expected:
                if run.source is None:  # this bucket's ETags are not MD5s: stop composing
                    self._disabled = True
                raise SepstoreError(
                    f"part {number} of {part.digest}: ETag {etag}, the MD5 of the local bytes is {expected}"
                )

        def sent(count: int) -> None:
            outcome.sent += count

        try:
            self.store.put_blob_composed(
                path, part, parts, workers=self.workers, buffers=self._buffers, check=check, sent=sent
            )
        except EncryptedUploadError as exc:  # said before any part was sent: nothing to replace
            log.info("composing stops for this push: %s", exc)
            self._disabled = True
            return Composed(False)
        except Exception as exc:  # any failure: the part is uploaded whole, as without composing
            log.info("composing %s from server-side copies failed (%s); uploading it whole", part.digest, exc)
            return outcome
        return Composed(True, outcome.sent, copied)


def _remote_header(store: Store, part: Part) -> tuple[dict[str, HeaderEntry], bytes]:
    """A destination part's parsed header and its bytes (length prefix included), read with one
    ranged read sized by the header sepstore would write (two when it is longer, up to
    :func:`~sepstore.delta.header_bound`: a longer one is not read)."""
    url = store.blob_url(part)
    bound = header_bound(part)
    if bound is None:
        raise IntegrityError(f"{url}: a dtype this sepstore does not know")
    head = store.read_blob_range(part, 0, min(predicted_head(part), part.size))
    need = header_end(head, part.size)
    if need > bound:
        raise IntegrityError(f"{url}: a header of {need} bytes, more than the {bound} its tensors need")
    if need > len(head):
        head = store.read_blob_range(part, 0, need)
    return parse_header(head, part.size, where=url), bytes(head[:need])


def _md5(path: str, run: Run) -> str:
    """The MD5 of the local file's bytes of ``run`` (what S3 answers a copied part with)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb", buffering=0) as file:
        for at in range(run.start, run.end, MAX_UPLOAD):
            count = min(MAX_UPLOAD, run.end - at)
            data = pread_exact(file.fileno(), count, at)
            if len(data) != count:
                raise OSError(f"{path} ended before byte {run.end}")
            digest.update(data)
    return digest.hexdigest()
