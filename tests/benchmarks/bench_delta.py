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
- node: pulls v1 into a cache once (untimed); then, over S3 and over HTTP (``--limit-rate``
  slows nginx down to model a slower link; ``--http-only`` skips S3), interleaved
  ``--repeats`` times, a copy of that cache (hard links) is upgraded to v2 with ``pull`` assembling
  parts from cached tensors (delta) and with parts fetched whole (``sepstore.delta.MIN_REUSE`` set
  out of reach: the part-level upgrade as before). Bytes fetched (headers, changed tensors, the
  manifest) against the changed tensors' bytes, target <= 1.1x; time against the part-level
  upgrade, target <= 0.3x.
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
from pathlib import Path

import s3fs
import torch
from _checkpoint import read_state_dict, tinyllama_config, write_tinyllama_checkpoint
from _env import point_aws_at
from bench_remote import checkpoint_path, fresh_fs, moto_server

import sepstore
import sepstore.delta
from sepstore.demo import llama_decider

NAME = "tinyllama"
BUCKET = "bench"
STORE_URL = f"s3://{BUCKET}/store"
CHANGED = ("q_proj.weight", "v_proj.weight")
MB = 1e6


def lora_merged(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` with every layer's q_proj and v_proj changed (each element moved by a small step)."""
    return {k: (v + 0.001).to(v.dtype) if k.endswith(CHANGED) else v for k, v in sd.items()}


def prepare(args: argparse.Namespace, store: Path) -> int:
    """Dump v1 and v2 into ``store``; the changed tensors' bytes."""
    ckpt = checkpoint_path(args)
    write_tinyllama_checkpoint(ckpt, layers=args.layers)
    v1 = read_state_dict(ckpt)
    v2 = lora_merged(v1)
    changed = sum(v.nbytes for k, v in v2.items() if k.endswith(CHANGED))
    shutil.rmtree(store, ignore_errors=True)
    config = tinyllama_config(args.layers)
    start = time.perf_counter()
    sepstore.dump(llama_decider, v1, store, name=NAME, tag="v1", config=config, quiet=True)
    sepstore.dump(llama_decider, v2, store, name=NAME, tag="v2", config=config, quiet=True)
    total = sum(v.nbytes for v in v1.values())
    print(f"v1: {args.layers} layers, {total / 2**30:.2f} GiB bf16; v2 changes {changed / MB:.1f} MB of it")
    print(f"  dumped both in {time.perf_counter() - start:.1f} s")
    return changed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def http_server(root: Path, workdir: Path, limit_rate: str | None = None) -> Iterator[tuple[str, str]]:
    """nginx serving ``root`` on 127.0.0.1 (the aiohttp test server if there is no nginx; it has no
    ``limit_rate``); its URL and name."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        sys.path.insert(0, str(Path(__file__).parents[1]))
        from servers import StaticServer

        server = StaticServer(root).start()
        try:
            yield server.url, "aiohttp"
        finally:
            server.stop()
        return
    port, prefix = free_port(), workdir / "nginx"
    prefix.mkdir(exist_ok=True)
    user = "user root;" if os.geteuid() == 0 else ""
    (prefix / "nginx.conf").write_text(
        f"{user} worker_processes 2; daemon off; pid {prefix}/nginx.pid; error_log {prefix}/error.log;\n"
        "events { worker_connections 256; }\n"
        f"http {{ access_log off; sendfile on; client_body_temp_path {prefix}; proxy_temp_path {prefix};\n"
        f"  fastcgi_temp_path {prefix}; uwsgi_temp_path {prefix}; scgi_temp_path {prefix};\n"
        f"  server {{ listen 127.0.0.1:{port}; root {root}; {f'limit_rate {limit_rate};' if limit_rate else ''} }} }}\n"
    )
    process = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf")])
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", "nginx"
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


def upgrades(servers: dict[str, str], args: argparse.Namespace, changed: int, manifest_bytes: int) -> None:
    """Pull v1 into a cache from the first server (untimed); then, on each server, upgrade copies
    of it to v2 tensor by tensor and part by part, interleaved; print bytes and times."""
    base = args.workdir / "v1-cache"
    shutil.rmtree(base, ignore_errors=True)
    start = time.perf_counter()
    sepstore.pull(f"{next(iter(servers.values()))}/manifests/{NAME}/v1.json", cache_dir=base, quiet=True)
    print(f"\nnode: pull v1 into a cache (untimed) {time.perf_counter() - start:.1f} s")
    for server, root in servers.items():
        url = f"{root}/manifests/{NAME}/v2.json"
        times: dict[bool, list[float]] = {True: [], False: []}
        reports: dict[bool, sepstore.PullReport] = {}
        for i in range(args.repeats):
            for delta in (True, False) if i % 2 == 0 else (False, True):
                seconds, reports[delta] = upgrade(base, args.workdir, url, delta=delta)
                times[delta].append(seconds)
        fetched = reports[True].transferred_bytes + manifest_bytes
        whole = reports[False].transferred_bytes + manifest_bytes
        speed = statistics.median(times[True]) / statistics.median(times[False])
        reused = reports[True].reused_bytes / MB
        each: Callable[[list[float]], str] = lambda ts: " ".join(f"{t:.2f}" for t in ts)  # noqa: E731
        print(f"\nnode: upgrade v1 -> v2 over {server}, {len(reports[True].fetched)} parts")
        print(
            f"  tensor-level: {statistics.median(times[True]):.2f} s ({each(times[True])}), "
            f"{fetched / MB:.1f} MB fetched, {reused:.1f} MB copied from cached parts"
        )
        part_level = statistics.median(times[False])
        print(f"  part-level:   {part_level:.2f} s ({each(times[False])}), {whole / MB:.1f} MB fetched")
        print(f"  fetched / changed tensors: {fetched / changed:.3f}x   {verdict(fetched / changed, 1.1)}")
        print(f"  time / part-level time: {speed:.3f}x   {verdict(speed, 0.3)}")
    shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("bench-delta"), help="scratch folder (./bench-delta)")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint folder to write or reuse")
    parser.add_argument("--layers", type=int, default=22, help="transformer layers (default 22, TinyLlama)")
    parser.add_argument("--repeats", type=int, default=1, help="timed upgrades per variant and server (default 1)")
    parser.add_argument("--server", choices=("process", "thread"), default="process", help="where moto runs")
    parser.add_argument("--http-only", action="store_true", help="no S3: only the node's upgrade over HTTP")
    parser.add_argument(
        "--limit-rate", help="nginx's limit_rate per connection (e.g. 12m: about 100 MB/s over 8), to model a WAN link"
    )
    parser.add_argument("--clean", action="store_true", help="delete --workdir at the end")
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    www = args.workdir / "www"
    store = www / "store"
    changed = prepare(args, store)
    manifest_bytes = (store / "manifests" / NAME / "v2.json").stat().st_size
    with contextlib.ExitStack() as running:
        http, kind = running.enter_context(http_server(www, args.workdir, args.limit_rate))
        servers = {f"HTTP ({kind}{', limit_rate ' + args.limit_rate if args.limit_rate else ''})": f"{http}/store"}
        if not args.http_only:
            endpoint = running.enter_context(moto_server(args.server))
            point_aws_at(endpoint)
            fresh_fs().mkdir(BUCKET)
            publish(store, changed)
            servers = {"S3 (moto)": STORE_URL, **servers}
        upgrades(servers, args, changed, manifest_bytes)
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    shutil.rmtree(store)
    if args.clean:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
