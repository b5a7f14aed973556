"""Signing benchmark: what signing a model version and checking a trust policy cost, next to hashing
the model's parts (what every load, pull and verify does anyway).

Run by hand from the repository root (pytest skips tests/benchmarks):

    .venv/bin/python tests/benchmarks/bench_sign.py                          # TinyLlama-1.1B shapes, 5 repeats
    .venv/bin/python tests/benchmarks/bench_sign.py --layers 6 --repeats 3   # quick

It writes a seeded synthetic checkpoint (Hugging Face layout, bf16, about 2 GiB at full size) into
``--workdir`` (kept and reused unless ``--clean``), converts it into a store, makes a key, then
times, interleaved: BLAKE3 of every part file (page cache warm), ``sign`` (build the statement,
sign it, write the bundle), and ``read_manifest`` with and without ``trust=`` (the difference is
what a policy adds to every read: fetch the bundle, verify the signature, check the claim,
update the rollback state). It prints medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from _checkpoint import LAYERS, write_tinyllama_checkpoint

import sepstore
from sepstore.hashing import digest_file


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sepstore-bench-sign"))
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clean", action="store_true", help="delete --workdir at the end")
    args = parser.parse_args()

    checkpoint, store = args.workdir / f"checkpoint-{args.layers}", args.workdir / f"store-{args.layers}"
    write_tinyllama_checkpoint(checkpoint, layers=args.layers)
    if not store.exists():
        sepstore.convert(checkpoint, store, name="bench/tinyllama", tag="v1", quiet=True)
    key = args.workdir / "bench.key"
    if not key.exists():
        sepstore.keygen(key)
    os.environ["SEPSTORE_CACHE"] = str(args.workdir / "cache")
    parts = sorted((store / "parts/blake3").iterdir())
    total = sum(p.stat().st_size for p in parts)

    sepstore.sign(store, key=key)  # a first signature, and a warm page cache
    for part in parts:
        digest_file(part)
    timings = {
        "BLAKE3 of every part": median_seconds(lambda: [digest_file(p) for p in parts], args.repeats),
        "sign": median_seconds(lambda: sepstore.sign(store, key=key), args.repeats),
        "read_manifest": median_seconds(lambda: sepstore.read_manifest(store), args.repeats),
        "read_manifest, trust=": median_seconds(
            lambda: sepstore.read_manifest(store, trust=f"{key}.pub"), args.repeats
        ),
    }
    bundle = next((store / "signatures").rglob("*.json")).stat().st_size
    size = f"{total / 2**30:.2f} GiB"
    print(f"{len(parts)} parts, {size}; a bundle is {bundle / 1024:.1f} KiB; medians of {args.repeats}")
    for what, seconds in timings.items():
        print(f"  {what:<24} {seconds * 1000:9.1f} ms")
    policy = timings["read_manifest, trust="] - timings["read_manifest"]
    hashing = timings["BLAKE3 of every part"]
    print(f"  a policy adds {policy * 1000:.1f} ms to a read ({policy / hashing:.2%} of hashing the parts once);")
    print(f"  signing takes {timings['sign'] / hashing:.2%} of it")
    if args.clean:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
