"""Tensor-level delta for pull: a part the cache lacks is assembled from the tensors that cached
parts already hold, plus ranged reads of the others, and verified whole before it gets its name.

**Which cached part holds which tensor.** A part's header says where its tensors are but not what
they are; the manifest that named the part says what they are. So when a part enters the cache
(verified) or a pull finds it there, the cache keeps an index file beside it,
``tensors/blake3/<part hex>.json``: each tensor's digest (from that manifest) with its byte range
in the file (from the file's own header). The index is a hint and never trusted for bytes: an
assembled part is hashed whole and must match its digest, else it is fetched whole as before and
the index files of the parts it copied from are dropped (the next pull that names those parts
writes them again). It holds nothing a cache could not rebuild, so deleting it is always safe.

**Assembling a part.** Its header is fetched alone (one ranged read, sized by the header the
manifest's tensors give in sepstore's own layout, and read further when the file's header is
longer, by at most :data:`HEADER_SLACK`, else the part is fetched whole): the file's own header,
so a part written in another tensor order, or with ``__metadata__``, is assembled as it is.
Tensors found in the index are copied from the cached part, in offset order, in pieces of
:data:`COPY_BYTES`, each read into a reused page-aligned buffer at the address that is its offset in
the new file modulo a block, so that its whole blocks go from there straight to the disk, past the
page cache (:mod:`sepstore.directio`); the others are fetched as ranged reads, coalesced
across small gaps (a cached tensor in such a gap is fetched, not copied) and cut into chunks, in
parallel, asked for before the copies start so the network is busy at once. :func:`plan_ranges`
is that rule, which :func:`sepstore.diff` counts with too. A server that ignores ``Range`` answers
the header read with the whole part, which is then verified as a whole fetch would be.

**Verifying it.** The part's digest is computed while it is written, as a whole fetch computes
it (:class:`~sepstore.cache.InOrderDigest`): a copied piece, or a fetched one, that is the
digest's next byte is hashed from the buffer it was written from; one that lands ahead waits and
is hashed from the file in its turn. Each byte is written once (a retried read asks only for what
it still lacks) and hashed once, and the part gets its name only if the digest of all its bytes is
the manifest's; it is then renamed durably (``fsync``, as a whole fetch is) by the thread that
wrote its last bytes, while other parts are still being written. Here this is faster than copying
in the kernel (``copy_file_range``) and hashing the whole file after, or hashing each copied piece
from a map of the file (bench_delta.py): on a filesystem without reflinks the kernel moves the
bytes anyway, and a second pass, or a map set up and torn down per piece, costs more than the
buffer's extra copy. Writing the copied blocks past the page cache halves the kernel's time for
them (no page-cache pages to fill, nothing left for ``fsync`` to write): a 2 GiB upgrade took 1.8 s
instead of 2.7 s here, about what the disk alone takes for those bytes. The buffer is private, so
the bytes hashed are the bytes written. The price: the new part is not in the page cache, so a
``load`` after a ``pull`` reads it from the disk (2.5 s became 3.7 s here, ``--then-load``).
A ``load`` by URL does not: it gives each part to assemble page-aligned memory of its own (the
memory its tensors will use), and the copied pieces are read straight into their place there,
the fetched ranges received there, and both hashed there and written to the file from there
(``into``, as :meth:`~sepstore.cache.Cache.fetch` takes), so its tensors are never read back from the file: a
``load`` of v2 by URL on a node holding v1 took 1.8 s instead of 4.5 s here (2.1 s part-level,
``--then-load``). Sources are read
through the page cache: v1 was most likely just read or written, and a direct read would go to
the disk for bytes memory holds.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import mmap
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from tqdm.auto import tqdm

from .cache import CHUNK_BYTES, Cache, Fetch, InOrderDigest, _touch
from .directio import ALIGN, DirectFile
from .errors import IntegrityError
from .hashing import digest_hex
from .manifest import Blob, Part
from .retry import with_retries
from .safetensors_io import (
    ITEMSIZE,
    HeaderEntry,
    RawTensor,
    header_end,
    layout,
    parse_header,
    pread_exact,
)
from .store import create_temp, file_lock, replace_durably

__all__ = [
    "HEADER_SLACK",
    "INDEX_DIR",
    "TensorIndex",
    "Transfer",
    "assemble",
    "header_bound",
    "plan_ranges",
    "predicted_head",
    "transfer_bytes",
]

#: Where a cache keeps its index files (relative to its root).
INDEX_DIR = "tensors/blake3"
#: Bytes of a part that must be found cached before it is assembled rather than fetched whole
#: (below this, the extra header read costs more than the copy saves).
MIN_REUSE = 64 * 1024
_HEX = re.compile(r"[0-9a-f]{64}")
#: The suffix of a part's file in ``incoming/`` while it is assembled (under the part's lock).
ASSEMBLING = ".assembling"
#: Ranges to fetch that are at most this far apart are fetched as one read (the bytes between
#: are fetched too): fewer requests for small tensors (norms, biases) between changed ones.
GAP_BYTES = 64 * 1024
#: An index file's temporary file (``.tmp-*.json``) this old was left by a killed process.
STALE_TEMP_SECONDS = 600
#: Bytes a part's header may have beyond the header sepstore would write for its tensors (room for
#: ``__metadata__``, another writer's spacing): a longer one is not read, and the part is fetched
#: whole, since a header is parsed before any of the part's bytes can be verified.
HEADER_SLACK = 64 * 1024
#: Cached tensors are copied this many bytes a read (one buffer of this size, and a block, per
#: thread copying; 2-16 MiB made no difference in bench_delta.py).
COPY_BYTES = 8 * 1024 * 1024


@dataclass
class Transfer:
    """What fetching parts cost: bytes read over the network, and bytes copied from parts
    already cached instead."""

    transferred: int = 0
    reused: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, transferred: int = 0, reused: int = 0) -> None:
        with self._lock:
            self.transferred += transferred
            self.reused += reused


@dataclass(frozen=True)
class Source:
    """A tensor's bytes in a cached part: the part's digest and file, and the byte range there."""

    part: str
    path: str
    start: int
    end: int


class TensorIndex:
    """The cache's index of tensor digests to the cached parts (and byte ranges) that hold them."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.root = os.path.join(cache.root, *INDEX_DIR.split("/"))

    def _file(self, digest: str) -> str:
        return os.path.join(self.root, f"{digest_hex(digest)}.json")

    def remember(self, parts: Iterable[Blob]) -> None:
        """Index the cached ``parts`` not yet indexed, from their headers and the manifest's
        tensor digests; an unreadable part is left out (the index is only a hint)."""
        for part in parts:
            if isinstance(part, Part) and part.tensors and not os.path.exists(self._file(part.digest)):
                with contextlib.suppress(OSError, IntegrityError):
                    self._write(part)

    def _write(self, part: Part) -> None:
        path = self.cache.path(part)
        with open(path, "rb", buffering=0) as file:
            size = os.fstat(file.fileno()).st_size
            head = os.pread(file.fileno(), 8, 0)
            head += os.pread(file.fileno(), header_end(head, size) - len(head), len(head))
        header = parse_header(head, size, where=path)
        ranges = {
            part.tensors[name].digest: [entry.start, entry.end]
            for name, entry in header.items()
            if name in part.tensors and entry.end > entry.start
        }
        os.makedirs(self.root, exist_ok=True)
        fd, tmp = create_temp(self.root, ".json")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump({"size": size, "tensors": ranges}, out)
            os.replace(tmp, self._file(part.digest))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def forget(self, digests: Iterable[str]) -> None:
        """Drop the index files of these parts (they led to bytes that did not verify)."""
        for digest in digests:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._file(digest))

    def load(self) -> dict[str, Source]:
        """Every indexed tensor digest and where a cached part holds it; index files of parts no
        longer cached (pruned, or of another size now), and those a killed process left half
        written, are removed."""
        found: dict[str, Source] = {}
        try:
            names = sorted(os.listdir(self.root))
        except OSError:  # none yet, or a cache that cannot be used (the whole fetch says why)
            return found
        for name in names:
            if name.startswith(".tmp-"):
                _sweep_temp(os.path.join(self.root, name))
                continue
            hex_, dot, ext = name.partition(".")
            if ext != "json" or not dot or not _HEX.fullmatch(hex_):
                continue
            digest = f"blake3:{hex_}"
            path = os.path.join(self.cache.parts, f"{hex_}.safetensors")
            try:
                with open(os.path.join(self.root, name), "rb") as file:
                    entry = json.load(file)
                size, tensors = entry["size"], entry["tensors"]
                if os.path.getsize(path) != size:
                    raise ValueError("stale")
            except (OSError, ValueError, KeyError, TypeError):  # pruned, replaced, or not an index file of ours
                self.forget([digest])
                continue
            if not isinstance(tensors, dict):
                continue
            for tensor, span in tensors.items():
                if (
                    isinstance(tensor, str)
                    and isinstance(span, list)
                    and len(span) == 2
                    and all(type(x) is int for x in span)
                    and 0 <= span[0] < span[1] <= size
                ):
                    found.setdefault(tensor, Source(digest, path, span[0], span[1]))
        return found


@dataclass(eq=False)
class _Plan:
    """One part being assembled in ``incoming/<hex>.assembling``."""

    item: Fetch
    tmp: str
    out: DirectFile
    bar: tqdm | None
    transfer: Transfer
    digest: InOrderDigest
    #: Page-aligned memory of the part's size that receives its bytes (a load's tensors), or ``None``.
    into: memoryview | None = None
    copies: list[tuple[Source, int]] = field(default_factory=list)
    ranges: list[tuple[int, int]] = field(default_factory=list)
    #: Bytes this part adds to the bar's total, and bytes it has sent there.
    planned: int = 0
    sent: int = 0
    #: Bytes copied from cached parts (reported as reused once the part is verified).
    reused: int = 0
    #: Copy and fetch tasks not ended yet; whether one failed; whether the part was committed
    #: (``False``: assembled, but it did not verify), ``None`` until then.
    left: int = 0
    failed: bool = False
    verified: bool | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fetch(self, start: int, end: int) -> bool:
        """Fetch bytes ``start:end`` into the file, each byte written once (a retry asks only for
        what is still missing); whether the server ignored ``Range`` and the whole part came
        instead (taken only for the part's first bytes: other bytes outside ``start:end`` are
        dropped)."""
        item, size, into = self.item, self.item.part.size, self.into
        wanted, whole, written = end, False, start  # bytes start:written are in the file (or in `into`)

        def write(offset: int, piece: memoryview) -> None:
            nonlocal wanted, whole, written
            if start == 0 and not whole and offset + len(piece) > wanted:
                wanted, whole = size, True  # the server ignored Range: this is the part from its first byte
            lo, hi = max(offset, written), min(offset + len(piece), wanted)
            if lo >= hi:
                return  # written by an earlier try, or bytes not asked for
            if into is None:
                self.digest.write(self.out, lo, piece[lo - offset : hi - offset])
            else:  # hashed from `into` now, written to the file from there once all are in
                if piece.obj is not into.obj:  # else received into its place already
                    into[lo:hi] = piece[lo - offset : hi - offset]
                self.digest.hash(lo, into[lo:hi], held=True)
            written = hi
            self.transfer.add(transferred=hi - lo)
            with self._lock:
                self.sent += hi - lo
            if self.bar is not None:
                self.bar.update(hi - lo)

        def attempt() -> None:
            if written < wanted:
                item.source.stream_blob_range(item.part, written, wanted, write, into=into)

        if into is not None:
            _touch(into[start:end])
        with_retries(attempt, item.url)
        if into is not None:
            self.out.pwrite(into[start:written], start)
        return whole

    def head(self, start: int, end: int) -> bytes:
        """Bytes ``start:end`` of the part, fetched already (from ``into`` where it is given)."""
        if self.into is not None:
            return bytes(self.into[start:end])
        return pread_exact(self.out.fd, end - start, start)

    def copy(self, buffers: queue.SimpleQueue[memoryview]) -> None:
        """Copy the cached tensors into the file, in offset order, in pieces of about
        :data:`COPY_BYTES`, each read where its address is its file offset modulo
        :data:`~sepstore.directio.ALIGN`: straight into its place in ``into`` (page-aligned), where
        it is hashed and kept, or else into a page-aligned buffer (taken from ``buffers``, or made,
        and put back there) at that address. Then the piece's whole blocks go from there straight
        to the disk (:class:`~sepstore.directio.DirectFile`); only a tensor's partial end blocks,
        and a last piece too short to be worth it, go through the page cache."""
        into = self.into
        buffer = memoryview(b"")
        if into is None:
            try:
                buffer = buffers.get_nowait()
            except queue.Empty:
                buffer = memoryview(mmap.mmap(-1, -(-COPY_BYTES // ALIGN) * ALIGN + ALIGN))
        try:
            for source, at in self.copies:
                with open(source.path, "rb", buffering=0) as src:
                    done, count = 0, source.end - source.start
                    while done < count:
                        shift = (at + done) % ALIGN  # every piece but a tensor's last ends on a block
                        if into is None:
                            piece = buffer[shift : shift + min(len(buffer) - shift, count - done)]
                        else:
                            piece = into[at + done : at + done + min(COPY_BYTES - shift, count - done)]
                            _touch(piece)
                        got = os.preadv(src.fileno(), [piece], source.start + done)
                        if got <= 0:
                            raise IntegrityError(f"{source.path} is shorter than its index says")
                        self.digest.write(self.out, at + done, piece[:got], held=into is not None)
                        done += got
                self.reused += count
        finally:
            if into is None:
                buffers.put(buffer)


def _predicted(part: Part) -> tuple[list[tuple[str, int]], bytes]:
    """The tensors' offsets and the header (length prefix included) sepstore would write for the
    part's tensors (a ``KeyError`` for a dtype this sepstore does not know)."""
    return layout({n: RawTensor(t.dtype, tuple(t.shape)) for n, t in part.tensors.items()})


def predicted_head(part: Part) -> int:
    """The length of the header sepstore would write for the part's tensors (what to ask for first)."""
    return len(_predicted(part)[1])


def header_bound(part: Part) -> int | None:
    """The most bytes (length prefix included) of the part's header that are read from a server
    before its bytes are verified: sepstore's own header for its tensors plus :data:`HEADER_SLACK`;
    ``None`` for a part with a dtype this sepstore does not know (it is not read in pieces)."""
    if any(t.dtype not in ITEMSIZE for t in part.tensors.values()):
        return None
    return predicted_head(part) + HEADER_SLACK


def _matches(header: dict[str, HeaderEntry], part: Part) -> bool:
    return header.keys() == part.tensors.keys() and all(
        (e.dtype, e.shape) == (part.tensors[n].dtype, tuple(part.tensors[n].shape)) for n, e in header.items()
    )


def _join(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``spans`` sorted and joined across gaps of at most :data:`GAP_BYTES`."""
    joined: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if joined and start - joined[-1][1] <= GAP_BYTES:
            joined[-1] = (joined[-1][0], max(end, joined[-1][1]))
        else:
            joined.append((start, end))
    return joined


def plan_ranges(
    part: Part, spans: Iterable[tuple[str, int, int]], fetched: int, lengths: Mapping[str, int]
) -> tuple[list[tuple[str, int, int]], list[tuple[int, int]]]:
    """What assembling ``part`` copies and what it fetches, once its first ``fetched`` bytes (the
    header) are in: ``spans`` are its tensors' names and byte ranges in the file, ``lengths`` the
    byte length of each tensor digest the cache holds. A tensor is copied (the bytes ``start:end``
    of the new file, past the header) when the cache holds its digest with its length, unless it lies
    inside a range fetched anyway; the other tensors are fetched, in ranges joined across small gaps.
    The one rule for what a pull transfers, also what :func:`sepstore.diff` counts."""
    copies: list[tuple[str, int, int]] = []
    wanted: list[tuple[int, int]] = []
    for name, start, end in spans:
        if end <= fetched or end == start:  # in the header's bytes, or no bytes at all
            continue
        if lengths.get(part.tensors[name].digest) == end - start:
            copies.append((name, max(start, fetched), end))
        else:
            wanted.append((max(start, fetched), end))
    ranges = _join(wanted)
    starts = [start for start, _ in ranges]

    def fetched_anyway(start: int, end: int) -> bool:
        at = bisect.bisect_right(starts, start) - 1
        return at >= 0 and end <= ranges[at][1]

    return [c for c in copies if not fetched_anyway(c[1], c[2])], ranges


def transfer_bytes(part: Part, lengths: Mapping[str, int]) -> int:
    """Bytes a pull transfers to bring ``part`` into a cache holding the tensor digests (and their
    byte lengths) ``lengths``, when the part's header is the one sepstore writes: the header and
    the ranges :func:`plan_ranges` fetches, or the whole part when it is not assembled (less than
    :data:`MIN_REUSE` bytes to reuse, or a dtype this sepstore does not know)."""
    if header_bound(part) is None or _reusable(part, lengths) < MIN_REUSE:
        return part.size
    placed, head = _predicted(part)
    fetched = min(len(head), part.size)
    sizes = {n: RawTensor(t.dtype, tuple(t.shape)).nbytes for n, t in part.tensors.items()}
    _, ranges = plan_ranges(part, [(n, at, at + sizes[n]) for n, at in placed], fetched, lengths)
    return fetched + sum(end - start for start, end in ranges)


def _plan(plan: _Plan, known: dict[str, Source], lengths: Mapping[str, int]) -> None:
    """Fetch the part's header and decide, tensor by tensor, what is copied and what is fetched;
    nothing more to do when a server that ignores ``Range`` sent the whole part instead. A header
    longer than :func:`header_bound` is refused unread (the part is fetched whole)."""
    part = plan.item.part
    assert isinstance(part, Part)
    bound = header_bound(part)
    if bound is None:
        raise IntegrityError(f"{plan.item.url}: a dtype this sepstore does not know")
    os.ftruncate(plan.out.fd, part.size)
    asked = min(predicted_head(part), part.size)
    if plan.fetch(0, asked):
        return
    head = plan.head(0, asked)
    need = header_end(head, part.size)
    if need > bound:
        raise IntegrityError(f"{plan.item.url}: a header of {need} bytes, more than the {bound} its tensors need")
    if need > asked:
        plan.fetch(asked, need)
        head += plan.head(asked, need)
    header = parse_header(head, part.size, where=plan.item.url)
    if not _matches(header, part):
        raise IntegrityError(f"{plan.item.url}: the header does not list the manifest's tensors")
    fetched = max(asked, need)
    spans = [(name, entry.start, entry.end) for name, entry in header.items()]
    copies, ranges = plan_ranges(part, spans, fetched, lengths)
    for name, start, _ in sorted(copies, key=lambda copy: copy[1]):
        source, entry = known[part.tensors[name].digest], header[name]
        plan.copies.append((Source(source.part, source.path, source.start + start - entry.start, source.end), start))
    plan.ranges = [(at, min(at + CHUNK_BYTES, end)) for start, end in ranges for at in range(start, end, CHUNK_BYTES)]
    plan.planned = fetched + sum(end - start for start, end in ranges)
    if plan.bar is not None:  # the bar counts bytes transferred: the copied ones never are
        plan.bar.total -= part.size - plan.planned


def _succeeds(call: Callable[[], object]) -> bool:
    """Whether ``call`` ran without an error: any failure means the part is fetched whole, and
    that fetch reports its own errors."""
    try:
        call()
    except Exception:
        return False
    return True


def _attempt(
    plans: Sequence[_Plan], known: dict[str, Source], lengths: Mapping[str, int], cache: Cache, workers: int
) -> None:
    """Plan, copy, fetch and commit every part of ``plans`` (each plan's ``verified`` says how it
    went). A part's ranged reads and copies start as soon as its own header is in, not after every
    part's (on moto's S3 the headers took 0.9 s, bench_delta.py). Ranged reads have ``workers``
    threads of their own and are asked for before the part's copies, so the network is busy at once
    and never waits behind local copies (``workers`` threads too: fewer leave a loaded machine's
    cores to other processes, bench_delta.py). A part is committed by the thread that ends its last
    copy or fetch, so its ``fsync`` overlaps the other parts' work."""

    def run(plan: _Plan, task: Callable[[], object]) -> None:
        ok = _succeeds(task)
        with plan._lock:
            plan.failed |= not ok
            plan.left -= 1
            last = plan.left == 0
        if last:
            plan.out.close()  # every byte is written: its descriptors are not held while other parts go on
            if not plan.failed:
                plan.verified = _succeeds(partial(_commit, plan, cache))

    def begin(plan: _Plan) -> None:
        if not _succeeds(partial(_plan, plan, known, lengths)):
            return
        plan.left = 1 + len(plan.ranges)
        for start, end in plan.ranges:
            fetches.submit(run, plan, partial(plan.fetch, start, end))
        copies.submit(run, plan, partial(plan.copy, buffers))  # the part's copies in order, by one thread

    buffers: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
    with (
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sepstore-delta") as fetches,
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sepstore-copy") as copies,
    ):
        for planned in [fetches.submit(begin, p) for p in plans]:  # every copy is asked for before `copies` closes
            planned.result()


def assemble(
    cache: Cache,
    items: Sequence[Fetch],
    *,
    workers: int,
    bar: tqdm | None = None,
    transfer: Transfer,
    into: Mapping[str, memoryview] | None = None,
) -> list[Fetch]:
    """Assemble into the cache those of ``items`` (parts it lacks) that have at least
    :data:`MIN_REUSE` bytes of tensors cached already; returns those now cached, verified. The
    others (too little to reuse, a part another process is fetching, any failure or mismatch) are
    left for a whole fetch.
    A part whose digest ``into`` maps to page-aligned memory of its size (as
    :meth:`~sepstore.cache.Cache.fetch` takes) is assembled in that memory, hashed there and
    written to the file from there: once it is among those returned, the memory holds its
    verified bytes, and its tensors need not be read back from the file.
    ``transfer`` counts the bytes fetched, and those copied into parts that verified (a part
    fetched whole after all reuses nothing); ``bar`` counts the bytes fetched."""
    parts = [i for i in items if isinstance(i.part, Part) and i.part.tensors]
    if not parts:
        return []
    index = TensorIndex(cache)
    known = index.load()
    if not known:
        return []
    try:  # where parts are locked and assembled; it may have been deleted (it holds nothing else)
        os.makedirs(cache.incoming, exist_ok=True)
    except OSError:
        return []  # the whole fetch says what is wrong with the cache
    _sweep(cache)
    lengths = {digest: source.end - source.start for digest, source in known.items()}
    chosen = [i for i in parts if _reusable(i.part, lengths) >= MIN_REUSE]
    done: list[Fetch] = []
    with contextlib.ExitStack() as held:
        plans: list[_Plan] = []
        for item in chosen:
            try:
                free = held.enter_context(file_lock(cache.lock_path(item.part.digest), blocking=False))
            except OSError:
                continue  # the whole fetch says what is wrong with the cache
            if not free:
                continue  # another process is fetching it: the whole fetch waits for that
            if cache.has(item.part):
                continue
            tmp = os.path.join(cache.incoming, f"{digest_hex(item.part.digest)}{ASSEMBLING}")
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666))
                out = DirectFile(tmp)
            except OSError:
                continue  # the whole fetch says what is wrong with the cache
            held.callback(out.close)
            memory = (into or {}).get(item.part.digest)
            digest = InOrderDigest(tmp, item.part.size, item.label, memory)
            plans.append(_Plan(item, tmp, out, bar, transfer, digest, memory, planned=item.part.size))
        _attempt(plans, known, lengths, cache, workers)
        for plan in plans:
            part = plan.item.part
            if plan.verified:
                transfer.add(reused=plan.reused)
                done.append(plan.item)
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(plan.tmp)
            if plan.verified is False:  # the bytes copied were not what the index said: stop trusting it
                index.forget({s.part for s, _ in plan.copies})
            if bar is not None:  # the whole fetch adds the part's size to what this one sent
                bar.total += plan.sent + part.size - plan.planned
    index.remember(item.part for item in done)
    return done


def _commit(plan: _Plan, cache: Cache) -> None:
    """Rename the assembled part into the cache if its digest is the manifest's (what a whole
    fetch checks), else an :class:`IntegrityError`."""
    got, part = plan.digest.result(), plan.item.part
    if got != part.digest:
        raise IntegrityError(f"part {plan.item.label} assembled: digest is {got}, manifest says {part.digest}")
    replace_durably(plan.tmp, cache.path(part))


def _sweep(cache: Cache) -> None:
    """Delete the files of assemblies a killed process left in ``incoming/`` (those whose part's
    lock no one holds)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(cache.incoming):
            hex_, _, suffix = name.partition(".")
            if "." + suffix != ASSEMBLING or not _HEX.fullmatch(hex_):
                continue
            with file_lock(cache.lock_path(f"blake3:{hex_}"), blocking=False) as free:
                if free:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(cache.incoming, name))


def _sweep_temp(path: str) -> None:
    """Delete an index file a killed process left half written (one older than
    :data:`STALE_TEMP_SECONDS`: a younger one may be another process's, being written)."""
    with contextlib.suppress(OSError):
        if time.time() - os.stat(path).st_mtime > STALE_TEMP_SECONDS:
            os.unlink(path)


def _reusable(part: Blob, lengths: Mapping[str, int]) -> int:
    """Bytes of ``part``'s tensors whose digests the cache holds (``lengths``: their byte lengths)."""
    assert isinstance(part, Part)
    return sum(lengths[t.digest] for t in part.tensors.values() if t.digest in lengths)
