"""plan (layers over nodes, balanced by bytes) and gc (unreferenced parts, after a grace period)."""

from __future__ import annotations

import itertools
import os
import time
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from servers import CountingMotoServer, StaticServer

import sepstore
from sepstore.cli import main
from sepstore.demo import llama_decider, tiny_llama_state_dict
from sepstore.plan import parse_size


@pytest.fixture
def uneven(tmp_path: Path) -> Path:
    """Layers of different sizes: layer i has i+1 copies of a tensor."""
    sd = {"emb": torch.ones(64, 64)}
    for i in range(7):
        for j in range(i + 1):
            sd[f"layers.{i}.w{j}"] = torch.full((32, 32), float(i))
    sd["head"] = torch.ones(96, 64)
    sepstore.dump(lambda k: ("mid", k.split(".")[1], k.split(".")[2]) if k.startswith("layers.") else (
        ("begin", k) if k == "emb" else ("end", k)), sd, tmp_path)  # fmt: skip
    return tmp_path


def best_possible(manifest: sepstore.Manifest, nodes: int) -> int:
    sizes = [p.size for p in manifest.mid if p is not None]
    best = None
    for cuts in itertools.combinations(range(1, len(sizes)), nodes - 1):
        bounds = [0, *cuts, len(sizes)]
        loads = [sum(sizes[a:b]) for a, b in itertools.pairwise(bounds)]
        loads[0] += manifest.begin.size  # type: ignore[union-attr]
        loads[-1] += manifest.end.size  # type: ignore[union-attr]
        best = max(loads) if best is None else min(best, max(loads))
    assert best is not None
    return best


@pytest.mark.parametrize("nodes", [1, 2, 3, 4, 7])
def test_plan_balances_bytes_and_its_specs_load(uneven: Path, nodes: int) -> None:
    manifest = sepstore.read_manifest(uneven)
    result = sepstore.plan(uneven, nodes=nodes)
    assert len(result) == nodes
    assert result[0].spec.startswith("b ") and result[-1].spec.endswith(" e")
    assert sum(n.bytes for n in result) == manifest.total_bytes
    assert max(n.bytes for n in result) == best_possible(manifest, nodes)
    layers: list[int] = []
    for node in result:
        psd = sepstore.load(uneven, node.spec)
        layers += sorted(psd.mid)
    assert layers == list(range(7))


def test_plan_respects_budgets(uneven: Path) -> None:
    manifest = sepstore.read_manifest(uneven)
    sizes = [p.size for p in manifest.mid if p is not None]
    small = manifest.end.size + sizes[-1] + 100  # type: ignore[union-attr]
    big = manifest.total_bytes
    result = sepstore.plan(uneven, budgets=[big, small])
    assert result[1].spec == "6-7 e" and result[1].bytes <= small
    assert all(n.bytes <= n.budget for n in result if n.budget)  # type: ignore[operator]
    with pytest.raises(sepstore.SpecError, match="does not fit"):
        sepstore.plan(uneven, budgets=[1000, 1000])


@pytest.mark.parametrize(
    ("text", "value"), [("24GiB", 24 * 2**30), ("16G", 16 * 10**9), ("512MB", 512 * 10**6), ("1.5KiB", 1536), ("7", 7)]
)
def test_sizes_are_read_in_both_units(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("kwargs", [{"nodes": 8}, {"nodes": 0}, {}, {"nodes": 2, "budgets": ["1G", "1G"]}])
def test_impossible_plans_are_spec_errors(uneven: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(sepstore.SpecError):
        sepstore.plan(uneven, **kwargs)  # type: ignore[arg-type]


def test_bad_size_is_a_spec_error(uneven: Path) -> None:
    with pytest.raises(sepstore.SpecError, match="lots"):
        sepstore.plan(uneven, budgets=["lots", "1G"])


# -- gc ------------------------------------------------------------------------------------------


def two_versions(root: str) -> tuple[set[str], set[str]]:
    """Publish v1 and v2 (one layer changed); the digests only v1 has, and those of v2."""
    sd = tiny_llama_state_dict(layers=3, hidden=16, intermediate=16, vocab=32)
    one = sepstore.dump(llama_decider, sd, root, tag="v1")
    sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"] + 1
    two = sepstore.dump(llama_decider, sd, root, tag="v2")
    v1 = {p.digest[7:] for _, p in one.labelled_parts()}
    v2 = {p.digest[7:] for _, p in two.labelled_parts()}
    return v1 - v2, v2


def test_gc_removes_old_orphans_and_keeps_every_referenced_part(tmp_path: Path) -> None:
    only_v1, v2 = two_versions(str(tmp_path))
    (tmp_path / "manifests/model/v1.json").unlink()
    parts = tmp_path / "parts/blake3"
    stray = parts / ".tmp-00000000deadbeef.safetensors"
    stray.write_bytes(b"half a part")
    (parts / "README").write_text("not ours")
    manifest_temp = tmp_path / "manifests/model/.tmp-0123456789abcdef.json"  # a publisher killed mid-write
    manifest_temp.write_text("{")
    lookalike = tmp_path / "manifests/model/.tmp-notours.json"  # not a name sepstore gives its temp files
    lookalike.write_text("{")
    held = tmp_path / "manifests/model/v2.json.lock"  # a dump in progress holds this one
    held.write_text("")
    (tmp_path / "leases").mkdir(exist_ok=True)
    lease_temp = tmp_path / "leases/.tmp-00000000000000ff.json"  # a publisher killed while writing its lease
    lease_temp.write_text("{")
    assert sepstore.gc(tmp_path).removed == []  # everything is younger than the default hour
    old = time.time() - 7200
    for path in [*parts.iterdir(), manifest_temp, lookalike, held, lease_temp]:
        os.utime(path, (old, old))
    dry = sepstore.gc(tmp_path, dry_run=True)
    assert {r.removesuffix(".safetensors") for r in dry.removed} == only_v1 | {
        ".tmp-00000000deadbeef",
        ".tmp-0123456789abcdef.json",
        ".tmp-00000000000000ff.json",
    }
    assert len(list(parts.iterdir())) == len(v2) + 3 and manifest_temp.exists()
    report = sepstore.gc(tmp_path)
    assert report.removed == dry.removed and report.kept == len(v2)
    assert {p.stem for p in parts.iterdir() if p.suffix == ".safetensors"} == v2
    assert (parts / "README").exists()
    assert not manifest_temp.exists() and not lease_temp.exists()
    assert held.exists(), "lock files stay: another process may hold one"
    assert lookalike.exists()
    assert sepstore.verify(tmp_path, name="model", tag="v2").ok


def test_gc_touches_nothing_when_a_manifest_is_unreadable(tmp_path: Path) -> None:
    two_versions(str(tmp_path))
    (tmp_path / "manifests/model/v1.json").write_text("{broken")
    count = len(list((tmp_path / "parts/blake3").iterdir()))
    with pytest.raises(sepstore.ManifestError):
        sepstore.gc(tmp_path, grace=0)
    assert len(list((tmp_path / "parts/blake3").iterdir())) == count


def test_gc_on_s3(moto_server: CountingMotoServer) -> None:
    bucket = f"gc-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("s3")
    fs.mkdir(bucket)
    only_v1, v2 = two_versions(f"s3://{bucket}/store")
    fs.rm(f"{bucket}/store/manifests/model/v1.json")
    assert sepstore.gc(f"s3://{bucket}/store").removed == []
    report = sepstore.gc(f"s3://{bucket}/store", grace=0)
    assert {r.removesuffix(".safetensors") for r in report.removed} == only_v1
    left = {p.rsplit("/", 1)[1].removesuffix(".safetensors") for p in fs.ls(f"{bucket}/store/parts/blake3")}
    assert left == v2


def test_gc_refuses_a_folder_without_manifests_unless_allowed(tmp_path: Path) -> None:
    """A cache folder or a mistyped path has parts but no manifests: gc would take every part."""
    only_v1, v2 = two_versions(str(tmp_path))
    for tag in ("v1", "v2"):
        (tmp_path / f"manifests/model/{tag}.json").unlink()
    parts = tmp_path / "parts/blake3"
    with pytest.raises(sepstore.StoreError, match=r"holds no manifests.*allow_empty=True \(--allow-empty\)"):
        sepstore.gc(tmp_path, grace=0)
    assert len(list(parts.iterdir())) == len(only_v1 | v2)
    assert main(["gc", str(tmp_path), "--grace", "0"]) == 2
    assert len(list(parts.iterdir())) == len(only_v1 | v2)
    assert main(["gc", str(tmp_path), "--grace", "0", "--allow-empty"]) == 0
    assert list(parts.iterdir()) == []


def test_gc_with_no_grace_still_leaves_a_temporary_file_being_written(tmp_path: Path) -> None:
    """A temporary file may be a part some publisher is writing right now: only an hour-old one is
    a killed writer's."""
    only_v1, _ = two_versions(str(tmp_path))
    (tmp_path / "manifests/model/v1.json").unlink()
    fresh = tmp_path / "parts/blake3/.tmp-00000000deadbeef.safetensors"
    fresh.write_bytes(b"a part being written")
    assert {r.removesuffix(".safetensors") for r in sepstore.gc(tmp_path, grace=0).removed} == only_v1
    assert fresh.exists()


def test_gc_of_an_http_store_says_to_run_it_where_the_store_is_served(
    uneven: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = StaticServer(uneven).start()
    try:
        assert main(["gc", server.url]) == 2
    finally:
        server.stop()
    said = capsys.readouterr().err
    assert "run gc where the store can be listed" in said and "lacks listing" in said
