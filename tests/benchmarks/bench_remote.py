"""Remote benchmark: sepstore against its anchors, over nginx (HTTP) and moto's S3 server on 127.0.0.1.

Run by hand from the repository root (pytest skips tests/benchmarks):

    .venv/bin/python tests/benchmarks/bench_remote.py                          # full size, 3 repeats
    .venv/bin/python tests/benchmarks/bench_remote.py --layers 4 --repeats 2   # quick
    .venv/bin/python tests/benchmarks/bench_remote.py --clean                  # delete --workdir at the end
    .venv/bin/python tests/benchmarks/bench_remote.py --chunk-mib 32 128 --workers 8 16   # sweep pull settings
    .venv/bin/python tests/benchmarks/bench_remote.py --repeats 5 --skip-push            # the issue-15 run
    .venv/bin/python tests/benchmarks/bench_remote.py --only http --repeats 5            # nginx anchors only

It writes (or reuses) a seeded TinyLlama-1.1B-shaped checkpoint (bf16, about 2 GiB at full size) in
``--checkpoint`` if given, else in ``./bench-load/checkpoint`` if a complete one with these layers is
there (bench_load.py's), else in ``<workdir>/checkpoint``; dumps it into a local store as
``tinyllama:v1`` (begin + 22 layers + end = 24 parts); starts moto's ``ThreadedMotoServer`` on
127.0.0.1 (in a child process by default, so the server does not share the benchmark's GIL;
``--server thread`` runs it in this process) and points the AWS environment variables at it.
Then, interleaved, ``--repeats`` times each:

- push: ``sepstore.push(store, "s3://bench/store")`` (HEAD per part, BLAKE3 of every local part,
  upload, manifest last) against ``s3fs.S3FileSystem().put`` of the same part files to another
  prefix. Both destinations are emptied before each call.
- pull: ``sepstore.pull(manifest_url, "f", cache_dir=<empty folder>)`` (ranged GETs of
  ``CHUNK_BYTES`` into the cache, every part hashed and checked before it gets its name) against
  ``s3fs.S3FileSystem(skip_instance_cache=True).get([24 objects], [24 local paths])`` into an empty
  folder. Both start without an s3fs instance (the instance cache is cleared before each call),
  so both pay for a new session and new connections. Target: sepstore / s3fs <= 1.1x.
- pull ``"b 0-5"`` (information only).

``--chunk-mib`` and ``--workers`` take several values to time sepstore's pull with each
combination (``sepstore.cache.CHUNK_BYTES`` and ``pull(workers=...)``) against the same baseline;
``--skip-push`` pushes once untimed and times only the pulls.
Also printed: BLAKE3 of all parts from the warm page cache (the verification's own cost).

HTTP (``--only http``, or both by default): Debian's nginx (``/usr/sbin/nginx``, started as a child
with its own config, ``sendfile on``, ``Range`` answered as nginx does by default) serves the local
store on 127.0.0.1; then, interleaved (the order turns each round), ``--repeats`` times each, every
sepstore call into a new empty cache:

- ``sepstore.load(url)``: the whole model by URL, what a node does (fetch, verify, tensors in memory);
- ``sepstore.pull(url)`` then ``sepstore.load(url)``: two calls, so the second re-verifies the cache;
- the floor: eight parallel ``curl -r`` range requests covering the tensorizer file, to /dev/null;
- CoreWeave tensorizer (``pip install tensorizer``; skipped with a note if it is not installed):
  ``TensorDeserializer(url)`` of the same tensors, serialized once to a ``.tensors`` file that the
  same nginx serves, with ``verify_hash=True`` (its per-tensor hashes) and without.

Targets (issue 15): load <= 0.7x tensorizer verified and <= 3x the eight-curl floor.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import s3fs
import torch
from _checkpoint import INDEX, read_state_dict, tinyllama_config, tinyllama_shapes, write_tinyllama_checkpoint
from _env import point_aws_at
from moto.server import ThreadedMotoServer

import sepstore
import sepstore.cache
from sepstore.demo import llama_decider
from sepstore.hashing import digest_file, digest_hex

BUCKET = "bench"
NAME, TAG = "tinyllama", "v1"
STORE_URL = f"s3://{BUCKET}/store"
BASELINE = f"{BUCKET}/baseline/parts/blake3"
GB = 1e9


# -- the server ----------------------------------------------------------------------------------


def _serve(conn: Connection) -> None:
    """Child process: run moto's server until the parent says stop."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    conn.send(server.get_host_and_port())
    conn.recv()
    server.stop()


@contextlib.contextmanager
def moto_server(mode: str) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1, in a child process or this one; yields its endpoint URL."""
    if mode == "thread":
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield f"http://{host}:{port}"
        finally:
            server.stop()
        return
    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    process = multiprocessing.get_context("spawn").Process(target=_serve, args=(theirs,), daemon=True)
    process.start()
    try:
        host, port = ours.recv()
        yield f"http://{host}:{port}"
    finally:
        ours.send("stop")
        process.join(10)
        if process.is_alive():
            process.terminate()


NGINX = "/usr/sbin/nginx"
NGINX_CONF = """\
worker_processes 2;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
user root;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {root}/tmp;
    proxy_temp_path {root}/tmp;
    fastcgi_temp_path {root}/tmp;
    uwsgi_temp_path {root}/tmp;
    scgi_temp_path {root}/tmp;
    types {{ application/json json; }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {serve};
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def nginx_server(root: Path, serve: Path) -> Iterator[str]:
    """nginx serving the folder ``serve`` on 127.0.0.1 (config and logs in ``root``); yields its URL."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    port = _free_port()
    conf = root / "nginx.conf"
    conf.write_text(NGINX_CONF.format(root=root, port=port, serve=serve))
    process = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(root), "-g", "daemon off;"])
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def fresh_fs() -> s3fs.S3FileSystem:
    """A new s3fs instance (new session, new connections), and no cached one left for sepstore."""
    s3fs.S3FileSystem.clear_instance_cache()
    return s3fs.S3FileSystem(skip_instance_cache=True)


# -- preparing -----------------------------------------------------------------------------------


def checkpoint_path(args: argparse.Namespace) -> Path:
    """``--checkpoint``, else ``./bench-load/checkpoint`` if complete with these layers, else the workdir's."""
    if args.checkpoint is not None:
        return Path(args.checkpoint).resolve()
    shared = Path("bench-load/checkpoint")
    with contextlib.suppress(OSError, ValueError, KeyError):
        config = json.loads((shared / "config.json").read_text())
        if (shared / INDEX).is_file() and config["num_hidden_layers"] == args.layers:
            return shared.resolve()
    return args.workdir / "checkpoint"


def prepare(args: argparse.Namespace) -> tuple[Path, list[tuple[str, int]]]:
    """Write (or reuse) the checkpoint and dump it; the local store and its parts' (hex, size)."""
    ckpt, store = checkpoint_path(args), args.workdir / "store"
    start = time.perf_counter()
    write_tinyllama_checkpoint(ckpt, layers=args.layers)
    sd = read_state_dict(ckpt)
    size = sum(v.nbytes for v in sd.values())
    print(f"checkpoint: {args.layers} layers, {len(sd)} tensors, {size / 2**30:.2f} GiB bf16 at {ckpt}", end=" ")
    print(f"(ready in {time.perf_counter() - start:.1f} s)")
    shutil.rmtree(store, ignore_errors=True)
    start = time.perf_counter()
    manifest = sepstore.dump(llama_decider, sd, store, name=NAME, tag=TAG, config=tinyllama_config(args.layers))
    del sd
    parts = {p.digest: p.size for _, p in manifest.labelled_parts()}
    print(f"dump: {len(parts)} parts, {sum(parts.values()) / GB:.3f} GB, {time.perf_counter() - start:.1f} s")
    return store, [(digest_hex(d), s) for d, s in parts.items()]


# -- the timed steps -----------------------------------------------------------------------------


def part_files(store: Path, parts: list[tuple[str, int]]) -> list[str]:
    return [str(store / "parts" / "blake3" / f"{h}.safetensors") for h, _ in parts]


def empty_remote(prefix: str) -> None:
    fs = fresh_fs()
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)
    s3fs.S3FileSystem.clear_instance_cache()


def push_sepstore(store: Path) -> None:
    report = sepstore.push(store, STORE_URL, quiet=True)
    if not report.uploaded or report.skipped:
        raise RuntimeError(f"push uploaded {len(report.uploaded)}, skipped {len(report.skipped)}")


def push_s3fs(store: Path, parts: list[tuple[str, int]]) -> None:
    fresh_fs().put(part_files(store, parts), [f"{BASELINE}/{h}.safetensors" for h, _ in parts])


def pull_sepstore(cache: Path, spec: str, chunk: int, workers: int) -> int:
    """A verified pull into the empty cache ``cache``; bytes fetched."""
    s3fs.S3FileSystem.clear_instance_cache()
    sepstore.cache.CHUNK_BYTES = chunk
    url = f"{STORE_URL}/manifests/{NAME}/{TAG}.json"
    report = sepstore.pull(url, spec, cache_dir=cache, workers=workers, quiet=True)
    if report.present_bytes or not all(os.path.exists(p) for p in report.paths.values()):
        raise RuntimeError("pull did not fetch every part into the empty cache")
    return report.fetched_bytes


def pull_s3fs(folder: Path, parts: list[tuple[str, int]]) -> int:
    """A plain s3fs get of the same part objects into the empty ``folder``; bytes fetched."""
    fs = fresh_fs()
    local = [str(folder / f"{h}.safetensors") for h, _ in parts]
    fs.get([f"{BUCKET}/store/parts/blake3/{h}.safetensors" for h, _ in parts], local)
    if [os.path.getsize(p) for p in local] != [s for _, s in parts]:
        raise RuntimeError("s3fs get returned files of the wrong size")
    return sum(s for _, s in parts)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_in_empty(root: Path, fn: Callable[[Path], object]) -> float:
    """Seconds for ``fn(folder)`` with a new empty folder, deleted afterwards (not timed)."""
    folder = Path(tempfile.mkdtemp(prefix="pull-", dir=root))
    try:
        return timed(lambda: fn(folder))
    finally:
        shutil.rmtree(folder)


def load_sepstore(url: str, cache: Path, total: int) -> None:
    loaded = sepstore.load(url, cache_dir=cache).to_dict()
    if sum(t.nbytes for t in loaded.values()) > total:
        raise RuntimeError("load returned more bytes than the parts hold")


def pull_then_load(url: str, cache: Path, total: int) -> None:
    sepstore.pull(url, cache_dir=cache, quiet=True)
    load_sepstore(url, cache, total)


def curl_floor(url: str, size: int, streams: int = 8) -> None:
    """``streams`` parallel ``curl`` range requests that cover ``size`` bytes of ``url``, to /dev/null."""
    bounds = [size * i // streams for i in range(streams + 1)]
    calls = [["curl", "-sf", "-r", f"{a}-{b - 1}", "-o", "/dev/null", url] for a, b in itertools.pairwise(bounds)]
    running = [subprocess.Popen(call) for call in calls]
    if any(p.wait() for p in running):
        raise RuntimeError("a curl range request failed")


def tensorizer_file(args: argparse.Namespace, folder: Path) -> Path | None:
    """The checkpoint serialized by tensorizer into ``folder`` (reused if there); ``None`` without tensorizer."""
    try:
        from tensorizer import TensorSerializer
    except ImportError:
        print("tensorizer is not installed (pip install tensorizer): its anchors are skipped")
        return None
    path, stamp = folder / "model.tensors", folder / "layers"
    if path.is_file() and stamp.is_file() and stamp.read_text() == str(args.layers):
        return path
    folder.mkdir(parents=True, exist_ok=True)
    serializer = TensorSerializer(str(path))
    serializer.write_state_dict(read_state_dict(checkpoint_path(args)))
    serializer.close()
    stamp.write_text(str(args.layers))
    return path


def load_tensorizer(url: str, verify: bool, total: int) -> None:
    from tensorizer import TensorDeserializer

    with TensorDeserializer(url, device="cpu", verify_hash=verify) as tensors:
        got = sum(t.nbytes for t in tensors.values())
    if got != total:
        raise RuntimeError(f"tensorizer loaded {got} bytes of tensors, expected {total}")


def bench_http(args: argparse.Namespace, tensor_bytes: int) -> None:
    """The nginx anchors: load and pull+load by URL against eight curls and tensorizer."""
    ours = args.workdir / "tensorizer"
    tfile = tensorizer_file(args, ours)
    with nginx_server(args.workdir / "nginx", args.workdir) as base:
        url = f"{base}/store/manifests/{NAME}/{TAG}.json"
        print(f"\nnginx at {base}, serving {args.workdir}")
        floor_url, floor_size = (f"{base}/tensorizer/model.tensors", tfile.stat().st_size) if tfile else (None, 0)
        if tfile is None:  # the floor then covers the store's parts (fewer, bigger requests are not possible)
            floor_url = f"{base}/store/parts/blake3/" + max(os.listdir(args.workdir / "store/parts/blake3"))
            floor_size = os.path.getsize(args.workdir / "store/parts/blake3" / floor_url.rsplit("/", 1)[1])
        runs: list[tuple[str, Callable[[Path], object]]] = [
            ("sepstore load (URL, empty cache)", lambda d: load_sepstore(url, d, tensor_bytes)),
            ("sepstore pull, then load", lambda d: pull_then_load(url, d, tensor_bytes)),
            ("8 curl ranges to /dev/null (floor)", lambda d: curl_floor(floor_url, floor_size)),
        ]
        if tfile is not None:
            turl = f"{base}/tensorizer/model.tensors"
            runs += [
                ("tensorizer, verify_hash=True", lambda d: load_tensorizer(turl, True, tensor_bytes)),
                ("tensorizer, verify_hash=False", lambda d: load_tensorizer(turl, False, tensor_bytes)),
            ]
        table = Table(tensor_bytes)
        for i in range(args.repeats):
            turn = i % len(runs)
            for name, run in runs[turn:] + runs[:turn]:
                table.add(name, timed_in_empty(args.workdir, run))
        table.print(f"HTTP (nginx), {tensor_bytes / GB:.3f} GB of tensors, empty cache, {args.repeats} rounds")
        load, floor = "sepstore load (URL, empty cache)", "8 curl ranges to /dev/null (floor)"
        if tfile is not None:
            table.ratio(load, "tensorizer, verify_hash=True", target=0.7)
            table.ratio(load, "tensorizer, verify_hash=False")
        table.ratio(load, floor, target=3.0)
        table.ratio("sepstore pull, then load", load)
        if tfile is not None:
            table.ratio("tensorizer, verify_hash=True", floor)


# -- reporting -----------------------------------------------------------------------------------


class Table:
    def __init__(self, total: int) -> None:
        self.total = total
        self.rows: dict[str, list[float]] = {}

    def add(self, label: str, seconds: float) -> None:
        self.rows.setdefault(label, []).append(seconds)

    def print(self, title: str) -> None:
        print(f"\n{title:<52}{'min s':>9}{'median s':>10}{'GB/s':>8}   each repeat, s (GB/s from the median)")
        for label, times in self.rows.items():
            low, mid = min(times), statistics.median(times)
            every = " ".join(f"{t:.2f}" for t in times)
            print(f"{label:<52}{low:>9.3f}{mid:>10.3f}{self.total / GB / mid:>8.2f}   {every}")

    def ratio(self, ours: str, theirs: str, target: float | None = None) -> None:
        a, b = self.rows[ours], self.rows[theirs]
        median = statistics.median(a) / statistics.median(b)
        verdict = "" if target is None else f"   target <= {target}x: {'met' if median <= target else 'NOT met'}"
        print(f"  {ours} / {theirs}: min {min(a) / min(b):.2f}x, median {median:.2f}x{verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("bench-remote"), help="scratch folder (./bench-remote)")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint folder to write or reuse")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant (default 3)")
    parser.add_argument("--layers", type=int, default=22, help="transformer layers (default 22, TinyLlama)")
    parser.add_argument("--server", choices=("process", "thread"), default="process", help="where moto runs")
    parser.add_argument("--chunk-mib", type=int, nargs="+", help="sepstore CHUNK_BYTES in MiB (default: library's)")
    parser.add_argument("--workers", type=int, nargs="+", help="sepstore pull workers (default: library's)")
    parser.add_argument("--skip-push", action="store_true", help="push once (untimed) and time only the pulls")
    parser.add_argument("--only", choices=("http", "s3"), help="run only the HTTP (nginx) or the S3 (moto) part")
    parser.add_argument("--clean", action="store_true", help="delete --workdir at the end")
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    chunks = [m * 2**20 for m in args.chunk_mib] if args.chunk_mib else [sepstore.cache.CHUNK_BYTES]
    workers = args.workers or [sepstore.cache.DEFAULT_WORKERS]
    default_chunk = sepstore.cache.CHUNK_BYTES
    print(f"machine: {os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"torch {torch.__version__}, s3fs {s3fs.__version__}, moto server in a {args.server}")

    store, parts = prepare(args)
    total = sum(s for _, s in parts)
    files = part_files(store, parts)
    hashing = [timed(lambda: [digest_file(f) for f in files]) for _ in range(3)]
    best = min(hashing)
    print(f"BLAKE3 of all {len(parts)} parts, page cache warm: {best:.3f} s ({total / GB / best:.2f} GB/s)")
    if args.only != "s3":
        tensor_bytes = sum(2 * int(torch.Size(s).numel()) for s in tinyllama_shapes(args.layers).values())
        bench_http(args, tensor_bytes)
    if args.only != "http":
        bench_s3(args, store, parts, chunks, workers)
    sepstore.cache.CHUNK_BYTES = default_chunk
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    shutil.rmtree(store)
    if args.clean:
        shutil.rmtree(args.workdir)


def bench_s3(
    args: argparse.Namespace, store: Path, parts: list[tuple[str, int]], chunks: list[int], workers: list[int]
) -> None:
    """The moto anchors: push against s3fs put, pull against s3fs get."""
    total = sum(s for _, s in parts)
    default_chunk = sepstore.cache.CHUNK_BYTES
    with moto_server(args.server) as endpoint:
        point_aws_at(endpoint)
        fresh_fs().mkdir(BUCKET)
        print(f"moto S3 at {endpoint}, bucket {BUCKET}")

        push = Table(total)
        uploads: list[tuple[str, str, Callable[[], object]]] = [
            ("sepstore push (verified)", STORE_URL, lambda: push_sepstore(store)),
            ("s3fs put (plain)", BASELINE, lambda: push_s3fs(store, parts)),
        ]
        for i in range(args.repeats if not args.skip_push else 0):
            for label, prefix, upload in uploads if i % 2 == 0 else uploads[::-1]:
                empty_remote(prefix)
                push.add(label, timed(upload))
        empty_remote(BASELINE)
        if args.skip_push:
            empty_remote(STORE_URL)
            push_sepstore(store)
        else:
            push.print(f"push {len(parts)} parts, {total / GB:.3f} GB")
            push.ratio("sepstore push (verified)", "s3fs put (plain)")

        pull = Table(total)
        combos = [(c, w) for c in chunks for w in workers]
        names = {(c, w): f"sepstore pull f ({c // 2**20} MiB chunks, {w} workers)" for c, w in combos}
        gets: list[tuple[str, Callable[[Path], object]]] = [("s3fs get (plain)", lambda d: pull_s3fs(d, parts))]
        gets += [(names[c, w], lambda d, c=c, w=w: pull_sepstore(d, "f", c, w)) for c, w in combos]
        for i in range(args.repeats):
            for name, get in gets if i % 2 == 0 else gets[::-1]:
                pull.add(name, timed_in_empty(args.workdir, get))
        pull.print(f"pull {len(parts)} parts, {total / GB:.3f} GB, empty cache")
        for c, w in combos:
            pull.ratio(names[c, w], "s3fs get (plain)", target=1.1)

        spec, setting = f"b 0-{min(5, args.layers)}", (default_chunk, sepstore.cache.DEFAULT_WORKERS)
        small, fetched = Table(0), list[int]()
        for _ in range(args.repeats):
            seconds = timed_in_empty(args.workdir, lambda d: fetched.append(pull_sepstore(d, spec, *setting)))
            small.add(f"sepstore pull {spec!r}", seconds)
        small.total = fetched[0]
        small.print(f"pull {spec!r}, {small.total / GB:.3f} GB, empty cache (information)")


if __name__ == "__main__":
    main()
