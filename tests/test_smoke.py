"""The proxy forwards to the pool the split chooses, over real sockets."""

from __future__ import annotations

from conftest import Stack


async def test_forwards_to_blue_at_split_zero(stack: Stack) -> None:
    for _ in range(5):
        async with stack.session.get(stack.url + "/hello") as resp:
            assert resp.status == 200
            assert resp.headers["X-Upstream"] == "blue"
            body = await resp.json()
            assert body["path"] == "/hello"


async def test_split_sends_exact_share_to_green(stack: Stack) -> None:
    stack.proxy.control.put_split(25)
    seen = {"blue": 0, "green": 0}
    for _ in range(200):
        async with stack.session.get(stack.url + "/") as resp:
            assert resp.status == 200
            seen[resp.headers["X-Upstream"]] += 1
    assert seen["green"] == 50
