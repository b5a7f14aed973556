"""The ``sepstore`` command line: a thin front end over the public Python API.

Exit codes: 0 success, 1 a verification failure (integrity, or a trust policy not satisfied), 2 bad
usage or any other error.

One module per group of commands, each command's handler beside the function that adds its
arguments: :mod:`.publish` (convert, push, keygen, sign, demo), :mod:`.node` (verify, export, pull,
files, plan) and :mod:`.admin` (info, diff, tags, cache, gc); :mod:`._common` holds what they share.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any

from .. import __version__
from ..errors import IntegrityError, SepstoreError, TrustError
from . import admin, node, publish
from ._common import EXIT_OK, EXIT_USAGE, EXIT_VERIFY, Handler

__all__ = ["main"]


_INSECURE = "allow plain HTTP to the oci:// registries named on the command line (else only to this machine)"
_INSECURE_HOSTS = "SEPSTORE_OCI_INSECURE"


@contextlib.contextmanager
def _plain_http(args: argparse.Namespace) -> Iterator[None]:
    """With ``--insecure``, the hosts of the ``oci://`` URLs among the arguments are added to
    ``$SEPSTORE_OCI_INSECURE`` while the command runs (what the registry client reads)."""
    values = [v for value in vars(args).values() for v in (value if isinstance(value, list) else [value])]
    hosts = [urllib.parse.urlsplit(v).netloc for v in values if isinstance(v, str) and v.startswith("oci://")]
    if not getattr(args, "insecure", False) or not hosts:
        yield
        return
    before = os.environ.get(_INSECURE_HOSTS)
    os.environ[_INSECURE_HOSTS] = ",".join([before, *hosts] if before else hosts)
    try:
        yield
    finally:
        if before is None:
            del os.environ[_INSECURE_HOSTS]
        else:
            os.environ[_INSECURE_HOSTS] = before


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command, in the order ``sepstore --help`` lists them."""
    parser = argparse.ArgumentParser(
        prog="sepstore", description="LLM weights as a content-addressed, verified sepweight store."
    )
    parser.add_argument("--version", action="version", version=f"sepstore {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--insecure", action="store_true", help=_INSECURE)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)  # --debug after the command works too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--insecure", action="store_true", default=argparse.SUPPRESS, help=_INSECURE)

    def command(
        name: str,
        func: Handler | None,
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

    admin.add_info(command)
    node.add_verify(command)
    publish.add_convert(command)
    node.add_export(command)
    publish.add_push(command)
    node.add_pull(command)
    node.add_files(command)
    admin.add_diff(command)
    admin.add_tags(command)
    admin.add_cache(command)
    node.add_plan(command)
    admin.add_gc(command)
    publish.add_keygen(command)
    publish.add_sign(command)
    publish.add_demo(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _plain_http(args):
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
