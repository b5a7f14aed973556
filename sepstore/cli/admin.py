"""Commands that look after a store and the local cache: ``info``, ``diff``, ``tags`` (``ls``), ``cache``
(``ls``, ``verify``, ``prune``) and ``gc``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .._text import counted, human_bytes
from ..cache_admin import CachedFile, PartVerdict, cache_ls, cache_prune, cache_verify
from ..diff import diff
from ..errors import RefError
from ..gc import DEFAULT_GRACE, gc
from ..refs import ModelRef, is_manifest_url, resolve
from ..sign import signatures
from ..tags import tags
from ._common import (
    EXIT_OK,
    EXIT_VERIFY,
    Command,
    add_cache_dir,
    add_ref,
    add_trust,
    count_blobs,
    print_json,
    print_table,
    ref_options,
    short_digest,
    signature_lines,
    tally,
    trust_options,
    utc_time,
)


def _diff_sides(args: argparse.Namespace) -> tuple[ModelRef, ModelRef]:
    """A and B, each with its ``--name``/``--tag``: given twice, the first is A's and the second
    B's; given once, it is for each side that is a store root."""
    refs = (args.a, args.b)
    roots = [i for i, ref in enumerate(refs) if not is_manifest_url(ref)] or [0, 1]  # none: ModelRef says why
    chosen: list[dict[str, str | None]] = [{"name": None, "tag": None}, {"name": None, "tag": None}]
    for key in ("name", "tag"):
        values: list[str] = getattr(args, key) or []
        if len(values) > 2:
            raise RefError(
                f"--{key} is given once (for each store root) or twice (for A, then B), not {len(values)} times"
            )
        for i in range(2):
            if len(values) == 2:
                chosen[i][key] = values[i]
            elif values and i in roots:
                chosen[i][key] = values[0]
    pins: list[str] = args.digest or []
    if len(pins) not in (0, 2):
        raise RefError(f"--digest pins one manifest: give it twice (for A, then B), not {len(pins)} time(s)")
    digests = pins or [None, None]
    a, b = (
        ModelRef(ref, name=c["name"], tag=c["tag"], digest=d) for ref, c, d in zip(refs, chosen, digests, strict=True)
    )
    return a, b


def _verdicts(verdicts: Sequence[PartVerdict], kind: str) -> str:
    """``4 damaged parts and 1 damaged asset``: cached blobs re-hashed."""
    return count_blobs(len(verdicts), sum(v.asset for v in verdicts), kind)


def _cached_files(found: Sequence[CachedFile]) -> str:
    """``7 files (4 parts, 2 assets and 1 partial download)``: what prune removed or left."""
    partial = sum(f.partial for f in found)
    assets = sum(f.asset for f in found)
    kinds = tally((len(found) - partial - assets, "part"), (assets, "asset"), (partial, "partial download"))
    return f"{counted(len(found), 'file')} ({kinds})" if found else counted(0, "file")


def _cache_rows(files: Sequence[CachedFile]) -> list[list[str]]:
    return [[short_digest(f.digest), human_bytes(f.size), utc_time(f.last_used)] for f in files]


def cmd_info(args: argparse.Namespace) -> int:
    resolved = resolve(args.ref, **ref_options(args))
    signed = signatures(resolved, **trust_options(args))
    m = resolved.manifest
    parts = [
        {
            "part": label,
            "digest": part.digest,
            "size": part.size,
            "tensors": len(part.tensors),
            "dtypes": sorted({t.dtype for t in part.tensors.values()}),
        }
        for label, part in m.labelled_parts()
    ]
    config = m.config or {}
    summary = {
        "architecture": (config.get("architectures") or [config.get("model_type")])[0],
        "hidden_size": config.get("hidden_size"),
        "vocab_size": config.get("vocab_size"),
    }
    assets = [{"path": path, "digest": a.digest, "size": a.size} for path, a in sorted(m.asset_files.items())]
    info = {
        "name": m.name,
        "manifest": resolved.url,
        "digest": resolved.digest,
        "format_version": m.format_version,
        "layers": m.n_layers,
        "total_bytes": m.total_bytes,
        "config": summary if config else None,
        "metadata": m.metadata,
        "parts": parts,
        "assets": assets,
        "trust": signed.to_dict(),
    }
    if args.json:
        print_json(info)
        return EXIT_OK
    print(f"name:      {m.name}")
    print(f"manifest:  {resolved.url}")
    print(f"digest:    {resolved.digest}")
    print(f"layers:    {m.n_layers}")
    print(f"size:      {human_bytes(m.total_bytes)} in {counted(len(parts), 'part')}")
    if config:
        print("config:    " + ", ".join(f"{k} {v}" for k, v in summary.items() if v is not None))
    for p in parts:
        tensors = counted(p["tensors"], "tensor")
        print(f"  {p['part']:<10} {human_bytes(p['size']):>11}  {tensors:>11}  {','.join(p['dtypes'])}")
    if assets:
        print(f"assets:    {counted(len(assets), 'file')}, {human_bytes(sum(a['size'] for a in assets))}")
    for a in assets:
        print(f"  {human_bytes(a['size']):>11}  {a['path']}")
    print("\n".join(signature_lines(signed)))
    return EXIT_OK


def add_info(command: Command) -> None:
    """The ``info`` command."""
    p = command("info", cmd_info, "show a model's manifest: parts, sizes, dtypes, config", "sepstore info ./store")
    add_ref(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_diff(args: argparse.Namespace) -> int:
    result = diff(*_diff_sides(args), **trust_options(args))
    differ_code = EXIT_VERIFY if args.exit_code and result.differs else EXIT_OK
    if args.json:
        print_json(result.to_dict())
        return differ_code
    for p in result.changed:
        detail = ", ".join(f"{kind} {', '.join(names)}" for kind, names in p.tensors.to_dict().items() if names)
        print(f"{p.part:<10} {p.status:<8} {human_bytes(p.bytes):>11} {human_bytes(p.tensor_bytes):>11}  {detail}")
    for a in result.changed_assets:
        print(f"{'asset':<10} {a.status:<8} {human_bytes(a.bytes):>11}  {a.path}")
    same = len(result.parts) - len(result.changed)
    differ = counted(len(result.changed), "part") + (" differs" if len(result.changed) == 1 else " differ")
    if result.assets:
        differ += f", {counted(len(result.changed_assets), 'asset')} of {len(result.assets)}"
    print(
        f"{differ}, {same} same; {human_bytes(result.bytes_to_fetch)} to fetch by part, "
        f"{human_bytes(result.tensor_bytes_to_fetch)} by tensor"
    )
    return differ_code


def add_diff(command: Command) -> None:
    """The ``diff`` command."""
    p = command(
        "diff",
        cmd_diff,
        "compare two versions: changed parts and tensors, bytes to fetch",
        "sepstore diff ./store/manifests/llama/v1.json ./store/manifests/llama/v2.json\n"
        "  sepstore diff ./store ./store --name llama --tag v1 --tag v2",
    )
    p.add_argument("a", help="the version a node has: manifest path or URL, or a store root")
    p.add_argument("b", help="the version to move to")
    side = "given once, for each side that is a store root; twice, for A then B"
    p.add_argument("--name", action="append", help=f"model name in a store root ({side})")
    p.add_argument("--tag", action="append", help=f"tag of that model ({side})")
    p.add_argument(
        "--digest", action="append", help="pin the manifests' digests (blake3:<hex>): given twice, for A then B"
    )
    add_trust(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--exit-code",
        action="store_true",
        help="exit 1 if the versions differ, 0 if not (as `git diff --exit-code`); any error exits 2",
    )


def cmd_tags(args: argparse.Namespace) -> int:
    rows = tags(args.store, name=args.name)
    if args.json:
        print_json([row.to_dict() for row in rows])
        return EXIT_OK
    if not rows:
        print(f"no models in {args.store}" + (f" named {args.name!r}" if args.name else ""))
        return EXIT_OK
    table = [
        [r.name, r.tag, short_digest(r.digest), str(r.layers) if r.layers is not None else "-",
         human_bytes(r.bytes) if r.bytes is not None else "-", utc_time(r.modified)]
        + ([f"unreadable: {r.error}"] if r.error else [])
        for r in rows
    ]  # fmt: skip
    header = ["NAME", "TAG", "DIGEST", "LAYERS", "SIZE", "MODIFIED (UTC)"]
    width = len(header) + any(r.error for r in rows)
    print_table([*header, ""][:width], [row + [""] * (width - len(row)) for row in table], frozenset({3, 4}))
    return EXIT_OK


def add_tags(command: Command) -> None:
    """The ``tags`` command."""
    p = command(
        "tags",
        cmd_tags,
        "list every model and tag in a store: manifest digest, layers, size, when the tag was last written",
        "sepstore tags s3://models/store --name acme/llama",
        aliases=["ls"],
    )
    p.add_argument("store", help="store root: a path or URL (an HTTP server cannot list; give a manifest URL to info)")
    p.add_argument("--name", help="only this model's tags")
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_cache_ls(args: argparse.Namespace) -> int:
    listing = cache_ls(args.cache_dir)
    if args.json:
        print_json(listing.to_dict())
        return EXIT_OK
    if listing.parts:
        print_table(["DIGEST", "SIZE", "LAST USED (UTC)"], _cache_rows(listing.parts), frozenset({1}))
    if listing.partial:
        print("partial downloads (the next pull of the part resumes a stopped one):")
        rows = _cache_rows(listing.partial)
        for row, f in zip(rows, listing.partial, strict=True):
            row.append("fetching now" if f.active else "stopped")
        print_table(["DIGEST", "HELD", "LAST WRITTEN (UTC)", "STATE"], rows, frozenset({1}))
    held = sum(f.size for f in listing.parts)
    blobs = count_blobs(len(listing.parts), sum(f.asset for f in listing.parts))
    summary = f"cache {listing.root}: {blobs}, {human_bytes(held)}"
    if listing.partial:
        partial = counted(len(listing.partial), "partial download")
        summary += f", and {partial}; {human_bytes(listing.total_bytes)} in all"
    print(summary)
    return EXIT_OK


def cmd_cache_verify(args: argparse.Namespace) -> int:
    report = cache_verify(args.cache_dir, repair=args.repair)
    if args.json:
        print_json(report.to_dict())
        return EXIT_OK if report.ok else EXIT_VERIFY
    for p in report.bad:
        state = "removed" if p.removed else "kept"
        print(f"{short_digest(p.digest)}  {human_bytes(p.size):>11}  DAMAGED: {p.error}; {state}")
    checked = f"checked {_verdicts(report.parts, 'cached')} in {report.root}"
    if not report.bad:
        print(f"{checked}: all intact")
    elif report.ok:
        print(
            f"{checked}: removed {_verdicts(report.bad, 'damaged')}; the cache cannot fetch them again by "
            "itself (it does not know which manifests list them): the next load or pull of a model that needs "
            "one fetches it"
        )
    else:
        left = [p for p in report.bad if not p.removed]
        hint = "" if args.repair else "; `sepstore cache verify --repair` removes them"
        print(f"{checked}: {_verdicts(left, 'damaged')} remain{'s' if len(left) == 1 else ''}{hint}")
    return EXIT_OK if report.ok else EXIT_VERIFY


def cmd_cache_prune(args: argparse.Namespace) -> int:
    report = cache_prune(args.max_size, cache_dir=args.cache_dir, dry_run=args.dry_run)
    if args.json:
        print_json(report.to_dict())
        return EXIT_OK
    verb = "would remove" if report.dry_run else "removed"
    for f in report.removed:
        kind = " (partial download)" if f.partial else ""
        print(f"{verb}  {short_digest(f.digest)}  {human_bytes(f.size):>11}  last used {utc_time(f.last_used)}{kind}")
    in_use = ""
    if report.in_use:
        in_use = f"; kept {_cached_files(report.in_use)} other processes are reading or fetching"
    after = "would hold" if report.dry_run else "holds"
    print(
        f"{verb} {human_bytes(report.removed_bytes)} in {_cached_files(report.removed)}, least recently used "
        f"first{in_use}; the cache {after} {human_bytes(report.bytes_after)} (max {human_bytes(report.max_size)})"
    )
    return EXIT_OK


def add_cache(command: Command) -> None:
    """The ``cache`` command and its subcommands."""
    p = command(
        "cache",
        None,
        "manage the local cache of parts: list it, re-hash it, prune it to a size",
        "sepstore cache ls\n  sepstore cache verify --repair\n  sepstore cache prune --max-size 20GiB --dry-run",
    )
    cache = p.add_subparsers(dest="cache_command", required=True, metavar="COMMAND")
    p = command(
        "ls",
        cmd_cache_ls,
        "list the cached parts (most recently used first), partial downloads, and the total size",
        "sepstore cache ls --cache-dir /scratch/sepstore",
        under=cache,
    )
    add_cache_dir(p)
    p = command(
        "verify",
        cmd_cache_verify,
        "re-hash every cached part (exit 1 if a damaged one remains)",
        "sepstore cache verify --repair",
        under=cache,
    )
    add_cache_dir(p)
    p.add_argument(
        "--repair",
        action="store_true",
        help="remove damaged parts (the next load or pull of a model that needs one fetches it again)",
    )
    p = command(
        "prune",
        cmd_cache_prune,
        "remove cached parts, least recently used first, down to a size; parts in use are kept",
        "sepstore cache prune --max-size 20GiB --dry-run",
        under=cache,
    )
    add_cache_dir(p)
    p.add_argument("--max-size", required=True, help="size to shrink the cache to, e.g. 20GiB, 500MB, 0")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")


def cmd_gc(args: argparse.Namespace) -> int:
    report = gc(args.store, grace=args.grace, dry_run=args.dry_run, allow_empty=args.allow_empty)
    if args.json:
        print_json(report.to_dict())
        return EXIT_OK
    verb = "would remove" if report.dry_run else "removed"
    print(
        f"{verb} {counted(len(report.removed), 'unreferenced file')} ({human_bytes(report.removed_bytes)}); "
        f"kept {counted(report.kept, 'referenced file')}, {len(report.young)} unreferenced younger than "
        f"{args.grace:g} s and {len(report.leased)} a publish in progress relies on"
    )
    if report.signatures_removed or report.signatures_kept:
        print(
            f"{verb} {counted(len(report.signatures_removed), 'signature')} of deleted tags or replaced manifests; "
            f"kept {report.signatures_kept}"
        )
    return EXIT_OK


def add_gc(command: Command) -> None:
    """The ``gc`` command."""
    p = command(
        "gc",
        cmd_gc,
        "delete parts no manifest in the store references (older than the grace period)",
        "sepstore gc s3://models/store --dry-run",
    )
    p.add_argument("store", help="store root: a path or URL")
    p.add_argument(
        "--grace", type=float, default=DEFAULT_GRACE, help="keep files younger than this many seconds (default 3600)"
    )
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p.add_argument(
        "--allow-empty",
        action="store_true",
        help="run even if the store holds no manifests (which removes every part; refused by default)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
