"""Assets (format version 2): a model's tokenizer, configs, template and license stored by digest
beside its parts, written by dump and convert, carried by push and pull, verified on every read,
kept by gc while referenced or leased, compared by diff; hostile paths refused; version-1
manifests untouched, and a version-1 reader refuses version 2 clearly."""

from __future__ import annotations

import datetime as dt
import json
import posixpath
import shutil
import time
from pathlib import Path, PureWindowsPath

import fsspec
import msgspec
import pytest
import safetensors.torch
import torch
from hypothesis import given
from hypothesis import strategies as st
from servers import StaticServer
from test_remote import Backend, http_root, make_backend  # noqa: F401 - http_root is a fixture make_backend uses

import sepstore
import sepstore.manifest
from sepstore.cli import main
from sepstore.convert.assets import KEPT_NAMES, KEPT_SUFFIXES, WELL_KNOWN, find_assets
from sepstore.demo import llama_decider, tiny_llama_state_dict
from sepstore.errors import IntegrityError, ManifestError, StoreError
from sepstore.hashing import digest_buffer
from sepstore.leases import holding
from sepstore.manifest import decode_manifest, encode_manifest, is_asset_path
from sepstore.signing import Claim, statement
from sepstore.store import Store

REPO = Path(__file__).resolve().parent.parent
V2_STORE = REPO / "manifests" / "examples" / "tiny-llama-v2-store"
V2_MANIFEST = V2_STORE / "manifests" / "examples" / "tiny-llama" / "v2.json"
V2_SOURCE = "sepstore.demo.tiny_llama_state_dict(layers=2, hidden=8, intermediate=16, vocab=32, seed=2)"


def v2_example_state() -> dict[str, torch.Tensor]:
    return tiny_llama_state_dict(layers=2, hidden=8, intermediate=16, vocab=32, seed=2)


def v2_example_assets() -> dict[str, bytes]:
    """The committed v2 example's assets: small files of the kinds convert keeps."""
    vocab = {f"t{i}": i for i in range(32)}
    return {
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab}}).encode(),
        "tokenizer_config.json": b'{"bos_token": "t0", "eos_token": "t1", "model_max_length": 64}\n',
        "generation_config.json": b'{"do_sample": false, "max_new_tokens": 8}\n',
        "chat_template.jinja": b"{% for m in messages %}{{ m['content'] }}{% endfor %}\n",
        "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}\n',
        "LICENSE": b"Example license: do what you like.\n",
    }


def state() -> dict[str, torch.Tensor]:
    return tiny_llama_state_dict(layers=2, hidden=16, intermediate=16, vocab=32, seed=3)


FILES = {"tokenizer.json": b'{"vocab": [1, 2, 3]}', "pooling/config.json": b"{}", "README.md": b"# tiny\n"}


def dump_with_assets(store: Path | str, files: dict[str, bytes] | None = None, **kwargs: object) -> sepstore.Manifest:
    return sepstore.dump(
        llama_decider, state(), store, name="tiny", tag="v1", assets=files or FILES, quiet=True, **kwargs
    )


# --- the format ------------------------------------------------------------------------------------


def test_a_dump_with_assets_writes_format_version_2_and_one_without_stays_version_1(tmp_path: Path) -> None:
    with_assets = dump_with_assets(tmp_path / "a")
    without = sepstore.dump(llama_decider, state(), tmp_path / "b", name="tiny", tag="v1", quiet=True)
    assert with_assets.format_version == 2
    assert without.format_version == 1
    data = (tmp_path / "b" / "manifests" / "tiny" / "v1.json").read_bytes()
    assert b'"assets"' not in data  # a version-1 manifest's bytes, as every sepstore wrote them


def test_a_version_1_reader_refuses_a_version_2_manifest_with_its_newer_format_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dump_with_assets(tmp_path / "s")
    data = (tmp_path / "s" / "manifests" / "tiny" / "v1.json").read_bytes()
    monkeypatch.setattr(sepstore.manifest, "FORMAT_VERSION", 1)
    with pytest.raises(ManifestError, match=r"`format_version` is 2, newer than the 1 this sepstore reads; upgrade"):
        decode_manifest(data, source="v2.json")


def test_a_version_1_manifest_holding_assets_is_refused(tmp_path: Path) -> None:
    dump_with_assets(tmp_path / "s")
    d = json.loads((tmp_path / "s" / "manifests" / "tiny" / "v1.json").read_bytes())
    d["format_version"] = 1
    with pytest.raises(ManifestError, match="`assets` needs `format_version` 2"):
        decode_manifest(json.dumps(d).encode(), source="m.json")


HOSTILE_PATHS = [
    "../escape",
    "a/../../escape",
    "/etc/passwd",
    "a\\..\\b",
    "a//b",
    "a/./b",
    ".",
    "",
    "tokenizer.json\n",
    "a\x00b",
    "a\x1bb",
    "C:evil",
    "dir/",
    "x" * 1025,
]


@pytest.mark.parametrize("path", HOSTILE_PATHS, ids=repr)
def test_a_hostile_asset_path_in_a_manifest_is_refused(tmp_path: Path, path: str) -> None:
    dump_with_assets(tmp_path / "s")
    d = json.loads((tmp_path / "s" / "manifests" / "tiny" / "v1.json").read_bytes())
    d["assets"][path] = d["assets"].pop("tokenizer.json")
    with pytest.raises(ManifestError, match="assets"):
        decode_manifest(json.dumps(d).encode(), source="m.json")


@pytest.mark.parametrize("path", HOSTILE_PATHS, ids=repr)
def test_a_hostile_asset_path_given_to_dump_is_refused_before_anything_is_written(tmp_path: Path, path: str) -> None:
    with pytest.raises(ManifestError, match="asset path"):
        dump_with_assets(tmp_path / "s", {path: b"x"})
    assert not (tmp_path / "s" / "parts").exists()


@pytest.mark.parametrize(
    ("paths", "needle"),
    [
        (["a", "a/b"], "as a file and as a folder"),
        (["x/y", "x/y/z/w"], "as a file and as a folder"),
        (["README.md", "readme.md"], "differ only in case"),
    ],
)
def test_asset_paths_that_cannot_all_be_files_of_one_folder_are_refused(
    tmp_path: Path, paths: list[str], needle: str
) -> None:
    dump_with_assets(tmp_path / "s")
    d = json.loads((tmp_path / "s" / "manifests" / "tiny" / "v1.json").read_bytes())
    asset = d["assets"]["README.md"]
    d["assets"] = {p: asset for p in paths}
    with pytest.raises(ManifestError, match=needle):
        decode_manifest(json.dumps(d).encode(), source="m.json")


def test_an_asset_claiming_more_than_the_size_limit_is_refused(tmp_path: Path) -> None:
    dump_with_assets(tmp_path / "s")
    d = json.loads((tmp_path / "s" / "manifests" / "tiny" / "v1.json").read_bytes())
    d["assets"]["README.md"]["size"] = sepstore.manifest.MAX_ASSET_BYTES + 1
    with pytest.raises(ManifestError, match="size"):
        decode_manifest(json.dumps(d).encode(), source="m.json")


# --- the committed version-2 example store ---------------------------------------------------------


def test_committed_v2_example_store_loads_with_its_tensors_and_assets(tmp_path: Path) -> None:
    manifest = sepstore.read_manifest(V2_MANIFEST)
    assert (manifest.format_version, manifest.n_layers) == (2, 2)
    loaded = sepstore.load(V2_MANIFEST, "f").to_dict()
    want = {}
    for key, tensor in v2_example_state().items():
        where = llama_decider(key)
        if where is not None:
            want[".".join(str(w) for w in where)] = tensor
    assert sorted(loaded) == sorted(want)
    assert all(torch.equal(loaded[key], want[key]) and loaded[key].dtype == want[key].dtype for key in want)
    got = sepstore.assets(V2_MANIFEST)
    assert {path: file.read_bytes() for path, file in got.items()} == v2_example_assets()
    assert sepstore.verify(V2_MANIFEST, quiet=True).ok


def test_dumping_the_v2_example_again_is_byte_identical(tmp_path: Path) -> None:
    committed = json.loads(V2_MANIFEST.read_bytes())["metadata"]
    again = sepstore.dump(
        llama_decider,
        v2_example_state(),
        tmp_path / "store",
        name="examples/tiny-llama",
        tag="v2",
        metadata=committed,
        assets=v2_example_assets(),
        quiet=True,
    )
    written = tmp_path / "store" / "manifests" / "examples" / "tiny-llama" / "v2.json"
    assert written.read_bytes() == V2_MANIFEST.read_bytes()
    assert encode_manifest(again) == V2_MANIFEST.read_bytes()
    for blob in [*(p for _, p in again.labelled_parts()), *again.asset_files.values()]:
        name = blob.file_name
        assert (tmp_path / "store" / "parts" / "blake3" / name).read_bytes() == (
            V2_STORE / "parts" / "blake3" / name
        ).read_bytes()


# --- dump ------------------------------------------------------------------------------------------


def test_assets_are_stored_by_digest_and_given_back_verified_from_a_local_store(tmp_path: Path) -> None:
    source = tmp_path / "tokenizer.json"
    source.write_bytes(FILES["tokenizer.json"])
    manifest = dump_with_assets(tmp_path / "s", {**FILES, "tokenizer.json": source})
    assert manifest.asset_files["tokenizer.json"].digest == digest_buffer(FILES["tokenizer.json"])
    got = sepstore.assets(tmp_path / "s")
    assert {path: file.read_bytes() for path, file in got.items()} == FILES
    assert got["README.md"].parent == tmp_path / "s" / "parts" / "blake3"  # read in place


def test_combining_dumps_merge_their_assets(tmp_path: Path) -> None:
    dump_with_assets(tmp_path / "s", {"a.json": b"1"})
    merged = dump_with_assets(tmp_path / "s", {"b.json": b"2", "a.json": b"1"})
    assert sorted(merged.asset_files) == ["a.json", "b.json"]


def test_the_same_asset_path_with_other_content_is_refused_unless_forced(tmp_path: Path) -> None:
    dump_with_assets(tmp_path / "s", {"a.json": b"1"})
    with pytest.raises(ManifestError, match=r"'a\.json' is already in this model with other content"):
        dump_with_assets(tmp_path / "s", {"a.json": b"2"})
    forced = dump_with_assets(tmp_path / "s", {"a.json": b"2"}, force=True)
    assert forced.asset_files["a.json"].digest == digest_buffer(b"2")


def test_a_corrupted_asset_in_a_local_store_is_refused(tmp_path: Path) -> None:
    manifest = dump_with_assets(tmp_path / "s")
    path = Store(tmp_path / "s").blob_path(manifest.asset_files["README.md"])
    Path(path).write_bytes(b"# evil\n")
    with pytest.raises(IntegrityError, match=r"README\.md"):
        sepstore.assets(tmp_path / "s")


# --- remote stores: S3 and HTTP ---------------------------------------------------------------------


@pytest.fixture(params=["s3", "http"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return make_backend(request.param, request, tmp_path)


def publish(tmp_path: Path, backend: Backend) -> sepstore.Manifest:
    manifest = dump_with_assets(tmp_path / "build")
    report = sepstore.push(tmp_path / "build", backend.dest, quiet=True)
    assert sorted(label for label in report.uploaded if label.startswith("asset:")) == [
        f"asset:{path}" for path in sorted(FILES)
    ]
    return manifest


def asset_object(backend: Backend, manifest: sepstore.Manifest, path: str) -> str:
    return f"{backend.fs_root}/parts/blake3/{manifest.asset_files[path].file_name}"


def test_assets_round_trip_through_a_remote_store_into_the_cache(served: Backend, tmp_path: Path) -> None:
    publish(tmp_path, served)
    cache = tmp_path / "cache"
    report = sepstore.pull(served.manifest_url(), "b", cache_dir=cache, quiet=True)
    assert sorted(label for label in report.fetched if label.startswith("asset:")) == [
        f"asset:{p}" for p in sorted(FILES)
    ]
    got = sepstore.assets(served.manifest_url(), cache_dir=cache)
    assert {path: file.read_bytes() for path, file in got.items()} == FILES
    assert all(file.is_relative_to(cache) for file in got.values())
    again = sepstore.pull(served.manifest_url(), "b", cache_dir=cache, quiet=True)
    assert again.fetched == []
    assert sorted(label for label in again.present if label.startswith("asset:")) == [
        f"asset:{p}" for p in sorted(FILES)
    ]


def test_a_corrupted_asset_on_a_remote_store_is_refused_and_not_cached(served: Backend, tmp_path: Path) -> None:
    manifest = publish(tmp_path, served)
    target = asset_object(served, manifest, "tokenizer.json")
    served.fs.pipe_file(target, b'{"vocab": [6, 6, 6]}')  # same size, other bytes
    cache = tmp_path / "cache"
    with pytest.raises(IntegrityError, match=r"tokenizer\.json"):
        sepstore.assets(served.manifest_url(), cache_dir=cache)
    assert not (cache / "parts" / "blake3" / manifest.asset_files["tokenizer.json"].file_name).exists()


def test_a_damaged_cached_asset_is_fetched_again(served: Backend, tmp_path: Path) -> None:
    manifest = publish(tmp_path, served)
    cache = tmp_path / "cache"
    first = sepstore.assets(served.manifest_url(), cache_dir=cache)
    first["README.md"].write_bytes(b"# bad!\n")  # same size
    got = sepstore.assets(served.manifest_url(), cache_dir=cache)
    assert got["README.md"].read_bytes() == FILES["README.md"]
    report = sepstore.pull(served.manifest_url(), "b", cache_dir=cache, quiet=True)
    assert report.repaired == {}
    first["README.md"].write_bytes(b"# bad!\n")
    report = sepstore.pull(served.manifest_url(), "b", cache_dir=cache, quiet=True)
    assert list(report.repaired) == ["asset:README.md"]
    assert got["README.md"].read_bytes() == FILES["README.md"]
    assert manifest.asset_files["README.md"].file_name == got["README.md"].name


def test_push_copies_assets_once_and_a_second_push_skips_them(tmp_path: Path) -> None:
    dump_with_assets(tmp_path / "build")
    sepstore.push(tmp_path / "build", tmp_path / "dest", quiet=True)
    again = sepstore.push(tmp_path / "build", tmp_path / "dest", quiet=True)
    assert again.uploaded == []
    assert {f"asset:{p}" for p in FILES} <= set(again.skipped)
    got = sepstore.assets(tmp_path / "dest")
    assert {path: file.read_bytes() for path, file in got.items()} == FILES


# --- gc and leases ---------------------------------------------------------------------------------


def test_gc_keeps_referenced_assets_and_removes_orphans_past_the_grace(tmp_path: Path) -> None:
    store = tmp_path / "s"
    old = dump_with_assets(store, {"a.json": b"old"})
    dump_with_assets(store, {"a.json": b"new"}, force=True)
    orphan = old.asset_files["a.json"].file_name
    young = sepstore.gc(store)
    assert orphan in young.young and (store / "parts" / "blake3" / orphan).exists()
    report = sepstore.gc(store, grace=0)
    assert report.removed == [orphan]
    assert not (store / "parts" / "blake3" / orphan).exists()
    assert sepstore.assets(store)["a.json"].read_bytes() == b"new"


def test_gc_keeps_an_orphan_asset_a_publisher_has_leased(tmp_path: Path) -> None:
    store = tmp_path / "s"
    old = dump_with_assets(store, {"a.json": b"old"})
    dump_with_assets(store, {"a.json": b"new"}, force=True)
    orphan = old.asset_files["a.json"]
    with holding(Store(store), "publish", [orphan.digest]):
        report = sepstore.gc(store, grace=0)
    assert report.leased == [orphan.file_name]
    assert (store / "parts" / "blake3" / orphan.file_name).exists()


# --- diff, info, signatures, convert ---------------------------------------------------------------


def test_diff_lists_changed_added_and_removed_assets_and_their_bytes(tmp_path: Path) -> None:
    store = tmp_path / "s"
    sepstore.dump(
        llama_decider, state(), store, name="tiny", tag="v1", assets={"a": b"1", "b": b"2", "c": b"3"}, quiet=True
    )
    sepstore.dump(
        llama_decider, state(), store, name="tiny", tag="v2", assets={"a": b"1", "b": b"22", "d": b"3"}, quiet=True
    )
    result = sepstore.diff(sepstore.ModelRef(store, tag="v1"), sepstore.ModelRef(store, tag="v2"))
    assert [(a.path, a.status, a.bytes) for a in result.assets] == [
        ("a", "same", 0),
        ("b", "changed", 2),
        ("c", "removed", 0),
        ("d", "added", 0),  # the node has those bytes already, as c
    ]
    assert result.changed == [] and result.differs
    assert result.bytes_to_fetch == 2
    assert result.to_dict()["assets"][1] == {"path": "b", "status": "changed", "bytes": 2}


def test_the_cli_shows_assets_in_info_and_diff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "s"
    sepstore.dump(llama_decider, state(), store, name="tiny", tag="v1", assets={"a.json": b"1"}, quiet=True)
    sepstore.dump(llama_decider, state(), store, name="tiny", tag="v2", assets={"a.json": b"2"}, quiet=True)
    assert main(["info", str(store), "--tag", "v1"]) == 0
    out = capsys.readouterr().out
    assert "assets:    1 file" in out and "a.json" in out
    assert main(["info", str(store), "--tag", "v1", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format_version"] == 2
    assert info["assets"] == [{"path": "a.json", "digest": digest_buffer(b"1"), "size": 1}]
    assert main(["diff", str(store), str(store), "--tag", "v1", "--tag", "v2"]) == 0
    out = capsys.readouterr().out
    assert "asset      changed" in out and "a.json" in out and "1 asset of 1" in out


def test_a_signature_statement_lists_the_asset_files(tmp_path: Path) -> None:
    manifest = dump_with_assets(tmp_path / "s")
    claim = Claim("tiny", "v1", digest_buffer(b"m"), dt.datetime.now(dt.timezone.utc))
    resources = msgspec.json.decode(statement(manifest, claim))["predicate"]["resources"]
    names = {r["name"] for r in resources}
    assert {f"parts/blake3/{a.file_name}" for a in manifest.asset_files.values()} <= names


def write_hf_folder(root: Path) -> None:
    """A tiny HF llama folder with a tokenizer, configs, a pooling folder, a README, a license,
    and files convert must leave out."""
    from safetensors.torch import save_file

    root.mkdir(parents=True)
    sd = tiny_llama_state_dict(layers=2, hidden=16, intermediate=16, vocab=32, seed=4)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    kept = {
        "tokenizer.json": b"{}",
        "tokenizer_config.json": b'{"chat_template": "x"}',
        "special_tokens_map.json": b"{}",
        "generation_config.json": b"{}",
        "tokenizer.model": b"\x00sp",
        "modules.json": b"[]",
        "1_Pooling/config.json": b"{}",
        "README.md": b"# card\n",
        "LICENSE": b"MIT\n",
    }
    left_out = {
        ".gitattributes": b"*",
        "onnx/model.onnx": b"onnx",
        "onnx/config.json": b"{}",
        "2_Dense/pytorch_model.bin.index.json": b"{}",
        "flax_model.msgpack": b"x",
        "2_Dense/pytorch_model.bin": b"x",
    }
    for name, data in {**kept, **left_out}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "kept.json").write_text(json.dumps(sorted(kept)))


def test_convert_keeps_the_allow_listed_files_of_a_local_hf_folder(tmp_path: Path) -> None:
    write_hf_folder(tmp_path / "hf")
    expected = [*json.loads((tmp_path / "hf" / "kept.json").read_text()), "kept.json"]
    manifest = sepstore.convert(tmp_path / "hf", tmp_path / "s", name="tiny", quiet=True)
    assert sorted(manifest.asset_files) == sorted(expected)
    got = sepstore.assets(tmp_path / "s")
    assert got["1_Pooling/config.json"].read_bytes() == b"{}"
    bare = sepstore.convert(tmp_path / "hf", tmp_path / "s2", name="tiny", assets=False, quiet=True)
    assert bare.asset_files == {} and isinstance(bare.assets, msgspec.UnsetType)


def test_convert_takes_assets_from_a_hf_folder_on_s3(moto_server: object, tmp_path: Path) -> None:
    write_hf_folder(tmp_path / "hf")
    fs = fsspec.filesystem("s3")
    bucket = f"hf-{int(time.time() * 1e6)}"
    fs.mkdir(bucket)
    fs.put(str(tmp_path / "hf"), f"{bucket}/model", recursive=True)
    manifest = sepstore.convert(f"s3://{bucket}/model", tmp_path / "s", name="tiny", quiet=True)
    assert manifest.asset_files["tokenizer.model"].digest == digest_buffer(b"\x00sp")
    assert "onnx/config.json" not in manifest.asset_files and ".gitattributes" not in manifest.asset_files


def test_convert_over_plain_http_asks_for_the_well_known_files_by_name_without_listing(tmp_path: Path) -> None:
    write_hf_folder(tmp_path / "www" / "hf")
    folder = tmp_path / "www" / "hf"
    torch_model = {"model.embed_tokens.weight": torch.zeros(4, 2)}
    safetensors.torch.save_file(torch_model, folder / "model.safetensors")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    server = StaticServer(tmp_path / "www").start()
    try:
        url = f"{server.url}/hf/model.safetensors.index.json"
        manifest = sepstore.convert(url, tmp_path / "s", name="tiny", quiet=True)
    finally:
        server.stop()
    assert sorted(manifest.asset_files) == sorted(set(WELL_KNOWN) & set(json.loads((folder / "kept.json").read_text())))
    assert not [r for r in server.requests if r.path.rstrip("/").endswith("/hf")]  # the folder is never listed


#: Kinds of file the allow-list keeps whose names vary from model to model (custom code, tiktoken
#: and YAML files, notices), so that none can be asked for by name over plain HTTP.
NO_FIXED_NAME = {".py", ".tiktoken", ".yaml", ".yml", "LICENCE", "NOTICE", "COPYING", "USE_POLICY"}


def test_the_names_asked_for_over_http_and_the_allow_list_are_kept_in_step(tmp_path: Path) -> None:
    """Every name of WELL_KNOWN is one the allow-list keeps where the folder is listed, and every kind
    of file the allow-list keeps is asked for by some name, or has no fixed name (NO_FIXED_NAME)."""
    fs = fsspec.filesystem("memory")
    root = f"/{tmp_path.name}-well-known"
    for name in WELL_KNOWN:
        fs.pipe(f"{root}/{name}", b"x")
    try:
        assert sorted(find_assets(fs, root)) == sorted(WELL_KNOWN)
    finally:
        fs.rm(root, recursive=True)
    for kind in (*KEPT_SUFFIXES, *KEPT_NAMES):
        named = any(n.endswith(kind) if kind.startswith(".") else n.upper().startswith(kind) for n in WELL_KNOWN)
        assert named != (kind in NO_FIXED_NAME), f"{kind!r}: add a file of that kind to WELL_KNOWN, or to NO_FIXED_NAME"


def test_an_allow_listed_file_over_the_size_limit_stops_convert_with_the_way_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sepstore.convert import assets as convert_assets

    write_hf_folder(tmp_path / "hf")
    monkeypatch.setattr(convert_assets, "MAX_CONVERT_ASSET_BYTES", 4)
    with pytest.raises(StoreError, match="--no-assets"):
        sepstore.convert(tmp_path / "hf", tmp_path / "s", name="tiny", quiet=True)
    assert not (tmp_path / "s" / "manifests").exists()


def test_an_http_static_server_serves_a_v2_store_copied_as_files(tmp_path: Path) -> None:
    """A store copied by hand (``cp -r``, a CDN) carries its assets in the parts folder."""
    shutil.copytree(V2_STORE, tmp_path / "www" / "store")
    server = StaticServer(tmp_path / "www").start()
    try:
        url = f"{server.url}/store/manifests/examples/tiny-llama/v2.json"
        got = sepstore.assets(url, cache_dir=tmp_path / "cache")
    finally:
        server.stop()
    assert {path: file.read_bytes() for path, file in got.items()} == v2_example_assets()


def test_verify_checks_every_asset_and_reports_a_damaged_one(tmp_path: Path) -> None:
    manifest = dump_with_assets(tmp_path / "s")
    report = sepstore.verify(tmp_path / "s", quiet=True)
    assert report.ok
    assert {c.part for c in report.checks} >= {f"asset:{p}" for p in FILES}
    Path(Store(tmp_path / "s").blob_path(manifest.asset_files["README.md"])).write_bytes(b"# bad!\n")
    report = sepstore.verify(tmp_path / "s", quiet=True)
    assert [c.part for c in report.failures] == ["asset:README.md"]


def test_files_lists_the_asset_urls_beside_the_parts(tmp_path: Path) -> None:
    manifest = dump_with_assets(tmp_path / "s")
    found = {f.part: f for f in sepstore.files(tmp_path / "s", "b")}
    readme = manifest.asset_files["README.md"]
    assert found["asset:README.md"].url == str(tmp_path / "s" / "parts" / "blake3" / readme.file_name)
    assert (found["asset:README.md"].digest, found["asset:README.md"].size) == (readme.digest, readme.size)
    assert sorted(found) == sorted(["begin", *(f"asset:{p}" for p in FILES)])


@given(st.text(alphabet="ab./\\:\x00\n ", max_size=12))
def test_an_accepted_asset_path_stays_inside_any_folder_it_is_joined_to(path: str) -> None:
    if not is_asset_path(path):
        return
    for base in ("/base/dir", "C:\\base\\dir"):
        joined = posixpath.normpath(posixpath.join("/base/dir", path))
        assert joined.startswith("/base/dir/"), path
        windows = PureWindowsPath(base, path)
        assert windows.is_relative_to(base) and ".." not in windows.parts and windows.drive in ("", "C:"), path


def test_the_cli_pull_fetches_assets_and_says_so(
    served: Backend, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(tmp_path, served)
    assert main(["pull", served.manifest_url(), "--spec", "b", "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
    assert f"fetched and verified 1 part and {len(FILES)} assets" in capsys.readouterr().out
