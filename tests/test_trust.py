"""Signed manifests against an attacker who controls the bucket (moto S3 on 127.0.0.1, and a local
store): with a trust policy in force, every tampering is a TrustError that leaves the cache as it
was; the honest path (sign, push, load with $SEPSTORE_TRUST) works, also from a second store."""

from __future__ import annotations

import base64
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import msgspec
import pytest
import torch
from servers import StaticServer
from test_refs import READERS, call

import sepstore
from sepstore.demo import llama_decider, tiny_llama_state_dict
from sepstore.manifest import decode_manifest, encode_manifest


def small(seed: int = 0) -> dict[str, torch.Tensor]:
    return tiny_llama_state_dict(layers=2, hidden=8, intermediate=16, vocab=32, seed=seed)


@dataclass
class Bucket:
    """A store the attacker can write: its URL, and raw access to its objects."""

    url: str
    fs: fsspec.AbstractFileSystem
    root: str

    def get(self, path: str) -> bytes:
        self.fs.invalidate_cache()
        data: bytes = self.fs.cat_file(f"{self.root}/{path}")
        return data

    def put(self, path: str, data: bytes) -> None:
        if isinstance(self.fs, fsspec.implementations.local.LocalFileSystem):
            os.makedirs(os.path.dirname(f"{self.root}/{path}"), exist_ok=True)
        self.fs.pipe_file(f"{self.root}/{path}", data)
        self.fs.invalidate_cache()

    def copy(self, src: str, dest: str) -> None:
        self.put(dest, self.get(src))

    def signature(self, name: str, tag: str, key: Key) -> str:
        return f"signatures/{name}/{tag}/{key.id}.json"


@dataclass
class Key:
    path: Path
    id: str

    @property
    def pub(self) -> Path:
        return Path(f"{self.path}.pub")


def make_bucket(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Bucket:
    if kind == "local":
        root = str(tmp_path / "bucket")
        return Bucket(root, fsspec.filesystem("file"), root)
    server = request.getfixturevalue("moto_server")
    name = f"bucket-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("s3", endpoint_url=server.endpoint)
    fs.mkdir(name)
    return Bucket(f"s3://{name}/store", fs, f"{name}/store")


@pytest.fixture(params=["local", "s3"])
def bucket(request: pytest.FixtureRequest, tmp_path: Path) -> Bucket:
    return make_bucket(request.param, request, tmp_path)


@pytest.fixture(autouse=True)
def node_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The node's cache folder (parts and rollback state), also for calls given no cache_dir."""
    monkeypatch.setenv("SEPSTORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SEPSTORE_TRUST", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def acme(tmp_path: Path) -> Key:
    return Key(tmp_path / "acme.key", sepstore.keygen(tmp_path / "acme.key"))


@pytest.fixture
def mallory(tmp_path: Path) -> Key:
    return Key(tmp_path / "mallory.key", sepstore.keygen(tmp_path / "mallory.key"))


@pytest.fixture
def policy(tmp_path: Path, acme: Key) -> Path:
    """acme's key, allowed to sign acme's models only."""
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"keys": [{"public_key": "acme.key.pub", "names": ["acme/*"]}]}))
    return path


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """The publisher's local store: acme/a (v1 and v2) and acme/b."""
    root = tmp_path / "source"
    sepstore.dump(llama_decider, small(0), root, name="acme/a", tag="v1", quiet=True)
    sepstore.dump(llama_decider, small(1), root, name="acme/a", tag="v2", quiet=True)
    sepstore.dump(llama_decider, small(2), root, name="acme/b", tag="latest", quiet=True)
    return root


def publish(source: Path, bucket: Bucket, name: str, tag: str, key: Key, *, as_tag: str | None = None) -> None:
    sepstore.push(source, bucket.url, name=name, tag=tag, dest_tag=as_tag, sign=key.path, force=True, quiet=True)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes (locks excluded: they exist only while held)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def refused(node_cache: Path, policy: Path) -> Iterator[Any]:
    """``refused(bucket, name, tag, match)``: loading is a TrustError matching ``match``, and the
    node's cache (parts and rollback state) is as it was."""

    def check(bucket: Bucket, name: str, tag: str, match: str, **options: Any) -> None:
        before = snapshot(node_cache)
        with pytest.raises(sepstore.TrustError, match=match):
            sepstore.load(bucket.url, "f", name=name, tag=tag, trust=policy, cache_dir=node_cache, **options)
        assert snapshot(node_cache) == before

    yield check


# -- the honest path -------------------------------------------------------------------------------


def test_a_signed_model_loads_from_the_bucket_with_sepstore_trust(
    source: Path, bucket: Bucket, acme: Key, policy: Path, node_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(source, bucket, "acme/a", "v1", acme)
    monkeypatch.setenv("SEPSTORE_TRUST", str(policy))
    psd = sepstore.load(bucket.url, "f", name="acme/a", tag="v1")
    assert psd.begin and len(psd.mid) == 2
    assert list((node_cache / "trust").rglob("v1.json"))  # the issue time it accepted


def test_signatures_travel_with_push_to_a_second_store(
    source: Path, bucket: Bucket, acme: Key, policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(source, bucket, "acme/a", "v1", acme)
    second = tmp_path / "second"
    monkeypatch.setenv("SEPSTORE_TRUST", str(policy))
    report = sepstore.push(bucket.url, second, name="acme/a", tag="v1", quiet=True)
    assert report.signatures == [acme.id]
    assert sepstore.load(second, "b", name="acme/a", tag="v1").begin
    again = sepstore.push(bucket.url, second, name="acme/a", tag="v1", quiet=True)
    assert again.signatures == []  # the second store already holds that signature


def test_a_signature_is_not_copied_to_another_tag(source: Path, acme: Key, tmp_path: Path) -> None:
    sepstore.sign(source, name="acme/a", tag="v1", key=acme.path)
    report = sepstore.push(source, tmp_path / "dest", name="acme/a", tag="v1", dest_tag="stable", quiet=True)
    assert report.signatures == []
    with pytest.raises(sepstore.TrustError, match="no valid signature"):
        sepstore.read_manifest(tmp_path / "dest", name="acme/a", tag="stable", trust=acme.pub)


def test_several_signers_each_verify_and_one_trusted_is_enough(
    source: Path, acme: Key, mallory: Key, policy: Path
) -> None:
    for key in (acme, mallory):
        sepstore.sign(source, name="acme/a", tag="v1", key=key.path)
    report = sepstore.signatures(source, name="acme/a", tag="v1", trust=policy)
    assert report.satisfied
    states = {s.key_id: (s.valid, s.error) for s in report.signatures}
    assert states == {acme.id: (True, None), mallory.id: (False, "key not in the policy")}
    unchecked = sepstore.signatures(source, name="acme/a", tag="v1")
    assert unchecked.policy is None and {s.valid for s in unchecked.signatures} == {None}


# -- the attacks -----------------------------------------------------------------------------------


def test_an_unsigned_manifest_is_refused(source: Path, bucket: Bucket, refused: Any) -> None:
    sepstore.push(source, bucket.url, name="acme/a", tag="v1", quiet=True)
    refused(bucket, "acme/a", "v1", "no valid signature by a key")


def test_a_manifest_replaced_after_signing_is_refused(source: Path, bucket: Bucket, acme: Key, refused: Any) -> None:
    publish(source, bucket, "acme/a", "v1", acme)
    publish(source, bucket, "acme/a", "v2", acme)
    bucket.copy("manifests/acme/a/v2.json", "manifests/acme/a/v1.json")  # v2's bytes under v1's signature
    refused(bucket, "acme/a", "v1", "the manifest changed after signing")


def test_parts_spliced_in_from_another_model_are_refused(source: Path, bucket: Bucket, acme: Key, refused: Any) -> None:
    publish(source, bucket, "acme/a", "v1", acme)
    publish(source, bucket, "acme/b", "latest", acme)
    a = decode_manifest(bucket.get("manifests/acme/a/v1.json"), source="manifests/acme/a/v1.json")
    b = decode_manifest(bucket.get("manifests/acme/b/latest.json"), source="manifests/acme/b/latest.json")
    spliced = msgspec.structs.replace(a, mid=[b.mid[0], *a.mid[1:]])  # b's layer 0, whose part is in the bucket
    bucket.put("manifests/acme/a/v1.json", encode_manifest(spliced))
    refused(bucket, "acme/a", "v1", "the manifest changed after signing")


def test_a_signature_by_an_untrusted_key_is_refused(
    source: Path, bucket: Bucket, acme: Key, mallory: Key, refused: Any
) -> None:
    sepstore.push(source, bucket.url, name="acme/a", tag="v1", sign=mallory.path, quiet=True)
    refused(bucket, "acme/a", "v1", "no valid signature")
    # filed under the trusted key's id, it still names mallory's key, and would not verify with acme's
    bucket.copy(bucket.signature(name="acme/a", tag="v1", key=mallory), bucket.signature("acme/a", "v1", acme))
    refused(bucket, "acme/a", "v1", f"signed by key {mallory.id}, not {acme.id}")


def test_a_signature_for_one_model_is_not_accepted_for_another(
    source: Path, bucket: Bucket, acme: Key, refused: Any
) -> None:
    publish(source, bucket, "acme/a", "v1", acme)
    publish(source, bucket, "acme/b", "latest", acme)
    bucket.copy(bucket.signature("acme/a", "v1", acme), bucket.signature("acme/b", "latest", acme))
    refused(bucket, "acme/b", "latest", "changed after signing")
    # acme/a's manifest and signature, both moved under acme/b: the manifest's own name gives it away
    bucket.copy("manifests/acme/a/v1.json", "manifests/acme/b/latest.json")
    refused(bucket, "acme/b", "latest", "names itself 'acme/a', but is not published as")


def test_a_signature_for_one_tag_is_not_accepted_for_another(
    source: Path, bucket: Bucket, acme: Key, refused: Any
) -> None:
    publish(source, bucket, "acme/a", "v1", acme)
    bucket.copy("manifests/acme/a/v1.json", "manifests/acme/a/latest.json")
    bucket.copy(bucket.signature("acme/a", "v1", acme), bucket.signature("acme/a", "latest", acme))
    refused(bucket, "acme/a", "latest", "signs tag 'v1', not 'latest'")


def test_a_key_is_refused_outside_the_names_it_may_sign(
    tmp_path: Path, bucket: Bucket, acme: Key, refused: Any
) -> None:
    other = tmp_path / "other"
    sepstore.dump(llama_decider, small(3), other, name="globex/c", tag="v1", quiet=True)
    publish(other, bucket, "globex/c", "v1", acme)
    refused(bucket, "globex/c", "v1", r"allows this key to sign only \['acme/\*'\], not 'globex/c'")


@pytest.mark.parametrize("field", ["payload", "sig", "hint"])
def test_a_tampered_envelope_is_refused(source: Path, bucket: Bucket, acme: Key, refused: Any, field: str) -> None:
    publish(source, bucket, "acme/a", "v1", acme)
    path = bucket.signature("acme/a", "v1", acme)
    bundle = json.loads(bucket.get(path))
    envelope = bundle["dsseEnvelope"]
    if field == "payload":  # the statement says another tag, signature unchanged
        statement = json.loads(base64.b64decode(envelope["payload"]))
        statement["predicate"]["sepstore"]["issued_at"] = "2099-01-01T00:00:00.000000Z"
        envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
        match = "does not verify"
    elif field == "sig":
        sig = bytearray(base64.b64decode(envelope["signatures"][0]["sig"]))
        sig[-1] ^= 1
        envelope["signatures"][0]["sig"] = base64.b64encode(sig).decode()
        match = "does not verify"
    else:
        bundle["verificationMaterial"]["publicKey"]["hint"] = "0" * 64
        match = "signed by key 0000"
    bucket.put(path, json.dumps(bundle).encode())
    refused(bucket, "acme/a", "v1", match)
    bucket.put(path, b'{"mediaType": "not a bundle"}')
    refused(bucket, "acme/a", "v1", "not a Sigstore bundle")


def test_a_rolled_back_tag_is_refused_after_a_newer_one_was_loaded(
    source: Path, bucket: Bucket, acme: Key, policy: Path, node_cache: Path, refused: Any
) -> None:
    publish(source, bucket, "acme/a", "v1", acme, as_tag="latest")
    old_manifest = bucket.get("manifests/acme/a/latest.json")
    old_signature = bucket.get(bucket.signature("acme/a", "latest", acme))
    sepstore.load(bucket.url, "b", name="acme/a", tag="latest", trust=policy, cache_dir=node_cache)
    publish(source, bucket, "acme/a", "v2", acme, as_tag="latest")
    sepstore.load(bucket.url, "b", name="acme/a", tag="latest", trust=policy, cache_dir=node_cache)
    bucket.put("manifests/acme/a/latest.json", old_manifest)
    bucket.put(bucket.signature("acme/a", "latest", acme), old_signature)
    refused(bucket, "acme/a", "latest", "refusing a rollback")
    psd = sepstore.load(
        bucket.url, "b", name="acme/a", tag="latest", trust=policy, cache_dir=node_cache, allow_rollback=True
    )
    assert psd.begin
    refused(bucket, "acme/a", "latest", "refusing a rollback")  # on purpose once is not forever


def test_parts_redirected_to_another_host_are_refused(
    source: Path, bucket: Bucket, acme: Key, tmp_path: Path, refused: Any
) -> None:
    publish(source, bucket, "acme/a", "v1", acme)
    manifest = decode_manifest(bucket.get("manifests/acme/a/v1.json"), source="manifests/acme/a/v1.json")
    elsewhere = "s3://elsewhere/parts/blake3" if bucket.url.startswith("s3://") else str(tmp_path / "elsewhere")
    bucket.put("manifests/acme/a/v1.json", encode_manifest(msgspec.structs.replace(manifest, parts=elsewhere)))
    refused(bucket, "acme/a", "v1", "leads outside the store")
    # even signed by the publisher, parts outside the store are refused, unless the node names the mirror
    sepstore.sign(bucket.url, name="acme/a", tag="v1", key=acme.path)
    refused(bucket, "acme/a", "v1", "leads outside the store")
    mirror = f"{bucket.url}/parts/blake3"
    assert sepstore.load(bucket.url, "b", name="acme/a", tag="v1", trust=acme.pub, parts_url=mirror).begin


def test_a_node_loads_a_signed_model_over_http_where_nothing_can_be_listed(
    source: Path, acme: Key, mallory: Key, policy: Path, tmp_path: Path
) -> None:
    www = tmp_path / "www"
    publish(source, Bucket(str(www / "store"), fsspec.filesystem("file"), str(www / "store")), "acme/a", "v1", acme)
    sepstore.sign(www / "store", name="acme/a", tag="v1", key=mallory.path)
    server = StaticServer(www).start()
    try:
        url = f"{server.url}/store/manifests/acme/a/v1.json"
        assert sepstore.load(url, "b", trust=policy).begin  # the signature is asked for by key id
        assert sepstore.verify(url, "b", quiet=True, trust=policy).signatures.satisfied
        sepstore.keygen(tmp_path / "nobody")
        with pytest.raises(sepstore.TrustError, match="no valid signature"):
            sepstore.load(url, "b", trust=tmp_path / "nobody.pub")
    finally:
        server.stop()


# -- the policy ------------------------------------------------------------------------------------


@pytest.mark.parametrize("function", sorted(READERS))
def test_every_function_that_reads_a_model_enforces_the_policy(
    function: str, source: Path, tmp_path: Path, acme: Key
) -> None:
    url = str(source / "manifests/acme/a/v1.json")
    with pytest.raises(sepstore.TrustError, match="no valid signature"):
        call(function, url, tmp_path, trust=acme.pub)
    sepstore.sign(url, key=acme.path)
    for ref in (url, sepstore.ModelRef(str(source), name="acme/a", tag="v1"), sepstore.resolve(url)):
        assert call(function, ref, tmp_path, trust=acme.pub) is not None


def test_a_manifest_object_cannot_be_checked_against_a_policy(source: Path, acme: Key) -> None:
    manifest = sepstore.read_manifest(source, name="acme/a", tag="v1")
    with pytest.raises(sepstore.RefError, match="trust= cannot apply to a Manifest object"):
        sepstore.diff(manifest, manifest, trust=acme.pub)


def test_allow_rollback_without_a_policy_is_refused(source: Path) -> None:
    with pytest.raises(sepstore.RefError, match="allow_rollback= applies only with a trust policy"):
        sepstore.read_manifest(source, name="acme/a", tag="v1", allow_rollback=True)


def test_a_policy_takes_inline_keys_and_globs_and_refuses_unknown_fields(
    source: Path, acme: Key, tmp_path: Path
) -> None:
    sepstore.sign(source, name="acme/a", tag="v1", key=acme.path)
    path = tmp_path / "inline.json"
    path.write_text(json.dumps({"keys": [{"public_key": acme.pub.read_text(), "names": ["acme/?"]}]}))
    assert sepstore.read_manifest(source, name="acme/a", tag="v1", trust=path).name == "acme/a"
    twice = [{"public_key": "acme.key.pub", "names": ["globex/*"]}, {"public_key": "acme.key.pub", "names": ["acme/a"]}]
    path.write_text(json.dumps({"keys": twice}))
    assert sepstore.signatures(source, name="acme/a", tag="v1", trust=path).satisfied
    path.write_text(json.dumps({"keys": [{"public_key": str(acme.pub), "names": ["acme/*"], "threshold": 2}]}))
    with pytest.raises(sepstore.KeyFileError, match="not a trust policy"):
        sepstore.read_manifest(source, name="acme/a", tag="v1", trust=path)
    path.write_text(json.dumps({"keys": [{"public_key": "missing.pub", "names": ["*"]}]}))
    with pytest.raises(sepstore.KeyFileError, match=r"keys\[0\].public_key"):
        sepstore.read_manifest(source, name="acme/a", tag="v1", trust=path)


@pytest.mark.parametrize("kind", ["ec:P-256", "ec:P-384", "ed25519"])
def test_keys_made_with_openssl_sign_and_verify(kind: str, source: Path, tmp_path: Path) -> None:
    import subprocess

    assert shutil.which("openssl"), "openssl is needed (.ci/run installs it)"
    key, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    algorithm = (
        ["-algorithm", "EC", "-pkeyopt", f"ec_paramgen_curve:{kind[3:]}"]
        if kind != "ed25519"
        else ["-algorithm", "ED25519"]
    )
    subprocess.run(["openssl", "genpkey", *algorithm, "-out", key], check=True, capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", key, "-pubout", "-out", pub], check=True, capture_output=True)
    sepstore.sign(source, name="acme/a", tag="v1", key=key)
    assert sepstore.signatures(source, name="acme/a", tag="v1", trust=pub).satisfied


def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path: Path) -> None:
    key_id = sepstore.keygen(tmp_path / "k")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "k.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert len(key_id) == 64
    with pytest.raises(sepstore.KeyFileError, match="exists"):
        sepstore.keygen(tmp_path / "k")


def test_unusable_keys_are_named(tmp_path: Path, source: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "rsa.pem").write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(sepstore.KeyFileError, match="sepstore signs with ECDSA"):
        sepstore.sign(source, name="acme/a", tag="v1", key=tmp_path / "rsa.pem")
    with pytest.raises(sepstore.KeyFileError, match="private key: cannot read"):
        sepstore.sign(source, name="acme/a", tag="v1", key=tmp_path / "missing.pem")
    (tmp_path / "enc.pem").write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    with pytest.raises(sepstore.KeyFileError, match="is encrypted"):
        sepstore.sign(source, name="acme/a", tag="v1", key=tmp_path / "enc.pem")


def test_a_manifest_outside_a_store_cannot_be_signed(tmp_path: Path, source: Path, acme: Key) -> None:
    loose = source / "manifests/acme/renamed/v1.json"
    loose.parent.mkdir()
    shutil.copy(source / "manifests/acme/a/v1.json", loose)
    with pytest.raises(sepstore.RefError, match="not published in a store under its own name"):
        sepstore.sign(loose, key=acme.path)


# -- the command line ------------------------------------------------------------------------------


def test_the_cli_signs_and_a_policy_failure_exits_1(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sepstore.cli import main

    key = str(tmp_path / "cli.key")
    assert main(["keygen", key]) == 0
    ref = ["info", str(source), "--name", "acme/a", "--tag", "v1"]
    assert main([*ref, "--trust-key", f"{key}.pub"]) == 1
    assert "no valid signature" in capsys.readouterr().err
    assert main(["sign", str(source), "--name", "acme/a", "--tag", "v1", "--key", key]) == 0
    capsys.readouterr()
    assert main([*ref, "--trust-key", f"{key}.pub", "--json"]) == 0
    trust = json.loads(capsys.readouterr().out)["trust"]
    assert trust["satisfied"] is True and trust["signatures"][0]["valid"] is True
    assert main(["verify", str(source), "--name", "acme/a", "--tag", "v1", "--quiet", "--trust-key", f"{key}.pub"]) == 0
    assert "valid" in capsys.readouterr().out
    dest = str(tmp_path / "dest")
    push = ["push", str(source), dest, "--name", "acme/b", "--tag", "latest", "--quiet"]
    assert main([*push, "--sign", key, "--trust-key", f"{key}.pub"]) == 1  # the source is not signed
    assert main([*push, "--sign", key]) == 0
    assert "signatures there: " in capsys.readouterr().out
    assert main(["pull", dest, "--quiet", "--cache-dir", str(tmp_path / "c"), "--trust-key", f"{key}.pub"]) == 0
    assert main(["pull", dest, "--quiet", "--allow-rollback"]) == 2  # no policy to roll back against


# -- other tools -----------------------------------------------------------------------------------


def test_model_signing_verifies_a_signature_and_the_store_it_signs(source: Path, acme: Key) -> None:
    model_signing = pytest.importorskip("model_signing")
    report = sepstore.sign(source, name="acme/a", tag="v1", key=acme.path)
    config = model_signing.verifying.Config().use_elliptic_key_verifier(public_key=acme.pub)
    config.set_ignore_unsigned_files(True).verify(source, Path(report.signature_url))
    begin = sepstore.read_manifest(source, name="acme/a", tag="v1").begin
    assert begin is not None
    part = source / "parts/blake3" / f"{begin.digest.removeprefix('blake3:')}.safetensors"
    part.chmod(0o644)
    with open(part, "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    with pytest.raises(ValueError, match="Hash mismatch"):
        config.verify(source, Path(report.signature_url))


# -- gc --------------------------------------------------------------------------------------------


def test_gc_keeps_the_signatures_of_kept_tags_and_removes_those_of_deleted_or_replaced_ones(
    source: Path, bucket: Bucket, acme: Key, mallory: Key
) -> None:
    publish(source, bucket, "acme/a", "v1", acme)
    publish(source, bucket, "acme/a", "v2", acme)
    publish(source, bucket, "acme/b", "latest", acme)
    sepstore.sign(bucket.url, name="acme/b", tag="latest", key=mallory.path)
    publish(source, bucket, "acme/a", "v1", acme, as_tag="latest")
    bucket.fs.rm_file(f"{bucket.root}/manifests/acme/a/v2.json")  # a deleted tag
    # acme/b's tag now holds another manifest: mallory's signature of the old one is stale, acme's is re-made
    sepstore.dump(llama_decider, small(4), source, name="acme/b", tag="next", quiet=True)
    publish(source, bucket, "acme/b", "next", acme, as_tag="latest")
    stale = {bucket.signature("acme/a", "v2", acme), bucket.signature("acme/b", "latest", mallory)}

    young = sepstore.gc(bucket.url, dry_run=True)
    assert young.signatures_removed == [] and young.signatures_kept == 3
    dry = sepstore.gc(bucket.url, grace=0, dry_run=True)
    assert {url.split("/store/", 1)[-1].split("/bucket/", 1)[-1] for url in dry.signatures_removed} == stale
    report = sepstore.gc(bucket.url, grace=0)
    assert report.signatures_removed == dry.signatures_removed and report.signatures_kept == 3
    bucket.fs.invalidate_cache()
    for path in stale:
        assert not bucket.fs.exists(f"{bucket.root}/{path}")
    for name, tag in (("acme/a", "v1"), ("acme/a", "latest"), ("acme/b", "latest")):
        assert sepstore.signatures(bucket.url, name=name, tag=tag, trust=acme.pub).satisfied


def test_an_unreadable_rollback_state_is_refused_not_reset(source: Path, acme: Key, node_cache: Path) -> None:
    sepstore.sign(source, name="acme/a", tag="v1", key=acme.path)
    sepstore.read_manifest(source, name="acme/a", tag="v1", trust=acme.pub)
    (state,) = (node_cache / "trust").rglob("v1.json")
    state.write_text("{")
    with pytest.raises(sepstore.TrustError, match=r"rollback state .* is unreadable; delete it"):
        sepstore.read_manifest(source, name="acme/a", tag="v1", trust=acme.pub)
