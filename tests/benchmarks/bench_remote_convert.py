"""Remote convert benchmark: ``sepstore convert https://.../checkpoint`` against downloading the
folder first and converting it locally, over a loopback HTTP server that adds network latency.

Run by hand from the repository root (pytest skips tests/benchmarks):

    .venv/bin/python tests/benchmarks/bench_remote_convert.py                        # 2 GiB, 20 ms, 3 repeats
    .venv/bin/python tests/benchmarks/bench_remote_convert.py --layers 4 --latency 50

The checkpoint is bench_load.py's TinyLlama-shaped HF folder (``./bench-load/checkpoint``, written
if missing; ``--layers N`` writes a smaller one into ``--workdir``). It is served by an aiohttp
server on 127.0.0.1 (``FileResponse``: Range requests answered) that waits ``--latency`` ms before
answering each request, as a far object store or CDN does. Contenders, each a fresh subprocess,
interleaved, after one untimed warm-up each:

- remote convert: ``python -m sepstore convert http://127.0.0.1:PORT/checkpoint/model.safetensors.index.json
  DEST`` (plain HTTP has no folder listings);
- download + convert: ``fsspec`` ``get`` of the folder's files, then ``sepstore convert`` of the copy
  (what a user does without remote sources);
- download: the ``get`` alone (the floor for reading every byte once over this server).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from _checkpoint import write_tinyllama_checkpoint
from aiohttp import web

PYTHON = sys.executable
CONTENDERS = ("remote convert", "download + convert", "download")
DOWNLOAD = (
    "import sys, fsspec; fs = fsspec.filesystem('http'); url, dest = sys.argv[1:3]; "
    "[fs.get(f'{url}/{n}', f'{dest}/{n}') for n in sys.argv[3:]]"
)


class SlowServer:
    """Static files under ``root`` with Range support, each answer ``latency`` seconds late."""

    def __init__(self, root: Path, latency: float) -> None:
        self.root, self.latency, self.port = root, latency, 0
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(self.latency)
        path = (self.root / request.match_info["tail"]).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            return web.Response(status=404)
        return web.FileResponse(path)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr.decode(errors='replace')[-3000:]}")
    return time.perf_counter() - start


def run(name: str, url: str, files: list[str], work: Path) -> float:
    dest = work / "runs" / name.replace(" ", "").replace("+", "-")
    shutil.rmtree(dest, ignore_errors=True)
    os.sync()
    convert = [PYTHON, "-m", "sepstore", "convert"]
    if name == "remote convert":
        index = f"{url}/model.safetensors.index.json"  # plain HTTP has no folder listings: start from the index
        return timed([*convert, index, str(dest / "store"), "--name", "m", "--quiet"])
    (dest / "checkpoint").mkdir(parents=True)
    seconds = timed([PYTHON, "-c", DOWNLOAD, url, str(dest / "checkpoint"), *files])
    if name == "download + convert":
        seconds += timed([*convert, str(dest / "checkpoint"), str(dest / "store"), "--name", "m", "--quiet"])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("bench-load/checkpoint"))
    parser.add_argument("--workdir", type=Path, default=Path("bench-remote-convert"))
    parser.add_argument("--layers", type=int, help="write an N-layer checkpoint in --workdir instead")
    parser.add_argument("--latency", type=float, default=20.0, help="ms added to every request (default 20)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.layers is not None:
        checkpoint = write_tinyllama_checkpoint(work / "checkpoint", layers=args.layers)
    else:
        checkpoint = write_tinyllama_checkpoint(args.checkpoint.resolve())
    files = sorted(p.name for p in checkpoint.iterdir() if p.is_file())
    size = sum((checkpoint / f).stat().st_size for f in files)
    server = SlowServer(checkpoint.parent, args.latency / 1000)
    url = f"http://127.0.0.1:{server.port}/{checkpoint.name}"
    print(f"{size / 2**30:.2f} GiB in {len(files)} files at {url}, {args.latency:g} ms per request")
    for name in CONTENDERS:
        run(name, url, files, work)  # warm-up: page cache, imports
    times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for _ in range(args.repeats):
        for name in CONTENDERS:
            times[name].append(run(name, url, files, work))
            print(f"  {name:<20} {times[name][-1]:6.2f} s", flush=True)
    print(f"\n{'':<22}{'min s':>8}{'median s':>10}")
    for name in CONTENDERS:
        print(f"{name:<22}{min(times[name]):>8.2f}{statistics.median(times[name]):>10.2f}")
    for other in CONTENDERS[1:]:
        ratio = statistics.median(times["remote convert"]) / statistics.median(times[other])
        print(f"remote convert / {other}: {ratio:.2f}x (medians)")
    shutil.rmtree(work / "runs", ignore_errors=True)
    if args.layers is not None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
