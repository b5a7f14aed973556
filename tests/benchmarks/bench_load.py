"""Load benchmark: sepstore against llm_sepweight 0.10.0 on a TinyLlama-1.1B-shaped checkpoint.

Run by hand from the repository root (pytest skips tests/benchmarks):

    .venv/bin/python tests/benchmarks/bench_load.py                          # full size, 5 repeats
    .venv/bin/python tests/benchmarks/bench_load.py --layers 6 --repeats 3   # quick
    .venv/bin/python tests/benchmarks/bench_load.py --clean                  # delete --workdir at the end

It writes a seeded synthetic checkpoint (Hugging Face layout, bf16, about 2 GiB at full size) into
``--workdir`` (kept and reused by later runs unless ``--clean``), dumps it with ``sepstore.dump``
and ``llm_sepweight.dump`` (timed once each), loads ``"b 0-5"`` once with each loader (page cache
warm from then on; results compared), then times ``load(..., "b 0-5").to_dict()`` for sepstore
(verify=True, verify=False, mmap=True) and llm_sepweight, interleaved, in two settings:

- "one process": all calls in one spawned process, after a warm-up call each. Repeated calls can
  reuse memory the allocator kept, which helps llm_sepweight (its ``torch.load`` copies every byte
  into fresh memory, so it pays a page fault per 4 KiB page unless the allocator recycles pages).
- "fresh process": each call in a new process, as a node loading its weights once would do.

Two variants each: "load only" times the call alone (sepstore reads every byte once into memory of
its own, hashing it as it lands unless verify=False; with mmap=True it returns views of a
copy-on-write mmap, so it reads every byte once to hash it and copies nothing; llm_sepweight reads
every byte); "load + sum" also sums every tensor inside the timed region, so every byte is touched
on every side.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import re
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import llm_sepweight
import torch
from _checkpoint import read_state_dict, tinyllama_config, write_tinyllama_checkpoint

import sepstore
from sepstore.demo import llama_decider

Tensors = dict[str, torch.Tensor]
#: Each loader and the keywords sepstore.load gets (None: llm_sepweight).
OPTIONS: dict[str, dict[str, bool] | None] = {
    "sepstore verify=True": {},
    "sepstore verify=False": {"verify": False},
    "sepstore mmap=True": {"mmap": True},
    "llm_sepweight": None,
}
LOADERS = tuple(OPTIONS)
SEPSTORE = LOADERS[:-1]
MODES = ("load only", "load + sum")
Step = tuple[str, str]  # (loader, mode)


def sepweight_decider(key: str) -> list[str]:
    """llm_sepweight's decider for Hugging Face Llama keys (same split as ``llama_decider``)."""
    if key.startswith("model.embed_tokens."):
        return ["start", key.removeprefix("model.")]
    if key.startswith("model.layers."):
        layer, rest = key.removeprefix("model.layers.").split(".", 1)
        return ["mid", layer, rest]
    return ["end", key.removeprefix("model.")]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load(loader: str, manifest: Path, sepdir: Path, spec: str) -> Tensors:
    options = OPTIONS[loader]
    if options is None:
        return llm_sepweight.load(sepdir, spec).to_dict()
    return sepstore.load(manifest, spec, **options).to_dict()


def touch(sd: Tensors) -> float:
    """Read every byte of every tensor."""
    return sum(float(t.sum()) for t in sd.values())


def time_steps(manifest: Path, sepdir: Path, spec: str, steps: list[Step], warm_up: bool) -> list[float]:
    """Seconds for each step, in order, in this process (after one untimed call per loader if ``warm_up``)."""
    for loader in LOADERS if warm_up else ():
        load(loader, manifest, sepdir, spec)
    times = []
    for loader, mode in steps:
        gc.collect()
        start = time.perf_counter()
        sd = load(loader, manifest, sepdir, spec)
        if mode == "load + sum":
            touch(sd)
        times.append(time.perf_counter() - start)
        del sd
    return times


def check_same(ours: Tensors, theirs: Tensors) -> None:
    """Both loads return the same tensors (llm_sepweight names layer keys ``mid.<i>.h.<i>.X``)."""
    theirs = {re.sub(r"^mid\.(\d+)\.h\.\d+\.", r"mid.\1.", k): v for k, v in theirs.items()}
    if ours.keys() != theirs.keys() or not all(torch.equal(v, theirs[k]) for k, v in ours.items()):
        raise RuntimeError("sepstore and llm_sepweight loaded different tensors")


def prepare(workdir: Path, layers: int) -> tuple[Path, Path]:
    """Write the checkpoint (unless there) and dump it with both libraries; the two stores' paths."""
    ckpt, store, sepdir = workdir / "checkpoint", workdir / "sepstore", workdir / "llm_sepweight"
    start = time.perf_counter()
    write_tinyllama_checkpoint(ckpt, layers=layers)
    sd = read_state_dict(ckpt)
    size = sum(v.nbytes for v in sd.values())
    print(f"checkpoint: {layers} layers, {len(sd)} tensors, {size / 2**30:.2f} GiB bf16 at {ckpt}", end=" ")
    print(f"(ready in {time.perf_counter() - start:.1f} s)")
    for path in (store, sepdir):
        shutil.rmtree(path, ignore_errors=True)
    ours = timed(lambda: sepstore.dump(llama_decider, sd, store, config=tinyllama_config(layers)))
    theirs = timed(lambda: llm_sepweight.dump(sepweight_decider, sd, sepdir))
    print(f"dump (whole model, once): sepstore {ours:.2f} s, llm_sepweight {theirs:.2f} s ({ours / theirs:.2f}x)")
    return store / "manifests" / "model" / "latest.json", sepdir


def report(title: str, steps: list[Step], times: list[float]) -> None:
    by: dict[Step, list[float]] = {}
    for step, t in zip(steps, times, strict=True):
        by.setdefault(step, []).append(t)

    def cell(values: list[float]) -> str:
        return f"{min(values):>11.3f}{statistics.median(values):>11.3f}"

    def ratio(a: list[float], b: list[float]) -> str:
        return f"{min(a) / min(b):>10.2f}x{statistics.median(a) / statistics.median(b):>10.2f}x"

    print(f"\n{title + ', seconds':<32}" + "".join(f"{m:>22}" for m in MODES))
    print(f"{'':<32}" + f"{'min':>11}{'median':>11}" * len(MODES))
    for loader in LOADERS:
        print(f"{loader:<32}" + "".join(cell(by[loader, m]) for m in MODES))
    for loader in SEPSTORE:
        label = loader.removeprefix("sepstore ") + " / llm_sepweight"
        print(f"{label:<32}" + "".join(ratio(by[loader, m], by["llm_sepweight", m]) for m in MODES))
    ours, theirs = (statistics.median(by[loader, "load only"]) for loader in (LOADERS[0], "llm_sepweight"))
    print(f"sepstore verified / llm_sepweight, load only, median: {ours / theirs:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("bench-load"), help="scratch folder (./bench-load)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant (default 5)")
    parser.add_argument("--layers", type=int, default=22, help="transformer layers (default 22, TinyLlama)")
    parser.add_argument("--clean", action="store_true", help="delete --workdir at the end")
    args = parser.parse_args()
    spec = f"b 0-{min(5, args.layers)}"
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads")
    manifest, sepdir = prepare(args.workdir.resolve(), args.layers)
    ours, theirs = (load(loader, manifest, sepdir, spec) for loader in (LOADERS[0], "llm_sepweight"))
    check_same(ours, theirs)
    check_same(load("sepstore mmap=True", manifest, sepdir, spec), theirs)
    print(f'load "{spec}": {len(ours)} tensors, {sum(v.nbytes for v in ours.values()) / 2**20:.0f} MiB, ', end="")
    print(f"page cache warm, {args.repeats} repeats interleaved (target: verified / llm_sepweight <= 1.0x, aim 0.5x)")
    del ours, theirs

    steps = [(loader, mode) for _ in range(args.repeats) for mode in MODES for loader in LOADERS]
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(1) as pool:
        times = pool.apply(time_steps, (manifest, sepdir, spec, steps, True))
    report("one process", steps, times)
    with spawn.Pool(1, maxtasksperchild=1) as pool:
        times = [pool.apply(time_steps, (manifest, sepdir, spec, [step], False))[0] for step in steps]
    report("fresh process per call", steps, times)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.clean:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
