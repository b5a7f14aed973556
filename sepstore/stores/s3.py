"""An S3 object composed from ranges of other objects of the bucket and bytes of a local file: a
multipart upload whose parts are ``UploadPartCopy`` ranges or uploads. This is the execution behind
:meth:`~sepstore.stores.fsspec.FsspecStore.put_blob_composed`; what to copy from where, and the
checks of each part's ETag, are planned by :mod:`sepstore.compose`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import retry
from ..errors import SepstoreError
from ..safetensors_io import pread_exact
from ..store import s3_code

__all__ = ["EncryptedUploadError", "Run", "abort_upload", "compose_object"]

log = logging.getLogger(__name__)


class EncryptedUploadError(SepstoreError):
    """S3 encrypts the object being composed with a KMS or a customer's key (it says so when the
    upload is created): the ETags of its parts are then not MD5s, so they cannot check them."""


@dataclass(frozen=True)
class Run:
    """Bytes ``start:end`` of the new object: copied from ``source`` (the digest of a part the store
    holds) at ``source_start``, or uploaded from the local file when ``source`` is ``None``."""

    start: int
    end: int
    source: str | None = None
    source_start: int = 0

    @property
    def length(self) -> int:
        return self.end - self.start

    def cut(self, at: int) -> tuple[Run, Run]:
        """This run split ``at`` bytes from its start."""
        shift = self.source_start + at if self.source is not None else 0
        return Run(self.start, self.start + at, self.source, self.source_start), Run(
            self.start + at, self.end, self.source, shift
        )


#: ``check(number, run, data, etag)``: raises when part ``number`` (``run``; ``data``, the bytes
#: uploaded, or ``None`` for a copy) came back with an ETag that is not the expected one.
Check = Callable[[int, Run, bytes | None, str], None]


async def compose_object(
    fs: Any,
    path: str,
    runs: Sequence[Run],
    *,
    source_path: Callable[[str], str],
    local: str,
    workers: int,
    buffers: asyncio.Semaphore,
    check: Check,
    sent: Callable[[int], None],
) -> None:
    """Write the object ``path`` of the S3 filesystem ``fs`` as a multipart upload of ``runs`` (each
    an S3 part: copied from the object ``source_path(run.source)``, or read from the file ``local``),
    ``workers`` parts at once, local bytes held under ``buffers``. Every answer's ETag goes to
    ``check``; any failure aborts the upload (an :class:`EncryptedUploadError` before any part is
    sent, where S3 says it encrypts the object with a KMS or a customer key). ``sent(n)`` counts the
    bytes uploaded as they are sent."""
    bucket, key, _ = fs.split_path(path)
    upload = await fs._call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    upload_id = upload["UploadId"]
    encryption = str(upload.get("ServerSideEncryption", ""))
    if encryption.startswith("aws:kms") or upload.get("SSECustomerAlgorithm"):
        await abort_upload(fs, bucket, key, upload_id)
        raise EncryptedUploadError(
            f"{key}: S3 encrypts it with {encryption or 'a customer key'}, so its parts' ETags are not their MD5s"
        )
    gate = asyncio.Semaphore(workers)

    async def send(number: int, run: Run) -> dict[str, Any]:
        async with gate:
            common = {"Bucket": bucket, "Key": key, "UploadId": upload_id, "PartNumber": number}
            if run.source is None:
                async with buffers:
                    data = await asyncio.to_thread(_read, local, run)
                    sent(len(data))  # counted when it is sent, whether or not it is used
                    answer = await fs._call_s3("upload_part", Body=data, **common)
                    await asyncio.to_thread(check, number, run, data, answer["ETag"])
                return {"PartNumber": number, "ETag": answer["ETag"]}
            src_bucket, src_key, _ = fs.split_path(source_path(run.source))
            answer = await fs._call_s3(
                "upload_part_copy",
                CopySource={"Bucket": src_bucket, "Key": src_key},
                CopySourceRange=f"bytes={run.source_start}-{run.source_start + run.length - 1}",
                **common,
            )
            etag = answer["CopyPartResult"]["ETag"]
            async with buffers:
                await asyncio.to_thread(check, number, run, None, etag)
            return {"PartNumber": number, "ETag": etag}

    tasks = [asyncio.ensure_future(send(n, run)) for n, run in enumerate(runs, 1)]
    try:
        # every answer is awaited: an upload's ETag mismatch is seen (and reported) even when a copy failed first
        answers = await asyncio.gather(*tasks, return_exceptions=True)
        failed = [a for a in answers if isinstance(a, BaseException)]
        if failed:
            raise failed[0]
        done = [a for a in answers if not isinstance(a, BaseException)]
        await fs._call_s3(
            "complete_multipart_upload",
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": list(done)},
        )
    except BaseException:
        for task in tasks:
            task.cancel()
        await abort_upload(fs, bucket, key, upload_id)
        raise
    info = await fs._call_s3("head_object", Bucket=bucket, Key=key)
    expected = runs[-1].end if runs else 0
    if info.get("ContentLength") != expected:
        raise SepstoreError(f"{key}: {info.get('ContentLength')} bytes after composing, expected {expected}")


async def abort_upload(fs: Any, bucket: str, key: str, upload_id: str) -> None:
    """Abort a multipart upload, tried as :func:`~sepstore.retry.with_retries` tries (an abort can be
    repeated; one S3 no longer knows is done): an upload left open is billed for its parts until a
    lifecycle rule ends it, so one that cannot be aborted is a warning naming it, not a failure
    that would hide the one that made it abort."""
    for attempt in range(1, retry.ATTEMPTS + 1):
        try:
            await fs._call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
            return
        except Exception as exc:
            if s3_code(exc) == "NoSuchUpload":
                return
            if attempt < retry.ATTEMPTS and retry.is_transient(exc):
                await asyncio.sleep(retry.backoff(attempt))
                continue
            log.warning(
                "s3://%s/%s: the multipart upload %s could not be aborted (%s: %s); it stays open, and is "
                "billed, until aborted (aws s3api abort-multipart-upload) or ended by a lifecycle rule",
                bucket,
                key,
                upload_id,
                type(exc).__name__,
                exc,
            )
            return


def _read(path: str, run: Run) -> bytes:
    """The local file's bytes of ``run`` (a part to upload)."""
    with open(path, "rb", buffering=0) as file:
        data = pread_exact(file.fileno(), run.length, run.start)
    if len(data) != run.length:
        raise OSError(f"{path} ended before byte {run.end}")
    return bytes(data)
