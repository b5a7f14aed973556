"""Commands a node runs to get and check the parts it needs: ``verify``, ``export``, ``pull``, ``files``
and ``plan``."""

from __future__ import annotations

import argparse

from .._text import counted, human_bytes
from ..export import export
from ..plan import plan
from ..pull import files, pull
from ..verify import verify
from ._common import (
    EXIT_OK,
    EXIT_VERIFY,
    Command,
    add_parts_url,
    add_quiet,
    add_ref,
    count_labelled,
    print_json,
    ref_options,
    signature_lines,
)


def cmd_verify(args: argparse.Namespace) -> int:
    report = verify(args.ref, args.spec, quiet=args.quiet, **ref_options(args))
    if args.json:
        print_json(report.to_dict())
    else:
        for check in report.checks:
            status = "ok" if check.ok else f"FAILED: {check.error}"
            print(f"{check.part:<10} {human_bytes(check.size):>11}  {status}")
        checked = count_labelled([c.part for c in report.checks])
        verdict = "verified" if report.ok else f"{len(report.failures)} of {checked} failed"
        if report.signatures is not None:
            print("\n".join(signature_lines(report.signatures)))
        print(f"{report.manifest_url} ({report.manifest_digest}): {verdict}")
    return EXIT_OK if report.ok else EXIT_VERIFY


def add_verify(command: Command) -> None:
    """The ``verify`` command."""
    p = command(
        "verify",
        cmd_verify,
        "re-hash parts and check them against the manifest (exit 1 on any failure)",
        "sepstore verify ./store/manifests/llama/v1.json --spec 'b 0-5'",
    )
    add_ref(p)
    p.add_argument("--spec", default="f", help="parts to verify, e.g. 'b 0-5' (default: f, all)")
    add_parts_url(p)
    add_quiet(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_export(args: argparse.Namespace) -> int:
    report = export(
        args.ref,
        args.out_dir,
        spec=args.spec,
        max_shard_size=args.max_shard_size,
        force=args.force,
        quiet=args.quiet,
        **ref_options(args),
    )
    if args.json:
        print_json(report.to_dict())
        return EXIT_OK
    named = (
        "the checkpoint's names"
        if report.names == "renames"
        else "begin./mid.<i>./end. names (the store records no renames)"
    )
    weights = counted(report.shards, "weight file")
    print(
        f"exported {counted(report.tensors, 'tensor')} ({human_bytes(report.tensor_bytes)}) under {named} "
        f"in {weights}, and {counted(len(report.files) - report.shards, 'other file')} -> {report.out_dir}"
    )
    if report.left_out:
        print(f"left out what convert added: {', '.join(report.left_out)}")
    return EXIT_OK


def add_export(command: Command) -> None:
    """The ``export`` command."""
    p = command(
        "export",
        cmd_export,
        "write a model back as a Hugging Face folder (config, assets, safetensors shards) under its original names",
        "sepstore export s3://models/store/manifests/acme/llama/v2.json ./llama-hf --max-shard-size 2GB",
    )
    add_ref(p)
    p.add_argument("out_dir", help="local folder to write (must be empty unless --force)")
    p.add_argument("--spec", default="f", help="parts to export, e.g. 'b 0-5' (default: f, all)")
    p.add_argument(
        "--max-shard-size", default="5GB", help="largest weight file, e.g. 5GB, 500MiB (default: 5GB, as transformers)"
    )
    p.add_argument("--force", action="store_true", help="write into a folder that is not empty, replacing weight files")
    p.add_argument("--cache-dir", help="cache folder for remote parts (default: $SEPSTORE_CACHE or ~/.cache/sepstore)")
    add_parts_url(p)
    add_quiet(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_pull(args: argparse.Namespace) -> int:
    report = pull(args.ref, args.spec, quiet=args.quiet, verify=args.verify, **ref_options(args))
    if args.json:
        print_json(report.to_dict())
        return EXIT_OK
    checked = "re-hashed" if report.checked == "digest" else "size checked (--verify re-hashes them)"
    fetched = count_labelled(report.fetched)
    reused = f", {human_bytes(report.reused_bytes)} of it copied from cached tensors" if report.reused_bytes else ""
    print(
        f"fetched and verified {fetched} ({human_bytes(report.fetched_bytes)}{reused}); "
        f"{len(report.present)} already local ({human_bytes(report.present_bytes)}), {checked}"
    )
    if report.repaired:
        damaged = ", ".join(f"{label} ({why})" for label, why in report.repaired.items())
        print(f"repaired {counted(len(report.repaired), 'damaged local part')}, fetched again: {damaged}")
    return EXIT_OK


def add_pull(command: Command) -> None:
    """The ``pull`` command."""
    p = command(
        "pull",
        cmd_pull,
        "fetch the parts a spec needs into the local cache, verified",
        "sepstore pull https://cdn.example.com/store/manifests/acme/llama/v2.json --spec 'b 0-8'",
    )
    add_ref(p)
    p.add_argument("--spec", default="f", help="parts to fetch, e.g. 'b 0-5' (default: f, all)")
    p.add_argument("--cache-dir", help="cache folder (default: $SEPSTORE_CACHE or ~/.cache/sepstore)")
    add_parts_url(p)
    p.add_argument(
        "--verify",
        action="store_true",
        help="re-hash the parts already cached, and fetch again any that fail (default: check their sizes)",
    )
    add_quiet(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_files(args: argparse.Namespace) -> int:
    found = files(args.ref, args.spec, **ref_options(args))
    if args.json:
        print_json([f.to_dict() for f in found])
    else:
        for f in found:
            print(f.url)
    return EXIT_OK


def add_files(command: Command) -> None:
    """The ``files`` command."""
    p = command(
        "files",
        cmd_files,
        "print the URLs of the part files a spec needs, for other download tools",
        "sepstore files s3://models/store/manifests/acme/llama/v2.json --spec '0-4'",
    )
    add_ref(p)
    p.add_argument("--spec", default="f", help="parts to list (default: f, all)")
    add_parts_url(p)
    p.add_argument("--json", action="store_true", help="print JSON: part, url, digest, size")


def cmd_plan(args: argparse.Namespace) -> int:
    budgets = args.budget.split(",") if args.budget else None
    nodes = plan(args.ref, nodes=args.nodes, budgets=budgets, **ref_options(args))
    if args.json:
        print_json([n.to_dict() for n in nodes])
        return EXIT_OK
    for n in nodes:
        budget = f" of {human_bytes(n.budget)}" if n.budget else ""
        print(f"node {n.node}: {n.spec:<16} {human_bytes(n.bytes):>11}{budget}")
    return EXIT_OK


def add_plan(command: Command) -> None:
    """The ``plan`` command."""
    p = command(
        "plan",
        cmd_plan,
        "split a model's layers over nodes, balancing bytes (begin on the first node, end on the last)",
        "sepstore plan s3://models/store/manifests/acme/llama/v2.json --budget 24GiB,24GiB,16GiB",
    )
    add_ref(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--nodes", type=int, help="number of nodes, balanced by bytes")
    group.add_argument("--budget", help="one memory budget per node, comma-separated (24GiB,16GB,...)")
    p.add_argument("--json", action="store_true", help="print JSON")
