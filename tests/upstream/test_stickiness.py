"""Stickiness: a conversation stays on one account while it is healthy, and moves when not.

The binding stores are tested directly (memory, and the real Redis); then end to end: ten
turns on one account, a move when that account fails, and two gateway processes sharing
Redis that agree on where a conversation lives.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from codex_gateway.upstream.stickiness import (
    MemoryStickiness,
    RedisStickiness,
    Stickiness,
    conversation_key,
)
from tests.conftest import Gateway, Sandbox, free_port
from tests.upstream.pool_helpers import (
    FAULT_TIMEOUTS,
    fresh_accounts,
    pool_gateway,
    served_by,
    set_fault,
    start_second_process,
    stream_events,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
BODY = {"model": "gpt-5.1-codex", "input": "hi"}


# body, headers -> whether the request names a conversation
CONVERSATIONS = [
    # the body's prompt_cache_key, as Codex sends it
    ({"prompt_cache_key": "019a-conv"}, {}, True),
    # a session header when the body has none
    ({}, {"session-id": "019a-conv"}, True),
    ({}, {"session_id": "019a-conv"}, True),
    # nothing to go by
    ({}, {}, False),
    ({"prompt_cache_key": ""}, {}, False),
    ({"prompt_cache_key": 7}, {}, False),
]


@pytest.mark.parametrize(("body", "headers", "named"), CONVERSATIONS)
def test_a_conversation_is_named_by_cache_key_or_session_header(
    body: dict[str, object], headers: dict[str, str], named: bool
) -> None:
    name = conversation_key(5, body, headers)
    assert (name is not None) is named
    if name is not None:
        assert name == conversation_key(5, {"prompt_cache_key": "019a-conv"}, {})
        assert "019a-conv" not in name  # stored as a digest
        assert name != conversation_key(6, body, headers)  # per gateway key


def stores() -> list[tuple[str, Stickiness]]:
    return [
        ("memory", MemoryStickiness(ttl=0.3)),
        ("redis", RedisStickiness(REDIS_URL, "cg-test-" + uuid.uuid4().hex, ttl=1)),
    ]


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_binding_is_kept_moved_and_forgotten_after_its_ttl(kind: str) -> None:
    store = dict(stores())[kind]
    try:
        assert await store.get("k:1") is None
        await store.put("k:1", 3)
        assert await store.get("k:1") == 3
        await store.put("k:1", 4)
        assert await store.get("k:1") == 4
        assert await store.get("k:2") is None
        await asyncio.sleep(1.6 if kind == "redis" else 0.5)
        assert await store.get("k:1") is None
    finally:
        await store.close()


async def test_memory_bindings_drop_the_oldest_beyond_their_limit() -> None:
    store = MemoryStickiness(ttl=60, max_entries=2)
    for number in range(3):
        await store.put(f"k:{number}", number)
    assert [await store.get(f"k:{n}") for n in range(3)] == [None, 1, 2]


async def test_an_unreachable_redis_costs_stickiness_not_the_request() -> None:
    store = RedisStickiness(f"redis://127.0.0.1:{free_port()}/0", "cg-test", ttl=10)
    try:
        await store.put("k:1", 1)
        assert await store.get("k:1") is None
    finally:
        await store.close()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    env = {
        **FAULT_TIMEOUTS,
        "CODEX_GATEWAY_REDIS_URL": REDIS_URL,
        "CODEX_GATEWAY_REDIS_PREFIX": "cg-test-" + uuid.uuid4().hex,
    }
    yield from pool_gateway(request.param, tmp_path_factory, env)


def turn(gateway: Gateway, key: str, conversation: str | None) -> None:
    body = dict(BODY)
    if conversation is not None:
        body["prompt_cache_key"] = conversation
    response, events = stream_events(gateway, key, body)
    assert response.status_code == 200
    assert events[-1]["type"] == "response.completed"


def test_ten_turns_stay_on_one_account_then_move_and_stay_when_it_fails(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    accounts = fresh_accounts(gateway, sandbox, [{}, {}, {}])
    _, key = gateway.new_user("10")
    conversation = str(uuid.uuid4())
    sandbox.clear()
    for _ in range(10):
        turn(gateway, key, conversation)
        turn(gateway, key, None)  # other traffic keeps rotating across the accounts
    served = served_by(sandbox, accounts)
    sticky, others = served[0::2], served[1::2]
    assert len(set(sticky)) == 1
    # Meanwhile requests without a conversation take turns on the other accounts.
    assert set(others) == {a.name for a in accounts} - set(sticky)
    home = next(a for a in accounts if a.name == sticky[0])
    set_fault(sandbox, home, "500")
    sandbox.clear()
    turn(gateway, key, conversation)
    moved = served_by(sandbox, accounts)
    assert moved[0] == home.name and moved[1] != home.name
    # The new binding holds, even once the old account is healthy again.
    set_fault(sandbox, home, None)
    sandbox.clear()
    for _ in range(5):
        turn(gateway, key, conversation)
    assert served_by(sandbox, accounts) == [moved[1]] * 5


def test_two_gateway_processes_sharing_redis_agree_on_the_account(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    accounts = fresh_accounts(gateway, sandbox, [{}, {}])
    _, key = gateway.new_user("10")
    second = start_second_process(gateway)
    first_url = gateway.url
    try:
        sandbox.clear()
        # Make the first process's next free choice differ from a fresh process's.
        turn(gateway, key, None)
        conversation = str(uuid.uuid4())
        turn(gateway, key, conversation)
        gateway.url = second
        for _ in range(4):
            turn(gateway, key, conversation)
    finally:
        gateway.url = first_url
    served = served_by(sandbox, accounts)
    assert served[0] != served[1]
    assert served[1:] == [served[1]] * 5


@pytest.mark.parametrize("redis_url", ["", "redis://127.0.0.1:6379/0"])
def test_a_gateway_loads_the_redis_client_only_when_it_uses_redis(
    tmp_path: Path, redis_url: str
) -> None:
    """The client is several megabytes that a gateway on one machine never uses."""
    code = (
        "import sys\n"
        "from codex_gateway.app import Gateway\n"
        "from codex_gateway.config import Settings\n"
        f"Gateway(Settings(database_url='sqlite:///{tmp_path}/gateway.db', "
        f"spool_path='{tmp_path}/spool.jsonl', redis_url={redis_url or None!r}))\n"
        "print(any(name.split('.')[0] == 'redis' for name in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(bool(redis_url))
