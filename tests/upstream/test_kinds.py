"""What leaves for an OpenAI account: the client's body, the account's key in place of the
gateway key, and nothing of either key in the request's repr."""

from __future__ import annotations

from codex_gateway.store.queries import AccountRecord
from codex_gateway.upstream.kinds import RESPONSES, Call, OpenAIKind

ACCOUNT_KEY = "sk-upstream-account-key-do-not-show-0001"
GATEWAY_KEY = "sk-cg-gateway-key-do-not-show-0001"


async def test_an_openai_account_gets_its_own_key_and_the_repr_shows_neither_key() -> None:
    account = AccountRecord(1, "a", "openai", "http://127.0.0.1:9/v1", ACCOUNT_KEY, 0, True)
    call = Call(
        RESPONSES,
        b'{"model":"m","input":"hi"}',
        {"model": "m", "input": "hi"},
        {"authorization": f"Bearer {GATEWAY_KEY}", "content-type": "application/json"},
        7,
        "req_1",
    )

    outgoing = await OpenAIKind().prepare(account, call)

    assert outgoing.url == "http://127.0.0.1:9/v1/responses"
    assert outgoing.body == call.body
    assert outgoing.credential == ACCOUNT_KEY
    assert ACCOUNT_KEY in str(outgoing.headers.values())
    assert GATEWAY_KEY not in str(outgoing.headers.values())
    assert ACCOUNT_KEY not in repr(outgoing)
    assert GATEWAY_KEY not in repr(outgoing)
    assert GATEWAY_KEY not in repr(call)
    assert repr(call) == "Call(endpoint='responses', key_id=7, request_id='req_1')"
