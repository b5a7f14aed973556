"""export: a stored model back into a Hugging Face model folder, under the checkpoint's own names.

The folder is what ``save_pretrained`` writes: ``config.json`` (the manifest's config), the
model's assets, and the weights as ``model.safetensors`` or, past ``max_shard_size``,
``model-0000i-of-0000N.safetensors`` shards with ``model.safetensors.index.json``. Every tensor
keeps its dtype and bytes; its name is the checkpoint's, from the manifest's rename record
(:class:`~sepstore.manifest.Renames`, written by ``convert``), and tensors ``convert`` added (a tied
LM head) are left out. Each part is streamed once, in bounded pieces hashed as they are read and
written straight to their places, so memory holds two pieces, not a part. Every file is written
under a temporary name and renamed into place only when every part's digest has matched, the
weight index (or the single weight file) last: a folder that looks complete is.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from msgspec import UnsetType

from ._text import parse_size
from .assets import fetch_assets
from .errors import DeciderError, IntegrityError, ManifestError, SpecError, StoreError, TensorError
from .hashing import Hasher, digest_of
from .manifest import Asset, Manifest, Part, is_tensor_name
from .progress import progress
from .reader import READ_PIECE, PartReader, Writer
from .refs import FETCH_OPTIONS, RefLike, RefOptions, open_ref
from .safetensors_io import ITEMSIZE, HeaderEntry, RawTensor, layout, pwrite_all
from .spec import select_parts
from .store import create_temp, fsync_dir, make_dirs, replace_durably

if TYPE_CHECKING:
    from tqdm import tqdm
    from typing_extensions import Unpack

__all__ = ["ExportReport", "RenameFunction", "export"]

#: ``rename=``: a stored tensor's label name (``begin.X``, ``mid.<i>.X``, ``end.X``) to the name to
#: write it under, or ``None`` to leave it out.
RenameFunction = Callable[[str], "str | None"]

CONFIG: Final = "config.json"
SINGLE: Final = "model.safetensors"
INDEX: Final = "model.safetensors.index.json"
#: The weight files an earlier export (or ``save_pretrained``) left, removed by ``force``.
_WEIGHT_FILE = re.compile(r"^model(?:-\d{5}-of-\d{5})?\.safetensors(?:\.index\.json)?\Z")
#: What ``save_pretrained`` writes in every safetensors header; transformers checks it.
_METADATA: Final = {"format": "pt"}


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote: the folder, its files (relative paths), how tensors were named
    (``"renames"``: the manifest's record; ``"rename"``: the caller's function; ``"labels"``:
    ``begin.X``/``mid.<i>.X``/``end.X``) and the stored tensors left out (names ``convert`` added)."""

    out_dir: str
    manifest_url: str
    manifest_digest: str
    files: list[str]
    shards: int
    tensors: int
    tensor_bytes: int
    names: Literal["renames", "rename", "labels"]
    left_out: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": self.out_dir,
            "manifest": self.manifest_url,
            "digest": self.manifest_digest,
            "files": self.files,
            "shards": self.shards,
            "tensors": self.tensors,
            "tensor_bytes": self.tensor_bytes,
            "names": self.names,
            "left_out": self.left_out,
        }


@dataclass(frozen=True)
class _Placed:
    """One tensor to write: where it is stored, the name it gets, and where it goes."""

    label: str
    stored: str
    name: str
    shard: int
    offset: int


def export(
    ref: RefLike,
    out_dir: str | os.PathLike[str],
    *,
    spec: str = "f",
    max_shard_size: int | str = "5GB",
    rename: RenameFunction | None = None,
    force: bool = False,
    quiet: bool = False,
    **options: Unpack[RefOptions],
) -> ExportReport:
    """Write the model at ``ref`` (the parts ``spec`` names) into the local folder ``out_dir`` as a
    Hugging Face model folder that ``from_pretrained`` loads.

    Tensors get the checkpoint's names from the manifest's rename record (a store ``convert``
    made); a store without one (``dump`` with a decider function) exports them as
    ``begin.X``/``mid.<i>.X``/``end.X`` unless ``rename`` maps those to names (or to ``None``, to
    leave a tensor out). Weights go into one ``model.safetensors``, or into shards of at most
    ``max_shard_size`` (``"5GB"``, ``"500MiB"`` or bytes; one larger tensor gets a shard of its
    own) listed by ``model.safetensors.index.json``. ``out_dir`` must be empty or absent unless
    ``force``, which replaces the files an export writes and earlier weight files. ``ref`` and
    the options are as for :func:`sepstore.load`; remote parts go through the cache.

    Raises:
        StoreError: ``out_dir`` is not an empty folder (without ``force``), or not local.
        IntegrityError: a part or asset does not match the manifest (nothing is left looking complete).
        ManifestError: the record cannot name a tensor, or names two tensors alike.
        DeciderError: ``rename`` fails, returns a name a tensor cannot have, or one name twice.
    """
    limit = _shard_limit(max_shard_size)
    resolved = open_ref("export", ref, options, FETCH_OPTIONS)
    manifest = resolved.manifest
    _, chosen = select_parts(manifest, spec)
    names, left_out, how = _names(manifest, chosen, rename, resolved.url)
    placed, shards = _plan(chosen, names, limit)
    shard_files = _shard_files(len(shards))
    written = [CONFIG] if manifest.config is not None else []
    out = _prepare(out_dir, force, [*written, INDEX, *shard_files], manifest.asset_files)
    reader = PartReader(resolved, cache_dir=options.get("cache_dir"))
    with _Staging(out) as staging:
        reader.prefetch([*chosen, *manifest.labelled_assets()], desc=f"fetch {manifest.name}", quiet=quiet)
        for path, local in fetch_assets(reader, manifest).items():
            staging.copy(path, str(local), manifest.asset_files[path])
        if manifest.config is not None:
            staging.write(CONFIG, (json.dumps(manifest.config, indent=2, sort_keys=True) + "\n").encode())
        with progress(sum(p.size for _, p in chosen), f"export {manifest.name}", quiet=quiet) as bar:
            _write_shards(staging, reader, chosen, placed, shards, shard_files, bar)
        if len(shards) > 1:  # written last, so renamed last: the folder looks complete only once it is
            weight_map = {p.name: shard_files[p.shard] for p in placed}
            total = sum(t.nbytes for shard in shards for t in shard.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            staging.write(INDEX, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
        staging.publish(force)
    return ExportReport(
        out_dir=out,
        manifest_url=resolved.url,
        manifest_digest=resolved.digest,
        files=sorted(staging.finals),
        shards=len(shards),
        tensors=len(placed),
        tensor_bytes=sum(t.nbytes for shard in shards for t in shard.values()),
        names=how,
        left_out=left_out,
    )


def _shard_limit(max_shard_size: int | str) -> int:
    limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    if type(limit) is not int or limit < 1:
        raise SpecError(f"max_shard_size is a size such as '5GB' or a number of bytes >= 1, got {max_shard_size!r}")
    return limit


def _names(
    manifest: Manifest, chosen: list[tuple[str, Part]], rename: RenameFunction | None, url: str
) -> tuple[dict[tuple[str, str], str], list[str], Literal["renames", "rename", "labels"]]:
    """The name each stored tensor is written under, by ``(label, stored name)``; the tensors left
    out; and where the names came from."""
    record = None if isinstance(manifest.renames, UnsetType) else manifest.renames
    how: Literal["renames", "rename", "labels"] = (
        "rename" if rename is not None else "renames" if record is not None else "labels"
    )
    error = DeciderError if rename is not None else ManifestError
    added = set(record.added) if record is not None else set()
    names: dict[tuple[str, str], str] = {}
    left_out: list[str] = []
    taken: dict[str, str] = {}
    for label, part in chosen:
        for stored in part.tensors:
            where = f"{label}.{stored}"
            if rename is not None:
                name = _call(rename, where)
            elif record is not None:
                name = record.original(label, stored)
                if name is None:
                    raise ManifestError(
                        f"{url}: no rule of the manifest's renames covers tensor {where!r}; pass rename= to name it"
                    )
                if name in added:
                    name = None
            else:
                name = where
            if name is None:
                left_out.append(where)
                continue
            if not is_tensor_name(name):
                raise error(f"tensor {where!r} would be written as {name!r:.200}, which is not a tensor name")
            if name in taken:
                raise error(f"tensors {taken[name]!r} and {where!r} would both be written as {name!r}; refused")
            taken[name] = where
            names[label, stored] = name
    return names, left_out, how


def _call(rename: RenameFunction, where: str) -> str | None:
    try:
        name = rename(where)
    except Exception as exc:
        raise DeciderError(f"rename failed on {where!r}: {type(exc).__name__}: {exc}") from exc
    if name is not None and not isinstance(name, str):
        raise DeciderError(f"rename returned {name!r} for {where!r}; expected a tensor name or None")
    return name


def _plan(
    chosen: list[tuple[str, Part]], names: Mapping[tuple[str, str], str], limit: int
) -> tuple[list[_Placed], list[dict[str, RawTensor]]]:
    """Shards as ``save_pretrained`` cuts them (in order, a new one when the next tensor would pass
    ``limit``), and where each tensor goes in its shard's file."""
    shards: list[dict[str, RawTensor]] = []
    size = 0
    order: list[tuple[str, str, str]] = []
    for label, part in chosen:
        for stored, tensor in sorted(part.tensors.items(), key=lambda item: names.get((label, item[0]), "")):
            name = names.get((label, stored))
            if name is None:
                continue
            if tensor.dtype not in ITEMSIZE:
                raise TensorError(
                    f"tensor {label}.{stored} has dtype {tensor.dtype}, unknown to this sepstore; upgrade sepstore"
                )
            raw = RawTensor(tensor.dtype, tensor.shape)
            if not shards or (shards[-1] and size + raw.nbytes > limit):
                shards.append({})
                size = 0
            shards[-1][name] = raw
            size += raw.nbytes
            order.append((label, stored, name))
    offsets = [dict(layout(shard, _METADATA)[0]) for shard in shards]
    shard_of = {name: i for i, shard in enumerate(shards) for name in shard}
    placed = []
    for label, stored, name in order:
        shard = shard_of[name]
        placed.append(_Placed(label, stored, name, shard, offsets[shard][name]))
    return placed, shards


def _shard_files(n_shards: int) -> list[str]:
    """The weight files' names, as ``save_pretrained`` gives them."""
    if n_shards == 1:
        return [SINGLE]
    return [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]


def _prepare(out_dir: str | os.PathLike[str], force: bool, files: list[str], assets: Mapping[str, Asset]) -> str:
    """The output folder's absolute path, once it is known to be local and (without ``force``) empty,
    and no asset's path is one of the files the export writes."""
    out = os.fspath(out_dir)
    if "://" in out:
        raise StoreError(f"export writes to a local folder; {out!r} is a URL (export locally, then upload it)")
    out = os.path.abspath(out)
    for path in assets:
        if path in files:
            raise ManifestError(f"the model's asset {path!r} has the name of a file export writes; refused")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise StoreError(f"{out} exists and is not a folder")
    if os.path.isdir(out) and not force:
        held = sorted(os.listdir(out))
        if held:
            raise StoreError(
                f"{out} is not empty (it holds {', '.join(held[:5])}{', ...' if len(held) > 5 else ''}); "
                "export into an empty folder, or pass force=True (CLI: --force) to write into it"
            )
    return out


class _Staging:
    """The files of one export, written under temporary names in their folder and renamed into
    place together by :meth:`publish`; on any failure the temporary files (and the folders this
    export made, if empty) are removed."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.finals: list[str] = []
        self._temps: list[tuple[str, str]] = []
        self._made: list[str] = []

    def __enter__(self) -> _Staging:
        self._folder(self.out)
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        if kind is None:
            return
        for temp, _ in self._temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        for folder in reversed(self._made):
            with contextlib.suppress(OSError):
                os.rmdir(folder)

    def _folder(self, folder: str) -> None:
        missing = []
        path = folder
        while not os.path.isdir(path):
            missing.append(path)
            path = os.path.dirname(path)
        make_dirs(folder)
        self._made.extend(reversed(missing))

    def create(self, relative: str) -> int:
        """A new temporary file for ``relative``, open for writing (the caller closes it)."""
        final = os.path.join(self.out, *relative.split("/"))
        self._folder(os.path.dirname(final))
        fd, temp = create_temp(os.path.dirname(final), ".export")
        self._temps.append((temp, final))
        self.finals.append(relative)
        return fd

    def write(self, relative: str, data: bytes) -> None:
        fd = self.create(relative)
        try:
            pwrite_all(fd, data, 0)
        finally:
            os.close(fd)

    def copy(self, relative: str, source: str, asset: Asset) -> None:
        """Copy an asset's verified local file, hashing the bytes copied: they must be the asset's."""
        hasher = Hasher()
        done = 0
        fd = self.create(relative)
        try:
            with open(source, "rb", buffering=0) as file:
                while piece := file.read(READ_PIECE):
                    hasher.update(piece)
                    pwrite_all(fd, piece, done)
                    done += len(piece)
        finally:
            os.close(fd)
        if done != asset.size or digest_of(hasher) != asset.digest:
            raise IntegrityError(
                f"asset {relative!r} ({source}) changed while it was copied: {done} bytes, {digest_of(hasher)}; "
                f"manifest says {asset.size} bytes, {asset.digest}"
            )

    def publish(self, force: bool) -> None:
        """Rename every file into place, each fsynced first, the last one (the weight index or the
        single weight file) last. With ``force`` the weight files already there go first, so the
        folder never looks complete with a mix of old and new weights."""
        if force:
            new = set(self.finals)
            for name in sorted(os.listdir(self.out), key=lambda n: n != INDEX):  # the index first
                if _WEIGHT_FILE.match(name) and (name not in new or name in (INDEX, SINGLE)):
                    os.unlink(os.path.join(self.out, name))
            fsync_dir(self.out)
        for temp, final in self._temps:
            replace_durably(temp, final)
        self._temps.clear()


def _write_shards(
    staging: _Staging,
    reader: PartReader,
    chosen: list[tuple[str, Part]],
    placed: list[_Placed],
    shards: list[dict[str, RawTensor]],
    files: list[str],
    bar: tqdm,
) -> None:
    """Write the shards, streaming each part once (every piece hashed as it is read, see
    :meth:`PartReader.stream`) into the places of its tensors, so memory holds two pieces, not a
    part; the files stay under their temporary names until every part's digest has matched. A
    shard's file is open only while tensors are still to come into it."""
    by_part: dict[str, list[_Placed]] = {}
    for p in placed:
        by_part.setdefault(p.label, []).append(p)
    remaining = [len(shard) for shard in shards]
    fds: dict[int, int] = {}

    def fd_of(shard: int) -> int:
        if shard not in fds:
            fds[shard] = fd = staging.create(files[shard])
            _, head = layout(shards[shard], _METADATA)
            os.ftruncate(fd, len(head) + sum(t.nbytes for t in shards[shard].values()))
            pwrite_all(fd, head, 0)
        return fds[shard]

    def copy(label: str, part: Part) -> None:
        wanted = by_part.get(label, [])

        def writer(header: dict[str, HeaderEntry]) -> Writer:
            # Where each wanted tensor is in the part file; the tensors tile the data, so few overlap a piece.
            spans = [(header[p.stored].start, header[p.stored].end, p) for p in wanted]

            def write(at: int, piece: memoryview) -> None:
                for start, end, p in spans:
                    if start < at + len(piece) and end > at:
                        lo, hi = max(start, at), min(end, at + len(piece))
                        pwrite_all(fd_of(p.shard), piece[lo - at : hi - at], p.offset + lo - start)

            return write

        reader.stream(label, part, writer)
        for p in wanted:
            remaining[p.shard] -= 1
            if remaining[p.shard] == 0:
                os.close(fds.pop(p.shard))

    try:
        for label, part in chosen:
            copy(label, part)
            bar.update(part.size)
    finally:
        for fd in fds.values():
            os.close(fd)
