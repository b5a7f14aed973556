"""S3 calls are retried by sepstore alone (:func:`sepstore.retry.with_retries`), once per try:
botocore's own retries inside each try made a dead endpoint 25 requests and 40 s of backoff to fail.
Writes (parts, manifests, leases) are retried as reads are."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
from aiohttp import web
from servers import CountingMotoServer, FaultProxy, _LoopbackServer

import sepstore
import sepstore.retry


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


def test_a_dead_s3_endpoint_fails_a_pull_after_one_request_per_try(unavailable: Refusing, tmp_path: Path) -> None:
    url = "s3://bucket/store/manifests/model/latest.json"
    with pytest.raises(sepstore.StoreError, match="after 2 tries"):
        sepstore.pull(url, cache_dir=tmp_path, storage_options=options(unavailable.url))
    assert len(unavailable.requests) == 2, [(r.method, r.path) for r in unavailable.requests]


def test_an_s3_bad_request_answer_is_final_not_retried(unavailable: Refusing, tmp_path: Path) -> None:
    unavailable.status = 400
    url = "s3://bucket/store/manifests/model/latest.json"
    with pytest.raises(sepstore.StoreError, match="Bad Request") as caught:
        sepstore.pull(url, cache_dir=tmp_path, storage_options=options(unavailable.url))
    assert "tries" not in str(caught.value) and len(unavailable.requests) == 1


def test_a_dead_s3_endpoint_fails_a_push_after_one_request_per_try(unavailable: Refusing, store: Path) -> None:
    with pytest.raises(sepstore.StoreError, match="after 2 tries"):
        sepstore.push(store, "s3://bucket/store", dest_storage_options=options(unavailable.url), quiet=True)
    assert len(unavailable.requests) == 2, [(r.method, r.path) for r in unavailable.requests]


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
