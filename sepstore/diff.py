"""diff: what changed between two versions of a model, and what a node must fetch to move."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .delta import transfer_bytes
from .manifest import Manifest, Part
from .refs import RefLike, RefOptions, manifest_of
from .safetensors_io import ITEMSIZE, RawTensor

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["AssetDiff", "ManifestDiff", "PartDiff", "TensorChanges", "diff"]

Status = Literal["same", "changed", "added", "removed"]


@dataclass(frozen=True)
class TensorChanges:
    changed: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[str]]:
        return {"changed": self.changed, "added": self.added, "removed": self.removed}


@dataclass(frozen=True)
class PartDiff:
    """One part's change. ``bytes`` is what a node holding ``a`` must fetch for it (0 if it has
    it) when parts are fetched whole; ``tensor_bytes`` what ``pull`` transfers for it into a cache
    holding ``a`` (and nothing else), where parts are assembled from the tensors it holds
    (:mod:`sepstore.delta`, whose planning rule this is): the part's header and the tensors whose
    digests no part of ``a`` has, with the bytes between them when they are close
    (:data:`~sepstore.delta.GAP_BYTES`), or the whole part when less than
    :data:`~sepstore.delta.MIN_REUSE` of it is held. It assumes the header sepstore writes; a part
    written by another tool may have a longer one."""

    part: str
    status: Status
    tensors: TensorChanges
    bytes: int
    tensor_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "part": self.part,
            "status": self.status,
            "tensors": self.tensors.to_dict(),
            "bytes": self.bytes,
            "tensor_bytes": self.tensor_bytes,
        }


@dataclass(frozen=True)
class AssetDiff:
    """One asset's change, by its path. ``bytes`` is what a node holding ``a`` must fetch for it."""

    path: str
    status: Status
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "status": self.status, "bytes": self.bytes}


@dataclass(frozen=True)
class ManifestDiff:
    parts: list[PartDiff]
    #: Every asset path of either side, sorted (none when neither has assets).
    assets: list[AssetDiff] = field(default_factory=list)

    @property
    def bytes_to_fetch(self) -> int:
        """Bytes a node holding all of ``a`` downloads to hold all of ``b`` (each file once)."""
        return sum(p.bytes for p in self.parts) + sum(a.bytes for a in self.assets)

    @property
    def tensor_bytes_to_fetch(self) -> int:
        """Bytes that node downloads when parts are assembled from the tensors it holds (what
        ``pull`` reports as ``transferred_bytes``; see :class:`PartDiff`)."""
        return sum(p.tensor_bytes for p in self.parts) + sum(a.bytes for a in self.assets)

    @property
    def changed(self) -> list[PartDiff]:
        """The parts whose status is not ``same``."""
        return [p for p in self.parts if p.status != "same"]

    @property
    def changed_assets(self) -> list[AssetDiff]:
        """The assets whose status is not ``same``."""
        return [a for a in self.assets if a.status != "same"]

    @property
    def differs(self) -> bool:
        """Whether any part or asset differs (what ``diff --exit-code`` reports)."""
        return bool(self.changed or self.changed_assets)

    def to_dict(self) -> dict[str, Any]:
        return {
            "parts": [p.to_dict() for p in self.parts],
            "assets": [a.to_dict() for a in self.assets],
            "bytes_to_fetch": self.bytes_to_fetch,
            "tensor_bytes_to_fetch": self.tensor_bytes_to_fetch,
        }


def _compare(old: Part, new: Part) -> TensorChanges:
    return TensorChanges(
        changed=sorted(k for k in old.tensors.keys() & new.tensors.keys() if old.tensors[k] != new.tensors[k]),
        added=sorted(new.tensors.keys() - old.tensors.keys()),
        removed=sorted(old.tensors.keys() - new.tensors.keys()),
    )


def diff(a: RefLike | Manifest, b: RefLike | Manifest, **options: Unpack[RefOptions]) -> ManifestDiff:
    """Compare two versions part by part (``begin``, ``mid.<i>``, ``end``) and tensor by tensor,
    and their assets path by path.

    ``a`` and ``b`` are as for :func:`sepstore.read_manifest`, or :class:`Manifest` objects; the
    options apply to both sides (to give each side its own, pass :class:`sepstore.ModelRef` s:
    ``diff(ModelRef(store, tag="v1"), ModelRef(store, tag="v2"))``).
    """
    old, new = manifest_of("diff", a, options), manifest_of("diff", b, options)
    old_parts, new_parts = dict(old.labelled_parts()), dict(new.labelled_parts())
    have = {p.digest for p in old_parts.values()}
    # what a cache holding ``a`` has indexed: its tensor digests with their byte lengths (a part
    # with a dtype this sepstore does not know cannot be indexed)
    held = {
        t.digest: RawTensor(t.dtype, tuple(t.shape)).nbytes
        for p in old_parts.values()
        if all(t.dtype in ITEMSIZE for t in p.tensors.values())
        for t in p.tensors.values()
    }
    labels = [label for label, _ in old.labelled_parts()]
    labels += [label for label in new_parts if label not in old_parts]
    labels.sort(key=lambda s: (s == "end", s != "begin", int(s.split(".")[1]) if s.startswith("mid.") else 0))
    out: list[PartDiff] = []
    for label in labels:
        before, after = old_parts.get(label), new_parts.get(label)
        if after is None:
            if before is not None:
                out.append(PartDiff(label, "removed", TensorChanges(removed=sorted(before.tensors)), 0))
            continue
        cost = 0 if after.digest in have else after.size
        tensor_cost = 0 if after.digest in have else transfer_bytes(after, held)
        have.add(after.digest)
        if before is None:
            out.append(PartDiff(label, "added", TensorChanges(added=sorted(after.tensors)), cost, tensor_cost))
        elif before.digest == after.digest:
            out.append(PartDiff(label, "same", TensorChanges(), 0))
        else:
            out.append(PartDiff(label, "changed", _compare(before, after), cost, tensor_cost))
    return ManifestDiff(out, _assets(old, new, have))


def _assets(old: Manifest, new: Manifest, have: set[str]) -> list[AssetDiff]:
    """Each asset path of either side, with what a node holding ``old`` (and ``have``, the digests
    of its files) fetches for it."""
    before, after = old.asset_files, new.asset_files
    have |= {asset.digest for asset in before.values()}
    out: list[AssetDiff] = []
    for path in sorted(before.keys() | after.keys()):
        was, now = before.get(path), after.get(path)
        if now is None:
            out.append(AssetDiff(path, "removed", 0))
            continue
        cost = 0 if now.digest in have else now.size
        have.add(now.digest)
        status: Status = "added" if was is None else "same" if was == now else "changed"
        out.append(AssetDiff(path, status, cost))
    return out
