"""dump: a state dict, split by a decider into begin / mid / end parts, into a store."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from ._version import __version__
from .assets import AssetInput, check_asset_paths, merge_assets, write_assets
from .errors import DeciderError, ManifestError, StoreError
from .hashing import digest_buffer
from .leases import Held, holding
from .manifest import (
    FORMAT_VERSION,
    MAX_TENSOR_NAME,
    Manifest,
    Part,
    Renames,
    Tensor,
    decode_manifest,
    encode_manifest,
    format_version_for,
    is_tensor_name,
)
from .progress import progress
from .refs import Resolved
from .safetensors_io import RawTensor, WrittenPart, write_part
from .store import Store, check_name, check_tag, standard_parts_location

if TYPE_CHECKING:
    import torch

    from .reader import PartReader

__all__ = ["Decider", "Placement", "dump"]

#: What a decider returns for a key: ``("begin", new_key)``, ``("mid", layer, new_key)``,
#: ``("end", new_key)`` (lists and ``"start"`` for ``"begin"`` accepted), or ``None`` to drop it.
Placement = tuple[str, str] | tuple[str, int | str, str] | Sequence[object] | None
Decider = Callable[[str], Placement]
Slot = Literal["begin", "end"] | int
MAX_LAYERS = 100_000


def _label(slot: Slot) -> str:
    return slot if isinstance(slot, str) else f"mid.{slot}"


def place(decider: Decider, key: str) -> tuple[Slot, str] | None:
    """Where ``decider`` puts ``key``: a slot and the key's name inside the part, or ``None``."""
    try:
        where = decider(key)
    except DeciderError:
        raise
    except Exception as exc:
        raise DeciderError(f"decider failed on key {key!r}: {type(exc).__name__}: {exc}") from exc
    if where is None:
        return None
    usage = "expected ('begin', new_key), ('mid', layer, new_key), ('end', new_key) or None"
    if not isinstance(where, tuple | list) or not where:
        raise DeciderError(f"decider returned {where!r} for key {key!r}; {usage}")
    section, *rest = where
    section = "begin" if section == "start" else section
    new_key = rest[-1] if rest else None
    if not is_tensor_name(new_key):
        raise DeciderError(
            f"decider returned {where!r} for key {key!r}: the new key must be a non-empty string of one line "
            f"(at most {MAX_TENSOR_NAME} characters, not '__metadata__')"
        )
    if section in ("begin", "end") and len(rest) == 1:
        return section, new_key
    if section == "mid" and len(rest) == 2:
        layer = rest[0]
        if isinstance(layer, str) and layer.isascii() and layer.isdigit():
            layer = int(layer)
        if type(layer) is int and 0 <= layer < MAX_LAYERS:
            return layer, new_key
        raise DeciderError(f"decider returned {where!r} for key {key!r}: the layer must be an int 0..{MAX_LAYERS - 1}")
    raise DeciderError(f"decider returned {where!r} for key {key!r}; {usage}")


def _group(decider: Decider, keys: Iterable[str]) -> dict[Slot, dict[str, str]]:
    """Each slot's keys: ``{slot: {name in the part: key in the state dict}}``."""
    groups: dict[Slot, dict[str, str]] = {}
    origin: dict[tuple[Slot, str], str] = {}
    for key in keys:
        placement = place(decider, key)
        if placement is None:
            continue
        slot, new_key = placement
        if (slot, new_key) in origin:
            raise DeciderError(f"decider put both {origin[slot, new_key]!r} and {key!r} at {_label(slot)}.{new_key}")
        origin[slot, new_key] = key
        groups.setdefault(slot, {})[new_key] = key
    return groups


def _tensors(state_dict: Mapping[str, torch.Tensor], keys: dict[str, str]) -> dict[str, RawTensor]:
    """A part's tensors, ``{name in the part: bytes to store}`` for ``{name: state-dict key}``:
    torch tensors checked (torch is imported only for state dicts that hold them), or the raw
    tensors ``convert``'s lazy mapping reads all at once (``read_many``: concurrently, remotely)."""
    many = getattr(state_dict, "read_many", None)
    values: Mapping[str, object] = many(list(keys.values())) if many is not None else state_dict
    out: dict[str, RawTensor] = {}
    for name, key in keys.items():
        value = values[key]
        if not isinstance(value, RawTensor):
            from .tensors import as_raw

            value = as_raw(value, key)
        out[name] = value
    return out


def _nbytes(state_dict: Mapping[str, torch.Tensor], key: str) -> int:
    """A tensor's size without reading it, where the mapping can tell (a lazy source can)."""
    sized = getattr(state_dict, "nbytes_of", None)
    if sized is not None:
        return int(sized(key))
    value: Any = state_dict[key]
    if isinstance(value, RawTensor):
        return value.nbytes
    try:
        return int(value.numel() * value.element_size())  # a torch tensor, even a sparse one
    except (AttributeError, TypeError, RuntimeError):
        return 0  # not a tensor: _tensor says so when its part is built


def _as_part(written: WrittenPart) -> Part:
    tensors = {name: Tensor(r.dtype, r.shape, r.digest) for name, r in written.tensors.items()}
    return Part(written.digest, written.size, tensors)


class _Writer:
    """Writes the parts of one dump call, merging with the parts a previous call left."""

    def __init__(self, store: Store, existing: Resolved | None, lease: Held, committer: Executor) -> None:
        self.store = store
        self.existing = existing
        self.lease = lease
        self.committer = committer
        self._committing: Future[bool] | None = None
        self._reader: PartReader | None = None

    def write(self, tensors: Mapping[str, RawTensor]) -> Part:
        """Write a part; it is filed (fsynced and renamed, or uploaded) in the background while
        the next one is built, one at a time: :meth:`flush` waits for the last."""
        written, tmp = self.store.stage_blob(lambda fd: write_part(tensors, fd))
        try:
            self.flush()
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        part = _as_part(written)
        protect = self.lease.protect
        self._committing = self.committer.submit(
            self.store.commit_blob, tmp, part, protect=lambda digest: protect([digest])
        )
        return part

    def flush(self) -> None:
        """Wait until the part being filed is in the store (its error, if it failed)."""
        committing, self._committing = self._committing, None
        if committing is not None:
            committing.result()

    def _read(self, label: str, part: Part) -> dict[str, RawTensor]:
        from .reader import PartReader
        from .tensors import as_raw

        assert self.existing is not None
        if self._reader is None:
            self._reader = PartReader(self.existing)
        return {key: as_raw(value, f"{label}.{key}") for key, value in self._reader.read(label, part).items()}

    def merge(self, slot: Slot, tensors: dict[str, RawTensor], old: Part | None) -> Part:
        if old is None:
            return self.write(tensors)
        label = _label(slot)
        fresh = False
        for key, value in tensors.items():
            before = old.tensors.get(key)
            if before is None:
                fresh = True
                continue
            now = Tensor(value.dtype, value.shape, digest_buffer(value.read()))
            if now != before:
                raise DeciderError(
                    f"{label}.{key} is already in this model with other content "
                    f"({before.dtype}{list(before.shape)} {before.digest}, now {now.dtype}{list(now.shape)} "
                    f"{now.digest}); store it under another name or tag, or pass force=True (CLI: convert --force) "
                    "to replace the tag"
                )
        if not fresh:
            return old
        merged = {**self._read(label, old), **tensors}
        return self.write(merged)


def _as_json(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """``config`` as it reads back from JSON (``config.json``): int keys such as a transformers
    config's ``id2label`` become strings, tuples lists."""
    if config is None:
        return None
    try:
        return dict(json.loads(json.dumps(config)))
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"config= cannot be stored as JSON: {exc}") from None


def _check_extras(name: str, config: dict[str, Any] | None, metadata: Mapping[str, str] | None) -> None:
    """Refuse, before any part is written, a config or metadata the manifest could not hold."""
    probe = Manifest(FORMAT_VERSION, name, standard_parts_location(name), None, [], None, config, dict(metadata or {}))
    try:
        data = encode_manifest(probe)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"metadata= cannot be stored as JSON: {exc} (its values must be strings)") from None
    decode_manifest(data, source="config= and metadata= (metadata values must be strings)")


def _combined_renames(previous: Manifest | None, given: Renames | None, where: str) -> Renames | None:
    """The rename record of a combining dump: the tag's, or the one given; two that differ are a
    :class:`ManifestError`."""
    held = None if previous is None or isinstance(previous.renames, msgspec.UnsetType) else previous.renames
    if held is not None and given is not None and held != given:
        raise ManifestError(
            f"{where} records other renames than this dump's (another checkpoint's spelling?); pass force=True "
            "(CLI: convert --force) to replace the tag, or use another tag"
        )
    return given if given is not None else held


def dump(
    decider: Decider | str,
    state_dict: Mapping[str, torch.Tensor],
    out_path: str | os.PathLike[str],
    *,
    name: str = "model",
    tag: str = "latest",
    config: dict[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
    assets: Mapping[str, AssetInput] | None = None,
    renames: Renames | None = None,
    storage_options: dict[str, Any] | None = None,
    force: bool = False,
    quiet: bool = False,
) -> Manifest:
    """Split ``state_dict`` with ``decider`` and store it at ``out_path`` as ``name``/``tag``.

    Parts are built and written one at a time, reading each tensor only then: with a lazy
    mapping (as ``convert`` passes), peak memory is about one part. Calls into the same store,
    name and tag combine: the manifest afterwards describes the union of every state dict given
    (so a sharded checkpoint can be dumped shard by shard). A key given twice with different
    content is a :class:`DeciderError`; ``force=True`` replaces the tag's manifest instead of
    combining with it, and lets a registry repository holding another model take this one too. Parts
    are written before the manifest, so a reader never sees a manifest whose parts are missing.
    ``decider`` is a function or a built-in family's name (``"llama"``, see
    :mod:`sepstore.deciders`).

    ``assets`` adds the model's other files (``{"tokenizer.json": path_or_bytes, ...}``, each a
    relative path mapped to bytes, a local path or a URL), stored beside the parts by digest; a
    combining call adds to the assets the tag holds, and the same path with other content is a
    :class:`ManifestError` unless ``force``. ``renames`` records how the state dict's keys were
    renamed into the parts (:class:`~sepstore.manifest.Renames`; ``convert`` gives one for a
    built-in family), so that :func:`sepstore.export` can name them back; a combining call keeps
    the tag's record, and another one is a :class:`ManifestError` unless ``force``. A manifest with
    assets or renames is format version 2, one without stays version 1 (readable by every sepstore).
    """
    if isinstance(decider, str):
        from .deciders import get

        decider = get(decider).decider
    store = Store(out_path, storage_options)
    check_name(name)
    check_tag(tag)
    store.check_publishable(name, force=force)  # a registry repository holding another model: before any upload
    config = _as_json(config)
    _check_extras(name, config, metadata)
    given_assets = check_asset_paths(assets)
    if renames is not None and not isinstance(renames, Renames):
        raise ManifestError(f"renames= is a sepstore.manifest.Renames, got {type(renames).__name__}")
    groups = _group(decider, state_dict.keys())
    # Calls into one tag combine: one at a time. The lease keeps gc from the parts relied on.
    with (
        store.tag_lock(name, tag),
        holding(store, "publish") as lease,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="sepstore-commit") as committer,
    ):
        existing: Resolved | None = None
        version: str | None = None
        if not force and store.has_manifest(name, tag):
            data, version = store.read_manifest_version(name, tag)
            existing = Resolved(data, store.manifest_url(name, tag), store.parts_url, storage_options)
            held = (*existing.manifest.labelled_parts(), *existing.manifest.labelled_assets())
            lease.protect(blob.digest for _, blob in held)
        previous = existing.manifest if existing is not None else None
        record = _combined_renames(previous, renames, store.manifest_url(name, tag))
        parts: dict[Slot, Part | None] = {"begin": previous.begin, "end": previous.end} if previous else {}
        parts.update(enumerate(previous.mid) if previous else ())
        writer = _Writer(store, existing, lease, committer)
        before = dict(parts)

        def build(slot: Slot) -> Part:
            """The slot's part: this call's tensors, merged with those a previous call stored there."""
            return writer.merge(slot, _tensors(state_dict, groups[slot]), before.get(slot))

        order = sorted(groups, key=lambda s: (s == "end", s != "begin", s if isinstance(s, int) else 0))
        sizes = {slot: sum(_nbytes(state_dict, key) for key in group.values()) for slot, group in groups.items()}
        with progress(sum(sizes.values()), f"dump {name}:{tag}", quiet=quiet) as bar:
            for slot in order:
                parts[slot] = build(slot)
                bar.update(sizes[slot])
        writer.flush()
        new_assets = write_assets(store, given_assets, lambda digest: lease.protect([digest]))
        where = store.manifest_url(name, tag)
        all_assets = merge_assets(previous.asset_files if previous else {}, new_assets, where=where)
        # Belt and braces (a gc of an older sepstore ignores leases): every part, right before the
        # manifest; those this call has the tensors of are written again.
        vanished = {slot: part for slot, part in parts.items() if part is not None and not store.has_blob(part)}
        for slot in vanished.keys() & groups.keys():
            parts[slot] = vanished[slot] = build(slot)
        writer.flush()
        gone = [_label(slot) for slot, part in vanished.items() if not store.has_blob(part)]
        for path, asset in all_assets.items():
            if not store.has_blob(asset):
                if path not in new_assets:
                    gone.append(f"asset:{path}")
                    continue
                write_assets(store, {path: given_assets[path]}, lambda digest: lease.protect([digest]))
        if gone:
            raise StoreError(
                f"{store.url}: {', '.join(gone)} vanished during this dump (a gc of an older sepstore?); "
                "the manifest was not written, run the dump again"
            )
        lease.check()
        layers = max((slot + 1 for slot in parts if isinstance(slot, int)), default=0)
        meta = {**(previous.metadata if previous else {}), "sepstore_version": __version__, **(metadata or {})}
        manifest = Manifest(
            format_version=format_version_for(all_assets, record),
            name=name,
            parts=standard_parts_location(name),
            begin=parts.get("begin"),
            mid=[parts.get(layer) for layer in range(layers)],
            end=parts.get("end"),
            config=config if config is not None else (previous.config if previous else None),
            metadata=dict(sorted(meta.items())),
            assets=all_assets or msgspec.UNSET,
            renames=msgspec.UNSET if record is None else record,
        )
        data = encode_manifest(manifest)
        if not store.write_manifest_bytes(name, tag, data, create=not force and previous is None, if_version=version):
            raise StoreError(
                f"{store.manifest_url(name, tag)} was written by another publisher during this dump; "
                "run the dump again to combine with it"
            )
        return manifest
