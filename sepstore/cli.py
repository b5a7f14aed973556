"""The ``sepstore`` command line: a thin front end over the public Python API.

Exit codes: 0 success, 1 a verification failure (integrity, or a trust policy not satisfied), 2 bad
usage or any other error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from ._text import counted, human_bytes
from .cache_admin import CachedFile, PartVerdict, cache_ls, cache_prune, cache_verify
from .convert import convert
from .diff import diff
from .errors import IntegrityError, RefError, SepstoreError, TrustError
from .export import export
from .gc import DEFAULT_GRACE, gc
from .manifest import ASSET_LABEL
from .plan import plan
from .pull import files, pull
from .push import push
from .refs import ModelRef, RefOptions, is_manifest_url, resolve
from .sign import sign, signatures
from .signing import keygen
from .store import Store
from .tags import tags
from .trust import TrustReport
from .verify import verify

__all__ = ["main"]

EXIT_OK, EXIT_VERIFY, EXIT_USAGE = 0, 1, 2


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _ref_options(args: argparse.Namespace) -> RefOptions:
    """The reference options a command was given (``None`` where it has no such flag)."""
    return RefOptions(
        name=args.name,
        tag=args.tag,
        digest=args.digest,
        parts_url=getattr(args, "parts_url", None),
        cache_dir=getattr(args, "cache_dir", None),
        **_trust_options(args),
    )


def _trust_options(args: argparse.Namespace) -> RefOptions:
    """The trust policy a command was given (``--trust`` or ``--trust-key``; else ``$SEPSTORE_TRUST``)."""
    return RefOptions(
        trust=getattr(args, "trust", None) or getattr(args, "trust_key", None),
        allow_rollback=getattr(args, "allow_rollback", False) or None,
    )


def _signature_lines(report: TrustReport) -> list[str]:
    """One line per signature (key id, issue time, valid or why not), and the policy's verdict."""
    lines = [f"signed:    {'nothing' if not report.signatures else ''}".rstrip()]
    for sig in report.signatures:
        if sig.valid:
            state = "valid"
        elif sig.error is not None:
            state = f"not valid: {sig.error}"
        else:
            state = "not checked (no trust policy: --trust, --trust-key or $SEPSTORE_TRUST)"
        lines.append(f"  key {sig.key_id[:16]}  {sig.issued_at or '(time unknown)':<27}  {state}")
    if report.policy is not None:
        lines.append(f"trust:     {report.policy} satisfied")
    return lines


def cmd_info(args: argparse.Namespace) -> int:
    resolved = resolve(args.ref, **_ref_options(args))
    signed = signatures(resolved, **_trust_options(args))
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
        _print_json(info)
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
    print("\n".join(_signature_lines(signed)))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    report = verify(args.ref, args.spec, quiet=args.quiet, **_ref_options(args))
    if args.json:
        _print_json(report.to_dict())
    else:
        for check in report.checks:
            status = "ok" if check.ok else f"FAILED: {check.error}"
            print(f"{check.part:<10} {human_bytes(check.size):>11}  {status}")
        checked = _labelled([c.part for c in report.checks])
        verdict = "verified" if report.ok else f"{len(report.failures)} of {checked} failed"
        if report.signatures is not None:
            print("\n".join(_signature_lines(report.signatures)))
        print(f"{report.manifest_url} ({report.manifest_digest}): {verdict}")
    return EXIT_OK if report.ok else EXIT_VERIFY


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
    a, b = (ModelRef(ref, name=c["name"], tag=c["tag"]) for ref, c in zip(refs, chosen, strict=True))
    return a, b


def cmd_diff(args: argparse.Namespace) -> int:
    result = diff(*_diff_sides(args), **_trust_options(args))
    differ_code = EXIT_VERIFY if args.exit_code and result.differs else EXIT_OK
    if args.json:
        _print_json(result.to_dict())
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


def _short(digest: str | None) -> str:
    """A digest as ``docker images`` shows an image id: its first 12 hex digits."""
    return digest.removeprefix("blake3:")[:12] if digest else "-"


def _when(moment: dt.datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment is not None else "-"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: frozenset[int] = frozenset()) -> None:
    """Print rows in columns as wide as their widest cell (those in ``right`` aligned right)."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        cells = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        print("  ".join(cells).rstrip())


def _tally(*counts: tuple[int, str]) -> str:
    """``4 parts and 6 assets``: each count that is not 0 with its noun (``0 <first noun>s`` if all are)."""
    named = [counted(n, noun) for n, noun in counts if n] or [counted(0, counts[0][1])]
    return named[0] if len(named) == 1 else f"{', '.join(named[:-1])} and {named[-1]}"


def _blobs(total: int, assets: int, kind: str = "") -> str:
    """``4 parts and 6 assets`` for ``total`` blobs of which ``assets`` are assets; ``kind`` (such as
    ``damaged``) goes before each noun."""
    adjective = f"{kind} " if kind else ""
    return _tally((total - assets, f"{adjective}part"), (assets, f"{adjective}asset"))


def _labelled(labels: Sequence[str]) -> str:
    """How many parts and assets (labelled ``asset:<path>``) ``labels`` name: ``4 parts and 6 assets``."""
    return _blobs(len(labels), sum(label.startswith(ASSET_LABEL) for label in labels))


def _verdicts(verdicts: Sequence[PartVerdict], kind: str) -> str:
    """``4 damaged parts and 1 damaged asset``: cached blobs re-hashed."""
    return _blobs(len(verdicts), sum(v.asset for v in verdicts), kind)


def _cached_files(found: Sequence[CachedFile]) -> str:
    """``7 files (4 parts, 2 assets and 1 partial download)``: what prune removed or left."""
    partial = sum(f.partial for f in found)
    assets = sum(f.asset for f in found)
    kinds = _tally((len(found) - partial - assets, "part"), (assets, "asset"), (partial, "partial download"))
    return f"{counted(len(found), 'file')} ({kinds})" if found else counted(0, "file")


def cmd_tags(args: argparse.Namespace) -> int:
    rows = tags(args.store, name=args.name)
    if args.json:
        _print_json([row.to_dict() for row in rows])
        return EXIT_OK
    if not rows:
        print(f"no models in {args.store}" + (f" named {args.name!r}" if args.name else ""))
        return EXIT_OK
    table = [
        [r.name, r.tag, _short(r.digest), str(r.layers) if r.layers is not None else "-",
         human_bytes(r.bytes) if r.bytes is not None else "-", _when(r.modified)]
        + ([f"unreadable: {r.error}"] if r.error else [])
        for r in rows
    ]  # fmt: skip
    header = ["NAME", "TAG", "DIGEST", "LAYERS", "SIZE", "MODIFIED (UTC)"]
    width = len(header) + any(r.error for r in rows)
    _table([*header, ""][:width], [row + [""] * (width - len(row)) for row in table], frozenset({3, 4}))
    return EXIT_OK


def _cache_rows(files: Sequence[CachedFile]) -> list[list[str]]:
    return [[_short(f.digest), human_bytes(f.size), _when(f.last_used)] for f in files]


def cmd_cache_ls(args: argparse.Namespace) -> int:
    listing = cache_ls(args.cache_dir)
    if args.json:
        _print_json(listing.to_dict())
        return EXIT_OK
    if listing.parts:
        _table(["DIGEST", "SIZE", "LAST USED (UTC)"], _cache_rows(listing.parts), frozenset({1}))
    if listing.partial:
        print("partial downloads (the next pull of the part resumes a stopped one):")
        rows = _cache_rows(listing.partial)
        for row, f in zip(rows, listing.partial, strict=True):
            row.append("fetching now" if f.active else "stopped")
        _table(["DIGEST", "HELD", "LAST WRITTEN (UTC)", "STATE"], rows, frozenset({1}))
    held = sum(f.size for f in listing.parts)
    blobs = _blobs(len(listing.parts), sum(f.asset for f in listing.parts))
    summary = f"cache {listing.root}: {blobs}, {human_bytes(held)}"
    if listing.partial:
        partial = counted(len(listing.partial), "partial download")
        summary += f", and {partial}; {human_bytes(listing.total_bytes)} in all"
    print(summary)
    return EXIT_OK


def cmd_cache_verify(args: argparse.Namespace) -> int:
    report = cache_verify(args.cache_dir, repair=args.repair)
    if args.json:
        _print_json(report.to_dict())
        return EXIT_OK if report.ok else EXIT_VERIFY
    for p in report.bad:
        state = "removed" if p.removed else "kept"
        print(f"{_short(p.digest)}  {human_bytes(p.size):>11}  DAMAGED: {p.error}; {state}")
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
        _print_json(report.to_dict())
        return EXIT_OK
    verb = "would remove" if report.dry_run else "removed"
    for f in report.removed:
        kind = " (partial download)" if f.partial else ""
        print(f"{verb}  {_short(f.digest)}  {human_bytes(f.size):>11}  last used {_when(f.last_used)}{kind}")
    in_use = ""
    if report.in_use:
        in_use = f"; kept {_cached_files(report.in_use)} other processes are reading or fetching"
    after = "would hold" if report.dry_run else "holds"
    print(
        f"{verb} {_cached_files(report.removed)} ({human_bytes(report.removed_bytes)}), least recently used "
        f"first{in_use}; the cache {after} {human_bytes(report.bytes_after)} (max {human_bytes(report.max_size)})"
    )
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    manifest = convert(
        args.source,
        args.dest,
        decider=args.decider,
        name=args.name,
        tag=args.tag,
        dtype=args.dtype,
        assets=not args.no_assets,
        gguf_names=args.gguf_names,
        force=args.force,
        quiet=args.quiet,
    )
    store = Store(args.dest)
    url = store.url_of(store.manifest_path(manifest.name, args.tag))
    if args.json:
        _print_json(
            {
                "manifest": url,
                "name": manifest.name,
                "layers": manifest.n_layers,
                "bytes": manifest.total_bytes,
                "assets": sorted(manifest.asset_files),
            }
        )
        return EXIT_OK
    print(f"converted {manifest.metadata.get('source', args.source)} ({manifest.metadata.get('decider')} decider)")
    size = f"{counted(manifest.n_layers, 'layer')}, {human_bytes(manifest.total_bytes)}"
    if manifest.asset_files:
        size += f", {counted(len(manifest.asset_files), 'asset')} ({', '.join(sorted(manifest.asset_files))})"
    print(f"{manifest.name}:{args.tag}: {size} -> {url}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    report = export(
        args.ref,
        args.out_dir,
        spec=args.spec,
        max_shard_size=args.max_shard_size,
        force=args.force,
        quiet=args.quiet,
        **_ref_options(args),
    )
    if args.json:
        _print_json(report.to_dict())
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


def cmd_push(args: argparse.Namespace) -> int:
    report = push(
        args.ref,
        args.dest,
        dest_tag=args.as_tag,
        force=args.force,
        quiet=args.quiet,
        verify=args.verify,
        sign=args.sign,
        **_ref_options(args),
    )
    if args.json:
        _print_json(report.to_dict())
        return EXIT_OK
    checked = "re-hashed" if report.verified else "size checked"
    repaired = f", replacing {len(report.repaired)} damaged there" if report.repaired else ""
    copied = f", {human_bytes(report.copied_bytes)} of it copied server-side" if report.copied_bytes else ""
    print(
        f"uploaded {_labelled(report.uploaded)} ({human_bytes(report.uploaded_bytes)}{copied}){repaired}; "
        f"skipped {len(report.skipped)} already there ({human_bytes(report.skipped_bytes)}, {checked})"
    )
    state = "published" if report.manifest_written else "already published"
    print(f"{state}: {report.manifest_url} ({report.manifest_digest})")
    if report.signatures:
        print(f"signatures there: {', '.join(k[:16] for k in report.signatures)}")
    return EXIT_OK


def cmd_pull(args: argparse.Namespace) -> int:
    report = pull(args.ref, args.spec, quiet=args.quiet, verify=args.verify, **_ref_options(args))
    if args.json:
        _print_json(report.to_dict())
        return EXIT_OK
    checked = "re-hashed" if report.checked == "digest" else "size checked (--verify re-hashes them)"
    fetched = _labelled(report.fetched)
    reused = f", {human_bytes(report.reused_bytes)} of it copied from cached tensors" if report.reused_bytes else ""
    print(
        f"fetched and verified {fetched} ({human_bytes(report.fetched_bytes)}{reused}); "
        f"{len(report.present)} already local ({human_bytes(report.present_bytes)}), {checked}"
    )
    if report.repaired:
        damaged = ", ".join(f"{label} ({why})" for label, why in report.repaired.items())
        print(f"repaired {counted(len(report.repaired), 'damaged local part')}, fetched again: {damaged}")
    return EXIT_OK


def cmd_files(args: argparse.Namespace) -> int:
    found = files(args.ref, args.spec, **_ref_options(args))
    if args.json:
        _print_json([f.to_dict() for f in found])
    else:
        for f in found:
            print(f.url)
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    budgets = args.budget.split(",") if args.budget else None
    nodes = plan(args.ref, nodes=args.nodes, budgets=budgets, **_ref_options(args))
    if args.json:
        _print_json([n.to_dict() for n in nodes])
        return EXIT_OK
    for n in nodes:
        budget = f" of {human_bytes(n.budget)}" if n.budget else ""
        print(f"node {n.node}: {n.spec:<16} {human_bytes(n.bytes):>11}{budget}")
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    report = gc(args.store, grace=args.grace, dry_run=args.dry_run, allow_empty=args.allow_empty)
    if args.json:
        _print_json(report.to_dict())
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


def cmd_keygen(args: argparse.Namespace) -> int:
    kid = keygen(args.key, force=args.force)
    if args.json:
        _print_json({"private_key": args.key, "public_key": f"{args.key}.pub", "key_id": kid})
        return EXIT_OK
    print(f"wrote private key {args.key} (keep it secret) and public key {args.key}.pub")
    print(f"key id: {kid}")
    return EXIT_OK


def cmd_sign(args: argparse.Namespace) -> int:
    report = sign(args.ref, key=args.key, name=args.name, tag=args.tag, digest=args.digest)
    if args.json:
        _print_json(report.to_dict())
        return EXIT_OK
    print(f"signed {report.name}:{report.tag} ({report.manifest_digest}) with key {report.key_id[:16]}")
    print(f"signature: {report.signature_url}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.dir)
    return EXIT_OK


def _add_ref(p: argparse.ArgumentParser, *, trust: bool = True) -> None:
    p.add_argument("ref", help="manifest path or URL, or a store root")
    p.add_argument("--name", help="model name, when REF is a store holding several models")
    p.add_argument("--tag", help="tag of that model (default: latest, or the only one)")
    p.add_argument("--digest", help="pin the manifest's digest (blake3:<hex>); any other manifest is refused")
    if trust:
        _add_trust(p)


def _add_trust(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    policy = "trust policy: a JSON policy file or one public key (default: $SEPSTORE_TRUST)"
    group.add_argument("--trust", metavar="POLICY", help=policy)
    group.add_argument("--trust-key", metavar="KEY.pub", help="trust this public key (PEM) for every model name")
    p.add_argument(
        "--allow-rollback", action="store_true", help="accept a tag signed earlier than one this node already accepted"
    )


def _add_parts_url(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts-url", help="read part files from this mirror instead (reads are still verified)")


def _add_cache_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", help="cache folder (default: $SEPSTORE_CACHE or ~/.cache/sepstore)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sepstore", description="LLM weights as a content-addressed, verified sepweight store."
    )
    parser.add_argument("--version", action="version", version=f"sepstore {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)  # --debug after the command works too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    def command(
        name: str,
        func: Callable[[argparse.Namespace], int] | None,
        help: str,
        example: str,
        *,
        under: Any = sub,
        aliases: Sequence[str] = (),
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = under.add_parser(
            name,
            aliases=list(aliases),
            parents=[common],
            help=help,
            description=help,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if func is not None:
            p.set_defaults(func=func)
        return p

    p = command("info", cmd_info, "show a model's manifest: parts, sizes, dtypes, config", "sepstore info ./store")
    _add_ref(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command(
        "verify",
        cmd_verify,
        "re-hash parts and check them against the manifest (exit 1 on any failure)",
        "sepstore verify ./store/manifests/llama/v1.json --spec 'b 0-5'",
    )
    _add_ref(p)
    p.add_argument("--spec", default="f", help="parts to verify, e.g. 'b 0-5' (default: f, all)")
    _add_parts_url(p)
    _add_quiet(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command(
        "convert",
        cmd_convert,
        "convert a checkpoint (HF folder, .safetensors/.bin/.pth/.gguf file, llm_sepweight dir) into a store",
        "sepstore convert ./Llama-3-8B ./store --name meta-llama/Llama-3-8B --tag v1 --dtype bf16",
    )
    p.add_argument("source", help="checkpoint folder or file: a path or URL (s3://, https://, ...)")
    p.add_argument("dest", help="store to write: a path or URL")
    p.add_argument("--name", help="model name in the store (default: the checkpoint folder's name)")
    p.add_argument("--tag", default="latest", help="tag of this version (default: latest)")
    p.add_argument("--decider", default="auto", help="built-in decider (llama, gpt2, ...; default: auto)")
    p.add_argument("--dtype", help="cast floating-point tensors: bf16, fp16, fp32 or fp64 (default: keep)")
    p.add_argument(
        "--no-assets",
        action="store_true",
        help="leave out the folder's tokenizer, configs, README, ... (default: keep)",
    )
    p.add_argument(
        "--gguf-names",
        action="store_true",
        help="keep a GGUF's llama.cpp tensor names and Q/K layout (default: a llama or qwen2 GGUF gets "
        "Hugging Face names and layout, as transformers loads it)",
    )
    p.add_argument("--force", action="store_true", help="replace the tag if it exists (default: combine with it)")
    _add_quiet(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command(
        "export",
        cmd_export,
        "write a model back as a Hugging Face folder (config, assets, safetensors shards) under its original names",
        "sepstore export s3://models/store/manifests/acme/llama/v2.json ./llama-hf --max-shard-size 2GB",
    )
    _add_ref(p)
    p.add_argument("out_dir", help="local folder to write (must be empty unless --force)")
    p.add_argument("--spec", default="f", help="parts to export, e.g. 'b 0-5' (default: f, all)")
    p.add_argument(
        "--max-shard-size", default="5GB", help="largest weight file, e.g. 5GB, 500MiB (default: 5GB, as transformers)"
    )
    p.add_argument("--force", action="store_true", help="write into a folder that is not empty, replacing weight files")
    p.add_argument("--cache-dir", help="cache folder for remote parts (default: $SEPSTORE_CACHE or ~/.cache/sepstore)")
    _add_parts_url(p)
    _add_quiet(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command(
        "push",
        cmd_push,
        "publish a model version to another store, uploading only the parts it lacks",
        "sepstore push ./store/manifests/acme/llama/v2.json s3://models/store",
    )
    _add_ref(p)
    p.add_argument("dest", help="destination store: a path or URL (s3://bucket/prefix, memory://...)")
    p.add_argument("--as-tag", help="publish under this tag (default: the source's)")
    p.add_argument("--sign", metavar="KEY", help="sign the published manifest with this private key (PEM)")
    p.add_argument("--force", action="store_true", help="replace a different manifest already under that tag")
    p.add_argument(
        "--verify",
        action="store_true",
        help="re-hash the parts the destination already has (fetching them) and replace any that fail "
        "(default: check their sizes)",
    )
    _add_quiet(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command(
        "pull",
        cmd_pull,
        "fetch the parts a spec needs into the local cache, verified",
        "sepstore pull https://cdn.example.com/store/manifests/acme/llama/v2.json --spec 'b 0-8'",
    )
    _add_ref(p)
    p.add_argument("--spec", default="f", help="parts to fetch, e.g. 'b 0-5' (default: f, all)")
    p.add_argument("--cache-dir", help="cache folder (default: $SEPSTORE_CACHE or ~/.cache/sepstore)")
    _add_parts_url(p)
    p.add_argument(
        "--verify",
        action="store_true",
        help="re-hash the parts already cached, and fetch again any that fail (default: check their sizes)",
    )
    _add_quiet(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command(
        "files",
        cmd_files,
        "print the URLs of the part files a spec needs, for other download tools",
        "sepstore files s3://models/store/manifests/acme/llama/v2.json --spec '0-4'",
    )
    _add_ref(p)
    p.add_argument("--spec", default="f", help="parts to list (default: f, all)")
    _add_parts_url(p)
    p.add_argument("--json", action="store_true", help="print JSON: part, url, digest, size")

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
    _add_trust(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--exit-code",
        action="store_true",
        help="exit 1 if the versions differ, 0 if not (as `git diff --exit-code`); any error exits 2",
    )

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
    _add_cache_dir(p)
    p = command(
        "verify",
        cmd_cache_verify,
        "re-hash every cached part (exit 1 if a damaged one remains)",
        "sepstore cache verify --repair",
        under=cache,
    )
    _add_cache_dir(p)
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
    _add_cache_dir(p)
    p.add_argument("--max-size", required=True, help="size to shrink the cache to, e.g. 20GiB, 500MB, 0")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")

    p = command(
        "plan",
        cmd_plan,
        "split a model's layers over nodes, balancing bytes (begin on the first node, end on the last)",
        "sepstore plan s3://models/store/manifests/acme/llama/v2.json --budget 24GiB,24GiB,16GiB",
    )
    _add_ref(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--nodes", type=int, help="number of nodes, balanced by bytes")
    group.add_argument("--budget", help="one memory budget per node, comma-separated (24GiB,16GB,...)")
    p.add_argument("--json", action="store_true", help="print JSON")

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

    p = command(
        "keygen",
        cmd_keygen,
        "make a signing key: an ECDSA P-256 private key (PEM, mode 0600) and KEY.pub",
        "sepstore keygen ./acme.key",
    )
    p.add_argument("key", help="where to write the private key; the public key goes to KEY.pub")
    p.add_argument("--force", action="store_true", help="replace existing key files")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command(
        "sign",
        cmd_sign,
        "sign a published model version; the signature is stored beside it (signatures/<name>/<tag>/)",
        "sepstore sign s3://models/store --name acme/llama --tag v2 --key ./acme.key",
    )
    _add_ref(p, trust=False)
    p.add_argument("--key", required=True, help="private key (PEM); an encrypted one reads $SEPSTORE_KEY_PASSWORD")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command(
        "demo",
        cmd_demo,
        "build a small model, publish two versions, diff, load and verify them",
        "sepstore demo ./sepstore-demo",
    )
    p.add_argument(
        "dir", nargs="?", default="sepstore-demo", help="where to write the demo store (default: ./sepstore-demo)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except SepstoreError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"sepstore: error: {exc}", file=sys.stderr)
        failed = isinstance(exc, IntegrityError | TrustError) and not getattr(args, "exit_code", False)
        return EXIT_VERIFY if failed else EXIT_USAGE  # with --exit-code, 1 means only "they differ"
    except BrokenPipeError:  # stdout closed early (`sepstore files ... | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as exc:  # the local disk: a cache folder that cannot be made, a full disk, ...
        if args.debug:
            traceback.print_exc()
        print(f"sepstore: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("sepstore: interrupted", file=sys.stderr)
        return 130
