"""The environment the benchmarks run S3 clients in."""

from __future__ import annotations

import os

__all__ = ["point_aws_at"]


def point_aws_at(endpoint: str) -> None:
    """Point boto and s3fs (through the AWS environment variables) at the S3 server ``endpoint``
    (moto's, on 127.0.0.1), with moto's test credentials."""
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
