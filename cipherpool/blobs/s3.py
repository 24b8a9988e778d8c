"""The S3-compatible backend (``CIPHERPOOL_BLOB_STORE=s3``): MinIO, Ceph RGW, SeaweedFS, AWS.

Client: boto3/botocore, the reference client of the S3 API, which those servers test against;
its transfer manager sends a large object in parts (a 512 MiB key without holding it twice
in memory) and it reads credentials from the settings or, when those are unset, from the
usual chain (``AWS_*`` variables, a profile, an instance role).

Objects are ``<prefix>blob/<kind>/<sha256>``, ``<prefix>staged/<account>/<sha256>`` and
``<prefix>payload/<ref>``. A temporary's deadline is in its metadata (``x-amz-meta-deadline``,
epoch seconds): a read past it finds nothing, :meth:`S3Backend.sweep` deletes it, and a
bucket lifecycle rule on ``staged/`` and ``payload/`` (one day) is a backstop an operator may add.

An upload in progress is spooled on the local disk of the gateway streaming it (one request
from its first chunk to its adoption), under ``<data dir>/blob-spool`` with its own deadline,
then sent in one managed transfer when a row owns it (``persist``) or it is staged (``move``).
S3 multipart uploads need parts of at least 5 MiB and keep every unfinished upload billed
until aborted, which a gateway that dies mid-upload would never do; a spool file is swept.

Quota and full-storage errors (MinIO's ``XMinioAdminBucketQuotaExceeded`` and
``XMinioStorageFull``, RGW's ``QuotaExceeded``, any 507) are :class:`StoreFull`; a server that
does not answer is :class:`BrokerUnavailable`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from cipherpool.blobs.base import SizeCap, full_message, is_upload, name_of, parts_of
from cipherpool.blobs.filesystem import FsBackend
from cipherpool.errors import BrokerUnavailable, StoreFull

T = TypeVar("T")
DEADLINE = "deadline"  # metadata of a temporary: when it expires (epoch seconds)
FULL_CODES = frozenset(
    {
        "QuotaExceeded",
        "XMinioAdminBucketQuotaExceeded",
        "XMinioStorageFull",
        "InsufficientStorage",
        "StorageFull",
        "XMinioBucketQuotaExceeded",
    }
)
MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0
TRANSFER = TransferConfig(multipart_threshold=64 * 1024**2, multipart_chunksize=16 * 1024**2, max_concurrency=4)


class S3Backend:
    kind = "s3"

    def __init__(
        self,
        bucket: str,
        *,
        spool: Path,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        prefix: str = "",
        addressing_style: str = "path",
        max_bytes: int = 0,
        clock: Callable[[], float] = time.time,
    ):
        self.bucket, self.prefix, self.endpoint_url = bucket, prefix, endpoint_url
        self._clock = clock
        config = Config(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            signature_version="s3v4",
            retries={"max_attempts": 2, "mode": "standard"},
            s3={"addressing_style": addressing_style},
        )
        session = boto3.session.Session()  # a session of our own: boto3's default one is not thread-safe
        self.client: Any = session.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region or "us-east-1",
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=config,
        )
        self.spool = FsBackend(spool, clock=clock)
        self.cap = SizeCap(max_bytes, self._bucket_bytes)

    def describe(self) -> str:
        return f"s3:{self.endpoint_url or 'aws'}/{self.bucket}/{self.prefix}"

    def ping(self) -> None:
        self._guard(lambda: self.client.head_bucket(Bucket=self.bucket))

    def key(self, name: str) -> str:
        return self.prefix + "/".join(parts_of(name))

    def _name(self, key: str) -> str:
        return name_of(key[len(self.prefix) :].split("/"))

    # -- errors ----------------------------------------------------------------------------

    def _guard(self, action: Callable[[], T]) -> T:
        try:
            return action()
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in FULL_CODES or status == 507:
                raise StoreFull(full_message(f"bucket {self.bucket}", code or "507")) from exc
            if code == "NoSuchBucket":
                raise BrokerUnavailable(f"The blob store's bucket {self.bucket} does not exist.") from exc
            raise BrokerUnavailable(f"The blob store (S3) refused: {code} {error.get('Message', '')}".strip()) from exc
        except S3UploadFailedError as exc:
            if any(code in str(exc) for code in FULL_CODES) or "(507)" in str(exc):
                raise StoreFull(full_message(f"bucket {self.bucket}", str(exc))) from exc
            raise BrokerUnavailable(f"The blob store (S3) refused an upload: {exc}") from exc
        except BotoCoreError as exc:  # no connection, a timeout, a reset
            raise BrokerUnavailable(f"Cannot reach the blob store (S3 at {self.endpoint_url or 'AWS'}): {exc}") from exc

    def _head(self, name: str) -> dict[str, Any] | None:
        """The object's HEAD, or None when missing."""
        try:
            head: dict[str, Any] = self._guard(lambda: self.client.head_object(Bucket=self.bucket, Key=self.key(name)))
        except BrokerUnavailable as exc:
            if _missing(exc.__cause__):
                return None
            raise
        return head

    def _get(self, name: str, **extra: Any) -> dict[str, Any] | None:
        try:
            reply: dict[str, Any] = self._guard(lambda: self.client.get_object(Bucket=self.bucket, Key=self.key(name), **extra))
        except BrokerUnavailable as exc:
            if _missing(exc.__cause__):
                return None
            raise
        return reply

    def _live(self, metadata: dict[str, str]) -> bool:
        try:
            return float(metadata.get(DEADLINE, "inf")) >= self._clock()
        except ValueError:
            return False

    def _deadline(self, ttl_s: int) -> dict[str, str]:
        return {DEADLINE: f"{self._clock() + ttl_s:.3f}"}

    # -- permanent objects ---------------------------------------------------------------

    def put(self, name: str, data: bytes) -> None:
        if self._head(name) is not None:  # content-addressed: it is there already
            return
        self.cap.charge(len(data))
        self._guard(lambda: self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=data))

    def get(self, name: str) -> bytes | None:
        reply = self._get(name)
        return None if reply is None else self._guard(lambda: bytes(reply["Body"].read()))

    def exists(self, name: str) -> bool:
        return self._head(name) is not None

    def size(self, name: str) -> int:
        head = self._head(name)
        return int(head["ContentLength"]) if head else 0

    def head(self, name: str, n: int) -> bytes:
        if is_upload(name):
            return self.spool.head(name, n)
        reply = self._get(name, Range=f"bytes=0-{max(n, 1) - 1}")
        if reply is None or not self._live(reply.get("Metadata", {})):
            return b""
        return self._guard(lambda: bytes(reply["Body"].read()))[:n]

    def delete(self, name: str) -> None:
        if is_upload(name):
            self.spool.delete(name)
            return
        self._guard(lambda: self.client.delete_object(Bucket=self.bucket, Key=self.key(name)))
        self.cap.forget()

    def scan(self, prefix: str) -> Iterator[tuple[str, int]]:
        key_prefix = self.prefix + "/".join(parts_of(prefix + "x")[:-1]) + "/"
        for page in self._guard(
            lambda: list(self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=key_prefix))
        ):
            for item in page.get("Contents", []):
                yield self._name(item["Key"]), int(item["Size"])

    # -- temporaries ---------------------------------------------------------------------

    def append(self, name: str, chunk: bytes, ttl_s: int) -> None:
        if not is_upload(name):
            raise ValueError(f"Only uploads are appended to, not {name[:40]!r}.")
        self.cap.charge(len(chunk))
        self.spool.append(name, chunk, ttl_s)

    def put_temp(self, name: str, data: bytes, ttl_s: int) -> None:
        self.cap.charge(len(data))
        self._guard(
            lambda: self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=data, Metadata=self._deadline(ttl_s))
        )

    def get_temp(self, name: str) -> bytes | None:
        if is_upload(name):
            return self.spool.get_temp(name)
        reply = self._get(name)
        if reply is None or not self._live(reply.get("Metadata", {})):
            return None
        return self._guard(lambda: bytes(reply["Body"].read()))

    def expire(self, name: str, ttl_s: int) -> None:
        if is_upload(name):
            self.spool.expire(name, ttl_s)
            return
        if self._head(name) is None:
            return
        key = self.key(name)
        self._guard(
            lambda: self.client.copy_object(
                Bucket=self.bucket,
                Key=key,
                CopySource={"Bucket": self.bucket, "Key": key},
                Metadata=self._deadline(ttl_s),
                MetadataDirective="REPLACE",
            )
        )

    def persist(self, temp: str, name: str) -> bool:
        return self._transfer(temp, name, {})

    def move(self, temp: str, name: str, ttl_s: int) -> bool:
        return self._transfer(temp, name, self._deadline(ttl_s))

    def _transfer(self, temp: str, name: str, metadata: dict[str, str]) -> bool:
        extra = {"Metadata": metadata} if metadata else {}
        if is_upload(temp):  # spooled here: one managed transfer (in parts when large), then gone
            path = self.spool.path(temp)
            try:
                deadline = path.stat().st_mtime
            except FileNotFoundError:
                return False
            if deadline < self._clock():
                self.spool.delete(temp)
                return False
            self._guard(
                lambda: self.client.upload_file(str(path), self.bucket, self.key(name), ExtraArgs=extra or None, Config=TRANSFER)
            )
            self.spool.delete(temp)
            return True
        head = self._head(temp)
        if head is None or not self._live(head.get("Metadata", {})):
            return False
        source = {"Bucket": self.bucket, "Key": self.key(temp)}
        self._guard(
            lambda: self.client.copy(
                source, self.bucket, self.key(name), ExtraArgs={"MetadataDirective": "REPLACE", **extra}, Config=TRANSFER
            )
        )
        self.delete(temp)
        return True

    def sweep(self) -> int:
        removed = self.spool.sweep()
        for area in ("staged", "payload"):
            for key in self._keys(f"{self.prefix}{area}/"):
                name = self._name(key)
                head = self._head(name)
                if head is not None and not self._live(head.get("Metadata", {})):
                    self.delete(name)
                    removed += 1
        if removed:
            self.cap.forget()
        return removed

    def _keys(self, key_prefix: str) -> list[str]:
        def listing() -> list[str]:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=key_prefix)
            return [str(item["Key"]) for page in pages for item in page.get("Contents", [])]

        return self._guard(listing)

    def used_bytes(self) -> int:
        return self._bucket_bytes()

    def _bucket_bytes(self) -> int:
        pages = self._guard(
            lambda: list(self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix))
        )
        return sum(int(item["Size"]) for page in pages for item in page.get("Contents", []))


def _missing(cause: BaseException | None) -> bool:
    if not isinstance(cause, ClientError):
        return False
    code = str(cause.response.get("Error", {}).get("Code", ""))
    status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in MISSING_CODES or (status == 404 and code != "NoSuchBucket")
