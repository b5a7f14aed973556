"""OCI benchmark: sepstore's verified pull from a registry against a plain parallel blob download.

Run by hand from the repository root (pytest skips tests/benchmarks):

    .venv/bin/python tests/benchmarks/bench_oci.py                           # 8 layers of 32 MiB, 3 repeats
    .venv/bin/python tests/benchmarks/bench_oci.py --layers 16 --layer-mib 64 --repeats 2

It dumps a seeded synthetic model (begin, ``--layers`` mid parts of about ``--layer-mib`` MiB each,
end; float32 noise) into a local store, starts Debian's ``docker-registry`` (distribution 2.8,
filesystem storage, no auth) on 127.0.0.1 and pushes the model there with ``sepstore.push``
(timed once). Then, interleaved, ``--repeats`` times each, into empty folders:

- sepstore: ``sepstore.pull("oci://.../bench/model:v1", cache_dir=<empty>)``: the image manifest
  and the sepstore manifest layer (SHA-256 and BLAKE3 checked), then every part as ranged GETs of
  4 MiB pieces into the cache, 8 parts at a time, each hashed (BLAKE3) before it gets its name.
- plain: one ``GET /v2/<repo>/blobs/<digest>`` per weight layer with urllib3, 8 at a time, each
  streamed to a file in 4 MiB pieces, nothing checked (what ``oras pull`` does, in parallel).

Also printed: BLAKE3 of all parts from the warm page cache (the verification's own cost).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import urllib3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from registry import DistributionRegistry

import sepstore
from sepstore.demo import llama_decider
from sepstore.hashing import digest_file

PIECE = 4 * 1024 * 1024


def _state_dict(layers: int, layer_mib: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    side = int((layer_mib * 2**20 / 4) ** 0.5)
    state = {"model.embed_tokens.weight": torch.randn(256, side, generator=generator)}
    for i in range(layers):
        state[f"model.layers.{i}.mlp.down_proj.weight"] = torch.randn(side, side, generator=generator)
    state["model.norm.weight"] = torch.randn(side, generator=generator)
    state["lm_head.weight"] = torch.randn(256, side, generator=generator)
    return state


def _plain(host: str, repo: str, blobs: list[str], out: Path, workers: int) -> None:
    http = urllib3.PoolManager(maxsize=workers)

    def get(digest: str) -> None:
        answer = http.request("GET", f"http://{host}/v2/{repo}/blobs/{digest}", preload_content=False)
        with open(out / digest.replace(":", "-"), "wb") as file:
            while piece := answer.read(PIECE):
                file.write(piece)
        answer.release_conn()

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(get, blobs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--layer-mib", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-oci-"))
    registry = DistributionRegistry(work / "registry").start()
    try:
        store = work / "store"
        sepstore.dump(llama_decider, _state_dict(args.layers, args.layer_mib), store, name="model", tag="v1")
        ref = f"oci://{registry.host}/bench/model:v1"
        began = time.perf_counter()
        sepstore.push(store, f"oci://{registry.host}/bench/model", quiet=True)
        push_s = time.perf_counter() - began
        model = sepstore.resolve(ref)
        total = model.manifest.total_bytes
        image = sepstore.oci.resolve_oci(ref)
        blobs = [sha for sha, _ in image.blobs.values()]
        times: dict[str, list[float]] = {"sepstore": [], "plain": []}
        for _ in range(args.repeats):
            for kind in ("sepstore", "plain"):
                out = work / f"out-{kind}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                began = time.perf_counter()
                if kind == "sepstore":
                    sepstore.pull(ref, cache_dir=out, quiet=True, workers=args.workers)
                else:
                    _plain(registry.host, "bench/model", blobs, out, args.workers)
                times[kind].append(time.perf_counter() - began)
        began = time.perf_counter()
        for file in (work / "out-sepstore" / "parts" / "blake3").iterdir():
            digest_file(file)
        blake3_s = time.perf_counter() - began
        result = {
            "parts": len(blobs),
            "bytes": total,
            "push_s": round(push_s, 2),
            **{f"{k}_s": round(statistics.median(v), 3) for k, v in times.items()},
            **{f"{k}_mib_s": round(total / 2**20 / statistics.median(v), 1) for k, v in times.items()},
            "blake3_warm_s": round(blake3_s, 3),
            "ratio": round(statistics.median(times["sepstore"]) / statistics.median(times["plain"]), 2),
        }
        print(json.dumps(result, indent=2))
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
