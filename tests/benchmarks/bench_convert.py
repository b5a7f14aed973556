"""Convert benchmark: ``sepstore convert`` against ``cp -r`` and llm_sepweight 0.10.0's one-call dump.

Run by hand from the repository root (pytest skips tests/benchmarks):

    .venv/bin/python tests/benchmarks/bench_convert.py                          # full size, 3 repeats
    .venv/bin/python tests/benchmarks/bench_convert.py --layers 4 --repeats 2   # quick
    .venv/bin/python tests/benchmarks/bench_convert.py --clean                  # delete --workdir at the end
    .venv/bin/python tests/benchmarks/bench_convert.py --base-src /tmp/before   # also time another sepstore

The checkpoint is ``--checkpoint`` (default ``./bench-load/checkpoint``, bench_load.py's seeded
TinyLlama-1.1B-shaped Hugging Face folder: 3 bf16 safetensors shards, about 2.05 GiB, written with
``write_tinyllama_checkpoint`` if it is not there; another folder given that already holds an HF
index is used as it is). ``--layers N`` instead writes (or reuses) an N-layer checkpoint in ``<workdir>/checkpoint``.

Each contender runs as its own subprocess, into a fresh empty destination in ``--workdir``:

- convert: ``python -m sepstore convert CHECKPOINT DEST --quiet`` (streams one part at a time; on
  local disk it fsyncs each part and the manifest before renaming it into place, and the folder after);
- convert@base, with ``--base-src DIR``: the same, importing sepstore from ``DIR`` (a checkout of an
  earlier commit, e.g. the one before a change whose cost is to be measured);
- cp -r: ``cp -r CHECKPOINT DEST`` (the floor: read and write every byte once, nothing else);
- llm_sepweight: a Python process that loads the whole state dict (``read_state_dict``, i.e.
  safetensors ``load_file`` per shard) and calls ``llm_sepweight.dump(decider, sd, Path(dest))`` once;
- baseline: ``python -m sepstore --version``, the interpreter and imports convert pays before
  doing anything (a safetensors convert never imports torch; llm_sepweight's import of torch alone
  is about 1.5 s more).

Each is run once untimed first (so all read the checkpoint from a warm page cache; no cache is
dropped), then ``--repeats`` times, interleaved. Before every run the previous output is deleted
and ``os.sync()`` called (untimed), so no run pays for an earlier run's write-back; only convert
fsyncs its own output (its durability promise), cp -r and llm_sepweight leave it to the kernel.
Wall time is measured around the subprocess; peak RSS is the child's own maximum resident set
size, from ``/usr/bin/time -f %M`` (or, without it, ``os.wait4`` in a bare Python launcher), so it
is not inflated by this process's own memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _checkpoint import INDEX, read_state_dict, write_tinyllama_checkpoint

PYTHON = sys.executable
HERE = Path(__file__).resolve()
CONTENDERS = ("convert", "cp -r", "llm_sepweight", "baseline")
GIB, MIB = 2**30, 2**20
DEFAULT_CHECKPOINT = Path("bench-load/checkpoint")
TIME = Path("/usr/bin/time")
#: ``python -I -S -c LAUNCHER REPORT ARGV...``: run ARGV, write its ru_maxrss (KiB) to REPORT, exit as it did.
#: ``python -c FROM_SOURCE DIR ARGV...``: the sepstore command line, imported from DIR.
FROM_SOURCE = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); from sepstore.cli import main; sys.exit(main(sys.argv[1:]))"
)
LAUNCHER = (
    "import os, sys; pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ); "
    "_, status, usage = os.wait4(pid, 0); open(sys.argv[1], 'w').write(str(usage.ru_maxrss)); "
    "sys.exit(os.waitstatus_to_exitcode(status))"
)


@dataclass
class Runs:
    """Wall seconds and peak RSS (bytes) of each timed run of one contender."""

    seconds: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    written: int = 0


def sepweight_decider(key: str) -> list[str]:
    """llm_sepweight's decider for Hugging Face Llama keys (the same split as sepstore's llama decider)."""
    if key.startswith("model.embed_tokens."):
        return ["start", key.removeprefix("model.")]
    if key.startswith("model.layers."):
        layer, rest = key.removeprefix("model.layers.").split(".", 1)
        return ["mid", layer, rest]
    return ["end", key.removeprefix("model.")]


def sepweight_child(checkpoint: Path, dest: Path) -> None:
    """The llm_sepweight subprocess: the whole state dict in memory, then one ``dump`` call."""
    import llm_sepweight

    llm_sepweight.dump(sepweight_decider, read_state_dict(checkpoint), Path(dest))


def command(contender: str, checkpoint: Path, dest: Path, base_src: Path | None = None) -> list[str]:
    if contender == "convert":
        return [PYTHON, "-m", "sepstore", "convert", str(checkpoint), str(dest), "--quiet"]
    if contender == "convert@base":
        return [PYTHON, "-c", FROM_SOURCE, str(base_src), "convert", str(checkpoint), str(dest), "--quiet"]
    if contender == "cp -r":
        return ["cp", "-r", str(checkpoint), str(dest)]
    if contender == "llm_sepweight":
        return [PYTHON, str(HERE), "--sepweight-child", str(checkpoint), str(dest)]
    return [PYTHON, "-m", "sepstore", "--version"]


def run_child(argv: list[str]) -> tuple[float, int]:
    """Run ``argv`` to the end; its wall seconds and its own peak RSS in bytes.

    The child is started from a small process (``/usr/bin/time``, else a bare ``python -I -S``
    that spawns it and reads ``os.wait4``'s rusage), never from this one: Linux carries the
    forking process's RSS high-water mark over into the child's ``ru_maxrss`` through exec, so a
    child forked from this torch-importing process would report at least this process's RSS.
    """
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "maxrss"
        if TIME.is_file():
            wrapped = [str(TIME), "-f", "%M", "-o", str(report), *argv]
        else:
            wrapped = [PYTHON, "-I", "-S", "-c", LAUNCHER, str(report), *argv]
        start = time.perf_counter()
        done = subprocess.run(wrapped, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            message = done.stderr.decode(errors="replace")[-4000:]
            raise RuntimeError(f"{' '.join(argv)} exited with {done.returncode}:\n{message}")
        kib = int(report.read_text().split()[-1])  # ru_maxrss is in KiB on Linux
    return seconds, kib * 1024


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fresh(dest: Path) -> None:
    """Delete ``dest`` and flush dirty pages, so the next run starts with an empty disk queue."""
    shutil.rmtree(dest, ignore_errors=True)
    os.sync()


def check_output(contender: str, dest: Path, layers: int) -> None:
    """The run wrote what it should: a manifest with every layer, a copy, or begin/mid/end files."""
    if contender.startswith("convert"):
        manifests = list(dest.glob("manifests/*/latest.json"))
        if len(manifests) != 1:
            raise RuntimeError(f"convert left {len(manifests)} manifests in {dest}")
        if len(list(dest.glob("parts/**/*.safetensors"))) != layers + 2:
            raise RuntimeError(f"convert did not write {layers + 2} parts into {dest}")
    elif contender == "cp -r" and not (dest / INDEX).is_file():
        raise RuntimeError(f"cp -r left no {INDEX} in {dest}")
    elif contender == "llm_sepweight" and len(list(dest.glob("*.pth"))) != layers + 2:
        raise RuntimeError(f"llm_sepweight did not write {layers + 2} .pth files into {dest}")


def part_sizes(store: Path) -> dict[str, int]:
    """Each part's file size, by slot, from the manifest convert wrote."""
    from sepstore.manifest import decode_manifest

    (path,) = store.glob("manifests/*/latest.json")
    manifest = decode_manifest(path.read_bytes(), source=str(path))
    sizes = {"begin": manifest.begin.size if manifest.begin else 0, "end": manifest.end.size if manifest.end else 0}
    sizes |= {f"mid.{i}": part.size for i, part in enumerate(manifest.mid) if part is not None}
    return sizes


def prepare_checkpoint(args: argparse.Namespace, workdir: Path) -> Path:
    if args.layers is not None:
        return write_tinyllama_checkpoint(workdir / "checkpoint", layers=args.layers)
    checkpoint: Path = args.checkpoint.resolve()
    if (checkpoint / INDEX).is_file() and args.checkpoint != DEFAULT_CHECKPOINT:
        return checkpoint  # someone's own checkpoint: used as it is
    return write_tinyllama_checkpoint(checkpoint)


def layer_count(checkpoint: Path) -> int:
    config = json.loads((checkpoint / "config.json").read_text())
    return int(config["num_hidden_layers"])


def report(runs: dict[str, Runs], sizes: dict[str, int], source_bytes: int) -> None:
    def gib(n: float) -> str:
        return f"{n / GIB:.2f}"

    print(f"\n{'':<16}{'wall s min':>12}{'median':>10}{'peak RSS GiB':>14}{'written GiB':>13}{'GiB/s (min)':>13}")
    for name in runs:
        r = runs[name]
        rate = f"{source_bytes / GIB / min(r.seconds):.2f}" if name != "baseline" else "-"
        print(
            f"{name:<16}{min(r.seconds):>12.2f}{statistics.median(r.seconds):>10.2f}{gib(max(r.rss)):>14}"
            f"{gib(r.written):>13}{rate:>13}"
        )

    def ratio(a: str, b: str) -> str:
        ra, rb = runs[a].seconds, runs[b].seconds
        return f"{min(ra) / min(rb):.2f}x (min), {statistics.median(ra) / statistics.median(rb):.2f}x (median)"

    if "convert@base" in runs:
        print(f"\nconvert / convert@base:   {ratio('convert', 'convert@base')}   (what the change costs)")
    if not set(CONTENDERS) <= runs.keys():
        return  # --only: the rest compares every contender
    print(f"\nconvert / cp -r:          {ratio('convert', 'cp -r')}   target <= 1.5x, aim 1.2x")
    print(f"convert / llm_sepweight:  {ratio('convert', 'llm_sepweight')}")
    base = runs["baseline"]
    work = statistics.median(runs["convert"].seconds) - statistics.median(base.seconds)
    print(
        f"convert minus interpreter baseline (medians): {work:.2f} s = "
        f"{work / statistics.median(runs['cp -r'].seconds):.2f}x cp -r (the part of convert that is not start-up)"
    )
    convert_rss, sepweight_rss, base_rss = max(runs["convert"].rss), max(runs["llm_sepweight"].rss), max(base.rss)
    largest = max(sizes, key=lambda slot: sizes[slot])
    mids = [v for k, v in sizes.items() if k.startswith("mid.")]
    print(f"\ninterpreter baseline (python -m sepstore --version): {gib(base_rss)} GiB RSS, {min(base.seconds):.2f} s")
    print(
        f"parts: {len(sizes)}, largest {largest} {sizes[largest] / MIB:.1f} MiB "
        f"(begin {sizes['begin'] / MIB:.1f}, end {sizes['end'] / MIB:.1f}, "
        f"a layer {(max(mids) if mids else 0) / MIB:.1f} MiB)"
    )
    print(
        f"convert peak RSS: {gib(convert_rss)} GiB (target <= 1.0 GiB); minus baseline "
        f"{(convert_rss - base_rss) / MIB:.0f} MiB = {(convert_rss - base_rss) / sizes[largest]:.2f}x the largest part"
    )
    print(
        f"llm_sepweight peak RSS: {gib(sepweight_rss)} GiB; minus baseline {gib(sepweight_rss - base_rss)} GiB "
        f"= {(sepweight_rss - base_rss) / source_bytes:.2f}x the checkpoint"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="HF checkpoint folder")
    parser.add_argument("--workdir", type=Path, default=Path("bench-convert"), help="scratch folder (./bench-convert)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender (default 3)")
    parser.add_argument("--layers", type=int, help="write an N-layer checkpoint in --workdir instead (quick run)")
    parser.add_argument("--clean", action="store_true", help="delete --workdir at the end")
    parser.add_argument("--base-src", type=Path, help="also time convert importing sepstore from this source tree")
    parser.add_argument("--only", help="time only these contenders, comma-separated (e.g. convert,convert@base)")
    parser.add_argument("--sepweight-child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sepweight_child:
        sepweight_child(*args.sepweight_child)
        return

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = prepare_checkpoint(args, workdir)
    layers = layer_count(checkpoint)
    source_bytes = tree_bytes(checkpoint)
    print(f"machine: {os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    files = len(list(checkpoint.iterdir()))
    print(f"checkpoint: {checkpoint}, {layers} layers, {source_bytes / GIB:.2f} GiB in {files} files")
    contenders = CONTENDERS + (("convert@base",) if args.base_src else ())
    if args.only:
        contenders = tuple(c for c in contenders if c in args.only.split(","))
    base_src = args.base_src.resolve() if args.base_src else None
    dests = {name: workdir / name.replace(" ", "").replace("-", "").replace("@", "-") for name in contenders}

    print("warm-up: one untimed run of each (page cache warm from here on; nothing dropped) ...", flush=True)
    for name in contenders:
        fresh(dests[name])
        run_child(command(name, checkpoint, dests[name], base_src))
        check_output(name, dests[name], layers)
    sizes = part_sizes(dests["convert"]) if "convert" in dests else {}

    runs = {name: Runs() for name in contenders}
    print(f"timing: {args.repeats} repeats, interleaved; fresh destination and os.sync() before each run", flush=True)
    for repeat in range(args.repeats):
        for name in contenders:
            fresh(dests[name])
            seconds, rss = run_child(command(name, checkpoint, dests[name], base_src))
            check_output(name, dests[name], layers)
            runs[name].seconds.append(seconds)
            runs[name].rss.append(rss)
            runs[name].written = tree_bytes(dests[name]) if dests[name].exists() else 0
            print(f"  repeat {repeat + 1}: {name:<14} {seconds:6.2f} s  {rss / GIB:.2f} GiB", flush=True)
    report(runs, sizes, source_bytes)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for dest in dests.values():
        shutil.rmtree(dest, ignore_errors=True)
    if args.clean:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
