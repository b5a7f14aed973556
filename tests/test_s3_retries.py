"""S3 is retried at two levels (see :mod:`sepstore.backends`): sepstore's tries of each operation
(:func:`sepstore.retry.with_retries`), and within each try botocore's of each request
(``S3_REQUEST_ATTEMPTS``, unless the user configured botocore's); s3fs's own loop is off. So a dead
or hanging endpoint costs a known number of requests, one part of a multipart upload is sent again
alone, and an abort is retried. Writes (parts, manifests, leases) are retried as reads are."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import torch
from aiohttp import web
from fsspec.asyn import sync
from safetensors.torch import save
from servers import CountingMotoServer, FaultProxy, _LoopbackServer

import sepstore
import sepstore.retry
from sepstore.backends import S3_REQUEST_ATTEMPTS, open_url
from sepstore.demo import llama_decider
from sepstore.stores.s3 import EncryptedUploadError, Run, compose_object


class Refusing(_LoopbackServer):
    """An S3 endpoint that answers every request with ``status`` (503: a dead service behind a load
    balancer)."""

    methods = ("GET", "HEAD", "PUT", "POST", "DELETE")

    def __init__(self, status: int) -> None:
        super().__init__()
        self.status = status

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=self.status)


class FailingPuts(FaultProxy):
    """S3 through a proxy that answers the next ``failures`` PUTs whose path contains ``match`` 503."""

    def __init__(self, upstream: str, match: str, failures: int) -> None:
        super().__init__(upstream)
        self.match, self.failures = match, failures

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "PUT" and self.match in request.path and self.failures > 0:
            self.failures -= 1
            return web.Response(status=503)
        return await super()._handle(request)


def options(endpoint: str) -> dict[str, object]:
    return {
        "endpoint_url": endpoint,
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
        "skip_instance_cache": True,
    }


@pytest.fixture
def unavailable(monkeypatch: pytest.MonkeyPatch) -> Iterator[Refusing]:
    monkeypatch.setattr(sepstore.retry, "ATTEMPTS", 2)
    monkeypatch.setattr(sepstore.retry, "BASE_DELAY", 0.01)
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    server = Refusing(503).start()
    yield server
    server.stop()


class Hanging(_LoopbackServer):
    """An S3 endpoint that takes every request and never answers (a hung service behind a load
    balancer), until the client gives up."""

    methods = ("GET", "HEAD", "PUT", "POST", "DELETE")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        while request.transport is not None and not request.transport.is_closing():
            await asyncio.sleep(0.05)
        return web.Response(status=503)  # to no one


def test_a_dead_s3_endpoint_fails_a_pull_after_botocores_requests_in_each_try(
    unavailable: Refusing, tmp_path: Path
) -> None:
    url = "s3://bucket/store/manifests/model/latest.json"
    with pytest.raises(sepstore.StoreError, match="after 2 tries"):
        sepstore.pull(url, cache_dir=tmp_path, storage_options=options(unavailable.url))
    assert len(unavailable.requests) == 2 * S3_REQUEST_ATTEMPTS, [(r.method, r.path) for r in unavailable.requests]


def test_a_hanging_s3_endpoint_costs_botocores_requests_in_each_try_not_s3fs_retries_too(
    unavailable: Refusing, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEPSTORE_TIMEOUT", "0.5")
    hanging = Hanging().start()
    try:
        with pytest.raises(sepstore.StoreError, match="after 2 tries"):
            sepstore.push(store, "s3://bucket/store", dest_storage_options=options(hanging.url), quiet=True)
    finally:
        hanging.stop()
    assert len(hanging.requests) == 2 * S3_REQUEST_ATTEMPTS, [(r.method, r.path) for r in hanging.requests]


def test_botocores_retries_the_user_configured_in_the_aws_config_file_are_kept(
    unavailable: Refusing, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sepstore.retry, "ATTEMPTS", 1)
    config = tmp_path / "aws-config"
    config.write_text("[default]\nmax_attempts = 3\nretry_mode = standard\n")  # legacy's backoff is slow
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    url = "s3://bucket/store/manifests/model/latest.json"
    with pytest.raises(sepstore.StoreError, match="Service Unavailable"):
        sepstore.pull(url, cache_dir=tmp_path / "cache", storage_options=options(unavailable.url))
    assert len(unavailable.requests) == 3


def test_an_s3_bad_request_answer_is_final_not_retried(unavailable: Refusing, tmp_path: Path) -> None:
    unavailable.status = 400
    url = "s3://bucket/store/manifests/model/latest.json"
    with pytest.raises(sepstore.StoreError, match="Bad Request") as caught:
        sepstore.pull(url, cache_dir=tmp_path, storage_options=options(unavailable.url))
    assert "tries" not in str(caught.value) and len(unavailable.requests) == 1


def test_a_dead_s3_endpoint_fails_a_push_after_botocores_requests_in_each_try(
    unavailable: Refusing, store: Path
) -> None:
    with pytest.raises(sepstore.StoreError, match="after 2 tries"):
        sepstore.push(store, "s3://bucket/store", dest_storage_options=options(unavailable.url), quiet=True)
    assert len(unavailable.requests) == 2 * S3_REQUEST_ATTEMPTS, [(r.method, r.path) for r in unavailable.requests]


@pytest.mark.parametrize("match", ["/parts/blake3/", "/manifests/"])
def test_503s_to_s3_writes_are_retried_to_success(
    moto_server: CountingMotoServer, store: Path, monkeypatch: pytest.MonkeyPatch, match: str
) -> None:
    monkeypatch.setattr(sepstore.retry, "BASE_DELAY", 0.01)
    bucket = f"flaky-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(bucket)
    proxy = FailingPuts(moto_server.endpoint, match, 2).start()
    try:
        report = sepstore.push(store, f"s3://{bucket}/store", dest_storage_options=options(proxy.url), quiet=True)
    finally:
        proxy.stop()
    assert proxy.failures == 0 and report.manifest_written
    assert sepstore.verify(f"s3://{bucket}/store", quiet=True).ok


class FailingUploadPart(FaultProxy):
    """S3 through a proxy that answers the first ``UploadPart`` of part 2 with a 500."""

    failed = False

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("partNumber") == "2" and not self.failed:
            self.failed = True
            await request.read()
            return web.Response(status=500, body=b"<Error><Code>InternalError</Code><Message>x</Message></Error>")
        return await super()._handle(request)


def bucket_of(moto_server: CountingMotoServer) -> str:
    bucket = f"retries-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", endpoint_url=moto_server.endpoint, skip_instance_cache=True).mkdir(bucket)
    return bucket


def open_uploads(moto_server: CountingMotoServer, bucket: str) -> list[object]:
    fs = fsspec.filesystem("s3", endpoint_url=moto_server.endpoint, skip_instance_cache=True)
    return list(sync(fs.loop, fs._call_s3, "list_multipart_uploads", Bucket=bucket).get("Uploads", []))


def test_a_multipart_uploads_failed_part_is_sent_again_alone(moto_server: CountingMotoServer, tmp_path: Path) -> None:
    bucket = bucket_of(moto_server)
    local = tmp_path / "big"
    local.write_bytes(os.urandom(10 << 20))
    proxy = FailingUploadPart(moto_server.endpoint).start()
    try:
        fs, _ = open_url(f"s3://{bucket}/big", options(proxy.url))
        fs.put_file(str(local), f"{bucket}/big", chunksize=5 << 20)  # two parts
    finally:
        proxy.stop()
    assert proxy.failed and [r.method for r in proxy.requests].count("POST") == 2, "one upload, completed"
    direct = fsspec.filesystem("s3", endpoint_url=moto_server.endpoint, skip_instance_cache=True)
    assert direct.cat_file(f"{bucket}/big") == local.read_bytes()


class KmsBucket(FaultProxy):
    """S3 through a proxy that says it encrypts new uploads with KMS, and answers the first
    ``failures`` AbortMultipartUploads 503."""

    def __init__(self, upstream: str, failures: int) -> None:
        super().__init__(upstream)
        self.failures = failures

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "DELETE" and "uploadId" in request.query and self.failures > 0:
            self.failures -= 1
            return web.Response(status=503)
        answer = await super()._handle(request)
        if request.method == "POST" and "uploads" in request.query:
            answer.headers["x-amz-server-side-encryption"] = "aws:kms"
        return answer


@pytest.mark.parametrize("failures", [S3_REQUEST_ATTEMPTS, 100])
def test_an_abandoned_multipart_upload_is_aborted_through_503s_or_named_in_a_warning(
    moto_server: CountingMotoServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failures: int,
) -> None:
    monkeypatch.setattr(sepstore.retry, "ATTEMPTS", 2)
    monkeypatch.setattr(sepstore.retry, "BASE_DELAY", 0.01)
    bucket = bucket_of(moto_server)
    local = tmp_path / "local"
    local.write_bytes(b"x" * 100)
    proxy = KmsBucket(moto_server.endpoint, failures).start()
    try:
        fs, _ = open_url(f"s3://{bucket}/obj", options(proxy.url))
        with pytest.raises(EncryptedUploadError), caplog.at_level(logging.WARNING, "sepstore"):
            sync(
                fs.loop,
                compose_object,
                fs,
                f"{bucket}/obj",
                [Run(0, 100)],
                source_path=str,
                local=str(local),
                workers=1,
                buffers=asyncio.Semaphore(1),
                check=lambda *_: None,
                sent=lambda _: None,
            )
    finally:
        proxy.stop()
    left = open_uploads(moto_server, bucket)
    if failures < 2 * S3_REQUEST_ATTEMPTS:
        assert not left and not [r for r in caplog.records if r.name.startswith("sepstore")]
    else:
        assert len(left) == 1 and left[0]["UploadId"] in caplog.text and f"s3://{bucket}/obj" in caplog.text  # type: ignore[index]


class EachRequestFailsFirst(FaultProxy):
    """S3 through a proxy that answers each distinct request whose path or query names ``match``
    503 ``failures`` times before it forwards it: every call needs another of sepstore's tries."""

    def __init__(self, upstream: str, match: str, failures: int) -> None:
        super().__init__(upstream)
        self.match, self.failures = match, failures
        self.failed: dict[tuple[str, str], int] = {}

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        seen = (request.method, request.path_qs)
        if self.match in request.path_qs and self.failed.get(seen, 0) < self.failures:
            self.failed[seen] = self.failed.get(seen, 0) + 1
            await request.read()
            return web.Response(status=503)
        return await super()._handle(request)


def test_a_convert_from_s3_retries_the_listing_of_its_checkpoint(
    moto_server: CountingMotoServer,
    state_dict: dict[str, torch.Tensor],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sepstore.retry, "BASE_DELAY", 0.01)
    bucket = bucket_of(moto_server)
    direct = fsspec.filesystem("s3", endpoint_url=moto_server.endpoint, skip_instance_cache=True)
    direct.pipe_file(f"{bucket}/ckpt/model.safetensors", save({k: v.contiguous() for k, v in state_dict.items()}))
    direct.pipe_file(f"{bucket}/ckpt/config.json", json.dumps({"model_type": "llama"}).encode())
    direct.pipe_file(f"{bucket}/ckpt/tokenizer.json", b"{}")
    proxy = EachRequestFailsFirst(moto_server.endpoint, "prefix=ckpt", S3_REQUEST_ATTEMPTS).start()
    try:
        sepstore.convert(f"s3://{bucket}/ckpt", tmp_path / "store", storage_options=options(proxy.url), quiet=True)
    finally:
        proxy.stop()
    assert proxy.failed, "the listing was answered 503 first"
    assert sepstore.verify(tmp_path / "store", quiet=True).ok


class LosesManifestAnswers(FaultProxy):
    """S3 through a proxy that forwards each manifest PUT, then drops the connection of the first
    of them: S3 has stored it, the client does not know."""

    lost = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        answer = await super()._handle(request)
        if request.method == "PUT" and "/manifests/" in request.path and self.lost == 0:
            self.lost += 1
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=503)
        return answer


def test_a_dump_whose_conditional_manifest_write_lost_its_answer_is_no_conflict(
    moto_server: CountingMotoServer, state_dict: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sepstore.retry, "BASE_DELAY", 0.01)
    url = f"s3://{bucket_of(moto_server)}/store"
    proxy = LosesManifestAnswers(moto_server.endpoint).start()
    try:
        sepstore.dump(llama_decider, state_dict, url, storage_options=options(proxy.url), quiet=True)  # If-None-Match
        proxy.lost = 0
        extra = {"extra.weight": torch.ones(3)}
        sepstore.dump(llama_decider, extra, url, storage_options=options(proxy.url), quiet=True)  # If-Match
    finally:
        proxy.stop()
    assert proxy.lost == 1
    manifest = sepstore.read_manifest(f"{url}/manifests/model/latest.json")
    assert "extra.weight" in {name for _, part in manifest.labelled_parts() for name in part.tensors}
