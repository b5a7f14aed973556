"""Export benchmark: ``sepstore export`` of a converted store against ``cp -r`` of the source folder.

Run by hand from the repository root (pytest skips tests/benchmarks):

    .venv/bin/python tests/benchmarks/bench_export.py                          # full size, 3 repeats
    .venv/bin/python tests/benchmarks/bench_export.py --layers 4 --repeats 2   # quick
    .venv/bin/python tests/benchmarks/bench_export.py --clean                  # delete --workdir at the end

The checkpoint is ``--checkpoint`` (default ``./bench-load/checkpoint``, the seeded TinyLlama-1.1B-
shaped Hugging Face folder of ``_checkpoint.py``: 3 bf16 safetensors shards, about 2.05 GiB, written
if it is not there); ``--layers N`` writes (or reuses) an N-layer one in ``<workdir>/checkpoint``.
It is converted once (untimed) into ``<workdir>/store``; then each contender runs as its own
subprocess into a fresh destination, as bench_convert.py runs them (its ``run_child``: wall time
around the subprocess, the child's own peak RSS; ``fresh``: the previous output deleted and
``os.sync()`` before every run, untimed):

- export: ``python -m sepstore export STORE DEST --quiet`` (every part read once and hashed as it
  is read, written into one ``model.safetensors``; every file fsynced before it is renamed into place);
- cp -r: ``cp -r CHECKPOINT DEST`` (the floor: read and write every byte once, no fsync);
- baseline: ``python -m sepstore --version``, the interpreter and imports export pays first.

The first (untimed) export is checked tensor by tensor against the checkpoint: same names, dtypes
and bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

import torch
from _checkpoint import INDEX, write_tinyllama_checkpoint
from bench_convert import fresh, run_child, tree_bytes
from safetensors import safe_open

PYTHON = sys.executable
CONTENDERS = ("export", "cp -r", "baseline")
GIB, MIB = 2**30, 2**20


def command(contender: str, checkpoint: Path, store: Path, dest: Path) -> list[str]:
    if contender == "export":
        return [PYTHON, "-m", "sepstore", "export", str(store), str(dest), "--quiet"]
    if contender == "cp -r":
        return ["cp", "-r", str(checkpoint), str(dest)]
    return [PYTHON, "-m", "sepstore", "--version"]


def check_export(checkpoint: Path, dest: Path) -> None:
    """The export holds exactly the checkpoint's tensors (names, dtypes, bytes), one at a time in memory."""
    weight_map = json.loads((checkpoint / INDEX).read_text())["weight_map"]
    with safe_open(dest / "model.safetensors", "pt") as out:
        if sorted(out.keys()) != sorted(weight_map):
            raise RuntimeError(f"{dest}: other tensor names than {checkpoint}")
        for name, shard in weight_map.items():
            with safe_open(checkpoint / shard, "pt") as source:
                a, b = source.get_tensor(name), out.get_tensor(name)
            same = a.dtype == b.dtype and a.shape == b.shape
            if not same or not a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8)):
                raise RuntimeError(f"{dest}: tensor {name} differs from the checkpoint's")


def largest_part(store: Path) -> int:
    from sepstore.manifest import decode_manifest

    (path,) = store.glob("manifests/*/latest.json")
    return max(part.size for _, part in decode_manifest(path.read_bytes(), source=str(path)).labelled_parts())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("bench-load/checkpoint"), help="HF checkpoint folder")
    parser.add_argument("--workdir", type=Path, default=Path("bench-export"), help="scratch folder (./bench-export)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender (default 3)")
    parser.add_argument("--layers", type=int, help="write an N-layer checkpoint in --workdir instead (quick run)")
    parser.add_argument("--clean", action="store_true", help="delete --workdir at the end")
    args = parser.parse_args()

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.layers is not None:
        checkpoint = write_tinyllama_checkpoint(workdir / "checkpoint", layers=args.layers)
    else:
        checkpoint = write_tinyllama_checkpoint(args.checkpoint.resolve())
    source_bytes = tree_bytes(checkpoint)
    print(f"machine: {os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"checkpoint: {checkpoint}, {source_bytes / GIB:.2f} GiB")
    store = workdir / "store"
    fresh(store)
    run_child([PYTHON, "-m", "sepstore", "convert", str(checkpoint), str(store), "--quiet"])
    dests = {name: workdir / name.replace(" ", "").replace("-", "") for name in CONTENDERS}

    print("warm-up: one untimed run of each (page cache warm from here on; nothing dropped) ...", flush=True)
    for name in CONTENDERS:
        fresh(dests[name])
        run_child(command(name, checkpoint, store, dests[name]))
    check_export(checkpoint, dests["export"])
    print("the export holds the checkpoint's tensors, bit for bit")

    seconds: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    rss: dict[str, list[int]] = {name: [] for name in CONTENDERS}
    for repeat in range(args.repeats):
        for name in CONTENDERS:
            fresh(dests[name])
            took, peak = run_child(command(name, checkpoint, store, dests[name]))
            seconds[name].append(took)
            rss[name].append(peak)
            print(f"  repeat {repeat + 1}: {name:<8} {took:6.2f} s  {peak / GIB:.2f} GiB", flush=True)

    print(f"\n{'':<10}{'wall s min':>12}{'median':>10}{'peak RSS GiB':>14}{'GiB/s (min)':>13}")
    for name in CONTENDERS:
        rate = f"{source_bytes / GIB / min(seconds[name]):.2f}" if name != "baseline" else "-"
        print(
            f"{name:<10}{min(seconds[name]):>12.2f}{statistics.median(seconds[name]):>10.2f}"
            f"{max(rss[name]) / GIB:>14.2f}{rate:>13}"
        )
    ratio_min = min(seconds["export"]) / min(seconds["cp -r"])
    ratio_median = statistics.median(seconds["export"]) / statistics.median(seconds["cp -r"])
    print(f"\nexport / cp -r: {ratio_min:.2f}x (min), {ratio_median:.2f}x (median)")
    part = largest_part(store)
    extra = max(rss["export"]) - max(rss["baseline"])
    print(
        f"export peak RSS {max(rss['export']) / GIB:.2f} GiB, minus baseline {extra / MIB:.0f} MiB = "
        f"{extra / part:.2f}x the largest part ({part / MIB:.1f} MiB); cp -r {max(rss['cp -r']) / MIB:.0f} MiB"
    )
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for dest in (*dests.values(), store):
        shutil.rmtree(dest, ignore_errors=True)
    if args.clean:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
