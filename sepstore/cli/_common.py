"""What the command modules share: exit codes, the arguments several commands take, and the helpers
that print reports (JSON, tables, counts)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .._text import counted
from ..manifest import ASSET_LABEL
from ..refs import RefOptions
from ..trust import TrustReport

EXIT_OK, EXIT_VERIFY, EXIT_USAGE = 0, 1, 2

#: A command's handler: the parsed arguments in, the exit code out.
Handler = Callable[[argparse.Namespace], int]


class Command(Protocol):
    """Adds a command (or, ``under`` another command's subparsers, a subcommand) with its help and
    example, run by ``func``; :func:`sepstore.cli.build_parser` passes one to each ``add_*``."""

    def __call__(
        self,
        name: str,
        func: Handler | None,
        help: str,
        example: str,
        *,
        under: Any = ...,
        aliases: Sequence[str] = ...,
    ) -> argparse.ArgumentParser: ...


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def ref_options(args: argparse.Namespace) -> RefOptions:
    """The reference options a command was given (``None`` where it has no such flag)."""
    return RefOptions(
        name=args.name,
        tag=args.tag,
        digest=args.digest,
        parts_url=getattr(args, "parts_url", None),
        cache_dir=getattr(args, "cache_dir", None),
        **trust_options(args),
    )


def trust_options(args: argparse.Namespace) -> RefOptions:
    """The trust policy a command was given (``--trust`` or ``--trust-key``; else ``$SEPSTORE_TRUST``)."""
    return RefOptions(
        trust=getattr(args, "trust", None) or getattr(args, "trust_key", None),
        allow_rollback=getattr(args, "allow_rollback", False) or None,
    )


def signature_lines(report: TrustReport) -> list[str]:
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


def short_digest(digest: str | None) -> str:
    """A digest as ``docker images`` shows an image id: its first 12 hex digits."""
    return digest.removeprefix("blake3:")[:12] if digest else "-"


def utc_time(moment: dt.datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment is not None else "-"


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: frozenset[int] = frozenset()) -> None:
    """Print rows in columns as wide as their widest cell (those in ``right`` aligned right)."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        cells = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        print("  ".join(cells).rstrip())


def tally(*counts: tuple[int, str]) -> str:
    """``4 parts and 6 assets``: each count that is not 0 with its noun (``0 <first noun>s`` if all are)."""
    named = [counted(n, noun) for n, noun in counts if n] or [counted(0, counts[0][1])]
    return named[0] if len(named) == 1 else f"{', '.join(named[:-1])} and {named[-1]}"


def count_blobs(total: int, assets: int, kind: str = "") -> str:
    """``4 parts and 6 assets`` for ``total`` blobs of which ``assets`` are assets; ``kind`` (such as
    ``damaged``) goes before each noun."""
    adjective = f"{kind} " if kind else ""
    return tally((total - assets, f"{adjective}part"), (assets, f"{adjective}asset"))


def count_labelled(labels: Sequence[str]) -> str:
    """How many parts and assets (labelled ``asset:<path>``) ``labels`` name: ``4 parts and 6 assets``."""
    return count_blobs(len(labels), sum(label.startswith(ASSET_LABEL) for label in labels))


def add_ref(p: argparse.ArgumentParser, *, trust: bool = True) -> None:
    p.add_argument("ref", help="manifest path or URL, or a store root")
    p.add_argument("--name", help="model name, when REF is a store holding several models")
    p.add_argument("--tag", help="tag of that model (default: latest, or the only one)")
    p.add_argument("--digest", help="pin the manifest's digest (blake3:<hex>); any other manifest is refused")
    if trust:
        add_trust(p)


def add_trust(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    policy = "trust policy: a JSON policy file or one public key (default: $SEPSTORE_TRUST)"
    group.add_argument("--trust", metavar="POLICY", help=policy)
    group.add_argument("--trust-key", metavar="KEY.pub", help="trust this public key (PEM) for every model name")
    p.add_argument(
        "--allow-rollback", action="store_true", help="accept a tag signed earlier than one this node already accepted"
    )


def add_parts_url(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts-url", help="read part files from this mirror instead (reads are still verified)")


def add_cache_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", help="cache folder (default: $SEPSTORE_CACHE or ~/.cache/sepstore)")
    p.add_argument("--json", action="store_true", help="print JSON")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar")
