"""Administration commands: users, keys, upstream accounts, prices, usage and explain."""

from __future__ import annotations

import getpass
import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Any, Final

import click
import orjson
from click.core import ParameterSource

from codex_gateway.billing.pricing import Price, PriceTable, parse_amount, per_million, plain
from codex_gateway.billing.settlement import explain as explain_row
from codex_gateway.cli.context import dump_json, settings_or_exit, table, with_store
from codex_gateway.config import MAX_SECRET_FILE_BYTES, secret_in_file, text_in_key_file
from codex_gateway.errors import CredentialError
from codex_gateway.relay.chatgpt import RESPONSES_PATH, Quota
from codex_gateway.sandbox import ACCOUNT_KEY as SANDBOX_KEY
from codex_gateway.sandbox import ACCOUNT_NAME as SANDBOX_ACCOUNT
from codex_gateway.store.credentials import AccountState, CredentialStore
from codex_gateway.store.db import redact_url
from codex_gateway.store.queries import AccountRecord, KeyLimits, Resealing, Store
from codex_gateway.upstream.chatgpt_auth import load_cipher, read_codex_auth, seal_tokens
from codex_gateway.upstream.kinds import KIND_OPENAI
from codex_gateway.upstream.pool import READY, TIMED_STATES
from codex_gateway.upstream.sealing import (
    SEAL_ONCE_THE_GATEWAY_HAS_THE_KEY,
    SET_A_SECRET_KEY,
    TokenCipher,
    configured_cipher,
    opens,
    refuse_another_secret_key,
    resealed,
    same_secret_key,
)

ACCOUNT_KINDS = (KIND_OPENAI,)


class Unset(Enum):
    """An option that was not given (as opposed to one set to none)."""

    TOKEN = 0


UNSET: Final = Unset.TOKEN


MAX_NAME_LENGTH = 200
# What a negative amount looks like where only a positive one is taken: `-1`, ` -0.5`, `-inf`.
NEGATIVE_AMOUNT = re.compile(r"\s*-([\d.]|inf|nan)", re.IGNORECASE)
# What `accounts list` says of sealed credentials that do not open with the command's key:
# an API key, or a ChatGPT account's tokens.
KEY_DOES_NOT_OPEN = "sealed key does not open with this secret key"
TOKENS_DO_NOT_OPEN = "sealed tokens do not open with this secret key"


def _amount(_ctx: click.Context, param: click.Parameter, value: str | None) -> Decimal | None:
    if value is None:
        return None
    try:
        return parse_amount(value, "the amount")
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _positive_amount(ctx: click.Context, param: click.Parameter, value: str) -> Decimal:
    """An amount that only adds to a balance. Its command takes a leading `-` as part of
    the amount, not as an option, so that `-1` is refused as the negative amount it is."""
    if NEGATIVE_AMOUNT.match(value):
        raise click.BadParameter(
            f"must be positive, not {value!r}: a {ctx.command.name} adds to the balance; "
            "to take USD from a balance, use 'users adjust NAME -USD'"
        )
    if value.startswith("-"):
        # Not an amount: an option this command does not have, taken here as one.
        raise click.NoSuchOption(value, ctx=ctx)
    amount = _amount(ctx, param, value)
    if amount is None or amount <= 0:
        raise click.BadParameter(f"must be more than 0, not {value!r}")
    return amount


def _name(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Names of users, accounts and models: what is typed is what is stored and matched."""
    if value is None:
        return None
    if not value or value != value.strip():
        raise click.BadParameter(f"must not be empty or start or end with spaces: {value!r}")
    if not value.isprintable():
        raise click.BadParameter(
            f"must hold only printable characters, and {value!r} holds {_unprintable(value)}"
        )
    if len(value) > MAX_NAME_LENGTH:
        raise click.BadParameter(f"must be at most {MAX_NAME_LENGTH} characters, not {len(value)}")
    return value


def _unprintable(value: str) -> str:
    """The first character of `value` that is not printable, named by its code point."""
    character = next(character for character in value if not character.isprintable())
    return f"U+{ord(character):04X}"


def _ledger_text(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A note, reason or operator for the ledger: an audit trail that is read in a terminal,
    so it says something and holds no character that would move or colour what is shown."""
    if value is None:
        return None
    if not value.strip():
        raise click.BadParameter("must not be empty: the ledger keeps it as the why and who")
    if not value.isprintable():
        raise click.BadParameter(
            f"must be printable text on one line; it holds {_unprintable(value)}"
        )
    return value


def _user_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A user's name is also one word: it is matched as typed, listed in columns split by
    spaces, and given to `--user` options, where a space inside it would be easy to lose."""
    name = _name(ctx, param, value)
    if name is not None and " " in name:
        raise click.BadParameter(
            f"must not hold spaces, as {value!r} does: a user name is "
            f"one word of at most {MAX_NAME_LENGTH} printable characters, such as 'alice' or "
            "'team-1'"
        )
    return name


# `--api-key -`: the key is the one line of standard input.
FROM_STDIN = "-"
# How refusals name the two ways of giving a key that are not a typed --api-key.
STDIN_HINT = "'--api-key -'"
FILE_HINT = "'--api-key-file'"
# What `--api-key -` asks, on standard error, when standard input is a terminal.
KEY_PROMPT = "Upstream API key: "


def _api_key(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """A key typed on the command line is checked as it is parsed; `-` is read later, once
    the command knows the key is given no other way."""
    if value is None or value == FROM_STDIN:
        return value
    return _checked_api_key(value)


def _checked_api_key(value: str, option: str | None = None) -> str:
    """An upstream API key goes into an HTTP header as typed: one that a header cannot carry
    whole is refused, naming what is wrong with it and never repeating it (it is a secret)."""
    if not value:
        raise click.BadParameter("must not be empty", param_hint=option)
    if value != value.strip():
        raise click.BadParameter(
            "must not start or end with spaces or line breaks (the key is stored as typed)",
            param_hint=option,
        )
    if not value.isascii():
        raise click.BadParameter(
            "must be ASCII text; the key has a character outside ASCII", param_hint=option
        )
    if not value.isprintable():
        raise click.BadParameter(
            "must not hold control characters; the key has one (such as a line break or tab)",
            param_hint=option,
        )
    if " " in value:
        raise click.BadParameter(
            "must not hold spaces; the key has one inside it", param_hint=option
        )
    return value


def _upstream_api_key(api_key: str | None, key_file: str | None) -> str:
    """The key given by exactly one of --api-key-file, `--api-key -` and --api-key, checked
    as a typed one is. A file or line is taken without its line break, and nothing else."""
    if api_key is not None and key_file is not None:
        raise click.UsageError(
            "--api-key cannot be given with --api-key-file: give the upstream API key one way"
        )
    if key_file is not None:
        return _checked_api_key(_api_key_in_file(key_file), FILE_HINT)
    if api_key is None:
        raise click.UsageError(
            "give the upstream API key with --api-key-file PATH, --api-key - (one line of "
            "standard input) or --api-key KEY"
        )
    if api_key == FROM_STDIN:
        return _checked_api_key(_api_key_on_stdin(), STDIN_HINT)
    return api_key


def _api_key_on_stdin() -> str:
    """The one line of standard input, as bounded as a key file is; typed at a terminal,
    it is read without echo, so the key does not show on the screen."""
    if sys.stdin.isatty():
        line = _typed_line()
    else:
        line = _only_line(sys.stdin.buffer.read(MAX_SECRET_FILE_BYTES + 1))
    if len(line) > MAX_SECRET_FILE_BYTES:
        raise click.BadParameter(
            f"the line read from standard input is longer than {MAX_SECRET_FILE_BYTES} bytes; "
            "it must hold only the key",
            param_hint=STDIN_HINT,
        )
    try:
        return _without_line_break(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _not_utf8(exc) from None


def _only_line(piped: bytes) -> bytes:
    """The first line of what was piped in, with its line break; blank lines may follow it,
    but a second line that holds anything is refused, since which line is the key would be a
    guess (a file of several keys, a key broken over two lines)."""
    first, _, rest = piped.partition(b"\n")
    if rest.strip():
        raise click.BadParameter(
            "standard input holds more than one line that is not blank; it must hold only "
            "the key, on one line",
            param_hint=STDIN_HINT,
        )
    return piped[: len(first) + 1]


def _typed_line() -> bytes:
    """A line typed at the terminal, read without echo after a prompt on standard error, as
    bytes for the checks a piped line gets; the end of input before any line is an empty
    one. getpass ends the prompt's line only after a line was read: a read that ends
    otherwise ends it here, so that what is said next starts on a line of its own."""
    try:
        typed = getpass.getpass(KEY_PROMPT, stream=sys.stderr)
    except EOFError:
        sys.stderr.write("\n")
        return b""
    except UnicodeDecodeError as exc:
        sys.stderr.write("\n")
        raise _not_utf8(exc) from None
    return typed.encode("utf-8", "surrogateescape")


def _not_utf8(exc: UnicodeDecodeError) -> click.BadParameter:
    return click.BadParameter(f"not UTF-8 text (byte {exc.start})", param_hint=STDIN_HINT)


def _api_key_in_file(path: str) -> str:
    """The key in `path`, without its line break."""
    return _without_line_break(_in_key_file(path, text_in_key_file, "the key", FILE_HINT))


def _in_key_file(
    path: str, read: Callable[[Path], str], what: str, param_hint: str | None = None
) -> str:
    """What `read` takes from the file at `path`, read as the secret key file is (a regular
    file of at most MAX_SECRET_FILE_BYTES); `what` names what the file should hold. An empty
    path is refused as such: as a Path it would be the current directory."""
    if not path:
        raise click.BadParameter(
            f"is empty; give the path of the file holding {what}", param_hint=param_hint
        )
    try:
        return read(Path(path))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=param_hint) from None


def _without_line_break(text: str) -> str:
    """`text` without the one line break (LF or CR LF) an editor or `echo` ends it with."""
    return text.removesuffix("\r\n") if text.endswith("\r\n") else text.removesuffix("\n")


@click.group()
def users() -> None:
    """Users and their USD balances."""


@users.command("create")
@click.argument("name", callback=_user_name)
@click.option("--balance", default="0", callback=_amount, help="Starting balance in USD.")
def users_create(name: str, balance: Decimal) -> None:
    """Create a user with a starting balance."""
    with_store(lambda store: store.create_user(name, balance))
    click.echo(f"created user {name} with balance ${plain(balance)}")


@users.command("topup", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("usd", callback=_positive_amount)
@click.option("--note", default=None, callback=_ledger_text, help="Why, for the ledger.")
def users_topup(name: str, usd: Decimal, note: str | None) -> None:
    """Add USD to a user's balance."""
    balance = with_store(lambda store: store.topup(name, usd, note))
    click.echo(f"{name}: balance is now ${plain(balance)}")


@users.command("refund", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("usd", callback=_positive_amount)
@click.option("--reason", required=True, callback=_ledger_text, help="Why, for the ledger.")
@click.option("--operator", required=True, callback=_ledger_text, help="Who is making the refund.")
@click.option("--request", "request_id", default=None, help="The request this refund undoes.")
def users_refund(
    name: str, usd: Decimal, reason: str, operator: str, request_id: str | None
) -> None:
    """Give USD back to a user, as a ledger entry with its reason and operator."""
    done = with_store(
        lambda store: store.correct(name, "refund", usd, reason, operator, request_id)
    )
    click.echo(f"{name}: refunded ${plain(usd)}; balance is now ${plain(done.balance)}")


@users.command("adjust", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("usd", metavar="[-]USD")
@click.option("--reason", required=True, callback=_ledger_text, help="Why, for the ledger.")
@click.option(
    "--operator", required=True, callback=_ledger_text, help="Who is making the adjustment."
)
def users_adjust(name: str, usd: str, reason: str, operator: str) -> None:
    """Add (or, with a leading minus, take) USD, as a ledger entry; history is never edited."""
    negative = usd.startswith("-")
    try:
        magnitude = parse_amount(usd.removeprefix("-"), "the amount")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="USD") from None
    if magnitude == 0:
        raise click.BadParameter("must not be 0", param_hint="USD")
    amount = magnitude.copy_negate() if negative else magnitude
    done = with_store(lambda store: store.correct(name, "adjustment", amount, reason, operator))
    click.echo(f"{name}: adjusted by ${plain(amount)}; balance is now ${plain(done.balance)}")
    if amount < 0:
        click.echo(
            f"warning: the amount is negative: {name}'s balance went down by ${plain(magnitude)}",
            err=True,
        )
    if amount < 0 and done.reserved > 0 and done.balance < done.reserved:
        click.echo(
            f"warning: the balance is now below the ${plain(done.reserved)} that gateway "
            f"processes hold for {name}'s requests; their open leases are being returned "
            "within one catalog poll, and requests that no longer fit are refused.",
            err=True,
        )


@users.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def users_list(as_json: bool) -> None:
    """List users and balances."""
    rows = with_store(lambda store: store.list_users())
    if as_json:
        click.echo(dump_json(rows))
        return
    click.echo(table(rows, ["id", "name", "balance", "created_at"]))


@users.command("ledger")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def users_ledger(name: str, as_json: bool) -> None:
    """Every change to a user's balance, oldest first."""
    rows = list(with_store(lambda store: store.ledger(name)))
    click.echo(dump_json(rows) if as_json else table(rows, list(rows[0]) if rows else ["kind"]))


@click.group()
def keys() -> None:
    """Gateway API keys. A key is shown once, when it is created; only its hash is stored."""


def _cap(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Unset | Decimal | None:
    """A USD cap, or `none` for no cap."""
    if value is None:
        return UNSET
    if value.lower() == "none":
        return None
    try:
        amount = parse_amount(value, "the cap")
    except ValueError:
        amount = None
    if amount is None or amount <= 0:
        raise click.BadParameter(f"must be an amount of USD above 0, or none; not {value!r}")
    return amount


def _expiry(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> Unset | datetime | None:
    """A date or time (UTC when no zone is given), or `never`."""
    if value is None:
        return UNSET
    if value.lower() == "never":
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"must be a date such as 2027-01-31 or 2027-01-31T18:00, or never; not {value!r}"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _models(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> Unset | tuple[str, ...] | None:
    """A comma-separated allowlist, or `all`."""
    if value is None:
        return UNSET
    if value.lower() == "all":
        return None
    models = tuple(model.strip() for model in value.split(",") if model.strip())
    if not models:
        raise click.BadParameter("name at least one model, or all")
    return models


def _limit_options(command: Callable[..., None]) -> Callable[..., None]:
    command = click.option(
        "--models", callback=_models, default=None, help="Allowed models, a,b; or all."
    )(command)
    command = click.option(
        "--expires", callback=_expiry, default=None, help="Expiry date (UTC); or never."
    )(command)
    return click.option(
        "--cap", callback=_cap, default=None, help="Most USD the key may spend; or none."
    )(command)


def _given(value: Any) -> Any:
    return None if value is UNSET else value


def _limit_changes(cap: Any, expires: Any, models: Any) -> dict[str, Any]:
    """The columns of the limits that were given, `none`/`never`/`all` included."""
    stored = KeyLimits(_given(cap), _given(expires), _given(models)).values()
    given = {"cap_usd": cap, "expires_at": expires, "models": models}
    return {column: stored[column] for column, value in given.items() if value is not UNSET}


async def _warn_about_limits(store: Store, limits: KeyLimits) -> None:
    """Limits that are allowed but almost certainly a mistake: a key that can never be used."""
    if limits.expires_at is not None and limits.expires_at <= datetime.now(UTC):
        click.echo(
            f"warning: --expires {limits.expires_at:%Y-%m-%d %H:%M} UTC has passed: "
            "the key is refused from the start",
            err=True,
        )
    if limits.models:
        prices = PriceTable(await store.prices())
        unpriced = [model for model in limits.models if prices.resolve(model) is None]
        if unpriced:
            click.echo(
                f"warning: no price for {', '.join(unpriced)}: requests for "
                f"{'it' if len(unpriced) == 1 else 'them'} are refused until one is set "
                "(codex-gateway pricing set)",
                err=True,
            )


@keys.command("create")
@click.option("--user", "user_name", required=True, help="The user the key bills to.")
@click.option("--name", default=None, help="A label for the key.")
@_limit_options
def keys_create(user_name: str, name: str | None, cap: Any, expires: Any, models: Any) -> None:
    """Create a key and print it once (the last line of the output)."""
    limits = KeyLimits(_given(cap), _given(expires), _given(models))

    async def create(store: Store) -> tuple[str, str]:
        await _warn_about_limits(store, limits)
        return await store.create_key(user_name, name, limits)

    raw, display = with_store(create)
    click.echo(f"created key {display} for {user_name}; it is shown only this once:")
    click.echo(raw)


@keys.command("update")
@click.argument("key_id", type=int)
@_limit_options
def keys_update(key_id: int, cap: Any, expires: Any, models: Any) -> None:
    """Change a key's cap, expiry or model allowlist; running gateways follow within a poll.

    Lowering a cap below what the key spent and holds stops its new requests; requests
    already admitted finish.
    """
    changes = _limit_changes(cap, expires, models)
    if not changes:
        raise click.UsageError("give at least one of --cap, --expires, --models")

    async def update(store: Store) -> None:
        await _warn_about_limits(store, KeyLimits(None, _given(expires), _given(models)))
        await store.update_key(key_id, changes)

    with_store(update)
    click.echo(f"updated key {key_id}: " + ", ".join(sorted(changes)))


@keys.command("list")
@click.option("--user", "user_name", default=None, help="Only this user's keys.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def keys_list(user_name: str | None, as_json: bool) -> None:
    """List keys (shown as prefix and last four characters)."""
    rows = with_store(lambda store: store.list_keys(user_name))
    if as_json:
        click.echo(dump_json(rows))
        return
    for row in rows:
        row["models"] = ",".join(orjson.loads(row["models"])) if row["models"] else "all"
    columns = ["id", "display", "user", "name", "cap", "spent", "held", "expires_at", "models"]
    click.echo(table(rows, [*columns, "created_at", "revoked_at"]))


@keys.command("revoke")
@click.argument("key_id", type=int)
def keys_revoke(key_id: int) -> None:
    """Revoke a key by its id (see `keys list`)."""
    with_store(lambda store: store.revoke_key(key_id))
    click.echo(f"revoked key {key_id}")


_SECRET_KEY_CHANGED = click.option(
    "--secret-key-changed",
    is_flag=True,
    help="Seal with this secret key even though it opens none of the values already sealed: "
    "the gateways now run with it, and the accounts sealed before are given their keys again.",
)


@click.group()
def accounts() -> None:
    """Upstream accounts the gateway relays to."""


@accounts.command("add")
@click.option("--name", required=True, callback=_name)
@click.option("--kind", type=click.Choice(ACCOUNT_KINDS), default="openai", show_default=True)
@click.option(
    "--base-url", required=True, help="As OpenAI writes it, e.g. https://api.openai.com/v1"
)
@click.option(
    "--api-key",
    default=None,
    callback=_api_key,
    help="The upstream API key; - reads it from one line of standard input (without echo "
    "at a terminal). On the command line it shows in ps and the shell's history: prefer "
    "--api-key-file or -.",
)
@click.option(
    "--api-key-file",
    "key_file",
    default=None,
    type=click.Path(dir_okay=False),
    help="A file holding the upstream API key (read as CODEX_GATEWAY_SECRET_KEY_FILE is; "
    "one trailing line break is dropped).",
)
@click.option("--priority", type=int, default=100, show_default=True, help="Lower goes first.")
@click.option(
    "--max-concurrency",
    type=click.IntRange(min=1),
    default=None,
    help="Most requests in flight at once per gateway process (default: no cap).",
)
@click.option(
    "--weight",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Share of traffic among accounts of the same priority.",
)
@click.option(
    "--replace",
    is_flag=True,
    help="Give an existing account of this name this base URL and key (its priority, weight "
    "and cap stay).",
)
@_SECRET_KEY_CHANGED
@click.pass_context
def accounts_add(
    ctx: click.Context,
    name: str,
    kind: str,
    base_url: str,
    api_key: str | None,
    key_file: str | None,
    priority: int,
    max_concurrency: int | None,
    weight: int,
    replace: bool,
    secret_key_changed: bool,
) -> None:
    """Add an upstream account.

    The API key is given by exactly one of --api-key-file PATH, --api-key - (a line of
    standard input) or --api-key KEY (which ps and the shell's history show).

    With CODEX_GATEWAY_SECRET_KEY (or the key file) set, the API key is sealed with it before
    it is stored; without one it is stored unsealed, and a warning says so. A secret key that
    opens none of the values already sealed is refused (see --secret-key-changed).
    """
    if not base_url.startswith(("http://", "https://")):
        raise click.BadParameter("must start with http:// or https://", param_hint="--base-url")
    if replace:
        _refuse_with_replace(ctx, ("priority", "weight", "max_concurrency"))
    key = _upstream_api_key(api_key, key_file)
    cipher = _cipher_or_none()
    if cipher is not None and not secret_key_changed:
        _refuse_another_secret_key(cipher, besides=name if replace else None)
    stored = cipher.seal(key) if cipher else key
    sealed = cipher is not None
    if replace:
        with_store(lambda store: store.replace_api_key(name, kind, base_url, stored, sealed=sealed))
    else:
        with_store(
            lambda store: store.add_account(
                name,
                kind,
                base_url,
                stored,
                priority,
                sealed=sealed,
                max_concurrency=max_concurrency,
                weight=weight,
            )
        )
    done = "gave a new key to" if replace else "added"
    shown = redact_url(base_url.rstrip("/"))
    click.echo(f"{done} {kind} account {name} -> {shown}/responses")
    if cipher is None:
        click.echo(
            f"warning: no secret key is set, so the API key of account {name} is stored "
            f"unsealed in the database; {SEAL_ONCE_THE_GATEWAY_HAS_THE_KEY}",
            err=True,
        )


def _refuse_with_replace(ctx: click.Context, names: tuple[str, ...]) -> None:
    """--replace keeps what the account has; an option that would change it is refused
    rather than ignored."""
    for name in names:
        if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT:
            option = "--" + name.replace("_", "-")
            raise click.UsageError(
                f"{option} cannot be given with --replace: --replace gives the account a new "
                "base URL and key, and keeps its priority, weight and cap as they are"
            )


@accounts.command("seal")
@_SECRET_KEY_CHANGED
def accounts_seal(secret_key_changed: bool) -> None:
    """Seal every upstream API key still stored unsealed with the secret key.

    Keys added while the gateway had a secret key are sealed already; this seals those added
    before, or without one. Give the serving gateways the secret key and restart them first:
    they pick the sealed keys up within a poll, and open them only with that key (versions
    before sealing cannot open them at all). A key that opens none of the values already
    sealed is refused. The quick start's sandbox placeholder key is no secret and stays as it is.
    """
    cipher = _cipher_or_none()
    if cipher is None:
        raise click.ClickException(f"no secret key to seal API keys with: {SET_A_SECRET_KEY}")
    if not secret_key_changed:
        _refuse_another_secret_key(cipher)
    names = with_store(
        lambda store: store.seal_api_keys(
            KIND_OPENAI, cipher.seal, keep=(SANDBOX_ACCOUNT, SANDBOX_KEY)
        )
    )
    if names:
        click.echo(f"sealed the API keys of {len(names)} account(s): {', '.join(names)}")
    else:
        click.echo("every API key is sealed already")


def _refuse_another_secret_key(cipher: TokenCipher, besides: str | None = None) -> None:
    """End the command if its secret key opens none of the values already sealed, but for
    those of account `besides`, which are about to be replaced."""
    sealed = with_store(lambda store: store.sealed_values(besides=besides))
    try:
        refuse_another_secret_key(cipher, sealed)
    except CredentialError as exc:
        raise click.ClickException(str(exc)) from None


def _cipher_or_none() -> TokenCipher | None:
    """The secret key's cipher, None when none is set; a key file that gives no key ends the
    command with the problem."""
    try:
        return configured_cipher(settings_or_exit())
    except CredentialError as exc:
        raise click.ClickException(str(exc)) from None


def _old_secret_key(_ctx: click.Context, _param: click.Parameter, path: str) -> TokenCipher:
    """The cipher of the secret key in `path`."""
    return TokenCipher(_in_key_file(path, secret_in_file, "the old key"))


@accounts.command("reseal")
@click.option(
    "--old-secret-key-file",
    "old_key",
    required=True,
    type=click.Path(dir_okay=False),
    callback=_old_secret_key,
    help="A file holding the secret key the values are sealed with now (read as "
    "CODEX_GATEWAY_SECRET_KEY_FILE is).",
)
def accounts_reseal(old_key: TokenCipher) -> None:
    """Re-seal every sealed API key and ChatGPT token under a new secret key.

    Each value is opened with the old key, read from --old-secret-key-file, and sealed with
    the new one, CODEX_GATEWAY_SECRET_KEY (or the key file), all in one transaction. A value
    the new key opens already is left as it is, so running it again seals only what is left.
    If any value opens with neither key, nothing changes, and the accounts holding such
    values are named. Then restart every gateway with the new key: one still on the old key
    cannot open what is re-sealed. API keys stored unsealed stay so (see `accounts seal`).
    """
    new_key = _cipher_or_none()
    if new_key is None:
        raise click.ClickException(f"no new secret key to re-seal with: {SET_A_SECRET_KEY}")
    if same_secret_key(old_key, new_key):
        raise click.ClickException(
            "the old secret key is the secret key set now, so nothing was re-sealed: set the "
            "new key in CODEX_GATEWAY_SECRET_KEY or CODEX_GATEWAY_SECRET_KEY_FILE"
        )
    try:
        done = with_store(lambda store: store.reseal(lambda held: resealed(held, old_key, new_key)))
    except CredentialError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(_resealing_report(done))


def _resealing_report(done: Resealing) -> str:
    """What `accounts reseal` did, counted in values and accounts."""
    if not done.held:
        return "nothing is sealed in the database; nothing to re-seal"
    values = sum(len(sealed) for sealed in done.stored.values())
    already = sum(len(sealed) for sealed in done.held.values()) - values
    already_done = f"{already} value(s) already sealed under the new key"
    if not values:
        return f"nothing left to re-seal: all {already_done}"
    accounts = len(done.stored)
    report = f"re-sealed {values} value(s) of {accounts} account(s) under the new secret key"
    if already:
        report += f" and left the {already_done} as they were"
    return report + "; restart every gateway with it"


@accounts.command("import-codex")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", required=True)
@click.option(
    "--base-url",
    default=None,
    help="The ChatGPT backend; requests go to BASE/codex/responses. "
    "Default: CODEX_GATEWAY_CHATGPT_BASE_URL, else https://chatgpt.com/backend-api",
)
@click.option("--priority", type=int, default=100, show_default=True, help="Lower goes first.")
@click.option(
    "--max-concurrency",
    type=click.IntRange(min=1),
    default=None,
    help="Most requests in flight at once per gateway process (default: no cap).",
)
@click.option("--weight", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--replace", is_flag=True, help="Give an existing ChatGPT account of this name new tokens."
)
@_SECRET_KEY_CHANGED
def accounts_import_codex(
    path: Path,
    name: str,
    base_url: str | None,
    priority: int,
    max_concurrency: int | None,
    weight: int,
    replace: bool,
    secret_key_changed: bool,
) -> None:
    """Add a ChatGPT account from a Codex auth.json (after "Sign in with ChatGPT").

    Its tokens are sealed with CODEX_GATEWAY_SECRET_KEY (or the key file) before they are
    stored; without a key nothing is stored. A secret key that opens none of the values
    already sealed is refused (see --secret-key-changed). After a new sign-in, --replace
    gives an account (say one that needs_relogin) its new tokens.
    """
    settings = settings_or_exit()
    base = (base_url or settings.chatgpt_base_url).rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise click.BadParameter("must start with http:// or https://", param_hint="--base-url")
    try:
        tokens = read_codex_auth(path)
        cipher = load_cipher(settings)
    except CredentialError as exc:
        raise click.ClickException(str(exc)) from None
    if not secret_key_changed:
        _refuse_another_secret_key(cipher, besides=name if replace else None)
    sealed = seal_tokens(cipher, tokens)

    async def store_tokens(store: Store) -> None:
        credentials = CredentialStore(store.engine)
        if not replace:
            _warn_if_imported(tokens.account_id, await credentials.imported_as(tokens.account_id))
        if replace:
            await credentials.replace_tokens(name, base, tokens.account_id, sealed)
        else:
            await credentials.add_chatgpt_account(
                name, base, tokens.account_id, sealed, priority, max_concurrency, weight
            )

    with_store(store_tokens)
    plan = f", plan {tokens.plan_type}" if tokens.plan_type else ""
    click.echo(
        f"{'replaced the tokens of' if replace else 'imported'} chatgpt account {name} "
        f"(ChatGPT account {tokens.account_id}{plan}) -> {redact_url(base)}{RESPONSES_PATH}"
    )


def _warn_if_imported(chatgpt_account_id: str, names: list[str]) -> None:
    """Two gateway accounts on one sign-in share one refresh token, which the first refresh
    spends: the other then needs a new sign-in. Separate sign-ins are fine, but share a quota."""
    if names:
        click.echo(
            f"warning: ChatGPT account {chatgpt_account_id} is already imported as "
            f"{', '.join(names)}; accounts imported from one sign-in lock each other out at the "
            "first token refresh (sign in again for each, or use --replace)",
            err=True,
        )


@accounts.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def accounts_list(as_json: bool) -> None:
    """List upstream accounts with their state and why, and whether each key is sealed
    (keys and tokens are never shown).

    The serving gateways' secret key is not known here: with a secret key set, a sealed API
    key or ChatGPT token that does not open with it is named in WHY; without one, it shows
    only as sealed.
    """

    async def load(store: Store) -> tuple[list[AccountRecord], dict[int, AccountState]]:
        return await store.accounts(), await CredentialStore(store.engine).states()

    cipher = _checking_cipher()
    records, states = with_store(load)
    now = datetime.now(UTC)
    rows = [_account_row(a, states.get(a.id), now, cipher) for a in records]
    if as_json:
        click.echo(dump_json(rows))
        return
    for row in rows:
        row["quota"] = _quota_text(row["quota"])
    columns = ["id", "name", "kind", "base_url", "priority", "weight", "max_concurrency", "key"]
    click.echo(table(rows, [*columns, "state", "why", "quota"]))


def _checking_cipher() -> TokenCipher | None:
    """The secret key to check sealed keys against; a key file that gives none is said, and
    the list is shown without the check, as it is without a key."""
    try:
        return configured_cipher(settings_or_exit())
    except CredentialError as exc:
        click.echo(f"warning: {exc}; sealed keys are listed without checking them", err=True)
        return None


def _account_row(
    account: AccountRecord,
    credentials: AccountState | None,
    now: datetime,
    cipher: TokenCipher | None = None,
) -> dict[str, Any]:
    quota = (
        Quota.from_json(orjson.loads(credentials.quota))
        if credentials and credentials.quota
        else None
    )
    state, why, until = _state(account, quota, now)
    shut = _not_opening(account, credentials, cipher) if cipher is not None else None
    if shut:
        why = f"{why}; {shut}" if why else shut
    return {
        "id": account.id,
        "name": account.name,
        "kind": account.kind,
        # a password in the URL is masked; the row keeps it as given
        "base_url": redact_url(account.base_url),
        "priority": account.priority,
        "weight": account.weight,
        "max_concurrency": account.max_concurrency,
        # how the credential is stored; a ChatGPT account's tokens are always sealed
        "key": "unsealed"
        if account.kind == KIND_OPENAI and not account.api_key_sealed
        else "sealed",
        "enabled": account.enabled,
        "state": state,
        "why": why,
        "until": until.isoformat() if until else None,
        "quota": quota.to_json() if quota else None,
        "token_expires_at": credentials.token_expires_at if credentials else None,
    }


def _not_opening(
    account: AccountRecord, credentials: AccountState | None, cipher: TokenCipher
) -> str | None:
    """What WHY says when the account's sealed API key, or any of its sealed ChatGPT
    tokens, does not open with `cipher`; None when all of them open."""
    key = account.api_key_sealed
    if key is not None and not opens(cipher, key):
        return KEY_DOES_NOT_OPEN
    tokens = credentials.sealed_tokens if credentials else ()
    if not all(opens(cipher, token) for token in tokens):
        return TOKENS_DO_NOT_OPEN
    return None


def _state(
    account: AccountRecord, quota: Quota | None, now: datetime
) -> tuple[str, str | None, datetime | None]:
    """The account's state as an operator reads it, why, and until when; most pressing first.

    A timed state (cooling down, at a quota limit) whose time is up shows as ready.
    """
    state, why, until = account.state, account.state_reason, account.state_until
    if until is not None and until.tzinfo is None:
        until = until.replace(tzinfo=UTC)
    if not account.enabled:
        return "disabled", "disabled by the operator", None
    if state in TIMED_STATES and (until is None or until <= now):
        state, why, until = READY, None, None
    if state != READY:
        return state, why, until
    blocked = quota.blocked_until(now.timestamp()) if quota else None
    if blocked is not None:
        resets = datetime.fromtimestamp(blocked, UTC)
        return "cooling_down", f"usage limit reached; resets at {_moment(blocked)}", resets
    return READY, None, None


def _quota_text(quota: dict[str, Any] | None) -> str | None:
    if not quota:
        return None
    parts = []
    for name in ("primary", "secondary"):
        window = quota.get(name)
        if window:
            resets = f" resets {_moment(window['resets_at'])}" if window["resets_at"] else ""
            parts.append(f"{name} {window['used_percent']:g}%{resets}")
    return ", ".join(parts) or None


def _moment(unix: int) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M UTC")


@accounts.command("disable")
@click.argument("name")
def accounts_disable(name: str) -> None:
    """Take an account out of rotation."""
    with_store(lambda store: store.set_account_enabled(name, False))
    click.echo(f"disabled account {name}")


@accounts.command("enable")
@click.argument("name")
def accounts_enable(name: str) -> None:
    """Put an account back into rotation, clearing any health mark (e.g. after re-login)
    and any usage wall its stored quota reports: the operator knows best."""
    with_store(lambda store: store.set_account_enabled(name, True, _without_walls))
    click.echo(f"enabled account {name}")


def _without_walls(document: str) -> str | None:
    """A stored quota document with its walls lifted; one that is not JSON is dropped, as
    the gateway would ignore it anyway."""
    try:
        quota = Quota.from_json(orjson.loads(document))
    except orjson.JSONDecodeError:
        return None
    return orjson.dumps(quota.without_walls(time.time()).to_json()).decode()


@accounts.command("remove")
@click.argument("name")
def accounts_remove(name: str) -> None:
    """Delete an account that has served no request."""
    with_store(lambda store: store.remove_account(name))
    click.echo(f"removed account {name}")


@click.group()
def pricing() -> None:
    """Per-model prices (USD per 1M tokens unless --per 1k) and markup."""


@pricing.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def pricing_list(as_json: bool) -> None:
    """List prices, USD per 1M tokens."""
    prices = with_store(lambda store: store.prices())
    rows = [
        {
            "model": p.model,
            "input": plain(p.input),
            "cached_input": plain(p.cached_input),
            "output": plain(p.output),
            "markup": plain(p.markup),
        }
        for p in prices
    ]
    if as_json:
        click.echo(dump_json(rows))
        return
    click.echo(table(rows, ["model", "input", "cached_input", "output", "markup"]))


@pricing.command("set")
@click.argument("model", callback=_name)
@click.option("--input", "input_", required=True, callback=_amount, help="Input price.")
@click.option("--cached-input", required=True, callback=_amount, help="Cached input price.")
@click.option("--output", required=True, callback=_amount, help="Output price.")
@click.option("--markup", default="1", callback=_amount, show_default=True)
@click.option("--per", type=click.Choice(["1m", "1k"]), default="1m", show_default=True)
def pricing_set(
    model: str,
    input_: Decimal,
    cached_input: Decimal,
    output: Decimal,
    markup: Decimal,
    per: str,
) -> None:
    """Set a model's prices (creates or replaces)."""
    price = Price(
        model,
        per_million(input_, per),
        per_million(cached_input, per),
        per_million(output, per),
        markup,
    )
    with_store(lambda store: store.set_price(price))
    click.echo(
        f"{model}: input {plain(price.input)}, cached input {plain(price.cached_input)}, "
        f"output {plain(price.output)} USD per 1M tokens, markup x{plain(price.markup)}"
    )
    if price.cached_input > price.input:
        # Allowed, since the operator may mean it, but a cache read costing more than a fresh
        # read is almost always the two prices swapped or a misplaced decimal point.
        click.echo(
            f"warning: the cached input price {plain(cached_input)} is above the input price "
            f"{plain(input_)}: cached tokens will cost more than uncached ones",
            err=True,
        )
    if price.markup == 0:
        click.echo(f"warning: a markup of 0 makes every request for {model} free", err=True)


@pricing.command("remove")
@click.argument("model")
def pricing_remove(model: str) -> None:
    """Remove a model's price; requests for it are then refused."""
    with_store(lambda store: store.remove_price(model))
    click.echo(f"removed price for {model}")


USAGE_COLUMNS = [
    "request_id",
    "started_at",
    "user",
    "model",
    "status",
    "input_tokens",
    "cached_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_usd",
    "client_bytes",
    "flags",
]


@click.group()
def usage() -> None:
    """Per-request usage rows."""


@usage.command("list")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@click.option("--user", "user_name", default=None)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, newest first.")
def usage_list(limit: int, user_name: str | None, as_json: bool) -> None:
    """List usage rows, newest first."""
    rows = with_store(lambda store: store.list_usage(limit, user_name))
    rows = [_usage_json(row) for row in rows]
    if as_json:
        click.echo(dump_json(rows))
        return
    for row in rows:
        row["flags"] = ",".join(row["flags"]) or "-"
    click.echo(table(rows, USAGE_COLUMNS))


def _usage_json(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["flags"] = orjson.loads(row["flags"])
    out["raw_usage"] = orjson.loads(row["raw_usage"]) if row["raw_usage"] else None
    out["attempts"] = orjson.loads(row["attempts"]) if row.get("attempts") else []
    for name, value in row.items():
        if isinstance(value, Decimal):
            out[name] = plain(value)
    return out


@click.command()
@click.argument("request_id")
@click.option("--json", "as_json", is_flag=True, help="Print the whole usage row as JSON.")
def explain(request_id: str, as_json: bool) -> None:
    """Show how one request's cost was computed, term by term."""

    async def load(store: Store) -> dict[str, Any] | None:
        return await store.usage(request_id)

    row = with_store(load)
    if row is None:
        raise click.ClickException(f"no usage row for request {request_id!r}")
    click.echo(dump_json(_usage_json(row)) if as_json else explain_row(row))


@click.group()
def ledger() -> None:
    """The append-only record of every balance change."""


@ledger.command("verify")
def ledger_verify() -> None:
    """Prove every balance and reservation from the ledger, and every request's one settlement.

    Exits 1 with one line per discrepancy when anything does not add up.
    """
    problems, counts = with_store(lambda store: store.verify_ledger())
    checked = ", ".join(f"{count} {what}" for what, count in counts.items())
    for problem in problems:
        click.echo(f"problem: {problem}", err=True)
    if problems:
        raise click.ClickException(f"{len(problems)} problems in {checked}")
    click.echo(
        f"ok: {checked}; every balance and reservation equals its ledger and every request "
        "has exactly one settlement"
    )
