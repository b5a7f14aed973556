"""One conformance suite for every home of a store (as zarr's ``StoreTests``): local disk,
``memory://``, S3 (moto), read-only HTTP (written through local disk, read over aiohttp) and an OCI
registry (distribution). Each test checks what a store claims it can do, and that what it lacks is
refused with a :class:`StoreError` naming the store."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import msgspec
import pytest
import torch
from registry import DistributionRegistry
from servers import StaticServer

import sepstore
from sepstore.backends import RangeBody
from sepstore.demo import llama_decider, tiny_llama_state_dict
from sepstore.errors import IntegrityError, NotFoundError, StoreError
from sepstore.manifest import Blob, Manifest, decode_manifest, encode_manifest
from sepstore.store import Store
from sepstore.stores.base import CAPABILITIES, Blobs
from sepstore.stores.fsspec import FsspecStore, HttpStore, PartsFolder
from sepstore.stores.local import LocalStore
from sepstore.stores.registry import RegistryStore
from sepstore.tensors import raw_bytes

HOMES = ["local", "memory", "s3", "http", "oci"]
#: What each home claims: its class, then can_list, can_list_blobs, conditional_writes,
#: server_side_copy, can_delete and read_only.
CLAIMS = {
    "local": (LocalStore, True, True, False, False, True, False),
    "memory": (FsspecStore, True, True, False, False, True, False),
    "s3": (FsspecStore, True, True, True, True, True, False),
    "http": (HttpStore, False, False, False, False, False, True),
    "oci": (RegistryStore, True, False, False, False, True, False),
}
KEY_ID = "ab" * 32


@dataclass(frozen=True)
class Model:
    """A tiny dumped model: its manifest and each part's and asset's local file."""

    data: bytes
    manifest: Manifest
    files: dict[str, Path]

    @property
    def blobs(self) -> list[Blob]:
        return [blob for _, blob in [*self.manifest.labelled_parts(), *self.manifest.labelled_assets()]]


@dataclass(frozen=True)
class Home:
    """The store under test, and the store its content is written through (the same one, except
    for HTTP, which is written on the local disk it serves)."""

    kind: str
    store: Store
    writer: Store


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    root = tmp_path_factory.mktemp("conformance-model")
    sd = tiny_llama_state_dict(layers=2, hidden=16, intermediate=16, vocab=32, seed=7)
    sepstore.dump(llama_decider, sd, root, name="conf/model", tag="v1", quiet=True)
    data = (root / "manifests" / "conf" / "model" / "v1.json").read_bytes()
    manifest = decode_manifest(data, source="conformance")
    files = {b.file_name: root / "parts" / "blake3" / b.file_name for _, b in manifest.labelled_parts()}
    return Model(data, manifest, files)


@pytest.fixture(params=HOMES)
def home(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Home]:
    kind = request.param
    if kind == "local":
        store = Store(tmp_path / "store")
        yield Home(kind, store, store)
    elif kind == "memory":
        store = Store(f"memory://conformance-{uuid.uuid4().hex}/store")
        yield Home(kind, store, store)
    elif kind == "s3":
        request.getfixturevalue("moto_server")
        bucket = f"conformance-{uuid.uuid4().hex[:12]}"
        fsspec.filesystem("s3").mkdir(bucket)
        store = Store(f"s3://{bucket}/store")
        yield Home(kind, store, store)
    elif kind == "http":
        server = StaticServer(tmp_path).start()
        try:
            yield Home(kind, Store(f"{server.url}/store"), Store(tmp_path / "store"))
        finally:
            server.stop()
    else:
        registry: DistributionRegistry = request.getfixturevalue("plain_registry")
        store = Store(f"oci://{registry.host}/conformance/r{uuid.uuid4().hex[:12]}")
        yield Home(kind, store, store)


def _publish(home: Home, model: Model, data: bytes | None = None, *, create: bool = False) -> bool:
    for blob in model.blobs:
        home.writer.put_blob_file(str(model.files[blob.file_name]), blob)
    return home.writer.write_manifest_bytes("conf/model", "v1", data or model.data, create=create)


def _other(model: Model, note: str) -> bytes:
    """Another manifest of the same model (same parts), so a tag can be moved to it."""
    return encode_manifest(msgspec.structs.replace(model.manifest, metadata={**model.manifest.metadata, "note": note}))


def test_each_home_opens_as_its_implementation_and_claims_its_capabilities(home: Home) -> None:
    cls, *claims = CLAIMS[home.kind]
    assert type(home.store) is cls
    flags = home.store.capabilities()
    assert list(flags) == list(CAPABILITIES) and flags["ranged_reads"] is True
    named = ["can_list", "can_list_blobs", "conditional_writes", "server_side_copy", "can_delete", "read_only"]
    assert [flags[f] for f in named] == claims


def test_a_blob_written_is_found_sized_read_in_ranges_and_hashed(home: Home, model: Model) -> None:
    blob = max(model.blobs, key=lambda b: b.size)
    path = model.files[blob.file_name]
    assert not home.store.has_blob(blob) and home.store.blob_size(blob) is None
    assert home.writer.put_blob_file(str(path), blob) is True
    assert home.writer.put_blob_file(str(path), blob) is False  # content-addressed: never written twice
    assert home.store.has_blob(blob) and home.store.blob_size(blob) == blob.size
    whole = path.read_bytes()
    assert home.store.read_blob_range(blob, 0, blob.size) == whole
    assert home.store.read_blob_range(blob, 10, 123) == whole[10:123]
    assert home.store.read_blob_range(blob, 5, 5) == b""
    assert home.store.digest_blob(blob) == blob.digest
    assert home.store.blob_url(blob).startswith(("/", "memory://", "s3://", "http://"))


def test_a_manifest_reads_back_byte_for_byte_and_create_never_replaces(home: Home, model: Model) -> None:
    with pytest.raises(NotFoundError):
        home.store.read_manifest_bytes("conf/model", "v1")
    assert not home.store.has_manifest("conf/model", "v1")
    assert _publish(home, model, create=True) is True
    assert home.store.read_manifest_bytes("conf/model", "v1") == model.data
    assert home.store.has_manifest("conf/model", "v1")
    assert _publish(home, model, _other(model, "late"), create=True) is False
    assert home.store.read_manifest_bytes("conf/model", "v1") == model.data
    assert "v1" in home.store.manifest_url("conf/model", "v1")
    with pytest.raises(StoreError, match="invalid tag"):
        home.store.manifest_url("conf/model", "../v1")


def test_listing_works_where_claimed_and_is_refused_clearly_elsewhere(home: Home, model: Model) -> None:
    _publish(home, model)
    if home.store.can_list:
        assert home.store.list_manifests() == [("conf/model", "v1")]
    else:
        with pytest.raises(StoreError, match="not listed"):
            home.store.list_manifests()
    if home.store.can_list_blobs:
        names = {str(e["name"]).rsplit("/", 1)[-1] for e in home.store.list_blobs()}
        assert names == {b.file_name for b in model.blobs}
        entry = home.store.entry(str(home.store.list_blobs()[0]["name"]))
        assert entry is not None and entry["size"] in {b.size for b in model.blobs}
    else:
        with pytest.raises(StoreError, match="lacks"):
            home.store.list_blobs()
        with pytest.raises(StoreError, match="lacks"):
            sepstore.gc(home.store)


def test_conditional_writes_refuse_a_stale_version_where_claimed(home: Home, model: Model) -> None:
    _publish(home, model)
    data, version = home.store.read_manifest_version("conf/model", "v1")
    assert data == model.data
    if not home.store.conditional_writes:
        assert version is None
        return
    assert version is not None
    assert home.writer.write_manifest_bytes("conf/model", "v1", _other(model, "a"), if_version=version)
    assert not home.writer.write_manifest_bytes("conf/model", "v1", _other(model, "b"), if_version=version)
    assert home.store.read_manifest_bytes("conf/model", "v1") == _other(model, "a")


def test_deletion_works_where_claimed_and_is_refused_clearly_elsewhere(home: Home, model: Model) -> None:
    blob = model.blobs[0]
    home.writer.put_blob_file(str(model.files[blob.file_name]), blob)
    if home.store.can_delete:
        home.store.remove_blob(blob)
        assert not home.store.has_blob(blob)
        home.store.remove_blob(blob)  # one already gone is fine
    else:
        with pytest.raises(StoreError, match="lacks"):
            home.store.remove_blob(blob)
        assert home.store.has_blob(blob)


@pytest.mark.parametrize("home", ["http"], indirect=True)  # the read-only home; the others' writes are tested above
def test_a_read_only_store_refuses_every_write_clearly(home: Home, model: Model) -> None:
    assert home.store.read_only
    blob = model.blobs[0]
    with pytest.raises(StoreError, match="lacks writes"):
        home.store.put_blob_file(str(model.files[blob.file_name]), blob)
    with pytest.raises(StoreError, match="lacks writes"):
        home.store.write_manifest_bytes("conf/model", "v1", model.data)
    with pytest.raises(StoreError, match="lacks writes"):
        home.store.write_signature_bytes("conf/model", "v1", KEY_ID, b"{}")


def test_signatures_are_written_read_and_listed(home: Home, model: Model) -> None:
    _publish(home, model)
    bundle = b'{"mediaType":"test"}'
    home.writer.write_signature_bytes("conf/model", "v1", KEY_ID, bundle)
    assert home.store.read_signature_bytes("conf/model", "v1", KEY_ID) == bundle
    with pytest.raises(NotFoundError):
        home.store.read_signature_bytes("conf/model", "v1", "cd" * 32)
    if home.store.can_list:
        assert home.store.list_signatures("conf/model", "v1") == [KEY_ID]
    else:
        with pytest.raises(StoreError, match="lacks listing"):
            home.store.list_signatures("conf/model", "v1")


def test_leases_round_trip_where_gc_can_run(home: Home) -> None:
    lease_id = "publish-0123456789abcdef"
    if not (home.store.can_list_blobs and home.store.can_delete):
        assert home.store.list_leases() == []  # gc deletes nothing here, so no lease is needed
        return
    home.store.put_lease(lease_id, b"{}")
    assert home.store.read_lease(lease_id) == b"{}"
    assert home.store.list_leases() == [lease_id]
    home.store.delete_lease(lease_id)
    assert home.store.read_lease(lease_id) is None and home.store.list_leases() == []


def test_a_store_published_through_the_interface_loads_as_dumped(home: Home, model: Model) -> None:
    _publish(home, model)
    resolved = sepstore.resolve(home.store.manifest_url("conf/model", "v1"))
    assert resolved.data == model.data
    assert sepstore.verify(resolved, quiet=True).ok


@pytest.mark.parametrize("via", ["store", "mirror"])
def test_a_pull_reads_every_part_through_the_ranged_read_of_its_parts_location(
    home: Home, model: Model, via: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts are read where the manifest came from (the store itself), or from a mirror (``parts_url``:
    a folder of part files, or a registry repository), only through ``Blobs.open_blob_range``."""
    _publish(home, model)
    if via == "store":
        name = None if home.kind == "oci" else "conf/model"  # a repository holds one model
        resolved = sepstore.resolve(home.store.url, name=name, tag="v1")
        expected: type[Blobs] = type(home.store)
    else:
        resolved = sepstore.resolve(home.store.manifest_url("conf/model", "v1"), parts_url=home.store.parts_url)
        expected = RegistryStore if home.kind == "oci" else PartsFolder
    parts = resolved.parts
    assert type(parts) is expected and parts.parts_url == resolved.parts_url
    opened: list[str] = []
    read = type(parts).open_blob_range

    def counted(self: Blobs, blob: Blob, start: int, end: int) -> RangeBody:
        opened.append(blob.file_name)
        return read(self, blob, start, end)

    monkeypatch.setattr(type(parts), "open_blob_range", counted)
    report = sepstore.pull(resolved, cache_dir=tmp_path / "cache", quiet=True)
    if parts.local:  # read in place
        assert opened == [] and report.fetched == []
    else:
        assert set(opened) == {b.file_name for b in model.blobs}
        assert sorted(report.fetched) == sorted(label for label, _ in model.manifest.labelled_parts())
    for label, part in model.manifest.labelled_parts():
        assert Path(report.paths[label]).read_bytes() == model.files[part.file_name].read_bytes()
        assert resolved.part_url(part) == parts.blob_url(part)


def test_dump_writes_into_every_writable_home_through_the_interface(home: Home) -> None:
    sd = tiny_llama_state_dict(layers=2, hidden=16, intermediate=16, vocab=32, seed=11)
    if home.store.read_only:
        with pytest.raises(StoreError, match="lacks writes"):
            sepstore.dump(llama_decider, sd, home.store.url, name="conf/dumped", tag="v1", quiet=True)
        return
    sepstore.dump(llama_decider, sd, home.store.url, name="conf/dumped", tag="v1", quiet=True)
    url = home.store.manifest_url("conf/dumped", "v1")
    loaded = sepstore.load(url).to_dict()
    assert len(loaded) == len(sd) and sepstore.verify(url, quiet=True).ok
    assert sorted(map(_fingerprint, loaded.values())) == sorted(map(_fingerprint, sd.values()))


def _fingerprint(tensor: torch.Tensor) -> bytes:
    return bytes(raw_bytes(tensor))


def test_a_registry_store_is_a_repository_and_refuses_missing_or_damaged_blobs(
    plain_registry: DistributionRegistry, model: Model, tmp_path: Path
) -> None:
    with pytest.raises(StoreError, match="without a tag"):
        Store(f"oci://{plain_registry.host}/conformance/tagged:v1")
    store = Store(f"oci://{plain_registry.host}/conformance/r{uuid.uuid4().hex[:12]}")
    with pytest.raises(NotFoundError, match="no such repository"):
        store.require()
    with pytest.raises(StoreError, match="upload its blob first"):
        store.write_manifest_bytes("conf/model", "v1", model.data)
    for blob in model.blobs:
        store.put_blob_file(str(model.files[blob.file_name]), blob)
    assert store.write_manifest_bytes("conf/model", "v1", model.data)
    with pytest.raises(NotFoundError, match="holds model 'conf/model'"):
        store.read_manifest_bytes("other/model", "v1")
    damaged = model.files[model.blobs[0].file_name].read_bytes()
    spoilt = tmp_path / "spoilt"
    spoilt.write_bytes(damaged[:-1] + bytes([damaged[-1] ^ 1]))
    with pytest.raises(IntegrityError, match="not uploaded"):
        store.put_blob_file(str(spoilt), model.blobs[0], replace=True)
    fresh = Store(store.url)  # blobs found by BLAKE3 through the tag's image, not this session's uploads
    assert all(fresh.has_blob(blob) for blob in model.blobs)


def test_a_store_location_that_is_not_a_path_or_url_is_refused() -> None:
    with pytest.raises(StoreError, match="a store location is a path or URL"):
        Store(None)  # type: ignore[arg-type]


#: Which homes file a blob from another store of theirs inside the storage (S3's copy, a registry's mount).
COPIES = {"local": False, "memory": False, "s3": True, "http": False, "oci": True}


def _sibling(home: Home) -> Store:
    """Another, empty store of the same home (the same S3 endpoint, the same registry)."""
    if home.kind == "oci":
        return Store(home.writer.url.rsplit("/", 1)[0] + f"/s{uuid.uuid4().hex[:12]}")
    return Store(home.writer.url.rsplit("/", 1)[0] + f"/sibling-{uuid.uuid4().hex[:8]}")


def test_a_blob_is_copied_from_another_store_only_where_the_storage_copies_inside(home: Home, model: Model) -> None:
    blob = model.blobs[0]
    sibling = _sibling(home)
    assert home.writer.copy_blob_from(sibling, blob) is False  # the source lacks it: nothing to copy
    sibling.put_blob_file(str(model.files[blob.file_name]), blob)
    assert home.writer.copy_blob_from(sibling, blob) is COPIES[home.kind]
    assert home.store.has_blob(blob) is COPIES[home.kind]
    if COPIES[home.kind]:
        assert home.store.digest_blob(blob) == blob.digest


def test_only_a_registry_repository_refuses_a_second_model(home: Home, model: Model) -> None:
    _publish(home, model)
    home.writer.check_publishable("conf/model")
    if home.kind != "oci":
        home.writer.check_publishable("conf/another")
        return
    with pytest.raises(StoreError, match=r"holds model 'conf/model'.*one model"):
        home.writer.check_publishable("conf/another")
    another = encode_manifest(msgspec.structs.replace(model.manifest, name="conf/another"))
    with pytest.raises(StoreError, match="one model"):  # the manifest write itself refuses it
        home.writer.write_manifest_bytes("conf/another", "v2", another)
    home.writer.check_publishable("conf/another", force=True)  # forced: this store object takes it
    assert home.writer.write_manifest_bytes("conf/another", "v2", another)
