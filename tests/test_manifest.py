"""The manifest format: strict decoding, canonical encoding, safe `parts` locations, the committed
JSON Schema, and the committed example store that every version must still load."""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from blake3 import blake3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sepstore
import sepstore.schema
from sepstore.demo import llama_decider, tiny_llama_state_dict
from sepstore.manifest import (
    FORMAT,
    FORMAT_VERSION,
    Manifest,
    decode_manifest,
    encode_manifest,
    manifest_digest,
)

REPO = Path(__file__).resolve().parent.parent
SCHEMA_PATH = REPO / "manifests" / "schema.json"
EXAMPLE_STORE = REPO / "manifests" / "examples" / "tiny-llama-store"
EXAMPLE_MANIFEST = EXAMPLE_STORE / "manifests" / "examples" / "tiny-llama" / "v1.json"
SOURCE = "test://store/manifests/model/latest.json"

Json = dict[str, Any]
Mutation = Callable[[Json], Json]


def example_dict() -> Json:
    """A fresh copy of the committed example manifest as a plain JSON dict."""
    return json.loads(EXAMPLE_MANIFEST.read_bytes())


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


def first_tensor(d: Json) -> Json:
    return next(iter(d["begin"]["tensors"].values()))


def setter(*path: str | int, value: Any) -> Mutation:
    """A mutation that sets ``d[path[0]][path[1]]...`` to ``value``."""

    def mutate(d: Json) -> Json:
        target: Any = d
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return d

    return mutate


def deleter(key: str) -> Mutation:
    def mutate(d: Json) -> Json:
        del d[key]
        return d

    return mutate


def on_first_tensor(key: str, value: Any) -> Mutation:
    def mutate(d: Json) -> Json:
        first_tensor(d)[key] = value
        return d

    return mutate


GOOD_HEX = "0" * 64

# (mutation of a valid manifest, substrings the ManifestError's message must contain)
BAD_MANIFESTS: dict[str, tuple[Mutation, list[str]]] = {
    "stray_json_file": (lambda d: {"hello": 1}, ["`format`"]),
    "format_other": (setter("format", value="other"), ["`format`", "other"]),
    "format_null": (setter("format", value=None), ["`format`"]),
    "format_missing": (deleter("format"), ["`format`"]),
    "format_version_string": (setter("format_version", value="1"), ["`format_version`", "integer"]),
    "format_version_float": (setter("format_version", value=1.0), ["`format_version`", "integer"]),
    "format_version_bool": (setter("format_version", value=True), ["`format_version`", "integer"]),
    "format_version_null": (setter("format_version", value=None), ["`format_version`"]),
    "format_version_missing": (deleter("format_version"), ["`format_version`"]),
    "format_version_zero": (setter("format_version", value=0), ["format_version"]),
    "format_version_negative": (setter("format_version", value=-1), ["format_version"]),
    "digest_uppercase_hex": (setter("begin", "digest", value="blake3:" + "AB" * 32), ["$.begin.digest"]),
    "digest_sha256": (setter("begin", "digest", value="sha256:" + GOOD_HEX), ["$.begin.digest"]),
    "digest_short": (setter("begin", "digest", value="blake3:" + "0" * 63), ["$.begin.digest"]),
    "digest_long": (setter("begin", "digest", value="blake3:" + "0" * 65), ["$.begin.digest"]),
    "digest_bare_hex": (setter("begin", "digest", value=GOOD_HEX), ["$.begin.digest"]),
    "digest_not_a_string": (setter("begin", "digest", value=123), ["$.begin.digest"]),
    "mid_digest_bad": (setter("mid", 1, "digest", value="sha256:" + GOOD_HEX), ["$.mid[1].digest"]),
    "end_digest_bad": (setter("end", "digest", value="blake3:xyz"), ["$.end.digest"]),
    "tensor_digest_bad": (on_first_tensor("digest", "blake3:" + "G" * 64), ["$.begin.tensors", "digest"]),
    "size_negative": (setter("begin", "size", value=-1), ["$.begin.size"]),
    "size_string": (setter("begin", "size", value="600"), ["$.begin.size"]),
    "mid_size_negative": (setter("mid", 2, "size", value=-5), ["$.mid[2].size"]),
    "shape_negative_dimension": (on_first_tensor("shape", [-1, 8]), ["$.begin.tensors", "shape"]),
    "shape_not_integers": (on_first_tensor("shape", [1.5, 8]), ["$.begin.tensors", "shape"]),
    "dtype_lowercase": (on_first_tensor("dtype", "bf16"), ["$.begin.tensors", "dtype"]),
    "name_dotdot": (setter("name", value=".."), ["$.name"]),
    "name_dotdot_segment": (setter("name", value="a/../b"), ["$.name"]),
    "name_leading_dotdot": (setter("name", value="../b"), ["$.name"]),
    "name_dot_segment": (setter("name", value="a/./b"), ["$.name"]),
    "name_trailing_dot_segment": (setter("name", value="a/."), ["$.name"]),
    "name_empty_segment": (setter("name", value="a//b"), ["$.name"]),
    "name_leading_slash": (setter("name", value="/a"), ["$.name"]),
    "name_trailing_slash": (setter("name", value="a/"), ["$.name"]),
    "name_empty": (setter("name", value=""), ["$.name"]),
    "name_backslash": (setter("name", value="a\\b"), ["$.name"]),
    "name_missing": (deleter("name"), ["`name`"]),
    "parts_empty": (setter("parts", value=""), ["$.parts"]),
    "parts_with_query": (setter("parts", value="../../parts?x=1"), ["`parts`"]),
    "parts_with_backslash": (setter("parts", value="..\\..\\parts"), ["`parts`"]),
    "mid_null": (setter("mid", value=None), ["$.mid"]),
    "mid_missing": (deleter("mid"), ["`mid`"]),
    "metadata_non_string_value": (setter("metadata", "source", value=1), ["$.metadata"]),
    "unknown_top_level_field": (setter("extra", value=1), ["`extra`"]),
    "unknown_part_field": (setter("begin", "extra", value=1), ["`extra`", "$.begin"]),
    "unknown_tensor_field": (on_first_tensor("extra", 1), ["`extra`", "$.begin.tensors"]),
    "tensor_named_metadata": (setter("begin", "tensors", "__metadata__", value=None), ["$.begin.tensors"]),
}

NOT_MANIFESTS: dict[str, bytes] = {
    "empty": b"",
    "not_json": b"this is not json",
    "truncated_json": b'{"format": "sepweight", ',
    "invalid_utf8": b"\xff\xfe\x00",
    "json_array": b'["sepweight", 1]',
    "json_string": b'"sepweight"',
    "json_number": b"1",
    "json_null": b"null",
}


def assert_manifest_error(data: bytes, needles: list[str], *, source: str = SOURCE) -> None:
    with pytest.raises(sepstore.ManifestError) as info:
        decode_manifest(data, source=source)
    message = str(info.value)
    assert source in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


# --- strict decoding ---------------------------------------------------------------------------


def test_the_example_manifest_is_valid_before_mutation() -> None:
    manifest = decode_manifest(EXAMPLE_MANIFEST.read_bytes(), source=SOURCE)
    assert manifest.format_version == 1  # the committed example is a version-1 manifest, read as it is
    assert manifest.n_layers == 3


@pytest.mark.parametrize(("mutate", "needles"), BAD_MANIFESTS.values(), ids=BAD_MANIFESTS.keys())
def test_bad_manifest_field_is_refused_naming_the_field(mutate: Mutation, needles: list[str]) -> None:
    assert_manifest_error(encode(mutate(example_dict())), needles)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 99, 2**70])
def test_higher_format_version_is_refused_with_upgrade_hint(version: int) -> None:
    d = example_dict()
    d["format_version"] = version
    assert_manifest_error(encode(d), ["`format_version`", str(version), "upgrade"])


@pytest.mark.parametrize("data", NOT_MANIFESTS.values(), ids=NOT_MANIFESTS.keys())
def test_bytes_that_are_not_a_json_object_are_refused(data: bytes) -> None:
    assert_manifest_error(data, ["JSON"])


@pytest.mark.parametrize(
    "name",
    ["meta-llama/Llama-3-8B", "model", "a.b/c_d-e", "...", "a/.hidden", "x/y/z"],
)
def test_model_names_of_valid_segments_are_accepted(name: str) -> None:
    d = example_dict()
    d["name"] = name
    assert decode_manifest(encode(d), source=SOURCE).name == name


@pytest.mark.parametrize(
    "field",
    ["format_other", "format_version_string", "digest_sha256", "size_negative", "name_dotdot_segment"],
)
def test_read_manifest_refuses_a_bad_manifest_file(tmp_path: Path, field: str) -> None:
    mutate, needles = BAD_MANIFESTS[field]
    path = tmp_path / "store" / "manifests" / "model" / "latest.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(encode(mutate(example_dict())))
    with pytest.raises(sepstore.ManifestError) as info:
        sepstore.read_manifest(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message


def test_read_manifest_refuses_a_stray_json_file_in_a_store(tmp_path: Path) -> None:
    path = tmp_path / "store" / "manifests" / "model" / "latest.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"hello": 1}')
    with pytest.raises(sepstore.ManifestError, match=r"`format`.*not a sepstore manifest"):
        sepstore.read_manifest(path)
    with pytest.raises(sepstore.ManifestError, match="`format`"):
        sepstore.read_manifest(tmp_path / "store", name="model", tag="latest")
    with pytest.raises(sepstore.ManifestError, match="`format`"):
        sepstore.load(path)


def test_read_manifest_refuses_a_file_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_bytes(b"\x00\x01 definitely not json")
    with pytest.raises(sepstore.ManifestError, match="not a JSON object"):
        sepstore.read_manifest(path)


@pytest.mark.parametrize("where", ["format", "unknown_field", "config"])
def test_deeply_nested_json_is_a_manifest_error_not_a_recursion_error(where: str) -> None:
    deep = "[" * 5000 + "]" * 5000
    if where == "format":
        data = '{"format": ' + deep + "}"
    elif where == "unknown_field":
        data = '{"x": ' + deep + ', "format": "sepweight", "format_version": 1}'
    else:
        d = example_dict()
        d["config"] = {"nested": "PLACEHOLDER"}
        data = json.dumps(d).replace('"PLACEHOLDER"', deep)
    with pytest.raises(sepstore.ManifestError):
        decode_manifest(data.encode(), source=SOURCE)


# --- where parts may live ------------------------------------------------------------------------


@pytest.fixture
def local_store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    state = tiny_llama_state_dict(layers=2, hidden=8, intermediate=16, vocab=16, seed=3)
    sepstore.dump(llama_decider, state, root)
    return root


def rewrite_parts(manifest_path: Path, parts: str) -> None:
    d = json.loads(manifest_path.read_bytes())
    d["parts"] = parts
    manifest_path.write_bytes(encode(d))


def manifest_of(root: Path) -> Path:
    return root / "manifests" / "model" / "latest.json"


@pytest.mark.parametrize(
    "parts",
    [
        "../../../../etc",
        "../../..",
        "../../../store-evil/parts/blake3",
        "../../parts/../../../elsewhere",
    ],
)
def test_relative_parts_climbing_out_of_the_store_is_refused(local_store: Path, tmp_path: Path, parts: str) -> None:
    path = manifest_of(local_store)
    rewrite_parts(path, parts)
    with pytest.raises(sepstore.ManifestError, match=r"`parts`.*outside the store"):
        sepstore.read_manifest(path)
    with pytest.raises(sepstore.ManifestError, match=r"`parts`.*outside the store"):
        sepstore.load(path, "b", cache_dir=tmp_path / "cache")


def test_relative_parts_stay_in_the_store_even_when_the_name_disagrees_with_the_folder(local_store: Path) -> None:
    path = manifest_of(local_store)
    d = json.loads(path.read_bytes())
    d["name"], d["parts"] = "other", "../../../../etc"
    path.write_bytes(encode(d))
    with pytest.raises(sepstore.ManifestError, match=r"`parts`.*outside the store"):
        sepstore.read_manifest(path)


def test_a_manifest_outside_a_store_reaches_parts_only_below_itself(local_store: Path, tmp_path: Path) -> None:
    lone = tmp_path / "lone.json"
    lone.write_bytes(manifest_of(local_store).read_bytes())
    with pytest.raises(sepstore.ManifestError, match=r"`parts`.*outside the store"):
        sepstore.read_manifest(lone)
    rewrite_parts(lone, "store/parts/blake3")
    assert sepstore.verify(lone).ok


@pytest.mark.parametrize("parts", ["http://evil/parts", "https://evil/parts/blake3", "s3://bucket/parts", "memory://x"])
def test_parts_url_of_another_protocol_than_a_local_manifest_is_refused(
    local_store: Path, tmp_path: Path, parts: str
) -> None:
    path = manifest_of(local_store)
    rewrite_parts(path, parts)
    with pytest.raises(sepstore.ManifestError, match=r"`parts`.*another protocol"):
        sepstore.read_manifest(path)
    with pytest.raises(sepstore.ManifestError, match=r"`parts`.*another protocol"):
        sepstore.load(path, "b", cache_dir=tmp_path / "cache")


@pytest.fixture
def memory_store() -> Iterator[str]:
    root = f"memory://sepstore-test-{uuid.uuid4().hex}"
    state = tiny_llama_state_dict(layers=2, hidden=8, intermediate=16, vocab=16, seed=4)
    sepstore.dump(llama_decider, state, root)
    yield root
    fsspec.filesystem("memory").rm(root, recursive=True)


@pytest.mark.parametrize(
    ("parts", "why"),
    [
        ("/etc", "another protocol"),
        ("file:///etc", "another protocol"),
        ("http://evil/parts", "another protocol"),
        ("../../../../etc", "outside the store"),
        ("../../../elsewhere/parts/blake3", "outside the store"),
    ],
)
def test_remote_manifest_cannot_point_parts_at_local_files_or_outside_its_store(
    memory_store: str, parts: str, why: str
) -> None:
    fs = fsspec.filesystem("memory")
    url = f"{memory_store}/manifests/model/latest.json"
    d = json.loads(fs.cat(url))
    d["parts"] = parts
    fs.pipe(url, encode(d))
    with pytest.raises(sepstore.ManifestError, match=f"`parts`.*{why}"):
        sepstore.read_manifest(url)


def test_remote_manifest_with_its_relative_parts_loads(memory_store: str, tmp_path: Path) -> None:
    psd = sepstore.load(f"{memory_store}/manifests/model/latest.json", "b 0-1", cache_dir=tmp_path / "cache")
    assert psd.begin is not None and sorted(psd.mid) == [0]


@pytest.mark.parametrize("parts", ["../../parts/blake3", "../../parts/blake3/", "../../../store/parts/blake3"])
def test_relative_parts_inside_the_store_loads(local_store: Path, tmp_path: Path, parts: str) -> None:
    path = manifest_of(local_store)
    rewrite_parts(path, parts)
    assert sepstore.read_manifest(path).parts == parts
    psd = sepstore.load(path, cache_dir=tmp_path / "cache")
    assert psd.begin is not None and psd.end is not None and sorted(psd.mid) == [0, 1]


@pytest.mark.parametrize("parts", ["http://evil/parts", "../../../../etc"])
def test_parts_url_override_reads_parts_from_a_trusted_location(local_store: Path, tmp_path: Path, parts: str) -> None:
    path = manifest_of(local_store)
    rewrite_parts(path, parts)
    mirror = tmp_path / "mirror"
    (local_store / "parts").rename(mirror)
    psd = sepstore.load(path, parts_url=str(mirror / "blake3"), cache_dir=tmp_path / "cache")
    assert psd.begin is not None and sorted(psd.mid) == [0, 1]


# --- the committed JSON Schema ---------------------------------------------------------------------

REGENERATE = "python -m sepstore.schema > manifests/schema.json"


def check_schema_fresh(committed: str, rendered: str) -> None:
    assert committed == rendered, f"manifests/schema.json is stale; regenerate it: {REGENERATE}"


def test_committed_json_schema_is_up_to_date() -> None:
    check_schema_fresh(SCHEMA_PATH.read_text(encoding="utf-8"), sepstore.schema.render())


def test_stale_json_schema_fails_with_the_command_that_regenerates_it() -> None:
    stale = json.loads(sepstore.schema.render())
    stale["$defs"]["Manifest"]["properties"].pop("config")
    with pytest.raises(AssertionError, match=re.escape(REGENERATE)):
        check_schema_fresh(json.dumps(stale), sepstore.schema.render())


def test_json_schema_describes_the_manifest_fields() -> None:
    schema = json.loads(sepstore.schema.render())
    manifest = schema["$defs"]["Manifest"]
    assert {"format", "format_version", "name", "parts", "begin", "mid", "end"} <= set(manifest["properties"])
    assert manifest["properties"]["format"] == {"enum": [FORMAT]}
    assert schema["$defs"]["Part"]["properties"]["digest"]["pattern"] == r"^blake3:[0-9a-f]{64}$(?!\n)"


# --- format compatibility: the committed example store ---------------------------------------------


def expected_example_tensors() -> tuple[
    dict[str, torch.Tensor], list[dict[str, torch.Tensor]], dict[str, torch.Tensor]
]:
    state = tiny_llama_state_dict(layers=3, hidden=8, intermediate=16, vocab=32, seed=1)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    begin: dict[str, torch.Tensor] = {}
    mid: list[dict[str, torch.Tensor]] = [{} for _ in range(3)]
    end: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        placement = llama_decider(key)
        if placement is None:
            continue
        if placement[0] == "begin":
            begin[placement[1]] = tensor
        elif placement[0] == "end":
            end[placement[1]] = tensor
        else:
            mid[int(placement[1])][placement[2]] = tensor
    return begin, mid, end


def assert_same_tensors(got: dict[str, torch.Tensor] | None, want: dict[str, torch.Tensor]) -> None:
    assert got is not None
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key


def test_committed_example_store_still_loads_with_its_original_tensors(tmp_path: Path) -> None:
    manifest = sepstore.read_manifest(EXAMPLE_MANIFEST)
    assert manifest.n_layers == 3
    psd = sepstore.load(EXAMPLE_MANIFEST, "f", cache_dir=tmp_path / "cache")
    begin, mid, end = expected_example_tensors()
    assert_same_tensors(psd.begin, begin)
    assert sorted(psd.mid) == [0, 1, 2]
    for layer in range(3):
        assert_same_tensors(psd.mid[layer], mid[layer])
    assert_same_tensors(psd.end, end)
    assert "self_attn.rotary_emb.inv_freq" not in psd.mid[0]


def test_committed_example_store_loads_from_its_root_by_name_and_tag(tmp_path: Path) -> None:
    psd = sepstore.load(EXAMPLE_STORE, "1-3 e", name="examples/tiny-llama", tag="v1", cache_dir=tmp_path / "cache")
    _, mid, end = expected_example_tensors()
    assert psd.begin is None
    assert_same_tensors(psd.mid[1], mid[1])
    assert_same_tensors(psd.mid[2], mid[2])
    assert_same_tensors(psd.end, end)


def test_committed_example_store_verifies(tmp_path: Path) -> None:
    report = sepstore.verify(EXAMPLE_MANIFEST, cache_dir=tmp_path / "cache")
    assert report.ok, report.failures
    assert len(report.checks) == 5  # begin, 3 layers, end
    assert report.manifest_digest == manifest_digest(EXAMPLE_MANIFEST.read_bytes())


def test_dumping_the_example_tensors_again_writes_the_committed_parts_byte_for_byte(tmp_path: Path) -> None:
    """The part writer is deterministic across sepstore versions: same tensors, same digests."""
    state = tiny_llama_state_dict(layers=3, hidden=8, intermediate=16, vocab=32, seed=1)
    again = sepstore.dump(llama_decider, state, tmp_path / "store", name="examples/tiny-llama", tag="v1", quiet=True)
    committed = sepstore.read_manifest(EXAMPLE_MANIFEST)
    assert [(label, part.digest) for label, part in again.labelled_parts()] == [
        (label, part.digest) for label, part in committed.labelled_parts()
    ]
    for _, part in committed.labelled_parts():
        hex_ = part.digest.removeprefix("blake3:")
        written = tmp_path / "store" / "parts" / "blake3" / f"{hex_}.safetensors"
        assert written.read_bytes() == (EXAMPLE_STORE / "parts" / "blake3" / f"{hex_}.safetensors").read_bytes()


def test_committed_example_manifest_is_in_canonical_encoding() -> None:
    data = EXAMPLE_MANIFEST.read_bytes()
    assert encode_manifest(decode_manifest(data, source=str(EXAMPLE_MANIFEST))) == data


# --- encoding round trip ----------------------------------------------------------------------------


@pytest.fixture
def dumped(tmp_path: Path) -> tuple[Manifest, Path]:
    state = tiny_llama_state_dict(layers=3, hidden=8, intermediate=16, vocab=16, seed=5)
    root = tmp_path / "store"
    manifest = sepstore.dump(llama_decider, state, root, name="org/tiny", tag="v1")
    return manifest, root / "manifests" / "org" / "tiny" / "v1.json"


def test_encode_then_decode_gives_back_the_same_manifest(dumped: tuple[Manifest, Path]) -> None:
    manifest, _ = dumped
    assert decode_manifest(encode_manifest(manifest), source=SOURCE) == manifest
    example = decode_manifest(EXAMPLE_MANIFEST.read_bytes(), source=SOURCE)
    assert decode_manifest(encode_manifest(example), source=SOURCE) == example


def test_encoding_is_deterministic_and_is_what_dump_wrote(dumped: tuple[Manifest, Path]) -> None:
    manifest, path = dumped
    first = encode_manifest(manifest)
    assert encode_manifest(manifest) == first
    assert encode_manifest(decode_manifest(first, source=SOURCE)) == first
    assert path.read_bytes() == first
    assert first.endswith(b"\n")


def test_encoding_does_not_depend_on_dict_insertion_order(dumped: tuple[Manifest, Path]) -> None:
    manifest, _ = dumped
    d = json.loads(encode_manifest(manifest))
    d["metadata"] = dict(reversed(list({"b": "2", "a": "1", **d["metadata"]}.items())))
    d["config"] = {"z": 1, "a": {"y": 2, "b": 3}}
    shuffled = {key: d[key] for key in reversed(list(d))}
    one = decode_manifest(encode(d), source=SOURCE)
    other = decode_manifest(encode(shuffled), source=SOURCE)
    assert encode_manifest(one) == encode_manifest(other)


def test_manifest_digest_is_blake3_of_the_encoded_bytes(dumped: tuple[Manifest, Path]) -> None:
    manifest, path = dumped
    data = encode_manifest(manifest)
    assert manifest_digest(data) == "blake3:" + blake3(data).hexdigest()
    assert sepstore.resolve(path).digest == manifest_digest(data)


def test_pinned_manifest_digest_is_checked(dumped: tuple[Manifest, Path]) -> None:
    manifest, path = dumped
    good = manifest_digest(encode_manifest(manifest))
    assert sepstore.read_manifest(path, digest=good) == manifest
    with pytest.raises(sepstore.IntegrityError):
        sepstore.read_manifest(path, digest="blake3:" + GOOD_HEX)


# --- property: decoding never raises anything but ManifestError --------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats()
    | st.text()
    | st.sampled_from(["sepweight", "blake3:" + GOOD_HEX, "..", "a/b", "BF16", ""])
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30,
)
MANIFEST_FIELDS = ["format", "format_version", "name", "parts", "begin", "mid", "end", "config", "metadata"]


def paths_of(value: Any, prefix: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    """Every path to a value inside a JSON document (the root excluded)."""
    items: list[tuple[str | int, Any]] = []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    for key, child in items:
        yield (*prefix, key)
        yield from paths_of(child, (*prefix, key))


EXAMPLE_PATHS = sorted(paths_of(example_dict()), key=repr)


@st.composite
def mutated_manifests(draw: st.DrawFn) -> Any:
    """The valid example with one value replaced by random JSON, or removed."""
    d = example_dict()
    path = draw(st.sampled_from(EXAMPLE_PATHS))
    parent: Any = d
    for key in path[:-1]:
        parent = parent[key]
    if draw(st.booleans()):
        parent[path[-1]] = draw(json_values)
    elif isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent.pop(path[-1])
    return d


envelopes = st.fixed_dictionaries(
    {"format": st.just(FORMAT), "format_version": st.just(1) | json_values},
    optional={field: json_values for field in MANIFEST_FIELDS[2:]},
)


def decodes_or_refuses(data: bytes) -> None:
    with contextlib.suppress(sepstore.ManifestError):
        assert isinstance(decode_manifest(data, source=SOURCE), Manifest)


PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.binary(max_size=2000))
def test_random_bytes_decode_or_raise_only_manifest_error(data: bytes) -> None:
    decodes_or_refuses(data)


@PROPERTY
@given(json_values | envelopes | mutated_manifests())
def test_random_json_decodes_or_raises_only_manifest_error(value: Any) -> None:
    decodes_or_refuses(json.dumps(value).encode())


@PROPERTY
@given(mutated_manifests())
def test_a_manifest_that_decodes_round_trips(value: Any) -> None:
    try:
        manifest = decode_manifest(json.dumps(value).encode(), source=SOURCE)
    except sepstore.ManifestError:
        return
    assert decode_manifest(encode_manifest(manifest), source=SOURCE) == manifest
