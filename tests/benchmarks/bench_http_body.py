"""HTTP bodies alone: ``stream_range`` of one large file from nginx on 127.0.0.1 into a preallocated
buffer, as ``load`` by URL receives parts (ranged chunks in parallel threads, each read straight
into its place), through sepstore's own connection pool (:mod:`sepstore.httpio`) and through
fsspec's aiohttp session, with several piece sizes; wall time and this process's CPU time (user and
system), which say more than wall time on a loaded machine.

Run by hand from the repository root (pytest skips tests/benchmarks):

    .venv/bin/python tests/benchmarks/bench_http_body.py FILE                  # FILE: 2 GiB or so
    .venv/bin/python tests/benchmarks/bench_http_body.py FILE --pieces 1 4 16 --rounds 5 --hash

Measured on the 2-core box of issue 15 (2.2 GB file, 3 rounds, load average 0.6-2.5): the pool
1.6 / 1.8 / 2.0 GB/s with 1 / 4 / 16 MiB pieces (0.2 s user, 0.65-0.8 s system CPU), aiohttp
0.9 / 1.0 / 0.9 GB/s (1.2-1.3 s user, 0.85-0.95 s system); eight curls moved it at about 2 GB/s.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_remote import nginx_server
from blake3 import blake3

import sepstore.backends as backends
from sepstore.backends import open_url, stream_range

CHUNK = 32 * 2**20
WORKERS = 8


def fetch(url: str, size: int, into: memoryview, hashing: bool) -> None:
    """``size`` bytes of ``url`` into ``into``, in ``CHUNK``-byte ranges on ``WORKERS`` threads."""
    fs, path = open_url(url)

    def chunk(start: int) -> None:
        end = min(start + CHUNK, size)
        ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(into[start:end])), 0, end - start)  # map the pages
        hasher = blake3() if hashing else None

        def write(offset: int, piece: memoryview) -> None:
            if hasher is not None:
                hasher.update(piece)

        stream_range(fs, path, url, start, end, size, write, into=into)

    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(chunk, range(0, size, CHUNK)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path, help="the file nginx serves (a copy goes into a scratch folder)")
    parser.add_argument("--pieces", type=int, nargs="+", default=[4], help="PIECE_BYTES in MiB (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--hash", action="store_true", help="BLAKE3 each piece as it comes, as the cache does")
    args = parser.parse_args()
    size = args.file.stat().st_size
    pooled = backends._pooled_options
    bodies: dict[str, Callable[[object], object]] = {"pool": pooled, "aiohttp": lambda fs: None}
    times: dict[str, list[tuple[float, float, float]]] = {}
    print(f"{size / 1e9:.2f} GB, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "www").mkdir()
        shutil.copy(args.file, root / "www" / "blob")
        with nginx_server(root / "nginx", root / "www") as base:
            for _ in range(args.rounds):
                into = memoryview(bytearray(size))
                for name, options in bodies.items():
                    for piece in args.pieces:
                        backends._pooled_options, backends.PIECE_BYTES = options, piece * 2**20  # type: ignore[assignment]
                        before, began = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                        fetch(f"{base}/blob", size, into, args.hash)
                        wall, after = time.perf_counter() - began, resource.getrusage(resource.RUSAGE_SELF)
                        user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
                        times.setdefault(f"{name}, {piece} MiB pieces", []).append((wall, user, system))
                del into
    backends._pooled_options = pooled
    print(f"{'body':<28}{'GB/s (median)':>14}{'user s':>8}{'sys s':>7}   GB/s each round")
    for label, runs in times.items():
        wall = statistics.median(w for w, _, _ in runs)
        user, system = statistics.median(u for _, u, _ in runs), statistics.median(s for _, _, s in runs)
        each = " ".join(f"{size / 1e9 / w:.2f}" for w, _, _ in runs)
        print(f"{label:<28}{size / 1e9 / wall:>14.2f}{user:>8.2f}{system:>7.2f}   {each}")
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
