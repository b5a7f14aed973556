"""Run a model split over N processes, each loading only its slice, and generate greedily.

    python examples/pipeline.py REF --nodes 2 --tokens 1,2,3 --max-new-tokens 8

REF is what ``sepstore.load`` takes: a manifest path or URL (local, ``s3://``, ``http(s)://``) or
a store root. ``sepstore.plan`` splits the layers over the nodes; process i loads its slice with
``sepstore.hf.load_model`` (every byte verified), runs it with its own KV cache, and passes hidden
states to process i+1 with ``torch.distributed`` (gloo on 127.0.0.1). The last process's logits
are broadcast so that every process picks the same next token. The generated token ids are
printed as a JSON list on the last line.
"""

from __future__ import annotations

import argparse
import json
import socket
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sepstore
from sepstore.hf import greedy, load_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stage(rank: int, args: argparse.Namespace, specs: list[str], port: int, results: Any) -> None:
    """One process: load slice ``specs[rank]``, then take part in every generation step."""
    world = len(specs)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        options = {"storage_options": json.loads(args.storage_options)} if args.storage_options else {}
        node = load_model(args.ref, specs[rank], cache_dir=args.cache_dir, **options)
        cache = node.new_cache()
        config = node.config
        dtype = next(node.parameters()).dtype

        def step(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            run = {"attention_mask": mask, "position_ids": positions, "past_key_values": cache, "use_cache": True}
            if rank == 0:
                out = node(input_ids=ids, **run)
            else:
                hidden = torch.empty(ids.shape[0], ids.shape[1], config.hidden_size, dtype=dtype)
                dist.recv(hidden, src=rank - 1)
                out = node(hidden_states=hidden, **run)
            logits = torch.empty(ids.shape[0], config.vocab_size)  # float32 holds any dtype's logits exactly
            if rank < world - 1:
                dist.send(out.hidden_states.contiguous(), dst=rank + 1)
            else:
                logits = out.logits[:, -1].float().contiguous()
            dist.broadcast(logits, src=world - 1)
            return logits

        prompt = torch.tensor([[int(t) for t in args.tokens.split(",")]])
        generated = greedy(step, prompt, max_new_tokens=args.max_new_tokens)
        if rank == 0:
            results.put(generated[0].tolist())
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", help="manifest path or URL, or store root")
    parser.add_argument("--nodes", type=int, default=2, help="processes to split the model over")
    parser.add_argument("--tokens", required=True, help="prompt token ids, comma-separated")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--cache-dir", help="where remote parts are kept (default $SEPSTORE_CACHE)")
    parser.add_argument("--storage-options", help="fsspec options as JSON, e.g. an S3 endpoint")
    args = parser.parse_args(argv)
    options = {"storage_options": json.loads(args.storage_options)} if args.storage_options else {}
    try:
        specs = [p.spec for p in sepstore.plan(args.ref, nodes=args.nodes, **options)]
    except sepstore.SepstoreError as exc:
        parser.exit(2, f"pipeline.py: {exc}\n")
    for rank, spec in enumerate(specs):
        print(f"node {rank}: {spec}")
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(stage, args=(args, specs, free_port(), results), nprocs=len(specs), join=True)
    print(json.dumps(results.get()))


if __name__ == "__main__":
    main()
