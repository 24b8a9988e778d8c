"""Where the blob store keeps its bytes: one interface (:class:`Backend`), three backends.

* ``fs`` (:mod:`.filesystem`): a directory, the embedded stack's default; a shared mount
  (NFS, CephFS) in a cluster.
* ``s3`` (:mod:`.s3`): an S3-compatible object store (MinIO, Ceph RGW, SeaweedFS, AWS).
* ``redis`` (:mod:`.redis_backend`): the platform's Redis, as before backends existed; for
  small setups.

:class:`cipherpool.store.BlobStore` is what the rest of the platform uses; it picks its backend
with :func:`backend_for` (``CIPHERPOOL_BLOB_STORE``). A pool node puts :class:`DiskCache`
in front of it. See docs/architecture.md, "Processes and where state lives".
"""

from __future__ import annotations

from pathlib import Path

import redis

from cipherpool.blobs.base import Backend, SizeCap, parts_of
from cipherpool.blobs.cache import CacheFigures, DiskCache, read_figures
from cipherpool.config.settings import Settings
from cipherpool.errors import ConfigurationError

__all__ = ["Backend", "CacheFigures", "DiskCache", "SizeCap", "backend_for", "node_cache_dir", "parts_of", "read_figures"]


def backend_for(settings: Settings, client: redis.Redis) -> Backend:
    """The backend the settings name; ``client`` is the platform's Redis (the redis backend's)."""
    kind = settings.effective_blob_store()
    if kind == "fs":
        from cipherpool.blobs.filesystem import FsBackend

        return FsBackend(settings.effective_blob_dir(), max_bytes=settings.blob_store_max_bytes)
    if kind == "s3":
        if not settings.s3_bucket:
            raise ConfigurationError(
                "CIPHERPOOL_BLOB_STORE=s3 needs CIPHERPOOL_S3_BUCKET (and usually CIPHERPOOL_S3_ENDPOINT_URL and credentials)."
            )
        from cipherpool.blobs.s3 import S3Backend

        return S3Backend(
            settings.s3_bucket,
            spool=Path(settings.data_dir).expanduser() / "blob-spool",
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key,
            prefix=settings.s3_prefix,
            addressing_style=settings.s3_addressing_style,
            max_bytes=settings.blob_store_max_bytes,
        )
    from cipherpool.blobs.redis_backend import RedisBackend

    return RedisBackend(client)


def node_cache_dir(settings: Settings, node: str) -> Path:
    """Where a pool node keeps its disk cache: one folder per node name, so that two nodes on
    one host never share an index, and a restarted node finds its own."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in node)
    return Path(settings.data_dir).expanduser() / "blob-cache" / safe
