"""The operator's secret key: upstream credentials sealed at rest, and opened once in memory.

ChatGPT tokens are always sealed; an upstream API key is sealed whenever the gateway has a
secret key. A sealed API key is opened when the catalog loads the accounts, not per request,
so the relay sends each request with a key it already holds. A key that stops opening (sealed
since with another secret key, or while this gateway has none) never takes a serving account
out of rotation: the process goes on with the key it last held for that account, and says so
once. Only an account whose key this process never held is left out, and named in the log.
"""

from __future__ import annotations

import base64
import hmac
import logging
from dataclasses import replace

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from codex_gateway.config import MIN_SECRET_LENGTH, Settings, read_secret_key_file
from codex_gateway.errors import ConfigError, CredentialError
from codex_gateway.store.queries import AccountRecord, SealedByAccount

log = logging.getLogger(__name__)

# Fixed salt: the key must come out the same in every process from the same secret.
_KDF_SALT = b"codex-gateway/secret-key/v1"
SET_A_SECRET_KEY = (
    f"set CODEX_GATEWAY_SECRET_KEY (at least {MIN_SECRET_LENGTH} characters) or "
    "CODEX_GATEWAY_SECRET_KEY_FILE"
)
# Sealing under a key the serving gateways lack would leave them keys they cannot open.
SEAL_ONCE_THE_GATEWAY_HAS_THE_KEY = (
    f"first give the gateway a secret key ({SET_A_SECRET_KEY}) and restart it, then run "
    "`codex-gateway accounts seal` with that same key"
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


def refuse_another_secret_key(cipher: TokenCipher, sealed: dict[str, str]) -> None:
    """Refuse to seal with a secret key that opens none of the values already sealed (by
    account name): they were sealed with another key, which the serving gateways most likely
    hold, and those gateways could not open what this key seals. With nothing sealed yet,
    any key will do."""
    if not sealed or any(opens(cipher, value) for value in sealed.values()):
        return
    raise CredentialError(
        "this secret key opens none of the values already sealed in the database (accounts "
        f"{', '.join(sealed)}): they were sealed with another key, and a gateway that holds "
        "that key could not open what this one seals. Run the command with the gateway's "
        "secret key; if the gateways now run with this key, give --secret-key-changed"
    )


def resealed(held: SealedByAccount, old: TokenCipher, new: TokenCipher) -> SealedByAccount:
    """The sealed values (by account name, then column) that open with `old`, sealed again
    with `new`; those that open with `new` already are left out, as done. If any value opens
    with neither, none is given: the CredentialError names the accounts holding such
    values, and never a value."""
    done: SealedByAccount = {}
    shut: list[str] = []
    for name, values in held.items():
        try:
            anew = {column: _sealed_anew(value, old, new) for column, value in values.items()}
        except CredentialError:
            shut.append(name)
            continue
        sealed = {column: value for column, value in anew.items() if value is not None}
        if sealed:
            done[name] = sealed
    if shut:
        raise CredentialError(
            "neither the old nor the new secret key opens the sealed values of accounts "
            f"{', '.join(shut)}, so nothing was re-sealed. Give --old-secret-key-file the key "
            "they were sealed with; or, with the old key as the secret key, give those "
            "accounts their keys again (`accounts add --replace`, `accounts import-codex "
            "--replace`) or remove them, and re-seal"
        )
    return done


def _sealed_anew(value: str, old: TokenCipher, new: TokenCipher) -> str | None:
    """`value` opened with `old` and sealed with `new`, or None if `new` opens it already."""
    try:
        return new.seal(old.open(value))
    except CredentialError:
        if opens(new, value):
            return None
        raise


def same_secret_key(one: TokenCipher, other: TokenCipher) -> bool:
    """Whether two ciphers come from the same secret key, and so open what each other seals:
    their session keys, derived from the same master key as their sealing keys, are equal."""
    return hmac.compare_digest(one.session_key, other.session_key)


def opens(cipher: TokenCipher, sealed: str) -> bool:
    """Whether a sealed value opens with `cipher`."""
    return opened_or_none(cipher, sealed) is not None


def opened_or_none(cipher: TokenCipher | None, sealed: str) -> str | None:
    """A sealed value opened with `cipher`; None when it does not open, or with no cipher."""
    if cipher is None:
        return None
    try:
        return cipher.open(sealed)
    except CredentialError:
        return None


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

    Keys opened at the last load are kept, so a reload opens only what changed. The last key
    held for each account, opened or in clear, is kept too: should its stored key stop
    opening (sealed by `accounts seal` under a secret key this gateway lacks), the account
    keeps serving with it rather than leaving every account out at once. Only while the
    account is the same one, under the same name, kind and base URL: a key given for one
    upstream never goes to another. A key that does not open is logged unless `advises` is
    false: then another worker of the same `serve`, opening the same keys, logs it, but for an
    account this worker served with until now and leaves out (another may have kept it).
    """

    def __init__(self, cipher: TokenCipher | None, advises: bool = True):
        self._cipher = cipher
        self._advises = advises
        self._opened: dict[str, str] = {}  # sealed -> in clear
        # account id -> where the account sent its last key (name, kind, base URL), and the key
        self._held: dict[int, tuple[tuple[str, str, str], str]] = {}
        self._reported: set[str] = set()  # sealed keys already logged as not opening

    def open(self, accounts: list[AccountRecord]) -> tuple[list[AccountRecord], list[str]]:
        """The accounts with their keys in clear, and the names of the enabled accounts
        left out because their keys do not open."""
        ready: list[AccountRecord] = []
        shut: list[str] = []
        opened: dict[str, str] = {}
        held: dict[int, tuple[tuple[str, str, str], str]] = {}
        for account in accounts:
            key = self._key(account, opened)
            if key is None:
                if account.enabled:
                    shut.append(account.name)
                continue
            held[account.id] = (_where(account), key)
            ready.append(account if key == account.api_key else replace(account, api_key=key))
        self._opened, self._held = opened, held
        return ready, shut

    def left_out(self, names: list[str]) -> str | None:
        """Why the accounts `names` (as `open` gives them) are left out, in words a client of
        the gateway may read: they are counted, not named, and no key is shown."""
        if not names:
            return None
        why = (
            "do not open with this gateway's secret key"
            if self._cipher is not None
            else "are sealed and this gateway has no secret key to open them"
        )
        return f"{len(names)} account(s) are left out because their API keys {why}"

    def _key(self, account: AccountRecord, opened: dict[str, str]) -> str | None:
        """The account's key in clear: as stored, opened, or else the one last held for it."""
        sealed = account.api_key_sealed
        if sealed is None:
            return account.api_key
        key = self._opened.get(sealed) or opened_or_none(self._cipher, sealed)
        if key is not None:
            opened[sealed] = key
            return key
        where, key = self._held.get(account.id, (None, None))
        if where != _where(account):
            key = None  # another account now, or the same one sent elsewhere
        # An account this process served with and now drops is its own news, whichever
        # worker it is: another worker may have kept it.
        self._report(account, sealed, kept=key is not None, dropped=where is not None and not key)
        return key

    def _report(
        self, account: AccountRecord, sealed: str, *, kept: bool, dropped: bool = False
    ) -> None:
        """Log once, for an enabled account, why its stored key does not open and what the
        account does meanwhile; `dropped`: this process served with the account until now."""
        if not account.enabled or sealed in self._reported:
            return
        if not self._advises and not dropped:
            return
        self._reported.add(sealed)
        if self._cipher is not None:
            why = (
                "does not open with this gateway's secret key (was the key changed?); start "
                "with the key it was sealed with, or give the account its key again with "
                f"`accounts add --name {account.name} --base-url URL --api-key-file PATH --replace`"
            )
        else:
            why = (
                f"is sealed and this gateway has no secret key to open it; {SET_A_SECRET_KEY} "
                "to the key it was sealed with, and restart"
            )
        then = (
            "the account keeps serving with the key this process held before, until it restarts"
            if kept
            else "the account is left out of rotation"
        )
        log.error(
            "the API key of upstream account %s %s; %s",
            account.name,
            why,
            then,
            extra={"account": account.name},
        )


def _where(account: AccountRecord) -> tuple[str, str, str]:
    """What an account's key is given for: the account, its kind and its upstream."""
    return account.name, account.kind, account.base_url
