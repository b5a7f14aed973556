"""sepstore models in a real OCI registry (Debian's docker-registry, distribution 2.8, on 127.0.0.1):
push, resolve, pull and load with ranged, verified reads; dedup and mounts counted at the registry;
corruption, credentials and the token flow; signatures as referrers; oras interop."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import same_bytes
from registry import DistributionRegistry, RegistryProxy
from safetensors.torch import save_file
from servers import HostileServer, _LoopbackServer
from test_http_body import https_server

import sepstore
from sepstore.backends import stream_body
from sepstore.cli import main as cli_main
from sepstore.demo import llama_decider, tiny_llama_state_dict
from sepstore.errors import IntegrityError, NotFoundError, RefError, RegistryAuthError, RegistryError, StoreError
from sepstore.hashing import digest_file
from sepstore.manifest import decode_manifest
from sepstore.oci import (
    MODEL_ARTIFACT,
    Credentials,
    OciRef,
    Registry,
    attach_signature_oci,
    resolve_oci,
    signatures_oci,
    tags_oci,
)
from sepstore.oci.auth import credentials_for, parse_challenge
from sepstore.oci.transport import is_loopback

USER, PASSWORD = "sepstore", "s3cret-pass"


@pytest.fixture(scope="session")
def oci(plain_registry: DistributionRegistry) -> Iterator[RegistryProxy]:
    """The registry without auth, behind a proxy that records every request it gets."""
    proxy = RegistryProxy(f"http://{plain_registry.host}").start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributionRegistry]:
    registry = DistributionRegistry(tmp_path_factory.mktemp("auth-registry"), user=USER, password=PASSWORD).start()
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def token_proxy(plain_registry: DistributionRegistry) -> Iterator[RegistryProxy]:
    """The registry without auth behind a proxy that asks for bearer tokens (the registry token flow)."""
    proxy = RegistryProxy(f"http://{plain_registry.host}", tokens=(USER, PASSWORD)).start()
    yield proxy
    proxy.stop()


@pytest.fixture(autouse=True)
def no_ambient_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials only where a test gives them: none from this machine's environment or Docker config."""
    monkeypatch.delenv("SEPSTORE_OCI_USERNAME", raising=False)
    monkeypatch.delenv("SEPSTORE_OCI_PASSWORD", raising=False)
    monkeypatch.delenv("SEPSTORE_OCI_INSECURE", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))


def _model(root: Path, *, seed: int = 0, tag: str = "v1", change_layer: int | None = None) -> tuple[bytes, Path]:
    """A tiny model dumped into ``root``: its manifest's bytes, and its parts folder."""
    state = tiny_llama_state_dict(layers=4, hidden=16, intermediate=32, vocab=64, seed=seed)
    if change_layer is not None:
        key = f"model.layers.{change_layer}.mlp.down_proj.weight"
        state[key] = state[key] + 1
    sepstore.dump(llama_decider, state, root, name="tiny", tag=tag)
    return (root / "manifests" / "tiny" / f"{tag}.json").read_bytes(), root / "parts" / "blake3"


def _push(parts: Path, dest: str, **options: object) -> sepstore.PushReport:
    """``sepstore.push`` of the model dumped next to ``parts`` (its store's ``tiny`` at the store's
    only tag) to ``dest``: the one push every store gets, a registry included."""
    store = parts.parent.parent
    tag = next((store / "manifests" / "tiny").glob("*.json")).stem
    return sepstore.push(store, dest, name="tiny", tag=tag, quiet=True, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pushed(oci: RegistryProxy, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Path, str]:
    """Model ``tiny`` pushed as ``models/tiny:v1``: its manifest bytes, parts folder and reference."""
    data, parts = _model(tmp_path_factory.mktemp("v1"))
    ref = f"oci://{oci.host}/models/tiny:v1"
    report = _push(parts, ref)
    assert report.manifest_written and not report.skipped
    return data, parts, ref


def test_pushed_model_is_a_modelpack_image_carrying_the_manifest_byte_for_byte(
    oci: RegistryProxy, pushed: tuple[bytes, Path, str]
) -> None:
    data, _, ref = pushed
    model = resolve_oci(ref)
    assert model.data == data  # so the manifest's digest, and its signatures, hold
    image = json.loads(model.image)
    assert image["artifactType"] == MODEL_ARTIFACT
    assert image["config"]["mediaType"] == "application/vnd.cncf.model.config.v1+json"
    manifest = decode_manifest(data, source="test")
    weights = [x for x in image["layers"] if x["mediaType"] == "application/vnd.cncf.model.weight.v1.raw"]
    assert [x["annotations"]["org.sepstore.part"] for x in weights] == [label for label, _ in manifest.labelled_parts()]
    for (_, part), layer in zip(manifest.labelled_parts(), weights, strict=True):
        assert layer["annotations"]["org.sepstore.digest"] == part.digest
        assert layer["annotations"]["org.opencontainers.image.title"] == f"parts/blake3/{part.file_name}"
    config = bytearray()
    Registry(oci.host).download_blob("models/tiny", image["config"]["digest"], image["config"]["size"], config.extend)
    config = json.loads(config)
    assert config["modelfs"]["diffIds"] == [x["digest"] for x in image["layers"]]


def test_pulled_parts_match_their_sha256_and_blake3_and_load_as_pushed(
    pushed: tuple[bytes, Path, str], tmp_path: Path
) -> None:
    data, parts, ref = pushed
    model = resolve_oci(ref)
    report = sepstore.pull(model.resolved(), cache_dir=tmp_path / "cache", quiet=True)
    manifest = decode_manifest(data, source="test")
    assert sorted(report.fetched) == sorted(label for label, _ in manifest.labelled_parts())
    layers = {
        x["annotations"]["org.sepstore.part"]: x["digest"]
        for x in json.loads(model.image)["layers"]
        if "org.sepstore.part" in x["annotations"]
    }
    for label, part in manifest.labelled_parts():
        path = report.paths[label]
        assert digest_file(path) == part.digest
        assert "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest() == layers[label]
    loaded = sepstore.load(resolve_oci(ref).resolved(), cache_dir=tmp_path / "cache").to_dict()
    local = sepstore.load(parts.parent.parent, name="tiny", tag="v1").to_dict()
    assert loaded.keys() == local.keys()
    assert all(same_bytes(loaded[k], local[k]) for k in local)


def test_push_of_v2_after_v1_uploads_only_the_changed_layer(
    oci: RegistryProxy, pushed: tuple[bytes, Path, str], tmp_path: Path
) -> None:
    _, parts = _model(tmp_path / "v2", tag="v2", change_layer=2)
    since = len(oci.calls)
    report = _push(parts, f"oci://{oci.host}/models/tiny:v2")
    assert report.uploaded == ["mid.2"] and report.transferred_bytes == report.uploaded_bytes
    assert sorted(report.skipped) == sorted(["begin", "mid.0", "mid.1", "mid.3", "end"])
    # at the registry: the changed part, the new manifest's layer and the new model config, nothing else
    assert len(oci.uploads(since)) == 3
    assert len([p for m, p in oci.calls[since:] if m == "PUT" and "/blobs/uploads/" in p]) == 3
    sent = [p for m, p in oci.calls[since:] if m in ("PATCH", "PUT") and "/blobs/uploads/" in p]
    assert sum("digest=" not in p for p in sent) == 1  # the new part streamed once, hashed on the way
    assert oci.patched_bytes(since) == report.transferred_bytes  # what the report says was sent, was
    assert sorted(t.tag for t in tags_oci(f"oci://{oci.host}/models/tiny")) == ["v1", "v2"]
    changed = sepstore.diff(f"oci://{oci.host}/models/tiny:v1", f"oci://{oci.host}/models/tiny:v2").changed
    assert [p.part for p in changed] == ["mid.2"]
    assert len(sepstore.plan(f"oci://{oci.host}/models/tiny:v2", nodes=2)) == 2


def test_push_into_another_repository_mounts_the_blobs_instead_of_uploading(
    oci: RegistryProxy, pushed: tuple[bytes, Path, str], tmp_path: Path
) -> None:
    data, _, ref = pushed
    since = len(oci.calls)
    report = sepstore.push(ref, f"oci://{oci.host}/mirror/tiny", quiet=True, cache_dir=tmp_path / "cache")
    assert len(report.uploaded) == 6 and sorted(report.copied) == sorted(report.uploaded)
    assert report.transferred_bytes == 0 and report.copied_bytes == report.uploaded_bytes
    assert all("mount=sha256" in path and "from=models%2Ftiny" in path for path in oci.uploads(since)[:6])
    assert not [p for m, p in oci.calls[since:] if m == "PATCH"]  # no part's bytes were sent
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # nor fetched
    assert resolve_oci(f"oci://{oci.host}/mirror/tiny:v1").data == data


def test_a_refused_mount_falls_back_to_uploading_the_blob(
    oci: RegistryProxy, pushed: tuple[bytes, Path, str], tmp_path: Path
) -> None:
    data, _, ref = pushed
    since = len(oci.calls)
    oci.deny_mounts = True
    try:
        report = sepstore.push(ref, f"oci://{oci.host}/denied/tiny", quiet=True, cache_dir=tmp_path / "cache")
    finally:
        oci.deny_mounts = False
    assert any("mount=sha256" in path for path in oci.uploads(since))
    assert len(report.uploaded) == 6 and report.copied == [] and report.transferred_bytes > 0
    assert resolve_oci(f"oci://{oci.host}/denied/tiny:v1").data == data


def test_a_node_fetches_only_its_slice_with_ranged_reads(
    oci: RegistryProxy, pushed: tuple[bytes, Path, str], tmp_path: Path
) -> None:
    data, _, ref = pushed
    model = resolve_oci(ref)
    since = len(oci.requests)
    report = sepstore.pull(model.resolved(), "1-3", cache_dir=tmp_path / "cache", quiet=True)
    assert sorted(report.fetched) == ["mid.1", "mid.2"]
    gets = [r for r in oci.requests[since:] if r.method == "GET" and "/blobs/" in r.path]
    wanted = {
        model.blobs[p.file_name][0]
        for _, p in decode_manifest(data, source="test").labelled_parts()
        if _ in ("mid.1", "mid.2")
    }
    assert {r.path.rsplit("/", 1)[-1] for r in gets} == wanted
    assert all(r.range is not None and r.range.startswith("bytes=") for r in gets)
    # and any slice of a blob, by itself, through the store interface
    part = decode_manifest(data, source="test").mid[0]
    assert part is not None
    repository = model.resolved().parts
    whole = repository.read_blob_range(part, 0, part.size)
    assert repository.read_blob_range(part, 5, 50) == whole[5:50]
    assert repository.digest_blob(part) == part.digest


def test_a_corrupted_blob_in_the_registry_is_refused(
    oci: RegistryProxy, plain_registry: DistributionRegistry, tmp_path: Path
) -> None:
    data, parts = _model(tmp_path / "store", seed=7)  # blobs of its own: other tests are not touched
    _push(parts, f"oci://{oci.host}/models/corrupt:v1")
    model = resolve_oci(f"oci://{oci.host}/models/corrupt:v1")
    part = decode_manifest(data, source="test").mid[1]
    assert part is not None
    stored = plain_registry.blob_file(model.blobs[part.file_name][0])
    spoilt = bytearray(stored.read_bytes())
    spoilt[len(spoilt) // 2] ^= 0x01
    stored.write_bytes(bytes(spoilt))
    with pytest.raises(IntegrityError, match="SHA-256"):  # the whole blob in one answer: hashed on the way
        sepstore.pull(model.resolved(), "1-2", cache_dir=tmp_path / "cache", quiet=True)
    assert not list((tmp_path / "cache" / "parts" / "blake3").glob("*"))
    with pytest.raises(IntegrityError, match="SHA-256"):
        model.fetch(part, lambda piece: None)


def test_a_push_with_verify_finds_a_corrupted_blob_in_the_registry_and_repairs_it_or_names_who_can(
    oci: RegistryProxy, plain_registry: DistributionRegistry, tmp_path: Path
) -> None:
    data, parts = _model(tmp_path / "store", seed=15)
    ref = f"oci://{oci.host}/models/repaired:v1"
    _push(parts, ref)
    part = decode_manifest(data, source="test").mid[1]
    assert part is not None
    stored = plain_registry.blob_file(resolve_oci(ref).blobs[part.file_name][0])
    spoilt = bytearray(stored.read_bytes())
    spoilt[len(spoilt) // 2] ^= 0x01
    stored.write_bytes(bytes(spoilt))
    # distribution keeps a digest's bytes once for all repositories: deleted here and uploaded again,
    # the damaged copy stays, and only the registry's operator can remove it
    with pytest.raises(IntegrityError, match=r"holds a damaged blob.*its operator must remove the blob"):
        _push(parts, ref, verify=True)
    stored.unlink()
    report = _push(parts, ref, verify=True)
    assert report.uploaded == ["mid.1"] and report.manifest_written is False
    assert sepstore.pull(ref, cache_dir=tmp_path / "cache", quiet=True).fetched


def test_a_part_fetched_in_several_chunks_is_checked_by_sha256_and_blake3(
    oci: RegistryProxy, pushed: tuple[bytes, Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, _, ref = pushed
    monkeypatch.setattr(sepstore.cache, "CHUNK_BYTES", 1024)
    manifest = decode_manifest(data, source="test")
    assert all(part.size > 2 * 1024 for _, part in manifest.labelled_parts())
    since = len(oci.requests)
    report = sepstore.pull(ref, cache_dir=tmp_path / "cache", quiet=True)
    assert sorted(report.fetched) == sorted(label for label, _ in manifest.labelled_parts())
    blobs = {sha256 for sha256, _ in resolve_oci(ref).blobs.values()}
    gets = [r for r in oci.requests[since:] if r.method == "GET" and r.path.rsplit("/", 1)[-1] in blobs]
    assert len(gets) > 2 * len(report.fetched) and all(r.range is not None for r in gets)
    for label, part in manifest.labelled_parts():
        assert digest_file(report.paths[label]) == part.digest


def test_a_corrupted_blob_fetched_in_several_chunks_is_refused_by_its_sha256(
    oci: RegistryProxy, plain_registry: DistributionRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, parts = _model(tmp_path / "store", seed=11)  # blobs of its own: other tests are not touched
    _push(parts, f"oci://{oci.host}/models/corrupt-chunks:v1")
    model = resolve_oci(f"oci://{oci.host}/models/corrupt-chunks:v1")
    part = decode_manifest(data, source="test").mid[1]
    assert part is not None and part.size > 2 * 1024
    monkeypatch.setattr(sepstore.cache, "CHUNK_BYTES", 1024)  # ranged reads of 1 KiB: none is the whole blob
    sha256 = model.blobs[part.file_name][0]
    stored = plain_registry.blob_file(sha256)
    spoilt = bytearray(stored.read_bytes())
    spoilt[len(spoilt) // 2] ^= 0x01
    stored.write_bytes(bytes(spoilt))
    since = len(oci.requests)
    with pytest.raises(
        IntegrityError, match=rf"mid\.1 at .*: its SHA-256 is sha256:[0-9a-f]{{64}}, the blob is named {sha256}"
    ):
        sepstore.pull(model.resolved(), "1-2", cache_dir=tmp_path / "cache", quiet=True)
    assert len([r for r in oci.requests[since:] if r.method == "GET" and sha256 in r.path]) > 2
    assert not list((tmp_path / "cache" / "parts" / "blake3").glob("*"))


def test_a_pushed_tag_holding_another_image_is_refused_unless_forced(
    oci: RegistryProxy, pushed: tuple[bytes, Path, str], tmp_path: Path
) -> None:
    _, parts = _model(tmp_path / "other", seed=3)
    since = len(oci.calls)
    with pytest.raises(StoreError, match="already holds another manifest"):
        _push(parts, f"oci://{oci.host}/models/tiny:v1")
    assert oci.uploads(since) == []  # refused before anything was sent
    again = _push(pushed[1], f"oci://{oci.host}/models/tiny:v1")
    assert not again.manifest_written and not again.uploaded


def test_a_damaged_local_file_is_never_pushed(oci: RegistryProxy, tmp_path: Path) -> None:
    _, parts = _model(tmp_path / "store", seed=11)
    first = next(parts.glob("*.safetensors"))
    spoilt = bytearray(first.read_bytes())
    spoilt[-1] ^= 0x01
    first.write_bytes(bytes(spoilt))
    with pytest.raises(IntegrityError, match=first.name.split(".")[0]):
        _push(parts, f"oci://{oci.host}/models/damaged:v1")
    with pytest.raises(NotFoundError):
        resolve_oci(f"oci://{oci.host}/models/damaged:v1")


def test_credentials_from_the_docker_config_open_the_auth_registry(
    auth_registry: DistributionRegistry, pushed: tuple[bytes, Path, str], tmp_path: Path
) -> None:
    pair = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (tmp_path / "docker-config").mkdir()
    (tmp_path / "docker-config" / "config.json").write_text(json.dumps({"auths": {auth_registry.host: {"auth": pair}}}))
    data, parts, _ = pushed
    ref = f"oci://{auth_registry.host}/private/tiny:v1"
    _push(parts, ref)
    assert resolve_oci(ref).data == data


def test_missing_or_wrong_credentials_are_a_clear_error(
    auth_registry: DistributionRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = f"oci://{auth_registry.host}/private/tiny:v1"
    with pytest.raises(RegistryAuthError, match=r"wants credentials.*SEPSTORE_OCI_USERNAME"):
        resolve_oci(ref)
    monkeypatch.setenv("SEPSTORE_OCI_USERNAME", USER)
    monkeypatch.setenv("SEPSTORE_OCI_PASSWORD", "wrong")
    with pytest.raises(RegistryAuthError, match=f"refused the credentials of user '{USER}'.*SEPSTORE_OCI_USERNAME"):
        resolve_oci(ref)


def test_the_token_flow_fetches_a_bearer_token_with_the_credentials(
    token_proxy: RegistryProxy, pushed: tuple[bytes, Path, str], tmp_path: Path
) -> None:
    _, parts, _ = pushed
    ref = f"oci://{token_proxy.host}/tokened/tiny:v1"
    registry = Registry(token_proxy.host, credentials=Credentials(USER, PASSWORD))
    _push(parts, ref, dest_storage_options={"username": USER, "password": PASSWORD})
    model = resolve_oci(ref, registry=registry)
    report = sepstore.pull(model.resolved(), cache_dir=tmp_path / "cache", quiet=True)
    assert len(report.fetched) == 6
    assert any("scope=repository:tokened/tiny:pull,push" in q for q in token_proxy.token_requests)
    wrong = Registry(token_proxy.host, credentials=Credentials(USER, "nope"))
    with pytest.raises(RegistryAuthError, match="refused the credentials"):
        resolve_oci(ref, registry=wrong)
    with pytest.raises(RegistryAuthError, match="wants credentials"):
        resolve_oci(ref, registry=Registry(token_proxy.host))


def test_signatures_travel_as_referrers_of_the_image(oci: RegistryProxy, pushed: tuple[bytes, Path, str]) -> None:
    model = resolve_oci(pushed[2])
    first, second = "a" * 64, "b" * 64
    attach_signature_oci(model, first, b'{"old": 1}')
    attach_signature_oci(model, first, b'{"new": 1}')  # replaces that key's signature
    attach_signature_oci(model, second, b'{"other": 1}')
    assert signatures_oci(model) == {first: b'{"new": 1}', second: b'{"other": 1}'}
    # distribution 2.8 has no referrers API: the tag schema's index holds them, and tags leaves it out
    assert f"sha256-{model.image_digest.removeprefix('sha256:')}" in Registry(oci.host).tags("models/tiny")
    assert "sha256-" not in " ".join(t.tag for t in tags_oci(pushed[2]))


def test_oras_pulls_a_store_that_sepstore_loads(
    pushed: tuple[bytes, Path, str], oci: RegistryProxy, tmp_path: Path
) -> None:
    import oras.client

    data, _, _ = pushed
    client = oras.client.OrasClient(hostname=oci.host, insecure=True)
    client.pull(target=f"{oci.host}/models/tiny:v1", outdir=str(tmp_path / "pulled"))
    assert (tmp_path / "pulled" / "manifests" / "tiny" / "v1.json").read_bytes() == data
    report = sepstore.verify(tmp_path / "pulled", name="tiny", tag="v1")
    assert report.ok


# -- references, credentials, transport rules --------------------------------------------------------


def test_oci_references_parse_and_bad_ones_are_refused() -> None:
    ref = OciRef.parse("oci://registry.example:5000/team/llama-3:v2@sha256:" + "0" * 64)
    assert (ref.host, ref.repository, ref.tag, ref.reference) == (
        "registry.example:5000",
        "team/llama-3",
        "v2",
        "sha256:" + "0" * 64,
    )
    assert OciRef.parse("oci://localhost/m").tag is None
    for bad in ("oci://host", "oci://host/Upper:v1", "oci://host/m:.hidden", "oci://host/m@sha256:12", "s3://b/m"):
        with pytest.raises(RefError):
            OciRef.parse(bad)
    with pytest.raises(RefError, match="name a tag"):
        resolve_oci("oci://127.0.0.1:1/m")


def test_plain_http_is_refused_for_a_registry_not_on_this_machine() -> None:
    registry = Registry("registry.invalid:5000")
    with pytest.raises(RegistryError, match="plain HTTP"):
        registry.request("GET", "http://registry.invalid:5000/v2/", scope="registry:catalog:*")
    assert Registry("registry.invalid:5000", insecure=True)._allowed("http://registry.invalid:5000/v2/")
    assert registry._allowed("https://registry.invalid:5000/v2/")


@pytest.fixture
def loopback_name(monkeypatch: pytest.MonkeyPatch) -> str:
    """A host name that resolves to 127.0.0.1 but is not one sepstore takes for loopback (so plain
    HTTP to it needs ``insecure``): a name only this test's resolver knows, as a DNS entry would."""
    name = "registry.sepstore.test"
    resolve = socket.getaddrinfo

    def getaddrinfo(host: object, *args: Any, **kwargs: Any) -> Any:
        return resolve("127.0.0.1" if host == name else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert not is_loopback(name)
    return name


def test_a_plain_http_registry_not_on_this_machine_fails_at_once_saying_how_to_allow_it(
    oci: RegistryProxy, pushed: tuple[bytes, Path, str], loopback_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    host = f"{loopback_name}:{oci.port}"
    with pytest.raises(RegistryError, match=rf"plain HTTP\? Pass --insecure.*SEPSTORE_OCI_INSECURE={host}") as caught:
        Registry(host).tags("models/tiny")
    assert "tries" not in str(caught.value)  # not retried: no other try does better
    assert "v1" in Registry(host, insecure=True).tags("models/tiny")
    assert "v1" in [t.tag for t in sepstore.tags(f"oci://{host}/models/tiny", storage_options={"insecure": True})]
    assert cli_main(["tags", f"oci://{host}/models/tiny"]) == 2
    assert "--insecure" in capsys.readouterr().err
    assert cli_main(["tags", f"oci://{host}/models/tiny", "--insecure", "--json"]) == 0
    assert "v1" in [row["tag"] for row in json.loads(capsys.readouterr().out)]
    assert "SEPSTORE_OCI_INSECURE" not in os.environ  # for that command only


def test_a_registry_whose_certificate_does_not_verify_fails_at_once_naming_the_ca_settings(
    tmp_path: Path, loopback_name: str
) -> None:
    server, _ = https_server(tmp_path, tmp_path)
    try:
        with pytest.raises(RegistryError, match=r"certificate did not verify.*\$SSL_CERT_FILE.*--insecure") as caught:
            Registry(f"{loopback_name}:{server.port}").tags("models/tiny")
    finally:
        server.stop()
    assert "tries" not in str(caught.value)  # not retried: another try gets the same certificate


def test_docker_config_and_environment_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "docker-config"
    folder.mkdir()
    pair = base64.b64encode(b"alice:pw:with:colons").decode()
    auths = {"https://ghcr.io/v1/": {"auth": pair}, "quay.io": {}}
    (folder / "config.json").write_text(json.dumps({"auths": auths, "credsStore": "desktop"}))
    found = credentials_for("ghcr.io")
    assert found is not None and (found.username, found.password) == ("alice", "pw:with:colons")
    assert credentials_for("docker.example") is None
    with pytest.raises(RegistryAuthError, match="credential helper"):
        credentials_for("quay.io")
    monkeypatch.setenv("SEPSTORE_OCI_USERNAME", "bob")
    with pytest.raises(RegistryAuthError, match="both"):
        credentials_for("ghcr.io")
    monkeypatch.setenv("SEPSTORE_OCI_PASSWORD", "secret")
    env = credentials_for("ghcr.io")
    assert env is not None and (env.username, env.password) == ("bob", "secret")
    assert "secret" not in repr(env)


def test_bearer_challenges_parse_with_quoted_commas() -> None:
    challenge = parse_challenge(
        'Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push"'
    )
    assert challenge is not None and challenge.scheme == "bearer"
    assert challenge.params == {
        "realm": "https://auth.example/token",
        "service": "reg",
        "scope": "repository:a/b:pull,push",
    }


def test_a_large_blob_uploads_in_patch_chunks_hashed_on_the_way(oci: RegistryProxy, tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(250_000))
    digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    since = len(oci.calls)
    registry = Registry(oci.host)
    assert registry.upload_blob("chunks/test", str(blob), digest, 250_000, chunk=100_000).digest == digest
    assert [m for m, p in oci.calls[since:] if "/blobs/uploads/" in p] == ["POST", "PATCH", "PATCH", "PATCH", "PUT"]
    got = bytearray()
    registry.download_blob("chunks/test", digest, 250_000, got.extend)
    assert bytes(got) == blob.read_bytes()
    wrong = "sha256:" + "0" * 64
    with pytest.raises(IntegrityError, match="SHA-256"):  # found before the upload is closed
        registry.upload_blob("chunks/test", str(blob), wrong, 250_000, chunk=100_000)
    assert registry.blob_size("chunks/test", wrong) is None


# -- the public API and the command line, with oci:// references ------------------------------------


def test_push_pull_load_info_and_tags_take_oci_references(oci: RegistryProxy, tmp_path: Path) -> None:
    _, parts = _model(tmp_path / "store", seed=5)
    store = parts.parent.parent
    report = sepstore.push(store, f"oci://{oci.host}/api/tiny", name="tiny", tag="v1", quiet=True)
    assert report.manifest_url == f"oci://{oci.host}/api/tiny:v1" and len(report.uploaded) == 6
    assert report.transferred_bytes == report.uploaded_bytes > 0
    again = sepstore.push(store, f"oci://{oci.host}/api/tiny", name="tiny", tag="v1", quiet=True)
    assert not again.manifest_written and again.uploaded == [] and len(again.skipped) == 6
    assert again.transferred_bytes == 0
    ref = f"oci://{oci.host}/api/tiny:v1"
    assert sepstore.resolve(ref).digest == sepstore.resolve(store, name="tiny", tag="v1").digest
    pulled = sepstore.pull(ref, "b 0-2", cache_dir=tmp_path / "cache", quiet=True)
    assert sorted(pulled.fetched) == ["begin", "mid.0", "mid.1"]
    loaded = sepstore.load(ref, "f", cache_dir=tmp_path / "cache").to_dict()
    local = sepstore.load(store, "f", name="tiny", tag="v1").to_dict()
    assert all(same_bytes(loaded[k], local[k]) for k in local)
    assert sepstore.verify(ref, cache_dir=tmp_path / "cache", quiet=True).ok
    assert [(t.name, t.tag) for t in sepstore.tags(f"oci://{oci.host}/api/tiny")] == [("tiny", "v1")]
    urls = [f.url for f in sepstore.files(ref, "b")]  # for tools that download by URL: the registry's blob
    assert len(urls) == 1 and urls[0].startswith(f"http://{oci.host}/v2/api/tiny/blobs/sha256:")
    with pytest.raises(RefError, match="holds one model"):
        sepstore.resolve(f"oci://{oci.host}/api/tiny", name="tiny", tag="v1")
    assert sepstore.resolve(f"oci://{oci.host}/api/tiny", tag="v1").digest == report.manifest_digest
    checked = sepstore.push(store, f"oci://{oci.host}/api/tiny", name="tiny", tag="v1", verify=True, quiet=True)
    assert checked.verified and len(checked.skipped) == 6 and not checked.repaired  # re-hashed at the registry
    with pytest.raises(RefError, match="contradicts"):
        sepstore.push(store, f"oci://{oci.host}/api/tiny:v1", dest_tag="v2", name="tiny", tag="v1", quiet=True)


def test_a_signed_push_is_trusted_and_an_unsigned_tag_is_refused(oci: RegistryProxy, tmp_path: Path) -> None:
    _, parts = _model(tmp_path / "store", seed=6)
    store = parts.parent.parent
    key = tmp_path / "key.pem"
    sepstore.keygen(key)
    signed = sepstore.push(store, f"oci://{oci.host}/trusted/tiny", name="tiny", tag="v1", sign=key, quiet=True)
    assert len(signed.signatures) == 1
    ref = f"oci://{oci.host}/trusted/tiny:v1"
    trust = str(tmp_path / "key.pem.pub")
    assert sepstore.pull(ref, cache_dir=tmp_path / "cache", trust=trust, quiet=True).fetched
    sepstore.push(store, f"oci://{oci.host}/trusted/tiny:unsigned", name="tiny", tag="v1", quiet=True)
    with pytest.raises(sepstore.TrustError, match="no valid signature"):
        sepstore.pull(f"oci://{oci.host}/trusted/tiny:unsigned", cache_dir=tmp_path / "cache", trust=trust)
    # `sepstore sign` signs a version already in the registry; pushing it on carries the signature along
    sepstore.sign(f"oci://{oci.host}/trusted/tiny:unsigned", key=key)
    assert sepstore.load(f"oci://{oci.host}/trusted/tiny:unsigned", cache_dir=tmp_path / "cache", trust=trust)
    since = len(oci.calls)
    copied = sepstore.push(f"oci://{oci.host}/trusted/tiny:v1", f"oci://{oci.host}/copy/tiny", quiet=True,
                           cache_dir=tmp_path / "cache")  # fmt: skip
    assert copied.signatures == signed.signatures
    assert len(copied.copied) == 6 and copied.transferred_bytes == 0
    mounts = [p for p in oci.uploads(since) if "from=trusted%2Ftiny" in p]  # mounted, not uploaded again
    assert len(mounts) == 6
    # the signature pushed along verifies at the destination, as `sepstore verify --key` checks it
    assert sepstore.pull(f"oci://{oci.host}/copy/tiny:v1", cache_dir=tmp_path / "cache", trust=trust).fetched == []


def test_the_command_line_pushes_to_and_lists_a_registry(oci: RegistryProxy, tmp_path: Path) -> None:
    import subprocess
    import sys

    _, parts = _model(tmp_path / "store", seed=8)
    store = parts.parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(sepstore.__file__).parent.parent)]),
        "SEPSTORE_CACHE": str(tmp_path / "cache"),
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sepstore", *args], capture_output=True, text=True, env=env)

    sepstore.keygen(tmp_path / "key.pem")
    pushed = cli("push", str(store), f"oci://{oci.host}/cli/tiny:v1", "--sign", str(tmp_path / "key.pem"), "--json")
    assert pushed.returncode == 0, pushed.stderr
    report = json.loads(pushed.stdout)  # the keys every push reports, and what a mount copies
    assert len(report["uploaded"]) == 6 and report["copied"] == [] and len(report["signatures"]) == 1
    # the signature pushed along verifies, as any store's would
    verified = cli("verify", f"oci://{oci.host}/cli/tiny:v1", "--trust-key", str(tmp_path / "key.pem.pub"), "--quiet")
    assert verified.returncode == 0, verified.stderr
    listed = cli("tags", f"oci://{oci.host}/cli/tiny", "--json")
    assert [row["tag"] for row in json.loads(listed.stdout)] == ["v1"]
    pulled = cli("pull", f"oci://{oci.host}/cli/tiny:v1", "--cache-dir", str(tmp_path / "cache"), "--json")
    assert pulled.returncode == 0 and len(json.loads(pulled.stdout)["fetched"]) == 6
    missing = cli("info", f"oci://{oci.host}/cli/tiny:v9")
    assert missing.returncode != 0 and "no tag v9 in repository cli/tiny" in missing.stderr


def test_the_command_line_converts_a_checkpoint_into_a_registry_and_prints_its_oci_url(
    oci: RegistryProxy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tiny_llama_state_dict(layers=2, hidden=16, intermediate=32, vocab=64, seed=14)
    (tmp_path / "ckpt").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "ckpt" / "model.safetensors"))
    dest = f"oci://{oci.host}/conv/tiny"
    args = ["convert", str(tmp_path / "ckpt"), dest, "--name", "tiny", "--tag", "v1", "--decider", "llama"]
    assert cli_main(args) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"-> {dest}:v1")
    assert resolve_oci(f"{dest}:v1").data


def test_an_unknown_repository_and_an_unknown_tag_are_told_apart(
    oci: RegistryProxy, pushed: tuple[bytes, Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["info", f"oci://{oci.host}/models/tiny:v9"]) == 2
    listing = f"list its tags with `sepstore tags oci://{oci.host}/models/tiny`"
    assert f"no tag v9 in repository models/tiny; {listing}" in capsys.readouterr().err
    assert cli_main(["info", f"oci://{oci.host}/nowhere/tiny:v1"]) == 2
    assert f"no repository nowhere/tiny at {oci.host}" in capsys.readouterr().err


def test_assets_travel_as_their_own_layers(oci: RegistryProxy, tmp_path: Path) -> None:
    state = tiny_llama_state_dict(layers=2, hidden=16, intermediate=32, vocab=64, seed=9)
    files = {"tokenizer.json": b'{"model": {}}', "README.md": b"# tiny\n"}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    sepstore.dump(llama_decider, state, tmp_path / "store", name="tiny", tag="v1", config=config, assets=files)
    sepstore.push(tmp_path / "store", f"oci://{oci.host}/assets/tiny:v1", quiet=True)
    model = resolve_oci(f"oci://{oci.host}/assets/tiny:v1")
    kinds = {x["annotations"].get("org.sepstore.asset"): x["mediaType"] for x in json.loads(model.image)["layers"]}
    assert kinds["README.md"] == "application/vnd.cncf.model.doc.v1.raw"
    assert kinds["tokenizer.json"] == "application/vnd.cncf.model.weight.config.v1.raw"
    got = sepstore.assets(f"oci://{oci.host}/assets/tiny:v1", cache_dir=tmp_path / "cache")
    assert {path: file.read_bytes() for path, file in got.items()} == files
    image = json.loads(model.image)
    blob = bytearray()
    Registry(oci.host).download_blob("assets/tiny", image["config"]["digest"], image["config"]["size"], blob.extend)
    assert json.loads(blob)["config"]["architecture"] == "LlamaForCausalLM"
    assert json.loads(blob)["descriptor"] == {"name": "tiny", "family": "llama"}


def _hostile(tmp_path: Path, mode: str, spoil: str, **options: object) -> tuple[HostileServer, str, int]:
    """A server that answers like a registry under ``tmp_path`` (a 100-byte blob, a manifest),
    except that GETs of paths with ``spoil`` in them are spoilt as ``mode`` says."""
    data = bytes(range(100))
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (tmp_path / "v2" / "r" / "blobs").mkdir(parents=True)
    (tmp_path / "v2" / "r" / "blobs" / digest).write_bytes(data)
    (tmp_path / "v2" / "r" / "manifests").mkdir()
    (tmp_path / "v2" / "r" / "manifests" / "v1").write_bytes(b"{}")
    server = HostileServer(tmp_path, mode, spoil=spoil, **options).start()  # type: ignore[arg-type]
    return server, digest, len(data)


@pytest.mark.parametrize("mode", ["huge", "huge-chunked"])
def test_an_oversized_answer_is_refused_without_being_held(tmp_path: Path, mode: str) -> None:
    server, _digest, _size = _hostile(tmp_path, mode, "/manifests/", huge_bytes=64 * 2**20)
    try:
        with pytest.raises(RegistryError, match="over the 4194304-byte limit"):
            Registry(f"127.0.0.1:{server.port}").get_manifest("r", "v1")
    finally:
        server.stop()


def test_a_blob_answer_of_another_size_is_refused_before_it_is_read(tmp_path: Path) -> None:
    server, digest, size = _hostile(tmp_path, "huge", "/blobs/", huge_bytes=64 * 2**20)
    try:
        with pytest.raises(IntegrityError, match="67108864 bytes"):
            body = Registry(f"127.0.0.1:{server.port}").open_blob("r", digest, 0, 50, size)
            stream_body(body, "the blob", 0, 50, size, lambda at, piece: None)
    finally:
        server.stop()


def test_a_trickling_registry_is_cut_off_by_the_minimum_speed_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEPSTORE_TIMEOUT", "1")
    monkeypatch.setenv("SEPSTORE_MIN_SPEED", "1000")
    server, digest, size = _hostile(tmp_path, "trickle", "/blobs/", trickle_seconds=0.2)
    try:
        with pytest.raises(StoreError, match="stalled"):
            Registry(f"127.0.0.1:{server.port}").download_blob("r", digest, size, lambda piece: None)
    finally:
        server.stop()


class _Redirecting(_LoopbackServer):
    """A registry whose blob GETs are redirected to ``storage`` (as S3-backed registries do), asking
    for basic auth itself; it and the storage record the Authorization header each request came with."""

    def __init__(self, storage: str | None = None, *, challenge: bool = False, token: str = "storage-token") -> None:
        super().__init__()
        self.storage = storage
        self.challenge = challenge  # the storage asks for a bearer token from its own token service
        self.token = token
        self.seen: list[tuple[str, str | None]] = []

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization")
        self.seen.append((request.path, auth))
        if self.storage is None and self.challenge:
            if request.path == "/token":
                return web.json_response({"token": self.token})
            if auth != f"Bearer {self.token}":
                return web.Response(status=401, headers={"WWW-Authenticate": f'Bearer realm="{self.url}/token"'})
        if self.storage is None:  # the storage: serves any blob's bytes
            return web.Response(body=b"x" * 10)
        if auth is None:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        return web.Response(status=307, headers={"Location": f"{self.storage}/bucket/blob?sig=1"})


def test_a_redirect_to_blob_storage_does_not_carry_the_registry_credentials() -> None:
    storage = _Redirecting().start()
    registry = _Redirecting(storage.url).start()
    try:
        client = Registry(f"127.0.0.1:{registry.port}", credentials=Credentials(USER, PASSWORD))
        digest = "sha256:" + hashlib.sha256(b"x" * 10).hexdigest()
        got = bytearray()
        client.download_blob("r", digest, 10, got.extend)
        assert bytes(got) == b"x" * 10
        assert any(auth is not None for path, auth in registry.seen if "/blobs/" in path)
        assert storage.seen == [("/bucket/blob", None)]
    finally:
        registry.stop()
        storage.stop()


def test_blob_storage_on_another_host_asking_for_authentication_never_gets_the_registry_credentials() -> None:
    storage = _Redirecting(challenge=True).start()
    registry = _Redirecting(storage.url).start()
    try:
        client = Registry(f"127.0.0.1:{registry.port}", credentials=Credentials(USER, PASSWORD))
        digest = "sha256:" + hashlib.sha256(b"x" * 10).hexdigest()
        with pytest.raises(RegistryAuthError, match=rf"asks for authentication.*only to 127.0.0.1:{registry.port}"):
            client.download_blob("r", digest, 10, lambda piece: None)
        assert storage.seen == [("/bucket/blob", None)]  # no token asked for, with or without credentials
    finally:
        registry.stop()
        storage.stop()


class _EndlessTags(_LoopbackServer):
    """A registry whose tag list links page after page of 1000 tags (to a new page each time, or,
    with ``loop``, back to the same one; with ``empty``, of no tags at all)."""

    def __init__(self, *, loop: bool = False, empty: bool = False) -> None:
        super().__init__()
        self.loop, self.empty = loop, empty

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/v2/":
            return web.json_response({})
        start = int(request.query.get("last", "0"))
        following = 0 if self.loop else start + 1000
        tags = [] if self.empty else [f"t{i:07d}" for i in range(start, start + 1000)]
        link = f'</v2/r/tags/list?n=1000&last={following}>; rel="next"'
        return web.json_response({"name": "r", "tags": tags}, headers={"Link": link})


@pytest.mark.parametrize("loop", [False, True], ids=["new-pages", "the-same-page"])
def test_a_tag_list_linking_pages_without_end_is_refused_naming_the_repository(loop: bool) -> None:
    server = _EndlessTags(loop=loop).start()
    try:
        said = "links back to a page already read" if loop else "lists over 100000 tags"
        with pytest.raises(RegistryError, match=rf"repository r {said}"):
            Registry(f"127.0.0.1:{server.port}").tags("r")
        assert len(server.requests) <= (2 if loop else 110)
    finally:
        server.stop()


def test_a_tag_list_of_empty_pages_without_end_stops_after_a_bounded_number_of_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sepstore.oci.manifests, "MAX_TAG_PAGES", 50)
    server = _EndlessTags(empty=True).start()
    try:
        with pytest.raises(RegistryError, match="tag list of repository r goes on past 50 pages"):
            Registry(f"127.0.0.1:{server.port}").tags("r")
        assert len([r for r in server.requests if "tags/list" in r.path]) == 50
    finally:
        server.stop()


@pytest.mark.parametrize("token", ["abc\r\nX-Injected: 1", "x" * (16 * 1024 + 1)], ids=["crlf", "long"])
def test_a_token_that_cannot_be_a_header_is_refused_naming_the_token_service(token: str) -> None:
    registry = _Redirecting(challenge=True, token=token).start()
    try:
        digest = "sha256:" + hashlib.sha256(b"x" * 10).hexdigest()
        with pytest.raises(RegistryAuthError, match=rf"{registry.url}/token.*token is not .*printable ASCII"):
            Registry(f"127.0.0.1:{registry.port}").download_blob("r", digest, 10, lambda piece: None)
    finally:
        registry.stop()


def test_a_push_into_a_repository_holding_another_model_is_refused_before_any_upload_unless_forced(
    oci: RegistryProxy, tmp_path: Path
) -> None:
    repo = f"oci://{oci.host}/acme/llama-mini"
    other = tmp_path / "other"
    state = tiny_llama_state_dict(layers=1, hidden=8, intermediate=8, vocab=16)
    sepstore.dump(llama_decider, state, other, name="llama-mini", quiet=True)
    sepstore.push(other, repo, name="llama-mini", quiet=True)
    assert sepstore.push(other, repo, name="llama-mini", dest_tag="v2", quiet=True).manifest_written  # same model
    _, parts = _model(tmp_path / "tiny")
    store = parts.parent.parent
    since = len(oci.calls)
    refused = r"holds model 'llama-mini' \(tag 'latest'\), not 'tiny'.*one model.*--force"
    with pytest.raises(StoreError, match=refused):
        sepstore.push(store, repo, name="tiny", tag="v1", quiet=True)
    assert oci.uploads(since) == []
    assert sepstore.push(store, repo, name="tiny", tag="v1", force=True, quiet=True).manifest_written
    assert [(t.name, t.tag) for t in sepstore.tags(repo)] == [
        ("llama-mini", "latest"),
        ("tiny", "v1"),
        ("llama-mini", "v2"),
    ]


def test_a_dump_into_a_repository_holding_another_model_is_refused_before_any_upload(
    oci: RegistryProxy, tmp_path: Path
) -> None:
    repo = f"oci://{oci.host}/acme/held"
    state = tiny_llama_state_dict(layers=1, hidden=8, intermediate=8, vocab=16)
    sepstore.dump(llama_decider, state, repo, name="held", quiet=True)
    since = len(oci.calls)
    refused = r"holds model 'held' \(tag 'latest'\), not 'tiny'.*one model"
    with pytest.raises(StoreError, match=refused):
        sepstore.dump(llama_decider, state, repo, name="tiny", tag="v1", quiet=True)
    assert oci.uploads(since) == []
    # the store's own manifest write refuses it too, whoever calls it
    _, parts = _model(tmp_path / "tiny")
    data = (parts.parent.parent / "manifests" / "tiny" / "v1.json").read_bytes()
    with pytest.raises(StoreError, match=refused):
        sepstore.Store(repo).write_manifest_bytes("tiny", "v1", data)
    assert [(t.name, t.tag) for t in sepstore.tags(repo)] == [("held", "latest")]


def test_a_file_that_is_not_its_blob_is_never_filed_in_a_registry(oci: RegistryProxy, tmp_path: Path) -> None:
    _, parts = _model(tmp_path / "store", seed=12)
    part = decode_manifest((parts.parent.parent / "manifests" / "tiny" / "v1.json").read_bytes(), source="t").mid[0]
    assert part is not None
    spoilt = bytearray((parts / part.file_name).read_bytes())
    spoilt[-1] ^= 0x01
    (tmp_path / "spoilt").write_bytes(bytes(spoilt))
    store = sepstore.Store(f"oci://{oci.host}/models/spoilt")
    with pytest.raises(IntegrityError, match="not uploaded"):
        store.put_blob_file(str(tmp_path / "spoilt"), part)
    # hashed while it was sent, and the upload cancelled before it was closed: the registry has no such blob
    assert Registry(oci.host).blob_size("models/spoilt", "sha256:" + hashlib.sha256(spoilt).hexdigest()) is None
    assert store.put_blob_file(str(parts / part.file_name), part) and store.has_blob(part)


def test_a_push_with_verify_rehashes_what_it_mounted_and_never_publishes_a_lying_source_image(
    oci: RegistryProxy, tmp_path: Path
) -> None:
    _, parts = _model(tmp_path / "store", seed=13)
    ref = f"oci://{oci.host}/liar/tiny:v1"
    _push(parts, ref)
    image = json.loads(resolve_oci(ref).image)
    layers = {x["annotations"].get("org.sepstore.part"): x for x in image["layers"]}
    first, second = layers["mid.0"], layers["mid.1"]
    assert first["size"] == second["size"]
    first["digest"], second["digest"] = second["digest"], first["digest"]  # each part names the other's blob
    Registry(oci.host).put_manifest(
        "liar/tiny", "v1", json.dumps(image).encode(), "application/vnd.oci.image.manifest.v1+json"
    )
    with pytest.raises(IntegrityError):  # the mounted blobs re-hashed, found wrong, and the source cannot mend them
        sepstore.push(ref, f"oci://{oci.host}/honest/tiny", verify=True, quiet=True, cache_dir=tmp_path / "cache")
    with pytest.raises(NotFoundError):
        resolve_oci(f"oci://{oci.host}/honest/tiny:v1")
