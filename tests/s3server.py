"""An S3-compatible server for tests and benchmarks: moto's standalone server (``moto[server]``
in the test extra), started on a free loopback port as a child of a
:class:`~cipherpool.stack.supervisor.Supervisor` (so it is stopped by its own pid), with a
bucket made for the platform. No network beyond loopback, no real credentials."""

from __future__ import annotations

import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cipherpool.stack.supervisor import Supervisor, free_port
from cipherpool.waiting import wait_until

ACCESS_KEY = "cipherpool-test"
SECRET_KEY = "cipherpool-test-secret"
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str

    def settings(self, **more: object) -> dict[str, object]:
        """Settings fields that put the blob store in this server's bucket."""
        return {
            "blob_store": "s3",
            "s3_bucket": self.bucket,
            "s3_endpoint_url": self.endpoint_url,
            "s3_access_key_id": ACCESS_KEY,
            "s3_secret_access_key": SECRET_KEY,
            "s3_region": "us-east-1",
            **more,
        }

    def client(self):  # noqa: ANN201 - boto3 ships no types
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    def make_bucket(self, name: str) -> S3Server:
        self.client().create_bucket(Bucket=name)
        return S3Server(self.endpoint_url, name)


def start_moto(supervisor: Supervisor, log_dir: Path, bucket: str = "cipherpool") -> S3Server:
    """moto's server on 127.0.0.1 and a free port, with ``bucket`` made; stopped with the supervisor."""
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(log_dir), "MOTO_PORT": str(port)}
    supervisor.start("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env)
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            with urllib.request.urlopen(url + "/moto-api/", timeout=1):
                return True
        except OSError:
            return False

    wait_until(answers, START_TIMEOUT_S, error=RuntimeError(f"moto did not start; see {log_dir}"))
    return S3Server(url, "unset").make_bucket(bucket)
