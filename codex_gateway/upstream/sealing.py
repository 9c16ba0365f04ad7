"""The operator's secret key: upstream credentials sealed at rest, and opened once in memory.

ChatGPT tokens are always sealed; an upstream API key is sealed whenever the gateway has a
secret key. A sealed API key is opened when the catalog loads the accounts, not per request,
so the relay sends each request with a key it already holds. An account whose key does not
open (a changed secret key, or none) is left out of rotation and named in the log once; the
other accounts keep serving.
"""

from __future__ import annotations

import base64
import dataclasses
import logging

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from codex_gateway.config import MIN_SECRET_LENGTH, Settings, read_secret_key_file
from codex_gateway.errors import ConfigError, CredentialError
from codex_gateway.store.queries import AccountRecord

log = logging.getLogger(__name__)

# Fixed salt: the key must come out the same in every process from the same secret.
_KDF_SALT = b"codex-gateway/secret-key/v1"
SET_A_SECRET_KEY = (
    f"set CODEX_GATEWAY_SECRET_KEY (at least {MIN_SECRET_LENGTH} characters) or "
    "CODEX_GATEWAY_SECRET_KEY_FILE"
)


class TokenCipher:
    """Seals credentials with a key derived from the operator's secret (scrypt, then HKDF).

    The same secret also yields the key for upstream session ids, kept separate by HKDF.
    """

    def __init__(self, secret: str):
        if len(secret) < MIN_SECRET_LENGTH:
            raise CredentialError(
                f"the secret key must be at least {MIN_SECRET_LENGTH} characters long"
            )
        master = Scrypt(salt=_KDF_SALT, length=32, n=2**14, r=8, p=1).derive(secret.encode())
        self._fernet = Fernet(base64.urlsafe_b64encode(_subkey(master, b"token-sealing")))
        self.session_key = _subkey(master, b"session-ids")

    def seal(self, token: str) -> str:
        return self._fernet.encrypt(token.encode()).decode("ascii")

    def open(self, sealed: str) -> str:
        try:
            return self._fernet.decrypt(sealed.encode("ascii")).decode()
        except (InvalidToken, UnicodeError):
            raise CredentialError(
                "a stored token does not open with this secret key; was the key changed?"
            ) from None


def _subkey(master: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(master)


def configured_cipher(settings: Settings) -> TokenCipher | None:
    """The cipher for this gateway's secret key, or None when none is set.

    A key that is set but gives none (an unreadable key file) is a CredentialError.
    """
    if settings.secret_key:
        return TokenCipher(settings.secret_key)
    if not settings.secret_key_file:
        return None
    try:
        return TokenCipher(read_secret_key_file(settings.secret_key_file))
    except ConfigError as exc:  # the key file gives no key
        raise CredentialError(str(exc)) from None


class ApiKeyOpener:
    """Opens the sealed API keys of the accounts the catalog loads.

    Keys opened at the last load are kept, so a reload opens only what changed.
    """

    def __init__(self, cipher: TokenCipher | None):
        self._cipher = cipher
        self._opened: dict[str, str] = {}  # sealed -> in clear
        self._reported: set[str] = set()  # sealed keys already logged as shut

    def open(self, accounts: list[AccountRecord]) -> tuple[list[AccountRecord], list[str]]:
        """The accounts with their keys in clear, and the names of the enabled accounts
        left out because their keys do not open."""
        ready: list[AccountRecord] = []
        shut: list[str] = []
        opened: dict[str, str] = {}
        for account in accounts:
            sealed = account.api_key_sealed
            if sealed is None:
                ready.append(account)
                continue
            key = self._opened.get(sealed)
            if key is None:
                key = self._open(account, sealed)
            if key is None:
                if account.enabled:
                    shut.append(account.name)
                continue
            opened[sealed] = key
            ready.append(dataclasses.replace(account, api_key=key))
        self._opened = opened
        return ready, shut

    def _open(self, account: AccountRecord, sealed: str) -> str | None:
        if self._cipher is not None:
            try:
                return self._cipher.open(sealed)
            except CredentialError:
                why = (
                    "does not open with this gateway's secret key (was the key changed?); start "
                    "with the key it was sealed with, or give the account its key again with "
                    f"`accounts add --name {account.name} --base-url URL --api-key KEY --replace`"
                )
        else:
            why = f"is sealed and this gateway has no secret key to open it; {SET_A_SECRET_KEY}"
        if account.enabled and sealed not in self._reported:
            self._reported.add(sealed)
            log.error(
                "the API key of upstream account %s %s; the account is left out of rotation",
                account.name,
                why,
                extra={"account": account.name},
            )
        return None
