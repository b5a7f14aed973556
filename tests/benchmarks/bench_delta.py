"""Tensor-level delta benchmark: a fine-tune that changes q_proj and v_proj in every layer (a merged
LoRA), published to S3 after v1 and pulled by a node that holds v1, over moto's S3 and over nginx.

Run by hand from the repository root (pytest skips tests/benchmarks):

    .venv/bin/python tests/benchmarks/bench_delta.py                    # TinyLlama shapes, 2 GiB
    .venv/bin/python tests/benchmarks/bench_delta.py --layers 4         # quick
    .venv/bin/python tests/benchmarks/bench_delta.py --repeats 3 --clean

It writes (or reuses) bench_remote.py's seeded TinyLlama-1.1B-shaped checkpoint (bf16) as v1 and
makes v2 from it with every layer's ``q_proj`` and ``v_proj`` changed (8 + 1 MiB of a 42 MiB
layer); dumps both into one local store (``tinyllama:v1``, ``tinyllama:v2``), served as it is by
Debian's nginx (``/usr/sbin/nginx``, with ``Range``; the aiohttp test server if nginx is missing);
starts moto's S3 server in a child process; then:

- publisher: ``push`` v1 to ``s3://bench/store`` (untimed), then ``push`` v2 there (timed):
  bytes sent in PUT bodies (the report's ``transferred_bytes``) against the changed tensors' bytes.
  Target <= 1.2x.
- node: pulls v1 into a cache once (untimed); then, round after round (``--repeats``), over each
  link, a copy of that cache (hard links) is upgraded to v2 with ``pull`` assembling parts from
  cached tensors (tensor-level) and with parts fetched whole (``sepstore.delta.MIN_REUSE`` set out
  of reach: the part-level upgrade as before), in an order that turns each round. Links: moto's S3
  on loopback (``--http-only`` skips it) and nginx for each ``--link-gbit`` (default ``0 10 1``):
  0 is loopback with no limit; a rate is modelled by nginx's ``limit_rate`` of rate/8/8 bytes a
  second on each of pull's 8 connections (so no more than that in all: a server's rate, not a real
  link's latency or loss). Bytes fetched (headers, changed tensors, the manifest) against the
  changed tensors' bytes, target <= 1.1x; time against the part-level upgrade, target <= 0.3x.
- the local floor, once a round: v2's new parts, read into memory first, written into new files
  and BLAKE3'd one after another by one thread, each fsynced by a second thread while the next is
  written; no network, nothing to read. Both upgrades write and hash every byte of those parts too,
  so on loopback, where the part-level upgrade moves bytes at memory speed, the tensor-level one
  saves little more than the part-level upgrade's time beyond this; it is printed as a fraction of
  each loopback part-level time (on a shared VM, writing fresh page-cache pages varies 2-3x).

Last lines: a table of every link's medians and ratio against the target.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import s3fs
import torch
from _checkpoint import read_state_dict, tinyllama_config, write_tinyllama_checkpoint
from _env import point_aws_at
from bench_remote import checkpoint_path, fresh_fs, moto_server

import sepstore
import sepstore.delta
from sepstore.cache import DEFAULT_WORKERS
from sepstore.demo import llama_decider
from sepstore.directio import WRITE_SLICE
from sepstore.hashing import Hasher, digest_hex

NAME = "tinyllama"
BUCKET = "bench"
STORE_URL = f"s3://{BUCKET}/store"
CHANGED = ("q_proj.weight", "v_proj.weight")
MB = 1e6


def lora_merged(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` with every layer's q_proj and v_proj changed (each element moved by a small step)."""
    return {k: (v + 0.001).to(v.dtype) if k.endswith(CHANGED) else v for k, v in sd.items()}


def prepare(args: argparse.Namespace, store: Path) -> tuple[int, list[Path]]:
    """Dump v1 and v2 into ``store``; the changed tensors' bytes, and the files of v2's parts that
    v1 lacks."""
    ckpt = checkpoint_path(args)
    write_tinyllama_checkpoint(ckpt, layers=args.layers)
    v1 = read_state_dict(ckpt)
    v2 = lora_merged(v1)
    changed = sum(v.nbytes for k, v in v2.items() if k.endswith(CHANGED))
    shutil.rmtree(store, ignore_errors=True)
    config = tinyllama_config(args.layers)
    start = time.perf_counter()
    old = sepstore.dump(llama_decider, v1, store, name=NAME, tag="v1", config=config, quiet=True)
    new = sepstore.dump(llama_decider, v2, store, name=NAME, tag="v2", config=config, quiet=True)
    total = sum(v.nbytes for v in v1.values())
    print(f"v1: {args.layers} layers, {total / 2**30:.2f} GiB bf16; v2 changes {changed / MB:.1f} MB of it")
    print(f"  dumped both in {time.perf_counter() - start:.1f} s")
    parts = {p.digest for _, p in new.labelled_parts()} - {p.digest for _, p in old.labelled_parts()}
    return changed, [store / "parts" / "blake3" / f"{digest_hex(d)}.safetensors" for d in sorted(parts)]


def local_floor(parts: list[Path], workdir: Path) -> float:
    """Seconds to write ``parts`` (v2's new ones, read into memory first) into new files and BLAKE3
    them, one after another, each fsynced by another thread while the next is written, as an
    upgrade does: what bringing v2 into a cache costs here with no network and nothing to read, the
    least a tensor-level upgrade (which writes and hashes every byte of those parts too) can take."""
    held = [memoryview(path.read_bytes()) for path in parts]
    outs = [workdir / f"floor-{i}.tmp" for i in range(len(parts))]
    with ThreadPoolExecutor(max_workers=1) as syncing:
        start = time.perf_counter()
        synced = []
        for data, out in zip(held, outs, strict=True):
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            for at in range(0, len(data), WRITE_SLICE):
                os.pwrite(fd, data[at : at + WRITE_SLICE], at)
            Hasher().update(data)
            synced.append(syncing.submit(lambda fd=fd: (os.fsync(fd), os.close(fd))))
        for done in synced:
            done.result()
        seconds = time.perf_counter() - start
    for out in outs:
        out.unlink()
    return seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def http_servers(root: Path, workdir: Path, rates: list[int]) -> Iterator[tuple[str, list[str]]]:
    """One nginx serving ``root`` on 127.0.0.1, on a port per nginx ``limit_rate`` of ``rates``
    (bytes a second a connection; 0: none); its name and the URLs, in that order. Without nginx,
    the aiohttp test server, unlimited only (it has no ``limit_rate``)."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        if any(rates):
            sys.exit("--link-gbit other than 0 needs nginx (/usr/sbin/nginx, Debian's nginx package)")
        sys.path.insert(0, str(Path(__file__).parents[1]))
        from servers import StaticServer

        server = StaticServer(root).start()
        try:
            yield "aiohttp", [server.url for _ in rates]
        finally:
            server.stop()
        return
    ports, prefix = [free_port() for _ in rates], workdir / "nginx"
    prefix.mkdir(exist_ok=True)
    user = "user root;" if os.geteuid() == 0 else ""
    servers = "".join(
        f"  server {{ listen 127.0.0.1:{port}; root {root}; {f'limit_rate {rate};' if rate else ''} }}\n"
        for port, rate in zip(ports, rates, strict=True)
    )
    (prefix / "nginx.conf").write_text(
        f"{user} worker_processes 2; daemon off; pid {prefix}/nginx.pid; error_log {prefix}/error.log;\n"
        "events { worker_connections 256; }\n"
        f"http {{ access_log off; sendfile on; client_body_temp_path {prefix}; proxy_temp_path {prefix};\n"
        f"  fastcgi_temp_path {prefix}; uwsgi_temp_path {prefix}; scgi_temp_path {prefix};\n{servers}}}\n"
    )
    process = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf")])
    try:
        for port in ports:
            for _ in range(100):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
                time.sleep(0.05)
        yield "nginx", [f"http://127.0.0.1:{port}" for port in ports]
    finally:
        process.terminate()
        process.wait(10)


def upgrade(base: Path, workdir: Path, url: str, *, delta: bool) -> tuple[float, sepstore.PullReport]:
    """Seconds to pull ``url`` into a copy (hard links) of the v1 cache ``base``, and the report."""
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=workdir))
    shutil.rmtree(cache)
    subprocess.run(["cp", "-al", str(base), str(cache)], check=True)
    s3fs.S3FileSystem.clear_instance_cache()
    saved = sepstore.delta.MIN_REUSE
    sepstore.delta.MIN_REUSE = saved if delta else 1 << 62
    try:
        start = time.perf_counter()
        report = sepstore.pull(url, cache_dir=cache, quiet=True)
        return time.perf_counter() - start, report
    finally:
        sepstore.delta.MIN_REUSE = saved
        shutil.rmtree(cache)


TARGET = 0.3


def verdict(value: float, target: float) -> str:
    return f"target <= {target}x: {'met' if value <= target else 'NOT met'}"


def publish(store: Path, changed: int) -> None:
    """Push v1 to the S3 store (untimed), then v2 (timed); print what v2 sent and copied."""
    start = time.perf_counter()
    sepstore.push(store / "manifests" / NAME / "v1.json", STORE_URL, quiet=True)
    print(f"\npublisher: push v1 to moto S3 (untimed) {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    pushed = sepstore.push(store / "manifests" / NAME / "v2.json", STORE_URL, quiet=True)
    seconds = time.perf_counter() - start
    ratio = pushed.transferred_bytes / changed
    print(
        f"publisher: push v2 {seconds:.2f} s; {len(pushed.uploaded)} parts, {pushed.uploaded_bytes / MB:.1f} MB: "
        f"{pushed.transferred_bytes / MB:.1f} MB sent, {pushed.copied_bytes / MB:.1f} MB copied server-side"
    )
    print(f"  sent / changed tensors ({changed / MB:.1f} MB): {ratio:.3f}x   {verdict(ratio, 1.2)}")


@dataclass
class Link:
    """A server the node upgrades from, and what its upgrades took."""

    name: str
    root: str
    loopback: bool
    times: dict[bool, list[float]] = field(default_factory=lambda: {True: [], False: []})
    reports: dict[bool, sepstore.PullReport] = field(default_factory=dict)

    def median(self, delta: bool) -> float:
        return statistics.median(self.times[delta])


def upgrades(
    links: list[Link], args: argparse.Namespace, changed: int, manifest_bytes: int, new_parts: list[Path]
) -> list[float]:
    """Pull v1 into a cache from the first link (untimed); then, round after round, from each link,
    upgrade copies of it to v2 tensor by tensor and part by part (the order turning each round),
    and time the local floor once a round, under the same load; print bytes and times, return the
    floor's times."""
    base = args.workdir / "v1-cache"
    shutil.rmtree(base, ignore_errors=True)
    start = time.perf_counter()
    sepstore.pull(f"{links[0].root}/manifests/{NAME}/v1.json", cache_dir=base, quiet=True)
    print(f"\nnode: pull v1 into a cache (untimed) {time.perf_counter() - start:.1f} s")
    floors: list[float] = []
    for i in range(args.repeats):
        for link in links:
            for delta in (True, False) if i % 2 == 0 else (False, True):
                seconds, link.reports[delta] = upgrade(
                    base, args.workdir, f"{link.root}/manifests/{NAME}/v2.json", delta=delta
                )
                link.times[delta].append(seconds)
        floors.append(local_floor(new_parts, args.workdir))
    shutil.rmtree(base, ignore_errors=True)
    each: Callable[[list[float]], str] = lambda ts: " ".join(f"{t:.2f}" for t in ts)  # noqa: E731
    for link in links:
        fetched = link.reports[True].transferred_bytes + manifest_bytes
        whole = link.reports[False].transferred_bytes + manifest_bytes
        reused = link.reports[True].reused_bytes / MB
        print(f"\nnode: upgrade v1 -> v2 over {link.name}, {len(link.reports[True].fetched)} parts")
        print(
            f"  tensor-level: {link.median(True):.2f} s ({each(link.times[True])}), "
            f"{fetched / MB:.1f} MB fetched, {reused:.1f} MB copied from cached parts"
        )
        print(f"  part-level:   {link.median(False):.2f} s ({each(link.times[False])}), {whole / MB:.1f} MB fetched")
        print(f"  fetched / changed tensors: {fetched / changed:.3f}x   {verdict(fetched / changed, 1.1)}")
    return floors


def table(links: list[Link], changed: int, manifest_bytes: int, floors: list[float], new_bytes: int) -> None:
    """Every link's medians and time ratio against the target, and the local floor."""
    print(f"\nupgrade v1 -> v2 (median of the rounds; target: tensor-level <= {TARGET}x part-level)")
    print(f"  {'server, link':62} {'part-level':>10} {'tensor-level':>12} {'ratio':>7}  {'target':8} fetched/changed")
    for link in links:
        ratio = link.median(True) / link.median(False)
        fetched = (link.reports[True].transferred_bytes + manifest_bytes) / changed
        print(
            f"  {link.name:62} {link.median(False):9.2f}s {link.median(True):11.2f}s {ratio:6.3f}x  "
            f"{'met' if ratio <= TARGET else 'NOT met':8} {fetched:.3f}x"
        )
    floor = statistics.median(floors)
    print(
        f"  local floor: write + BLAKE3 of v2's {new_bytes / MB:.0f} MB of new parts from memory, fsync "
        f"overlapped, one thread, no network: {floor:.2f} s ({' '.join(f'{t:.2f}' for t in floors)})"
    )
    for link in links:
        if link.loopback:
            ratio = floor / link.median(False)
            print(f"    = {ratio:.3f}x the part-level upgrade over {link.name} (both upgrades do this work too)")


def link_name(gbit: float, rate: int) -> str:
    """What was limited, named as it is: nginx's rate a connection, not the link itself."""
    if not rate:
        return "loopback, no limit"
    return f"{gbit:g} Gbit/s: limit_rate {rate / MB:.2f} MB/s x {DEFAULT_WORKERS} conn."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("bench-delta"), help="scratch folder (./bench-delta)")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint folder to write or reuse")
    parser.add_argument("--layers", type=int, default=22, help="transformer layers (default 22, TinyLlama)")
    parser.add_argument("--repeats", type=int, default=1, help="timed upgrades per variant and server (default 1)")
    parser.add_argument("--server", choices=("process", "thread"), default="process", help="where moto runs")
    parser.add_argument("--http-only", action="store_true", help="no S3: only the node's upgrade over HTTP")
    parser.add_argument(
        "--link-gbit",
        type=float,
        nargs="+",
        default=[0, 10, 1],
        metavar="GBIT",
        help="HTTP links to upgrade over, in Gbit/s (0: loopback, no limit); each one nginx limit_rate of "
        f"GBIT/8/{DEFAULT_WORKERS} per connection, pull's {DEFAULT_WORKERS} connections (default 0 10 1)",
    )
    parser.add_argument("--clean", action="store_true", help="delete --workdir at the end")
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    www = args.workdir / "www"
    store = www / "store"
    changed, new_parts = prepare(args, store)
    manifest_bytes = (store / "manifests" / NAME / "v2.json").stat().st_size
    rates = [round(gbit * 1e9 / 8 / DEFAULT_WORKERS) for gbit in args.link_gbit]
    with contextlib.ExitStack() as running:
        kind, urls = running.enter_context(http_servers(www, args.workdir, rates))
        links = [
            Link(f"HTTP ({kind}), {link_name(gbit, rate)}", f"{url}/store", not rate)
            for gbit, rate, url in zip(args.link_gbit, rates, urls, strict=True)
        ]
        links.sort(key=lambda link: not link.loopback)  # v1 is pulled from the first
        if not args.http_only:
            endpoint = running.enter_context(moto_server(args.server))
            point_aws_at(endpoint)
            fresh_fs().mkdir(BUCKET)
            publish(store, changed)
            links.append(Link("S3 (moto), loopback, no limit", STORE_URL, True))
        floors = upgrades(links, args, changed, manifest_bytes, new_parts)
    table(links, changed, manifest_bytes, floors, sum(p.stat().st_size for p in new_parts))
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    shutil.rmtree(store)
    if args.clean:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
