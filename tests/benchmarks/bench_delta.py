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
- the local floor, once a round: v2's new parts, read into page-aligned memory first, written into
  new files and BLAKE3'd with sepstore's own writer (whole blocks with ``O_DIRECT``, as the
  tensor-level upgrade writes its copies), a part a thread on pull's 8 threads, each fsynced; no
  network, nothing to read. Both upgrades write and hash every byte of those parts too, so neither
  can take less; it is printed against each loopback upgrade, with the part-level time the target
  would need for a tensor-level upgrade that took only this.
- with ``--then-load``, each upgraded cache is loaded (``sepstore.load`` of v2 from it, verified)
  right after, timed apart: a part written past the page cache is read back from the disk. And,
  after each upgrade, another copy of the v1 cache is upgraded by ``sepstore.load`` of v2 by URL
  (what a node does: one call that fetches or assembles what it lacks into the tensors' memory and
  returns them), tensor by tensor and part by part.

Last lines: a table of every link's medians and ratio against the target.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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
from sepstore.cache import DEFAULT_WORKERS, InOrderDigest
from sepstore.delta import COPY_BYTES
from sepstore.demo import llama_decider
from sepstore.directio import DirectFile
from sepstore.hashing import digest_hex

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
    """Seconds to write ``parts`` (v2's new ones, held in page-aligned memory) into new files and
    BLAKE3 them as an upgrade does, with sepstore's own writer (:class:`InOrderDigest` into a
    :class:`DirectFile`, so whole blocks go past the page cache), one part a thread on pull's
    threads, each fsynced: what bringing v2 into a cache costs here with no network and nothing to
    read, the least either upgrade (which both write and hash every byte of those parts) can take."""
    held = []
    for path in parts:
        memory = memoryview(mmap.mmap(-1, path.stat().st_size))
        with path.open("rb", buffering=0) as file:
            file.readinto(memory)
        held.append(memory)

    def write(i: int) -> None:
        out = workdir / f"floor-{i}.tmp"
        with out.open("wb") as file:
            file.truncate(len(held[i]))
        with DirectFile(str(out)) as file:
            digest = InOrderDigest(str(out), len(held[i]), out.name)
            for at in range(0, len(held[i]), COPY_BYTES):
                digest.write(file, at, held[i][at : at + COPY_BYTES])
            os.fsync(file.fd)
        digest.result()
        out.unlink()

    with ThreadPoolExecutor(max_workers=DEFAULT_WORKERS) as pool:
        start = time.perf_counter()
        list(pool.map(write, range(len(held))))
        return time.perf_counter() - start


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


@contextlib.contextmanager
def v1_copy(base: Path, workdir: Path, *, delta: bool) -> Iterator[Path]:
    """A copy (hard links) of the v1 cache ``base``, upgraded tensor by tensor (``delta``) or part
    by part while the ``with`` block runs, then deleted."""
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=workdir))
    shutil.rmtree(cache)
    subprocess.run(["cp", "-al", str(base), str(cache)], check=True)
    s3fs.S3FileSystem.clear_instance_cache()
    saved = sepstore.delta.MIN_REUSE
    sepstore.delta.MIN_REUSE = saved if delta else 1 << 62
    try:
        yield cache
    finally:
        sepstore.delta.MIN_REUSE = saved
        shutil.rmtree(cache)


def upgrade(
    base: Path, workdir: Path, url: str, *, delta: bool, then_load: bool
) -> tuple[float, sepstore.PullReport, float | None]:
    """Seconds to pull ``url`` into a copy of the v1 cache ``base``, the report, and with
    ``then_load`` the seconds to load it from that cache right after."""
    with v1_copy(base, workdir, delta=delta) as cache:
        start = time.perf_counter()
        report = sepstore.pull(url, cache_dir=cache, quiet=True)
        seconds = time.perf_counter() - start
        if not then_load:
            return seconds, report, None
        start = time.perf_counter()
        sepstore.load(url, cache_dir=cache)
        return seconds, report, time.perf_counter() - start


def load_upgrade(base: Path, workdir: Path, url: str, *, delta: bool) -> float:
    """Seconds to ``load`` ``url`` into a copy of the v1 cache ``base`` (a node's upgrade: fetch or
    assemble what it lacks, and return the tensors)."""
    with v1_copy(base, workdir, delta=delta) as cache:
        start = time.perf_counter()
        sepstore.load(url, cache_dir=cache)
        return time.perf_counter() - start


TARGET = 0.3


def listed(times: list[float]) -> str:
    return " ".join(f"{t:.2f}" for t in times)


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
    loads: dict[bool, list[float]] = field(default_factory=lambda: {True: [], False: []})
    url_loads: dict[bool, list[float]] = field(default_factory=lambda: {True: [], False: []})
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
                url = f"{link.root}/manifests/{NAME}/v2.json"
                seconds, link.reports[delta], loaded = upgrade(
                    base, args.workdir, url, delta=delta, then_load=args.then_load
                )
                link.times[delta].append(seconds)
                if loaded is not None:
                    link.loads[delta].append(loaded)
                    link.url_loads[delta].append(load_upgrade(base, args.workdir, url, delta=delta))
        floors.append(local_floor(new_parts, args.workdir))
    shutil.rmtree(base, ignore_errors=True)
    for link in links:
        fetched = link.reports[True].transferred_bytes + manifest_bytes
        whole = link.reports[False].transferred_bytes + manifest_bytes
        reused = link.reports[True].reused_bytes / MB
        print(f"\nnode: upgrade v1 -> v2 over {link.name}, {len(link.reports[True].fetched)} parts")
        print(
            f"  tensor-level: {link.median(True):.2f} s ({listed(link.times[True])}), "
            f"{fetched / MB:.1f} MB fetched, {reused:.1f} MB copied from cached parts"
        )
        print(f"  part-level:   {link.median(False):.2f} s ({listed(link.times[False])}), {whole / MB:.1f} MB fetched")
        print(f"  fetched / changed tensors: {fetched / changed:.3f}x   {verdict(fetched / changed, 1.1)}")
        for delta, name in ((True, "tensor-level"), (False, "part-level")):
            if link.loads[delta]:
                loads = link.loads[delta]
                median = statistics.median(loads)
                print(f"  load v2 from the cache right after the {name} upgrade: {median:.2f} s ({listed(loads)})")
        for delta, name in ((True, "tensor-level"), (False, "part-level")):
            if link.url_loads[delta]:
                loads = link.url_loads[delta]
                median = statistics.median(loads)
                print(f"  load v2 by URL into the v1 cache, {name}: {median:.2f} s ({listed(loads)})")
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
        f"  local floor: write (O_DIRECT where aligned) + BLAKE3 + fsync of v2's {new_bytes / MB:.0f} MB of new "
        f"parts from memory, {DEFAULT_WORKERS} threads, no network: {floor:.2f} s ({listed(floors)})"
    )
    for link in links:
        if link.loopback:
            print(
                f"    over {link.name}: = {floor / link.median(False):.3f}x the part-level upgrade, "
                f"{floor / link.median(True):.3f}x the tensor-level one; a tensor-level upgrade as fast as the "
                f"floor meets {TARGET}x only against a part-level one of >= {floor / TARGET:.2f} s"
            )


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
    parser.add_argument("--then-load", action="store_true", help="time a load of v2 from each upgraded cache")
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
