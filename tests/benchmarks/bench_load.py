"""Load benchmark: sepstore against llm_sepweight 0.10.0 on a TinyLlama-1.1B-shaped checkpoint.

Run by hand from the repository root (pytest skips tests/benchmarks):

    .venv/bin/python tests/benchmarks/bench_load.py                 # full size, 5 repeats
    .venv/bin/python tests/benchmarks/bench_load.py --layers 6 --repeats 3   # quick
    .venv/bin/python tests/benchmarks/bench_load.py --clean         # remove --workdir at the end

It writes a seeded synthetic checkpoint (Hugging Face layout, bf16, about 2 GiB at full size) into
``--workdir`` (reused by later runs), dumps it with ``sepstore.dump`` and ``llm_sepweight.dump``
(timed once each), then times ``load(..., "b 0-5").to_dict()`` for sepstore (verified and not) and
llm_sepweight, interleaved, after one untimed warm-up call each, so the page cache is warm for all.

Two variants: "load only" times the call alone (sepstore returns views of a copy-on-write mmap, so
unverified it reads only headers, verified it reads every byte once to hash it; llm_sepweight's
``torch.load`` copies every byte into memory); "load + sum" also sums every tensor inside the timed
region, so every byte is touched on every side.
"""

from __future__ import annotations

import argparse
import gc
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


def sepweight_decider(key: str) -> list[str]:
    """llm_sepweight's decider for Hugging Face Llama keys (same split as ``llama_decider``)."""
    if key.startswith("model.embed_tokens."):
        return ["start", key.removeprefix("model.")]
    if key.startswith("model.layers."):
        layer, rest = key.removeprefix("model.layers.").split(".", 1)
        return ["mid", layer, rest]
    return ["end", key.removeprefix("model.")]


def touch(sd: Tensors) -> float:
    """Read every byte of every tensor."""
    return sum(float(t.sum()) for t in sd.values())


def timed(fn: Callable[[], object]) -> float:
    gc.collect()
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    del result
    return elapsed


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
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads")
    for path in (store, sepdir):
        shutil.rmtree(path, ignore_errors=True)
    ours = timed(lambda: sepstore.dump(llama_decider, sd, store, config=tinyllama_config(layers)))
    theirs = timed(lambda: llm_sepweight.dump(sepweight_decider, sd, sepdir))
    print(f"dump (whole model, once): sepstore {ours:.2f} s, llm_sepweight {theirs:.2f} s ({ours / theirs:.2f}x)")
    return store / "manifests" / "model" / "latest.json", sepdir


def warm_up(loaders: dict[str, Callable[[], Tensors]], repeats: int) -> tuple[int, int, float]:
    """One untimed call of each loader; check they agree. Tensors, bytes, and the best time to sum them."""
    results = {name: load() for name, load in loaders.items()}
    ours, theirs = results["sepstore verify=True"], results["llm_sepweight"]
    check_same(ours, theirs)
    sum_alone = min(timed(lambda: touch(theirs)) for _ in range(repeats))
    return len(ours), sum(v.nbytes for v in ours.values()), sum_alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("bench-load"), help="scratch folder (./bench-load)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant (default 5)")
    parser.add_argument("--layers", type=int, default=22, help="transformer layers (default 22, TinyLlama)")
    parser.add_argument("--clean", action="store_true", help="delete --workdir at the end")
    args = parser.parse_args()
    spec = f"b 0-{min(5, args.layers)}"
    manifest, sepdir = prepare(args.workdir, args.layers)

    loaders: dict[str, Callable[[], Tensors]] = {
        "sepstore verify=True": lambda: sepstore.load(manifest, spec).to_dict(),
        "sepstore verify=False": lambda: sepstore.load(manifest, spec, verify=False).to_dict(),
        "llm_sepweight": lambda: llm_sepweight.load(sepdir, spec).to_dict(),
    }
    count, nbytes, sum_alone = warm_up(loaders, args.repeats)
    print(
        f'load "{spec}": {count} tensors, {nbytes / 2**20:.0f} MiB; page cache warm; {args.repeats} repeats, ', end=""
    )
    print("interleaved")
    modes: dict[str, Callable[[Callable[[], Tensors]], Callable[[], object]]] = {
        "load only": lambda load: load,
        "load + sum": lambda load: lambda: touch(load()),
    }
    times: dict[tuple[str, str], list[float]] = {(n, m): [] for n in loaders for m in modes}
    for _ in range(args.repeats):
        for mode, wrap in modes.items():
            for name, load in loaders.items():
                times[name, mode].append(timed(wrap(load)))

    def cell(values: list[float]) -> str:
        return f"{min(values):>11.3f}{statistics.median(values):>11.3f}"

    def ratio(a: list[float], b: list[float]) -> str:
        return f"{min(a) / min(b):>10.2f}x{statistics.median(a) / statistics.median(b):>10.2f}x"

    print(f"\n{'seconds':<24}" + "".join(f"{m:>22}" for m in modes))
    print(f"{'':<24}" + f"{'min':>11}{'median':>11}" * len(modes))
    for name in loaders:
        print(f"{name:<24}" + "".join(cell(times[name, m]) for m in modes))
    print(f"{'(sum alone, resident)':<24}{sum_alone:>11.3f}")
    for name in ("sepstore verify=True", "sepstore verify=False"):
        label = name.removeprefix("sepstore ") + " / llm_sepweight"
        print(f"{label:<24}" + "".join(ratio(times[name, m], times["llm_sepweight", m]) for m in modes))
    verified = statistics.median(times["sepstore verify=True", "load only"])
    baseline = statistics.median(times["llm_sepweight", "load only"])
    print(f"\nsepstore verified / llm_sepweight, load only, median: {verified / baseline:.2f}x", end=" ")
    print("(target <= 1.0x, aim 0.5x)")
    if args.clean:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
