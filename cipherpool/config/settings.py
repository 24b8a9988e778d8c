"""One typed settings object, read from ``CIPHERPOOL_*`` environment variables.

Every process of the platform (control worker, pool node, beat, CLI) and every client builds
its configuration from here, so a deployment is described by its environment alone. Units are
in the field names (``_s`` seconds, ``_bytes`` bytes).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

GIB = 1024**3
KIB = 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CIPHERPOOL_", extra="ignore")

    # Where things are. A broker URL of None means "embedded": `cipherpool up` starts Redis.
    broker_url: str | None = None
    result_backend: str | None = Field(None, description="defaults to broker_url")
    store_url: str | None = Field(None, description="blob store (Redis); defaults to broker_url")
    database_url: str | None = Field(None, description="defaults to SQLite under data_dir")
    data_dir: Path = Path.home() / ".cipherpool"

    # Credentials a client may take from its environment instead of its code.
    api_key: str | None = None
    token: str | None = None

    # Pool node profile (DESIGN.md §5: threads = cores / parallel executions).
    host_class: str = "cpu"
    node_threads: int | None = Field(None, description="OMP_NUM_THREADS for FHE runs")

    # Evaluation-key cache, per node process. A used key costs several times its serialized
    # size in memory (35 MB key -> ~185-650 MB), so the bound is in bytes of *estimated*
    # resident size = serialized size x key_memory_factor.
    key_cache_bytes: int = 4 * GIB
    key_memory_factor: float = 6.0

    # Payloads above this size travel by reference through the blob store, not in messages.
    inline_max_bytes: int = 512 * KIB
    payload_ttl_s: int = 3600

    # Time limits.
    query_timeout_s: float = 300.0
    management_timeout_s: float = 30.0
    worker_start_timeout_s: float = 300.0
    # Redis redelivers a task not acknowledged this long after a node took it (a killed node's
    # query). Above the longest single FHE run (seconds here; raise it for big models), and
    # below query_timeout_s so that the redelivered query still has a client waiting.
    visibility_timeout_s: int = 120
    result_expires_s: int = 3600
    node_heartbeat_s: float = 10.0

    # Monitoring beside the pool.
    flower_port: int | None = None

    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'cipherpool.db'}"

    def effective_broker_url(self) -> str:
        if not self.broker_url:
            from cipherpool.errors import ConfigurationError

            raise ConfigurationError(
                "No broker configured: set CIPHERPOOL_BROKER_URL (e.g. redis://127.0.0.1:6379/0) "
                "or run `cipherpool up`, which starts an embedded Redis and prints the URL."
            )
        return self.broker_url

    def effective_result_backend(self) -> str:
        return self.result_backend or self.effective_broker_url()

    def effective_store_url(self) -> str:
        return self.store_url or self.effective_broker_url()


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as CIPHERPOOL_* variables, so child processes see exactly these."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"CIPHERPOOL_{name.upper()}"] = str(value)
    return env


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings (tests and `cipherpool up` change the environment)."""
    get_settings.cache_clear()
