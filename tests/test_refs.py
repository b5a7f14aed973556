"""One reference, checked in one place: every function that reads a model takes the same reference
and options, and an option is applied or refused, never ignored."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from servers import StaticServer

import sepstore
from sepstore.demo import llama_decider, tiny_llama_state_dict
from sepstore.manifest import manifest_digest

OTHER_PIN = "blake3:" + "0" * 64


def small(seed: int = 0) -> dict[str, torch.Tensor]:
    return tiny_llama_state_dict(layers=2, hidden=8, intermediate=16, vocab=32, seed=seed)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    sepstore.dump(llama_decider, small(), tmp_path / "store", name="m", tag="v1", quiet=True)
    sepstore.dump(llama_decider, small(seed=1), tmp_path / "store", name="m", tag="v2", quiet=True)
    return tmp_path / "store"


@pytest.fixture
def url(root: Path) -> str:
    return str(root / "manifests/m/v1.json")


# Every public function that reads a model, called with a reference and options; `push` publishes
# into a fresh folder, `lazy_load` into an empty module (not strict).
def _lazy_load(ref: Any, **options: Any) -> object:
    return sepstore.lazy_load(torch.nn.Module(), ref, "f", strict=False, **options)


def _push(ref: Any, **options: Any) -> object:
    return sepstore.push(ref, options.pop("_dest"), quiet=True, **options)


READERS: dict[str, Callable[..., object]] = {
    "load": lambda ref, **o: sepstore.load(ref, "b", **o),
    "lazy_load": _lazy_load,
    "read_manifest": lambda ref, **o: sepstore.read_manifest(ref, **o),
    "resolve": lambda ref, **o: sepstore.resolve(ref, **o),
    "verify": lambda ref, **o: sepstore.verify(ref, quiet=True, **o),
    "pull": lambda ref, **o: sepstore.pull(ref, "b", quiet=True, **o),
    "push": _push,
    "plan": lambda ref, **o: sepstore.plan(ref, nodes=1, **o),
    "diff": lambda ref, **o: sepstore.diff(ref, ref, **o),
    "files": lambda ref, **o: sepstore.files(ref, **o),
}
# What each function cannot use: it reads no parts (parts_url), or fetches none (cache_dir).
INAPPLICABLE = [
    ("read_manifest", "parts_url"),
    ("read_manifest", "cache_dir"),
    ("resolve", "cache_dir"),
    ("plan", "parts_url"),
    ("plan", "cache_dir"),
    ("diff", "parts_url"),
    ("diff", "cache_dir"),
    ("files", "cache_dir"),
]


def call(function: str, ref: Any, tmp_path: Path, **options: Any) -> object:
    if function == "push":
        options["_dest"] = tmp_path / f"dest-{len(list(tmp_path.glob('dest-*')))}"
    return READERS[function](ref, **options)


def test_a_pin_given_with_a_resolved_reference_is_checked(url: str) -> None:
    resolved = sepstore.resolve(url)
    with pytest.raises(sepstore.IntegrityError, match=f"{OTHER_PIN} was pinned"):
        sepstore.load(resolved, "b", digest=OTHER_PIN)
    assert sepstore.load(resolved, "b", digest=resolved.digest).begin


def test_a_mirror_given_with_a_resolved_reference_is_used(root: Path, url: str, tmp_path: Path) -> None:
    resolved = sepstore.resolve(url)
    mirror = tmp_path / "mirror"
    shutil.move(root / "parts", mirror)  # the store's own parts are gone: only the mirror has them
    psd = sepstore.load(resolved, "b", parts_url=mirror / "blake3", cache_dir=tmp_path / "cache")
    assert psd.begin
    with pytest.raises(sepstore.NotFoundError):
        sepstore.load(resolved, "b", cache_dir=tmp_path / "cache")


def test_a_resolved_reference_cannot_carry_a_manifest_other_than_its_bytes(root: Path, url: str) -> None:
    resolved = sepstore.resolve(url)
    other = sepstore.read_manifest(root, name="m", tag="v2")
    with pytest.raises(ValueError, match="manifest"):
        dataclasses.replace(resolved, manifest=other)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="digest"):
        dataclasses.replace(resolved, digest=OTHER_PIN)  # type: ignore[call-arg]
    v2 = (root / "manifests/m/v2.json").read_bytes()
    swapped = dataclasses.replace(resolved, data=v2)  # the bytes decide manifest and digest
    assert swapped.manifest == other and swapped.digest == manifest_digest(v2)


def test_a_resolved_reference_is_built_from_bytes(url: str, root: Path) -> None:
    data = Path(url).read_bytes()
    resolved = sepstore.Resolved(data, url)
    assert resolved.digest == manifest_digest(data)
    assert resolved.manifest == sepstore.read_manifest(url)
    assert resolved.parts_url == str(root / "parts/blake3")
    assert resolved == sepstore.resolve(url)
    with pytest.raises(sepstore.ManifestError):
        sepstore.Resolved(b"{}", url)


@pytest.mark.parametrize(("function", "option"), INAPPLICABLE)
def test_an_option_a_function_cannot_use_is_refused(function: str, option: str, url: str, tmp_path: Path) -> None:
    with pytest.raises(sepstore.RefError, match=rf"{function}\(\) does not take {option}="):
        call(function, url, tmp_path, **{option: tmp_path / "x"})


@pytest.mark.parametrize("function", sorted(READERS))
@pytest.mark.parametrize("option", ["name", "tag", "storage_options"])
def test_what_would_pick_another_manifest_is_refused_with_a_resolved_reference(
    function: str, option: str, url: str, tmp_path: Path
) -> None:
    value: object = {"anon": True} if option == "storage_options" else "v2"
    with pytest.raises(sepstore.RefError, match=f"{option}= cannot apply to an already-resolved reference"):
        call(function, sepstore.resolve(url), tmp_path, **{option: value})


@pytest.mark.parametrize("function", sorted(READERS))
def test_every_function_checks_a_pin_whatever_the_reference(
    function: str, root: Path, url: str, tmp_path: Path
) -> None:
    for ref in (url, sepstore.resolve(url), sepstore.ModelRef(str(root), name="m", tag="v1")):
        with pytest.raises(sepstore.IntegrityError, match="was pinned"):
            call(function, ref, tmp_path, digest=OTHER_PIN, cache_dir=None)
    assert call(function, url, tmp_path, digest=sepstore.resolve(url).digest) is not None


@pytest.mark.parametrize("function", sorted(READERS))
def test_an_unknown_option_is_a_type_error(function: str, url: str, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=rf"{function}\(\) got an unexpected keyword argument 'digets'"):
        call(function, url, tmp_path, digets=OTHER_PIN)


@pytest.mark.parametrize("function", ["plan", "diff"])
def test_options_with_a_manifest_object_are_refused(function: str, url: str, tmp_path: Path) -> None:
    manifest = sepstore.read_manifest(url)
    with pytest.raises(sepstore.RefError, match="cannot apply to a Manifest object"):
        call(function, manifest, tmp_path, digest=OTHER_PIN)
    assert call(function, manifest, tmp_path)


def test_options_left_as_none_are_not_given(url: str, tmp_path: Path) -> None:
    assert sepstore.read_manifest(url, parts_url=None, cache_dir=None, name=None, tag=None, digest=None)
    assert sepstore.load(sepstore.resolve(url), "b", name=None, storage_options=None).begin


def test_a_model_ref_carries_its_options(root: Path, tmp_path: Path) -> None:
    v1 = sepstore.ModelRef(root, name="m", tag="v1")
    assert v1.url == str(root)
    assert sepstore.read_manifest(v1) == sepstore.read_manifest(root, name="m", tag="v1")
    assert sepstore.load(v1, "b").begin
    pinned = dataclasses.replace(v1, digest=OTHER_PIN)
    with pytest.raises(sepstore.IntegrityError, match="was pinned"):
        sepstore.load(pinned, "b")
    assert sepstore.read_manifest(sepstore.ModelRef(root, name="m"), tag="v2") == sepstore.read_manifest(
        root, name="m", tag="v2"
    )  # an option the reference leaves open fills it in
    with pytest.raises(sepstore.RefError, match="tag='v2' contradicts the reference's tag='v1'"):
        sepstore.load(v1, "b", tag="v2")
    assert sepstore.load(v1, "b", tag="v1").begin  # the same value is no contradiction
    assert {v1: 1}[sepstore.ModelRef(str(root), name="m", tag="v1")] == 1  # hashable, equal by value


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"digest": "sha256:" + "0" * 64}, "digest= pins a manifest's digest"),
        ({"digest": OTHER_PIN + "\n"}, "digest= pins a manifest's digest"),
        ({"parts_url": 5}, "parts_url= is a path or URL"),
        ({"parts_url": ""}, "parts_url= is a path or URL"),
        ({"storage_options": "anon"}, "storage_options= is a mapping"),
        ({"name": "../x"}, "invalid model name"),
        ({"tag": "a/b"}, "invalid tag"),
    ],
)
def test_malformed_options_are_refused_before_anything_is_read(
    options: dict[str, Any], message: str, tmp_path: Path
) -> None:
    with pytest.raises(sepstore.StoreError, match=message):
        sepstore.ModelRef(tmp_path / "nowhere", **options)
    with pytest.raises(sepstore.StoreError, match=message):
        sepstore.load(tmp_path / "nowhere", "b", **options)


def test_name_and_tag_with_a_manifest_url_are_refused(url: str) -> None:
    with pytest.raises(sepstore.RefError, match="is a manifest; name= and tag= are for a store root"):
        sepstore.ModelRef(url, tag="v1")
    with pytest.raises(sepstore.RefError, match="is a manifest"):
        sepstore.files(url, name="m")


def test_diff_takes_a_model_ref_per_side(root: Path) -> None:
    v1, v2 = sepstore.ModelRef(root, name="m", tag="v1"), sepstore.ModelRef(root, name="m", tag="v2")
    assert sepstore.diff(v1, v2).changed
    assert not sepstore.diff(v1, v1).changed
    assert not sepstore.diff(root, root, name="m", tag="v2").changed  # options apply to both sides


def test_files_lists_part_urls_with_the_mirror_applied(url: str, tmp_path: Path) -> None:
    found = sepstore.files(url, "b e")
    assert [f.part for f in found] == ["begin", "end"]
    assert all(Path(f.url).is_file() for f in found)
    mirrored = sepstore.files(url, "b", parts_url="https://mirror.example/parts/")
    assert mirrored[0].url == f"https://mirror.example/parts/{found[0].digest[7:]}.safetensors"
    assert mirrored[0].to_dict() == {**found[0].to_dict(), "url": mirrored[0].url}


# --- errors that name the real cause -------------------------------------------------------------


def test_a_mistyped_manifest_url_says_nothing_is_there(root: Path) -> None:
    with pytest.raises(sepstore.NotFoundError, match=r"v1\.jsn: nothing there; a manifest URL ends in \.json"):
        sepstore.load(root / "manifests/m/v1.jsn")
    (root / "manifests/m/v1.jsn").write_text("{}")
    with pytest.raises(sepstore.NotFoundError, match=r"is neither a manifest \(a manifest URL ends in \.json\)"):
        sepstore.read_manifest(root / "manifests/m/v1.jsn")


def sepstore_cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sepstore", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_diff_from_the_command_line_takes_the_name_and_tags_its_hint_asks_for(root: Path) -> None:
    sepstore.dump(llama_decider, small(), root, name="other", tag="v1", quiet=True)
    asked = sepstore_cli("diff", root, root)
    assert asked.returncode == 2 and "pick one with name= (--name)" in asked.stderr
    same = sepstore_cli("diff", root, root, "--name", "m", "--tag", "v1")
    assert same.returncode == 0 and "0 parts differ" in same.stdout, same.stderr
    moved = sepstore_cli("diff", root, root, "--name", "m", "--tag", "v1", "--tag", "v2", "--json")
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout)["bytes_to_fetch"] > 0
    mixed = sepstore_cli("diff", root / "manifests/m/v1.json", root, "--name", "m", "--tag", "v2", "--json")
    assert json.loads(mixed.stdout) == json.loads(moved.stdout), mixed.stderr
    thrice = sepstore_cli("diff", root, root, "--tag", "v1", "--tag", "v2", "--tag", "v1")
    assert thrice.returncode == 2 and "--tag is given once" in thrice.stderr


def test_the_command_line_pins_a_digest(root: Path, url: str) -> None:
    good = sepstore.resolve(url).digest
    assert sepstore_cli("info", url, "--digest", good).returncode == 0
    refused = sepstore_cli("verify", root, "--name", "m", "--tag", "v1", "--digest", OTHER_PIN)
    assert refused.returncode == 1 and "was pinned" in refused.stderr


def test_diff_pins_each_side_with_digest_given_twice(root: Path) -> None:
    v1, v2 = (sepstore.resolve(root, name="m", tag=t).digest for t in ("v1", "v2"))
    sides = (root, root, "--name", "m", "--tag", "v1", "--tag", "v2")
    assert sepstore_cli("diff", *sides, "--digest", v1, "--digest", v2).returncode == 0
    swapped = sepstore_cli("diff", *sides, "--digest", v2, "--digest", v1)
    assert swapped.returncode == 1 and "was pinned" in swapped.stderr
    once = sepstore_cli("diff", *sides, "--digest", v1)
    assert once.returncode == 2 and "give it twice" in once.stderr


# --- a manifest cannot climb out of its store with percent escapes ------------------------------------


@pytest.fixture
def two_stores(tmp_path: Path) -> Iterator[tuple[StaticServer, Path]]:
    """Stores ``a`` and ``b`` on one HTTP server: ``a`` holds a copy of ``b``'s manifest."""
    www = tmp_path / "www"
    sepstore.dump(llama_decider, small(), www / "b", name="m", tag="v1", quiet=True)
    (www / "a/manifests/m").mkdir(parents=True)
    server = StaticServer(www).start()
    yield server, www
    server.stop()


@pytest.mark.parametrize(
    "parts",
    [
        "%2e%2e/%2e%2e/%2e%2e/b/parts/blake3",
        "%2E%2E/%2e%2E/../b/parts/blake3",
        "..%2f..%2f..%2fb/parts/blake3",
        "..%5c..%5c..%5cb/parts/blake3",
        "%252e%252e/%252e%252e/%252e%252e/b/parts/blake3",
    ],
)
def test_percent_encoded_dot_segments_in_parts_are_refused(
    two_stores: tuple[StaticServer, Path], parts: str, tmp_path: Path
) -> None:
    server, www = two_stores
    manifest = json.loads((www / "b/manifests/m/v1.json").read_bytes())
    (www / "a/manifests/m/v1.json").write_text(json.dumps({**manifest, "parts": parts}))
    url = f"{server.url}/a/manifests/m/v1.json"
    with pytest.raises(sepstore.ManifestError, match=r"field `parts`.*percent escape"):
        sepstore.load(url, "e", cache_dir=tmp_path / "cache")
    assert not [r for r in server.requests if "/parts/" in r.path], "no part was asked for"
