"""The one exception tree of cipherpool.

Every error a user can meet is a subclass of :class:`CipherpoolError`. Each class carries

* ``code``: a stable snake-case name, the only thing that crosses the wire (a task returns
  ``{"ok": false, "error": {"code": ..., "message": ...}}`` and the client raises the class
  registered under that code). Nothing is pickled, and a client never imports a class named
  by the server.
* ``exit_code``: what the CLI exits with, so scripts can tell the families apart.

::

    CipherpoolError                     exit 1
    ├── ConfigurationError              exit 2   settings or environment unusable
    ├── AuthError                       exit 3
    │   ├── InvalidApiKey                        unknown account API key
    │   ├── InvalidToken                         unknown, revoked or expired access token
    │   └── TokenNotForModel                     token is assigned to another model
    ├── NotFound                        exit 4
    │   ├── ModelNotFound
    │   ├── WorkerNotFound
    │   ├── TokenNotFound
    │   ├── AccountNotFound
    │   └── EvaluationKeyNotFound                key id never uploaded / not this client's
    ├── Conflict                        exit 5
    │   ├── ModelExists
    │   ├── ModelInactive                        queries refused until the model is activated
    │   ├── ModelUnavailable                     no worker serves the model (query timed out)
    │   ├── NoFreeNode                           every pool node is bound or offline
    │   └── VersionMismatch                      client and server concrete versions differ
    ├── InvalidInput                    exit 6
    │   ├── InvalidDeployment                    directory is not a concrete-ml deployment
    │   ├── InvalidShape                         wrong input shape for encrypt()
    │   ├── MalformedCiphertext                  not a cipherpool ciphertext, or corrupt
    │   ├── InvalidEvaluationKey                 truncated or unreadable evaluation key
    │   ├── KeyMismatch                          encrypted under other keys than the ones named
    │   └── ModelMismatch                        encrypted for another model
    └── PlatformError                   exit 7
        ├── BrokerUnavailable
        ├── QueryTimeout
        ├── WorkerStartFailed
        └── RemoteError                          unexpected failure inside a platform process
"""

from __future__ import annotations

from typing import Any, ClassVar

_REGISTRY: dict[str, type[CipherpoolError]] = {}


class CipherpoolError(Exception):
    """Root of every cipherpool error; its message says what the user should do."""

    code: ClassVar[str] = "error"
    exit_code: ClassVar[int] = 1

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


def from_wire(error: dict[str, Any]) -> CipherpoolError:
    """Rebuild the typed error that a platform process reported; unknown codes stay readable."""
    cls = _REGISTRY.get(str(error.get("code")), RemoteError)
    return cls(str(error.get("message", "")))


class ConfigurationError(CipherpoolError):
    """Settings or the environment do not allow the requested action."""

    code = "configuration_error"
    exit_code = 2


class AuthError(CipherpoolError):
    code = "auth_error"
    exit_code = 3


class InvalidApiKey(AuthError):
    code = "invalid_api_key"


class InvalidToken(AuthError):
    code = "invalid_token"


class TokenNotForModel(AuthError):
    code = "token_not_for_model"


class NotFound(CipherpoolError):
    code = "not_found"
    exit_code = 4


class ModelNotFound(NotFound):
    code = "model_not_found"


class WorkerNotFound(NotFound):
    code = "worker_not_found"


class TokenNotFound(NotFound):
    code = "token_not_found"


class AccountNotFound(NotFound):
    code = "account_not_found"


class EvaluationKeyNotFound(NotFound):
    code = "evaluation_key_not_found"


class Conflict(CipherpoolError):
    code = "conflict"
    exit_code = 5


class ModelExists(Conflict):
    code = "model_exists"


class ModelInactive(Conflict):
    code = "model_inactive"


class ModelUnavailable(Conflict):
    code = "model_unavailable"


class NoFreeNode(Conflict):
    code = "no_free_node"


class VersionMismatch(Conflict):
    code = "version_mismatch"


class InvalidInput(CipherpoolError):
    code = "invalid_input"
    exit_code = 6


class InvalidDeployment(InvalidInput):
    code = "invalid_deployment"


class InvalidShape(InvalidInput):
    code = "invalid_shape"


class MalformedCiphertext(InvalidInput):
    code = "malformed_ciphertext"


class InvalidEvaluationKey(InvalidInput):
    code = "invalid_evaluation_key"


class KeyMismatch(InvalidInput):
    code = "key_mismatch"


class ModelMismatch(InvalidInput):
    code = "model_mismatch"


class PlatformError(CipherpoolError):
    code = "platform_error"
    exit_code = 7


class BrokerUnavailable(PlatformError):
    code = "broker_unavailable"


class QueryTimeout(PlatformError):
    code = "query_timeout"


class WorkerStartFailed(PlatformError):
    code = "worker_start_failed"


class RemoteError(PlatformError):
    code = "remote_error"
