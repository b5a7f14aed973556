"""plan: split a model's layers over nodes, balancing bytes; begin goes to the first, end to the last."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._text import human_bytes, parse_size
from .errors import NotFoundError, SpecError
from .manifest import Manifest
from .refs import RefLike, RefOptions, manifest_of

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["NodePlan", "parse_size", "plan"]


@dataclass(frozen=True)
class NodePlan:
    """One node's share: the part spec to load (``"b 0-7"``) and its bytes."""

    node: int
    spec: str
    bytes: int
    budget: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "spec": self.spec, "bytes": self.bytes, "budget": self.budget}


def plan(
    ref: RefLike | Manifest,
    *,
    nodes: int | None = None,
    budgets: Sequence[int | str] | None = None,
    **options: Unpack[RefOptions],
) -> list[NodePlan]:
    """Split the layers into one contiguous range per node, begin on the first and end on the last.

    With ``nodes=N`` the largest node's bytes are as small as they can be; with ``budgets`` (bytes,
    or sizes such as ``"24GiB"``) each node fits its budget and the fullest node, relative to its
    budget, is as empty as it can be. The specs load directly with :func:`sepstore.load`.
    ``ref`` is as for :func:`sepstore.read_manifest`, or a :class:`Manifest` (then no option applies).
    """
    manifest = manifest_of("plan", ref, options)
    if (nodes is None) == (budgets is None):
        raise SpecError("give either nodes= (a count) or budgets= (one size per node)")
    if budgets is not None and (isinstance(budgets, str) or not all(isinstance(b, str | int) for b in budgets)):
        raise SpecError(f"budgets= is a list of sizes (bytes or e.g. '24GiB'), got {budgets!r}")
    if nodes is not None and (type(nodes) is not int):
        raise SpecError(f"nodes= is a whole number of nodes, got {nodes!r}")
    limits = [parse_size(b) if isinstance(b, str) else b for b in budgets] if budgets is not None else None
    count = len(limits) if limits is not None else int(nodes or 0)
    layers = manifest.n_layers
    if count < 1:
        raise SpecError(f"a plan needs at least one node, got {count}")
    if count > max(layers, 1):
        raise SpecError(f"cannot split {layers} layers over {count} nodes: each node needs at least one layer")
    missing = [i for i, p in enumerate(manifest.mid) if p is None]
    if missing:
        raise NotFoundError(f"model {manifest.name!r} has no parts yet for layers {missing[:10]}")
    head = manifest.begin.size if manifest.begin else 0
    tail = manifest.end.size if manifest.end else 0
    sizes = [p.size for p in manifest.mid if p is not None]
    cuts = _partition(sizes, head, tail, limits or [1] * count)
    if cuts is None:
        total = head + tail + sum(sizes)
        raise SpecError(
            f"the model ({human_bytes(total)}, largest layer {human_bytes(max(sizes, default=0))}) does not fit "
            f"these budgets ({', '.join(human_bytes(b) for b in limits or [])})"
        )
    out = []
    for i, (start, stop) in enumerate(itertools.pairwise(cuts)):
        tokens = (["b"] if i == 0 and manifest.begin else []) + ([f"{start}-{stop}"] if stop > start else [])
        tokens += ["e"] if i == count - 1 and manifest.end else []
        size = sum(sizes[start:stop]) + (head if i == 0 else 0) + (tail if i == count - 1 else 0)
        out.append(NodePlan(i, " ".join(tokens), size, limits[i] if limits else None))
    return out


def _partition(sizes: list[int], head: int, tail: int, limits: list[int]) -> list[int] | None:
    """Cut points ``[0, c1, ..., len(sizes)]`` minimising the largest ``load / limit``, each node
    getting at least one layer and ``load <= limit`` when limits are real budgets (not all 1)."""
    n, k = len(sizes), len(limits)
    if n == 0:
        return [0] * (k + 1)
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    budgeted = any(limit != 1 for limit in limits)
    inf = float("inf")

    def cost(node: int, start: int, stop: int) -> float:
        load = prefix[stop] - prefix[start] + (head if node == 0 else 0) + (tail if node == k - 1 else 0)
        if budgeted and load > limits[node]:
            return inf
        return load / limits[node]

    # best[j][i]: the smallest worst cost placing layers 0..i-1 on nodes 0..j
    best = [[inf] * (n + 1) for _ in range(k)]
    back = [[0] * (n + 1) for _ in range(k)]
    for i in range(1, n + 1):
        best[0][i] = cost(0, 0, i)
    for j in range(1, k):
        for i in range(j + 1, n + 1):
            for cut in range(j, i):
                worst = max(best[j - 1][cut], cost(j, cut, i))
                if worst < best[j][i]:
                    best[j][i], back[j][i] = worst, cut
    if best[k - 1][n] == inf:
        return None
    cuts = [n]
    for j in range(k - 1, 0, -1):
        cuts.append(back[j][cuts[-1]])
    return [0, *reversed(cuts)]
