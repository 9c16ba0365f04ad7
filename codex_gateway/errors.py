"""The gateway's one error tree, and OpenAI's error shape.

    GatewayError
    ├── ClientError            what the caller did wrong (4xx)
    │   ├── AuthenticationError     401 invalid_api_key
    │   ├── InvalidRequest          400 invalid_request_error
    │   ├── ModelNotFound           404 model_not_found
    │   ├── ModelNotAllowed         403 model_not_allowed (the key's allowlist)
    │   ├── InsufficientQuota       429 insufficient_quota
    │   ├── BodyTooLarge            413
    │   ├── UnsupportedEncoding     415, a compressed request body
    │   ├── NotFound                404 for unknown paths
    │   └── MethodNotAllowed        405
    ├── StorageUnavailable     503, the gateway's database cannot be reached (fail closed)
    ├── ShuttingDown           503, a shutdown cut the request before its answer began
    └── UpstreamError          what the upstream did (5xx)
        ├── NoAccountAvailable      503
        ├── UsageLimitReached       429, every account that could serve is at its usage limit
        ├── UpstreamConnectError    502
        ├── UpstreamTimeout         504
        ├── UpstreamStatusError     502, an upstream answer the client must not see as is
        ├── UpstreamProtocolError   502, bytes that are not what the protocol promises
        └── TokenRefreshError       502, a ChatGPT account's token could not be refreshed

Operator-facing problems, never sent to a client: ConfigError (settings), CredentialError
(a credential file, a missing secret key, a sealed token that will not open) and
DatabaseUnavailable (a database a start cannot open or migrate).

Every error a client sees is rendered by `GatewayError.body()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        detail: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        # For the operator (usage row, log); never sent to the client.
        self.detail = detail
        if code is not None:
            self.code = code

    def payload(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return orjson.dumps(self.payload())

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        """Headers the error response carries besides its JSON body."""
        return []


class ClientError(GatewayError):
    status = 400
    type = "invalid_request_error"


class AuthenticationError(ClientError):
    status = 401
    code = "invalid_api_key"


class InvalidRequest(ClientError):
    status = 400


class ModelNotFound(ClientError):
    status = 404
    code = "model_not_found"


class ModelNotAllowed(ClientError):
    status = 403
    code = "model_not_allowed"


class InsufficientQuota(ClientError):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class BodyTooLarge(ClientError):
    status = 413
    code = "request_too_large"


class UnsupportedEncoding(ClientError):
    status = 415
    code = "unsupported_content_encoding"


class NotFound(ClientError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ClientError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, *, allowed: Sequence[str] = ()):
        super().__init__(message)
        self.allowed = list(allowed)

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"allow", ", ".join(self.allowed).encode())]


class StorageUnavailable(GatewayError):
    """The gateway's own database cannot be reached: requests fail closed."""

    status = 503
    code = "storage_unavailable"


class ShuttingDown(GatewayError):
    """The shutdown's grace period ended before the request's answer began."""

    status = 503
    code = "gateway_shutting_down"


class UpstreamError(GatewayError):
    """`kind` is the short name an attempt and a usage row record (`http_500`, `timeout_idle`)."""

    status = 502
    type = "upstream_error"
    kind = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str | None = None,
        detail: str | None = None,
    ):
        super().__init__(message, param=param, code=code, detail=detail)
        if kind is not None:
            self.kind = kind


class NoAccountAvailable(UpstreamError):
    status = 503
    code = "no_upstream_account"
    kind = "no_account"


class UsageLimitReached(UpstreamError):
    """Every account able to serve is behind a usage wall (ChatGPT's `usage_limit_reached`).

    Shaped like the Codex backend's own 429, so Codex CLI shows its user the reset time
    instead of retrying; `plan_type` is left out, since the client's plan is not the
    account's.
    """

    status = 429
    type = "usage_limit_reached"
    code = "usage_limit_reached"
    kind = "usage_limit_reached"

    def __init__(self, message: str, *, resets_at: int, resets_in_seconds: int):
        super().__init__(message)
        self.resets_at = resets_at
        self.resets_in_seconds = resets_in_seconds

    def payload(self) -> dict[str, Any]:
        payload = super().payload()
        payload["error"]["resets_at"] = self.resets_at
        payload["error"]["resets_in_seconds"] = self.resets_in_seconds
        return payload

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", str(self.resets_in_seconds).encode())]


class UpstreamConnectError(UpstreamError):
    status = 502
    code = "upstream_connect_error"
    kind = "connect"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
    kind = "timeout"


class DeadlinePassed(UpstreamTimeout):
    """The time a caller gave an upstream request ran out (`UpstreamClient.post`'s `timeout`,
    `UpstreamResponse.limit`); the caller knows which of its limits that was, and says so."""

    kind = "deadline"

    def __init__(
        self,
        message: str = "The upstream did not answer within the time given.",
        **details: str | None,
    ) -> None:
        super().__init__(message, **details)


class UpstreamStatusError(UpstreamError):
    status = 502
    code = "upstream_status_error"
    kind = "http_error"


class UpstreamProtocolError(UpstreamError):
    status = 502
    code = "upstream_protocol_error"
    kind = "protocol"


class TokenRefreshError(UpstreamError):
    """`permanent` means the account must sign in again; anything else may be retried."""

    status = 502
    code = "upstream_token_refresh_failed"
    kind = "token_refresh"

    def __init__(self, message: str, *, permanent: bool, reason: str | None = None):
        super().__init__(message)
        self.permanent = permanent
        self.reason = reason


class CredentialError(Exception):
    """A credential the gateway cannot use; the message says which and why, never its value."""


class DatabaseUnavailable(Exception):
    """The database a gateway starts on cannot be opened or migrated; the message is one line
    naming it, its password hidden."""


class ConfigError(Exception):
    """Settings that cannot work; each message is one line an operator can act on."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems
