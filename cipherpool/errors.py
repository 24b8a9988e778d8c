"""The one exception tree of cipherpool.

Every error a user can meet is a subclass of :class:`CipherpoolError`. Each class carries

* ``code``: a stable snake-case name, the only thing that crosses the wire (a task returns
  ``{"ok": false, "error": {"code": ..., "message": ...}}`` and the client raises the class
  registered under that code). Nothing is pickled, and a client never imports a class named
  by the server.
* ``exit_code``: what the CLI exits with, so scripts can tell the families apart.
* ``http_status``: what the gateway answers with; the body is ``{"code", "message"}``.
* ``retry_after_s``: set on errors that pass with time (a rate, a dependency's outage); the
  gateway sends it as ``Retry-After``, so a client or a proxy knows when to try again.

::

    CipherpoolError                     exit 1  HTTP 500
    ├── ConfigurationError              exit 2  500   settings or environment unusable
    ├── AuthError                       exit 3  401
    │   ├── InvalidApiKey                             unknown, missing or malformed API key
    │   ├── InvalidToken                              unknown or malformed access token
    │   │   ├── TokenRevoked                          revoked for good
    │   │   ├── TokenExpired                          past its expiry
    │   │   └── TokenDisabled                         disabled by its provider (until enabled)
    │   ├── AccountDisabled                     403   the provider's account is disabled
    │   ├── WrongCredential                     403   a token where an API key is needed, or back
    │   └── TokenNotForModel                    403   token is not assigned to the model
    ├── NotFound                        exit 4  404
    │   ├── ModelNotFound
    │   ├── WorkerNotFound
    │   ├── TokenNotFound
    │   ├── AccountNotFound
    │   ├── QueryNotFound                             unknown query id, or another client's
    │   ├── VersionNotFound                           no such version of the model
    │   ├── UploadNotFound                            staged upload expired or never made
    │   ├── EvaluationKeyNotFound                     key id never uploaded / not this client's
    │   │   └── EvaluationKeyExpired            410   the key set expired (unused too long, or its token expired)
    │   ├── AlertNotFound                             no such alert rule in this account
    │   └── ScheduleNotFound                          no such worker schedule in this account
    ├── Conflict                        exit 5  409
    │   ├── ModelExists
    │   ├── ModelInactive                             queries refused until the model is activated
    │   ├── ModelBusy                                 refused while workers serve the model
    │   ├── KeysOutdated                              keys made for another version's client specs
    │   ├── ModelUnavailable                    503   no worker serves the model (query timed out)
    │   │   └── NoWorkerUp                      503   no worker is up for the model (at submit)
    │   ├── NoFreeNode                                no free live node of the class/labels/profile
    │   ├── WorkerLimit                               the model's max_workers are running
    │   ├── BelowMinimum                              a stop would leave fewer than min_workers
    │   ├── WrongWorkerState                          standby/resume of a worker not up/standby
    │   ├── VersionMismatch                           client and server concrete versions differ
    │   └── InsufficientCredits                 402   the balance is below what the action needs
    ├── InvalidInput                    exit 6  422
    │   ├── BadRequest                          400   a request the gateway cannot read as one: two Authorization headers
    │   ├── InvalidDeployment                         directory is not a concrete-ml deployment
    │   ├── InvalidShape                              wrong input shape for encrypt()
    │   ├── MalformedCiphertext                       not a cipherpool ciphertext, or corrupt
    │   ├── InvalidCiphertext                         well framed, but no value concrete can evaluate (no payload, sizes disagree)
    │   ├── InvalidEvaluationKey                      truncated or unreadable evaluation key
    │   ├── KeyMismatch                               encrypted under other keys than the ones named
    │   ├── ModelMismatch                             encrypted for another model
    │   └── RefusedDestination                        a webhook to a loopback or private address
    ├── LimitExceeded                   exit 8  429
    │   ├── PayloadTooLarge                     413   body above its configured cap
    │   ├── RateLimited                         429   too many requests; Retry-After says when
    │   ├── QuotaExceeded                       429   the token's query quota is used up
    │   ├── TooManyKeys                         409   key sets per token at their cap
    │   ├── KeyQuotaExceeded                    409   stored key-set bytes at a quota (the subclass names which)
    │   │   ├── TokenKeyQuotaExceeded                 the token's (CIPHERPOOL_MAX_KEY_BYTES_PER_TOKEN)
    │   │   └── AccountKeyQuotaExceeded               the account's (CIPHERPOOL_MAX_KEY_BYTES_PER_ACCOUNT)
    │   └── TooManyAlerts                       409   alert rules per account at their cap
    └── PlatformError                   exit 7  503
        ├── BrokerUnavailable                         (platform side) Redis unreachable; Retry-After
        ├── DatabaseUnavailable                       the database down, or its schema not migrated; Retry-After
        ├── NotReady                                  GET /v1/ready: a part the gateway needs does not answer
        ├── GatewayUnavailable                        (client side) the gateway unreachable
        ├── StoreFull                           507   Redis at maxmemory; nothing is evicted
        ├── QueryTimeout                        504
        ├── WorkerStartFailed                   500
        │   └── BackendUnavailable                    compiled for the GPU, and this node's concrete has none
        ├── FheMismatch                         500   a decrypted answer differs from the clear model's
        ├── PrivacyBreach                       500   a request body held the secret key or a clear input
        └── RemoteError                         502   unexpected failure inside a platform process
"""

from __future__ import annotations

from typing import Any, ClassVar

_REGISTRY: dict[str, type[CipherpoolError]] = {}


class CipherpoolError(Exception):
    """Root of every cipherpool error; its message says what the user should do."""

    code: ClassVar[str] = "error"
    exit_code: ClassVar[int] = 1
    http_status: ClassVar[int] = 500
    retry_after_s: float | None = None  # HTTP Retry-After, for errors that pass with time

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            _REGISTRY[cls.code] = cls

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__doc__ or self.code

    def to_wire(self) -> dict[str, str]:
        """The error as it travels in a task result: a code and a message, nothing else."""
        return {"code": self.code, "message": self.message}


_REGISTRY[CipherpoolError.code] = CipherpoolError


def from_wire(error: Any) -> CipherpoolError:
    """Rebuild the typed error that a platform process reported; unknown codes stay readable."""
    if not isinstance(error, dict):
        return RemoteError(f"The platform answered with an unreadable error: {str(error)[:200]}")
    cls = _REGISTRY.get(str(error.get("code")), RemoteError)
    return cls(str(error.get("message", "")))


class ConfigurationError(CipherpoolError):
    """Settings or the environment do not allow the requested action."""

    code = "configuration_error"
    exit_code = 2


class AuthError(CipherpoolError):
    code = "auth_error"
    exit_code = 3
    http_status = 401


class InvalidApiKey(AuthError):
    code = "invalid_api_key"


class InvalidToken(AuthError):
    code = "invalid_token"


class TokenRevoked(InvalidToken):
    code = "token_revoked"


class TokenExpired(InvalidToken):
    code = "token_expired"


class TokenDisabled(InvalidToken):
    code = "token_disabled"


class AccountDisabled(AuthError):
    code = "account_disabled"
    http_status = 403


class WrongCredential(AuthError):
    code = "wrong_credential"
    http_status = 403


class TokenNotForModel(AuthError):
    code = "token_not_for_model"
    http_status = 403


class NotFound(CipherpoolError):
    code = "not_found"
    exit_code = 4
    http_status = 404


class ModelNotFound(NotFound):
    code = "model_not_found"


class WorkerNotFound(NotFound):
    code = "worker_not_found"


class TokenNotFound(NotFound):
    code = "token_not_found"


class AccountNotFound(NotFound):
    code = "account_not_found"


class QueryNotFound(NotFound):
    code = "query_not_found"


class VersionNotFound(NotFound):
    code = "version_not_found"


class UploadNotFound(NotFound):
    code = "upload_not_found"


class EvaluationKeyNotFound(NotFound):
    code = "evaluation_key_not_found"


class EvaluationKeyExpired(EvaluationKeyNotFound):
    """The key set was removed by the platform: unused for ``CIPHERPOOL_KEY_IDLE_EXPIRY_S``, or
    its token expired. Upload it again (a QueryClient does, by itself, and retries once)."""

    code = "evaluation_key_expired"
    http_status = 410


class AlertNotFound(NotFound):
    code = "alert_not_found"


class ScheduleNotFound(NotFound):
    code = "schedule_not_found"


class Conflict(CipherpoolError):
    code = "conflict"
    exit_code = 5
    http_status = 409


class ModelExists(Conflict):
    code = "model_exists"


class ModelInactive(Conflict):
    code = "model_inactive"


class ModelBusy(Conflict):
    code = "model_busy"


class KeysOutdated(Conflict):
    """The client's keys were generated from client specs the model no longer serves."""

    code = "keys_outdated"


class ModelUnavailable(Conflict):
    code = "model_unavailable"
    http_status = 503


class NoWorkerUp(ModelUnavailable):
    """Refused at submit: no worker serves the model now (a caller may ask to wait instead)."""

    code = "no_worker_up"


class NoFreeNode(Conflict):
    code = "no_free_node"


class WorkerLimit(Conflict):
    code = "max_workers_reached"


class BelowMinimum(Conflict):
    code = "below_min_workers"


class WrongWorkerState(Conflict):
    code = "wrong_worker_state"


class VersionMismatch(Conflict):
    code = "version_mismatch"


class InsufficientCredits(Conflict):
    """The account's credit balance is below what starting a worker (or a shared-node query)
    needs; the message says how much is missing and how to add credits."""

    code = "insufficient_credits"
    http_status = 402


class InvalidInput(CipherpoolError):
    code = "invalid_input"
    exit_code = 6
    http_status = 422


class RefusedDestination(InvalidInput):
    """A webhook's host is (or resolves to) an address the platform does not call: loopback,
    private, link-local (``CIPHERPOOL_WEBHOOK_ALLOW_PRIVATE`` allows them)."""

    code = "refused_destination"


class BadRequest(InvalidInput):
    """A request that is ambiguous before anything is read: more than one ``Authorization``
    header (which one would count?)."""

    code = "bad_request"
    http_status = 400


class InvalidDeployment(InvalidInput):
    code = "invalid_deployment"


class InvalidShape(InvalidInput):
    code = "invalid_shape"


class MalformedCiphertext(InvalidInput):
    code = "malformed_ciphertext"


class InvalidCiphertext(InvalidInput):
    """A ciphertext whose framing is sound but which holds no value concrete can evaluate: no
    payload, no raw or type information, or a payload whose size disagrees with its shape
    (a well-framed message of zeros, say). Refused before any node spends time on it."""

    code = "invalid_ciphertext"


class InvalidEvaluationKey(InvalidInput):
    code = "invalid_evaluation_key"


class KeyMismatch(InvalidInput):
    code = "key_mismatch"


class ModelMismatch(InvalidInput):
    code = "model_mismatch"


class LimitExceeded(CipherpoolError):
    code = "limit_exceeded"
    exit_code = 8
    http_status = 429


class PayloadTooLarge(LimitExceeded):
    code = "payload_too_large"
    http_status = 413


class RateLimited(LimitExceeded):
    """Too many requests; ``retry_after_s`` says when to try again (HTTP Retry-After)."""

    code = "rate_limited"
    http_status = 429

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QuotaExceeded(LimitExceeded):
    code = "token_quota_exceeded"
    http_status = 429


class TooManyKeys(LimitExceeded):
    code = "too_many_keys"
    http_status = 409


class KeyQuotaExceeded(LimitExceeded):
    """Storing this key set would take the stored key-set bytes past a quota: delete key sets
    that are no longer used (``DELETE /v1/client/keys/{id}``), or ask the provider or operator.
    409 like TooManyKeys: waiting does not help (not 429), and it is the caller's quota, not the
    platform's store (507 store_full)."""

    code = "key_quota_exceeded"
    http_status = 409


class TokenKeyQuotaExceeded(KeyQuotaExceeded):
    code = "token_key_quota_exceeded"


class AccountKeyQuotaExceeded(KeyQuotaExceeded):
    code = "account_key_quota_exceeded"


class TooManyAlerts(LimitExceeded):
    code = "too_many_alerts"
    http_status = 409


class PlatformError(CipherpoolError):
    code = "platform_error"
    exit_code = 7
    http_status = 503


class BrokerUnavailable(PlatformError):
    """Redis (broker, store or result backend) did not answer; it is usually back within
    seconds (a restart), hence the Retry-After."""

    code = "broker_unavailable"
    retry_after_s = 5.0


class DatabaseUnavailable(PlatformError):
    """The platform's database did not answer (down, unreachable, out of connections), or
    its schema is not migrated to this gateway's version yet. A typed 503 with Retry-After,
    not a 502: it is an outage to wait out, not a fault of the request or of the gateway."""

    code = "database_unavailable"
    retry_after_s = 5.0


class NotReady(PlatformError):
    """The gateway process runs but cannot serve yet: ``GET /v1/ready`` answers it, with each
    part it checked (a load balancer sends no traffic until it is ready again)."""

    code = "not_ready"


class GatewayUnavailable(PlatformError):
    code = "gateway_unavailable"


class StoreFull(PlatformError):
    code = "store_full"
    http_status = 507


class QueryTimeout(PlatformError):
    code = "query_timeout"
    http_status = 504


class WorkerStartFailed(PlatformError):
    code = "worker_start_failed"
    http_status = 500


class BackendUnavailable(WorkerStartFailed):
    """A circuit compiled with ``device="cuda"`` reached a node whose concrete has no GPU
    build, or sees no GPU. concrete's CPU build would compile it for the CPU anyway
    ("continuing without GPU acceleration"), with crypto parameters that the client's keys,
    made from the GPU compilation's specs, need not fit: refused instead, with the reason."""

    code = "backend_unavailable"


class FheMismatch(PlatformError):
    """A decrypted FHE answer differs from the model's clear answer (the tutorials check
    every one): a circuit compiled with too little precision, or a platform fault."""

    code = "fhe_mismatch"
    http_status = 500


class PrivacyBreach(PlatformError):
    """The demo's traffic check found, in what the client sent, bytes that must never leave
    it (a sample of its secret key, a clear input), or could not read a body to check it."""

    code = "privacy_breach"
    http_status = 500


class RemoteError(PlatformError):
    code = "remote_error"
    http_status = 502
