"""Outputs in an S3-compatible bucket (AWS S3, MinIO, Cloudflare R2, GCS in S3 mode).

Every API process writes to and reads from the same bucket, so any replica serves any
image, and no replica's disk holds the only copy. Clients get either this API's URL
(``/v1/outputs/{id}``, streamed from the bucket) or a presigned URL straight to the bucket
(``ZIMAGE_OUTPUT_URLS=presigned``), valid for the output TTL (at most 7 days, SigV4's cap).
Expiry: ``sweep`` (every process runs it each minute; deleting twice is harmless) removes
objects older than the TTL, and reads refuse them meanwhile; a bucket lifecycle rule (days,
not seconds) may be added as a backstop. Credentials come from boto3's usual chain
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile, an instance or pod role).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from zimage_server.core.errors import (
    OutputNotFound,
    OutputStoreUnavailable,
    ZImageError,
)
from zimage_server.store.outputs import SPACE_RECHECK_S, Stored, check_id, media_type_of

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

PRESIGN_MAX_S = 7 * 86_400
CHUNK_BYTES = 256 * 1024


class BucketStore:
    """Implements ``Outputs`` on one bucket, under ``prefix``."""

    def __init__(
        self,
        bucket: str,
        ttl_s: int,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        prefix: str = "outputs/",
        presigned: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        import boto3
        from botocore.config import Config

        config = Config(
            connect_timeout=3,
            read_timeout=15,
            retries={"max_attempts": 2, "mode": "standard"},
            # MinIO and most self-hosted servers want path-style addressing.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
        )
        self.client: S3Client = boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )
        self.bucket, self.ttl_s, self.prefix = bucket, ttl_s, prefix
        self.presigned, self.clock = presigned, clock
        self.where = f"bucket '{bucket}'" + (f" at {endpoint_url}" if endpoint_url else "")
        self._room_seen_at = -float("inf")

    @contextmanager
    def _reachable(self, output_id: str | None = None) -> Iterator[None]:
        """botocore's errors as ours: a missing object is a 404, anything else a 503."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if output_id is not None and code in ("NoSuchKey", "404", "NotFound"):
                raise self._missing(output_id) from None
            raise self._unavailable(code or "refused") from exc
        except BotoCoreError as exc:
            raise self._unavailable(type(exc).__name__) from exc

    def _unavailable(self, why: str) -> ZImageError:
        return OutputStoreUnavailable(
            f"The output store ({self.where}) is unavailable ({why}); nothing was charged. "
            "Retry shortly.",
            retry_after=5,
        )

    def _missing(self, output_id: str) -> OutputNotFound:
        return OutputNotFound(
            f"No output named '{output_id}': it never existed or has expired "
            f"(outputs are kept for {self.ttl_s} s)."
        )

    def room_recently_seen(self) -> bool:
        return time.monotonic() - self._room_seen_at < SPACE_RECHECK_S

    def check_space(self) -> None:
        """A bucket has no free-space reading; check instead that it answers, so that an
        unreachable one refuses work (503) before anything is held or rendered."""
        with self._reachable():
            self.client.head_bucket(Bucket=self.bucket)
        self._room_seen_at = time.monotonic()

    def save(self, data: bytes, image_format: str) -> str:
        output_id = f"{secrets.token_urlsafe(24)}.{image_format}"
        with self._reachable():
            self.client.put_object(
                Bucket=self.bucket,
                Key=self.prefix + output_id,
                Body=data,
                ContentType=media_type_of(output_id),
            )
        return output_id

    def _get(self, output_id: str) -> Any:
        check_id(output_id)
        with self._reachable(output_id):
            reply = self.client.get_object(Bucket=self.bucket, Key=self.prefix + output_id)
        if self.clock() - reply["LastModified"].timestamp() > self.ttl_s:
            reply["Body"].close()
            raise OutputNotFound(
                f"Output '{output_id}' has expired (outputs are kept for {self.ttl_s} s)."
            )
        return reply

    def read(self, output_id: str) -> bytes:
        reply = self._get(output_id)
        with self._reachable(output_id):
            return bytes(reply["Body"].read())

    def open(self, output_id: str) -> Stored:
        reply = self._get(output_id)
        return Stored(
            media_type_of(output_id),
            chunks=self._chunks(reply["Body"], output_id),
            size=int(reply["ContentLength"]),
        )

    def _chunks(self, body: Any, output_id: str) -> Iterator[bytes]:
        try:
            with self._reachable(output_id):
                yield from body.iter_chunks(CHUNK_BYTES)
        finally:
            body.close()

    def url(self, output_id: str, base_url: str) -> str:
        if not self.presigned:
            return f"{base_url}/v1/outputs/{output_id}"
        return self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self.prefix + output_id},
            ExpiresIn=min(self.ttl_s, PRESIGN_MAX_S),
        )

    def sweep(self) -> int:
        """Delete objects under the prefix older than the TTL; returns how many."""
        cutoff = self.clock() - self.ttl_s
        removed = 0
        with self._reachable():
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            )
            for page in pages:
                old: list[ObjectIdentifierTypeDef] = [
                    {"Key": item["Key"]}
                    for item in page.get("Contents", [])
                    if item["LastModified"].timestamp() < cutoff
                ]
                if old:
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": old})
                    removed += len(old)
        return removed
