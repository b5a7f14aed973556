"""load, lazy_load and read_manifest: the parts a node needs, verified, as a state dict."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from ._text import counted
from .errors import ModuleMismatchError, SpecError, TensorError
from .manifest import Manifest
from .reader import PartReader
from .refs import FETCH_OPTIONS, MANIFEST_OPTIONS, RefLike, RefOptions, Resolved, open_ref
from .spec import PartSpec, select_parts

if TYPE_CHECKING:
    import torch
    from torch import nn
    from typing_extensions import Unpack

__all__ = ["LoadResult", "PartStateDict", "lazy_load", "load", "read_manifest"]

Tensors = dict[str, "torch.Tensor"]


@dataclass
class PartStateDict:
    """The tensors of some parts of a model, shaped as in llm_sepweight.

    ``begin`` and ``end`` are ``None`` unless loaded; ``mid`` maps a layer number to its tensors;
    ``main_range`` is the spec's first layer range, onto which :meth:`to_dict` numbers layers.
    """

    begin: Tensors | None = None
    mid: dict[int, Tensors] = field(default_factory=dict)
    end: Tensors | None = None
    main_range: range | None = None

    def to_dict(self, target_range: range | None = None) -> Tensors:
        """A flat state dict with keys ``begin.X``, ``mid.<i>.X`` and ``end.X``.

        The layers of ``target_range`` (default: ``main_range``) are numbered as ``main_range``,
        so a module built for layers 0-5 can take layers 30-35 with ``to_dict(range(30, 35))``.
        """
        out: Tensors = {}
        for key, value in (self.begin or {}).items():
            out[f"begin.{key}"] = value
        target = self.main_range if target_range is None else target_range
        if target is not None:
            numbering = self.main_range if self.main_range is not None else target
            if len(target) != len(numbering):
                raise SpecError(
                    f"target range {_show(target)} has {len(target)} layers, but the main range "
                    f"{_show(numbering)} has {len(numbering)}"
                )
            for layer, number in zip(target, numbering, strict=True):
                if layer not in self.mid:
                    raise SpecError(f"layer {layer} of target range {_show(target)} was not loaded")
                for key, value in self.mid[layer].items():
                    out[f"mid.{number}.{key}"] = value
        for key, value in (self.end or {}).items():
            out[f"end.{key}"] = value
        return out

    def __repr__(self) -> str:
        """Which parts are loaded and how many tensors each holds, never the tensors' values."""
        shown = [f"begin: {counted(len(self.begin), 'tensor')}"] if self.begin is not None else []
        if self.mid:
            layers = sorted(self.mid)
            span = f"{layers[0]}-{layers[-1] + 1}" if layers == list(range(layers[0], layers[-1] + 1)) else layers
            shown.append(f"mid {span}: {counted(sum(len(t) for t in self.mid.values()), 'tensor')}")
        if self.end is not None:
            shown.append(f"end: {counted(len(self.end), 'tensor')}")
        if self.main_range is not None:
            shown.append(f"main_range {_show(self.main_range)}")
        return f"PartStateDict({', '.join(shown)})"


def _show(r: range) -> str:
    return f"{r.start}-{r.stop}"


def read_manifest(ref: RefLike, **options: Unpack[RefOptions]) -> Manifest:
    """Read and validate the manifest that ``ref`` names (see :func:`load`); ``parts_url`` and
    ``cache_dir`` do not apply."""
    return open_ref("read_manifest", ref, options, MANIFEST_OPTIONS).manifest


def iter_parts(
    resolved: Resolved,
    spec: str | PartSpec,
    *,
    verify: bool = True,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    mmap: bool = False,
    keep: bool = False,
) -> Iterator[tuple[str, Tensors]]:
    """Yield ``(label, tensors)`` part by part, each verified before it is yielded. ``keep`` says
    the caller keeps every part in CPU memory (as :func:`load` does): the parts to fetch are then
    received straight into the memory their tensors use, not read back from the cache. Otherwise
    (one part at a time, or onto another device) they are read back one by one, so that the CPU
    holds about one part at a time."""
    import torch

    try:
        target = torch.device(device)
        torch.empty(0, device=target)  # an unknown device, or one this torch was not built for
    except (RuntimeError, TypeError, AssertionError) as exc:
        raise TensorError(f"cannot load onto device {device!r}: {exc}") from None
    if mmap and target.type != "cpu":
        raise TensorError(
            f"mmap=True returns views of the part files on the CPU, but device is {device!r}; "
            "drop mmap=True (the verified bytes are then copied onto the device)"
        )
    _, chosen = select_parts(resolved.manifest, spec)
    reader = PartReader(resolved, cache_dir=cache_dir)
    in_memory = keep and not mmap and target.type == "cpu"
    reader.prefetch(chosen, desc=f"fetch {resolved.manifest.name}", in_memory=in_memory)
    for label, part in chosen:
        yield label, reader.read(label, part, verify=verify, mmap=mmap, device=target)


def load(
    ref: RefLike,
    spec: str = "f",
    *,
    verify: bool = True,
    device: str | torch.device = "cpu",
    mmap: bool = False,
    **options: Unpack[RefOptions],
) -> PartStateDict:
    """Load the parts ``spec`` names from the model at ``ref``, every byte verified.

    ``ref`` is a manifest path or URL, a store root (with ``name``/``tag`` when it holds more
    than one model), a :class:`~sepstore.ModelRef` or a :class:`~sepstore.Resolved`. The
    options (:class:`~sepstore.RefOptions`): ``digest`` pins the manifest's own digest,
    ``parts_url`` reads parts from a mirror, ``storage_options`` go to fsspec, ``cache_dir`` keeps
    remote parts. Each part file is read once into memory of its own and hashed as it is read, so
    the tensors are the verified bytes and nothing done to the files later changes them; ``device``
    gets one copy of those bytes. ``mmap=True`` (CPU only) returns views of memory-mapped part
    files instead, without copying: they are valid only while no one writes to or truncates the
    files, so it is refused for files other users could change (see SECURITY.md).
    """
    resolved = open_ref("load", ref, options, FETCH_OPTIONS)
    parsed, _ = select_parts(resolved.manifest, spec)
    result = PartStateDict(main_range=parsed.main_range)
    cache_dir = options.get("cache_dir")
    chosen = iter_parts(resolved, parsed, verify=verify, device=device, cache_dir=cache_dir, mmap=mmap, keep=True)
    for label, tensors in chosen:
        if label == "begin":
            result.begin = tensors
        elif label == "end":
            result.end = tensors
        else:
            result.mid[int(label.split(".")[1])] = tensors
    return result


def _rebuilt_buffers(manifest: Manifest) -> Callable[[str], bool]:
    """Which names are buffers the model rebuilds, for the built-in family ``convert`` recorded."""
    from .deciders import families

    family = families().get(manifest.metadata.get("decider", ""))
    return family.is_buffer if family is not None else lambda name: False


class LoadResult(NamedTuple):
    """What :func:`lazy_load` could not match, as in ``nn.Module.load_state_dict``."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def lazy_load(
    module: nn.Module,
    ref: RefLike,
    spec: str = "f",
    *,
    strict: bool = True,
    verify: bool = True,
    mmap: bool = False,
    **options: Unpack[RefOptions],
) -> LoadResult:
    """Load ``spec`` into ``module`` one part at a time, so peak memory is about one part.

    Keys are ``begin.X``, ``mid.<layer>.X`` and ``end.X``, as in a :class:`sepstore.Part`.
    Tensors are copied onto the device of the module's own parameters. With ``strict`` (the
    default) a key the module lacks, or a module key no part provided, is a
    :class:`ModuleMismatchError`; a store ``convert`` made with a built-in family may hold buffers
    the model rebuilds itself (:attr:`sepstore.deciders.Family.buffers`, e.g. rotary ``inv_freq``),
    which a module that lacks them skips (they are listed in ``unexpected_keys``). ``ref`` and
    the options are as for :func:`load`. ``mmap=True`` copies straight from memory-mapped part
    files, saving one copy of each part, under :func:`load`'s condition for it.
    """
    resolved = open_ref("lazy_load", ref, options, FETCH_OPTIONS)
    expected = set(module.state_dict().keys())
    rebuilt = _rebuilt_buffers(resolved.manifest)
    loaded: set[str] = set()
    unexpected: list[str] = []
    for label, tensors in iter_parts(resolved, spec, verify=verify, cache_dir=options.get("cache_dir"), mmap=mmap):
        prefixed = {f"{label}.{key}": value for key, value in tensors.items()}
        try:
            result = module.load_state_dict(prefixed, strict=False)
        except RuntimeError as exc:  # shapes that do not fit the module's parameters
            raise ModuleMismatchError(f"part {label} does not fit the module: {exc}") from exc
        unexpected.extend(result.unexpected_keys)
        refused = [key for key in result.unexpected_keys if not rebuilt(key)]
        if strict and refused:
            raise ModuleMismatchError(f"part {label} has tensors the module lacks: {sorted(refused)[:10]}")
        loaded.update(prefixed.keys() - set(result.unexpected_keys))
    missing = sorted(expected - loaded)
    if strict and missing:
        raise ModuleMismatchError(f"no part of spec {spec!r} provided these module keys: {missing[:10]}")
    return LoadResult(missing, sorted(unexpected))
