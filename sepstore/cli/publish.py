"""Commands that make and publish model versions: ``convert``, ``push``, ``keygen``, ``sign`` and
``demo``."""

from __future__ import annotations

import argparse

from .._text import counted, human_bytes
from ..convert import convert
from ..push import push
from ..sign import sign
from ..signing import keygen
from ..store import Store
from ._common import (
    EXIT_OK,
    Command,
    add_quiet,
    add_ref,
    count_labelled,
    print_json,
    ref_options,
)


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
    url = Store(args.dest).manifest_url(manifest.name, args.tag)
    if args.json:
        print_json(
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


def add_convert(command: Command) -> None:
    """The ``convert`` command."""
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
    p.add_argument(
        "--force",
        action="store_true",
        help="replace the tag if it exists (default: combine with it); into an oci:// repository holding "
        "another model, write this one there too",
    )
    add_quiet(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_push(args: argparse.Namespace) -> int:
    report = push(
        args.ref,
        args.dest,
        dest_tag=args.as_tag,
        force=args.force,
        quiet=args.quiet,
        verify=args.verify,
        sign=args.sign,
        **ref_options(args),
    )
    if args.json:
        print_json(report.to_dict())
        return EXIT_OK
    checked = "re-hashed" if report.verified else "size checked"
    repaired = f", replacing {len(report.repaired)} damaged there" if report.repaired else ""
    copied = f", {human_bytes(report.copied_bytes)} of it copied server-side" if report.copied_bytes else ""
    print(
        f"uploaded {count_labelled(report.uploaded)} ({human_bytes(report.uploaded_bytes)}{copied}){repaired}; "
        f"skipped {len(report.skipped)} already there ({human_bytes(report.skipped_bytes)}, {checked})"
    )
    state = "published" if report.manifest_written else "already published"
    print(f"{state}: {report.manifest_url} ({report.manifest_digest})")
    if report.signatures:
        print(f"signatures there: {', '.join(k[:16] for k in report.signatures)}")
    return EXIT_OK


def add_push(command: Command) -> None:
    """The ``push`` command."""
    p = command(
        "push",
        cmd_push,
        "publish a model version to another store, uploading only the parts it lacks",
        "sepstore push ./store/manifests/acme/llama/v2.json s3://models/store",
    )
    add_ref(p)
    p.add_argument("dest", help="destination store: a path or URL (s3://bucket/prefix, memory://...)")
    p.add_argument("--as-tag", help="publish under this tag (default: the source's)")
    p.add_argument("--sign", metavar="KEY", help="sign the published manifest with this private key (PEM)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a different manifest already under that tag; into an oci:// repository holding another "
        "model, push this one there too",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="re-hash the parts the destination already has (fetching them) and replace any that fail "
        "(default: check their sizes)",
    )
    add_quiet(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_keygen(args: argparse.Namespace) -> int:
    kid = keygen(args.key, force=args.force)
    if args.json:
        print_json({"private_key": args.key, "public_key": f"{args.key}.pub", "key_id": kid})
        return EXIT_OK
    print(f"wrote private key {args.key} (keep it secret) and public key {args.key}.pub")
    print(f"key id: {kid}")
    return EXIT_OK


def add_keygen(command: Command) -> None:
    """The ``keygen`` command."""
    p = command(
        "keygen",
        cmd_keygen,
        "make a signing key: an ECDSA P-256 private key (PEM, mode 0600) and KEY.pub",
        "sepstore keygen ./acme.key",
    )
    p.add_argument("key", help="where to write the private key; the public key goes to KEY.pub")
    p.add_argument("--force", action="store_true", help="replace existing key files")
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_sign(args: argparse.Namespace) -> int:
    report = sign(args.ref, key=args.key, name=args.name, tag=args.tag, digest=args.digest)
    if args.json:
        print_json(report.to_dict())
        return EXIT_OK
    print(f"signed {report.name}:{report.tag} ({report.manifest_digest}) with key {report.key_id[:16]}")
    print(f"signature: {report.signature_url}")
    return EXIT_OK


def add_sign(command: Command) -> None:
    """The ``sign`` command."""
    p = command(
        "sign",
        cmd_sign,
        "sign a published model version; the signature is stored beside it (signatures/<name>/<tag>/)",
        "sepstore sign s3://models/store --name acme/llama --tag v2 --key ./acme.key",
    )
    add_ref(p, trust=False)
    p.add_argument("--key", required=True, help="private key (PEM); an encrypted one reads $SEPSTORE_KEY_PASSWORD")
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(args.dir)
    return EXIT_OK


def add_demo(command: Command) -> None:
    """The ``demo`` command."""
    p = command(
        "demo",
        cmd_demo,
        "build a small model, publish two versions, diff, load and verify them",
        "sepstore demo ./sepstore-demo",
    )
    p.add_argument(
        "dir", nargs="?", default="sepstore-demo", help="where to write the demo store (default: ./sepstore-demo)"
    )
