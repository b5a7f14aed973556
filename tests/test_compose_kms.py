"""A push to an S3 bucket that encrypts new objects with KMS keys: the ETags of a multipart upload's
parts are not MD5s there, so no part is composed from server-side copies (which could not be
checked), and no upload is started in vain: S3 says it encrypts the object as the upload is created."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import fsspec
import pytest
from aiohttp import web
from servers import CountingMotoServer, FaultProxy
from test_delta import big_layer, lora_merged

import sepstore
from sepstore.demo import llama_decider


class KmsProxy(FaultProxy):
    """S3 through a proxy that answers as a bucket whose default encryption is SSE-KMS: a new
    multipart upload says ``x-amz-server-side-encryption: aws:kms`` (moto's do not), and the ETags of
    its parts are not their MD5s (moto's are). ``parts`` counts the parts sent or copied."""

    methods = FaultProxy.methods
    parts = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        answer = await super()._handle(request)
        if request.method == "POST" and "uploads" in request.query:
            answer.headers["x-amz-server-side-encryption"] = "aws:kms"
        elif request.method == "PUT" and "partNumber" in request.query:
            self.parts += 1
            assert isinstance(answer, web.Response) and isinstance(answer.body, bytes)
            body = re.sub(rb"<ETag>.*?</ETag>", b"<ETag>&quot;" + b"1" * 32 + b"&quot;</ETag>", answer.body)
            headers = {k: v for k, v in answer.headers.items() if k.lower() not in ("content-length", "etag")}
            return web.Response(body=body, status=answer.status, headers={**headers, "ETag": '"' + "0" * 32 + '"'})
        return answer


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``big:v1``, and ``big:v2`` whose changed tensors are a fraction of its one large layer."""
    store = tmp_path_factory.mktemp("kms") / "store"
    sd = big_layer()
    sepstore.dump(llama_decider, sd, store, name="big", tag="v1", quiet=True)
    sepstore.dump(llama_decider, lora_merged(sd), store, name="big", tag="v2", quiet=True)
    return store


def test_a_push_to_a_kms_encrypted_bucket_uploads_changed_parts_whole_without_composing_first(
    two_versions: Path, moto_server: CountingMotoServer
) -> None:
    bucket = f"kms-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(bucket)
    proxy = KmsProxy(moto_server.endpoint).start()
    try:
        options = {"endpoint_url": proxy.url, "skip_instance_cache": True}
        dest = f"s3://{bucket}/store"
        sepstore.push(two_versions / "manifests/big/v1.json", dest, dest_storage_options=options, quiet=True)
        proxy.requests.clear()
        report = sepstore.push(two_versions / "manifests/big/v2.json", dest, dest_storage_options=options, quiet=True)
    finally:
        proxy.stop()
    assert report.uploaded == ["mid.0"] and report.copied_bytes == 0
    assert proxy.parts == 0, "no part composed, none sent in vain"
    assert sepstore.verify(dest, name="big", tag="v2", quiet=True).ok
