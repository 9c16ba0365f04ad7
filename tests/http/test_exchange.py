"""Request ids: the shape clients and the usage rows see, unique across worker processes."""

from __future__ import annotations

import os
import re
import time

from codex_gateway.http.exchange import RequestIds


def test_a_request_id_is_req_and_128_bits_in_hex() -> None:
    new_request_id = RequestIds()
    ids = [new_request_id() for _ in range(10_000)]

    assert all(re.fullmatch(r"req_[0-9a-f]{32}", request_id) for request_id in ids)
    assert len(set(ids)) == len(ids)


def test_request_ids_sort_in_the_order_they_were_made() -> None:
    """Ids begin with the time in milliseconds, so the indexes on them grow at one end."""
    new_request_id = RequestIds()
    before = time.time_ns() // 1_000_000
    first = new_request_id()
    time.sleep(0.002)
    second = new_request_id()
    after = time.time_ns() // 1_000_000

    assert first < second
    assert before <= int(first[4:16], 16) <= int(second[4:16], 16) <= after


def test_a_forked_worker_does_not_repeat_the_ids_of_its_parent() -> None:
    new_request_id = RequestIds()
    new_request_id()  # the parent's key exists before the fork
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first ids, then exit at once
        os.write(write_end, " ".join(new_request_id() for _ in range(5)).encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        child = pipe.read().decode().split()

    parent = [new_request_id() for _ in range(5)]

    assert len(child) == 5
    assert not set(child) & set(parent)
