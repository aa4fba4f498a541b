"""Consumer keys and provider tokens across a cluster: what one instance issues, changes or
revokes holds on every other (daemon/cluster/credentials.py).

The merge rule is a pure function, tested alone. The rest runs real daemons on loopback with
separate stores (several machines' worth) against a redis-server started here (tests/
test_cluster.py's fixtures), and scripted fake providers speaking the real protocol. Every
wait has a bound; the measured propagation must stay within the documented one.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from daemon.cluster.credentials import decode, encode, supersedes
from daemon.key_policy import KeyLimits
from daemon.store import CredentialRow, open_store
from tests import test_cluster
from tests.consumer_harness import ADMIN, assert_openai_error, chat_body, poll_until
from tests.test_cluster import BOUND_S, REDIS, Node, World
from tests.test_messages_api import assert_anthropic_error

pytestmark = [
    pytest.mark.skipif(REDIS is None, reason="needs redis-server"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),  # see test_cluster's `world`
]
world = test_cluster.world  # the fixture: a redis-server and daemons sharing it
PROPAGATION_S = 1.0  # the bound docs/cluster.md promises ("about a second")
TOKENS = {"DINFER_PROVIDER_AUTH": "token"}


def _row(updated_at: float, **changes: object) -> CredentialRow:
    fields: dict[str, object] = {
        "id": "key_000000000001",
        "name": "app",
        "secret_hash": "a" * 64,
        "created_at": 100.0,
        "revoked_at": None,
        "updated_at": updated_at,
        **changes,
    }
    return CredentialRow(**fields)  # type: ignore[arg-type]


# The merge rule -------------------------------------------------------------------------------


def test_the_newer_row_wins_and_an_unknown_row_is_taken() -> None:
    old, new = _row(200.0), _row(201.0, limits=KeyLimits(rpm=5))
    assert supersedes(new, old)
    assert not supersedes(old, new)
    assert supersedes(old, None)


def test_a_revoke_wins_over_any_update_older_or_newer() -> None:
    revoked = _row(200.0, revoked_at=200.0)
    assert supersedes(revoked, _row(150.0))
    assert supersedes(revoked, _row(250.0, secret_hash="b" * 64))  # a rotation it crossed
    assert not supersedes(_row(250.0), revoked)


def test_equal_times_break_the_tie_the_same_way_everywhere() -> None:
    one, other = _row(200.0, secret_hash="b" * 64), _row(200.0, secret_hash="c" * 64)
    assert supersedes(other, one) != supersedes(one, other)  # exactly one of them wins
    assert not supersedes(one, _row(200.0, secret_hash="b" * 64))  # an equal row: no change


def test_a_row_survives_its_encoding() -> None:
    row = _row(201.0, limits=KeyLimits(rpm=5, allowed_models=frozenset({"b", "a"})))
    assert decode(encode(row, "api_keys")) == row
    with pytest.raises(ValueError):
        decode(encode(_row(1.0, secret_hash="short"), "api_keys"))


# Across daemons ---------------------------------------------------------------------------


async def admin(node: Node, method: str, path: str, **body: object) -> httpx.Response:
    with trio.fail_after(BOUND_S):
        return await node.client.request(method, path, headers=ADMIN, json=body or None)


async def models(node: Node, key: str) -> httpx.Response:
    with trio.fail_after(BOUND_S):
        return await node.client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})


async def known_within(node: Node, key: str) -> float:
    """Wait until `node` takes `key`; how long that took."""
    began = trio.current_time()
    store = node.daemon.supervisor.store
    await poll_until(lambda: store.lookup_api_key(key) is not None, bound=BOUND_S)
    return trio.current_time() - began


async def refused_within(node: Node, key: str) -> float:
    began = trio.current_time()
    store = node.daemon.supervisor.store
    await poll_until(lambda: store.lookup_api_key(key) is None, bound=BOUND_S)
    return trio.current_time() - began


async def test_a_key_created_on_one_instance_works_on_another_within_the_bound(
    world: World,
) -> None:
    a, b = await world.node(), await world.node()
    created = await admin(a, "POST", "/v1/admin/keys", name="app", rpm=7)
    assert created.status_code == 201, created.text
    key = created.json()["key"]
    assert await known_within(b, key) < PROPAGATION_S
    assert (await models(b, key)).status_code == 200
    listed = (await admin(b, "GET", f"/v1/admin/keys/{created.json()['id']}")).json()
    assert (listed["name"], listed["rpm"]) == ("app", 7)  # its limits came with it


async def test_limits_set_on_one_instance_hold_on_another(world: World) -> None:
    a, b = await world.node(), await world.node()
    created = (await admin(a, "POST", "/v1/admin/keys", name="app")).json()
    await known_within(b, created["key"])
    patched = await admin(b, "PATCH", f"/v1/admin/keys/{created['id']}", allowed_models=["x"])
    assert patched.status_code == 200, patched.text
    limits = a.daemon.supervisor.store.api_key_limits
    await poll_until(lambda: (limits(created["id"]) or KeyLimits()).allowed_models is not None)
    b.key = a.key = created["key"]
    refused = assert_openai_error(await a.chat(model="m"), 403)
    assert "m" in refused["message"]


async def test_a_rotation_on_one_instance_kills_the_old_secret_on_another(world: World) -> None:
    a, b = await world.node(), await world.node()
    created = (await admin(a, "POST", "/v1/admin/keys", name="app")).json()
    old = created["key"]
    await known_within(b, old)
    rotated = await admin(b, "POST", f"/v1/admin/keys/{created['id']}/rotate")
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["key"]
    assert await refused_within(a, old) < PROPAGATION_S
    assert_openai_error(await models(a, old), 401, "invalid_api_key")
    assert (await models(a, new)).status_code == 200


async def test_a_revoke_on_one_instance_is_refused_on_another_in_each_routes_shape(
    world: World,
) -> None:
    a, b = await world.node(), await world.node()
    created = (await admin(a, "POST", "/v1/admin/keys", name="app")).json()
    key = created["key"]
    await known_within(b, key)
    revoked = await admin(a, "DELETE", f"/v1/admin/keys/{created['id']}")
    assert revoked.status_code == 200, revoked.text
    assert await refused_within(b, key) < PROPAGATION_S
    b.key = key
    assert_openai_error(await b.chat(), 401, "invalid_api_key")
    with trio.fail_after(BOUND_S):
        answer = await b.client.post(
            "/v1/messages",
            json={"model": "m", "max_tokens": 8, "messages": chat_body()["messages"]},
            headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        )
    assert_anthropic_error(answer, 401, "authentication_error")
    listed = (await admin(b, "GET", f"/v1/admin/keys/{created['id']}")).json()
    assert listed["revoked_at"] is not None


async def test_a_key_written_to_a_store_by_the_cli_reaches_the_other_instances(
    world: World,
) -> None:
    a, b = await world.node(), await world.node()
    # `dinfer keys create` opens the store file itself, beside the running daemon.
    async with open_store(a.daemon.supervisor.store.path.parent) as cli:
        issued = await cli.create_api_key("from the shell")
    assert await known_within(b, issued.secret) < PROPAGATION_S
    async with open_store(b.daemon.supervisor.store.path.parent) as cli:
        assert await cli.revoke_api_key(issued.id)
    assert await refused_within(a, issued.secret) < PROPAGATION_S


async def test_a_daemon_started_later_knows_every_existing_key_before_it_serves(
    world: World,
) -> None:
    a, b = await world.node(), await world.node()
    created = (await admin(a, "POST", "/v1/admin/keys", name="app")).json()
    revoked = (await admin(b, "POST", "/v1/admin/keys", name="gone")).json()
    assert (await admin(b, "DELETE", f"/v1/admin/keys/{revoked['id']}")).status_code == 200
    await refused_within(a, revoked["key"])
    c = await world.node()  # its store is new and empty: no poll, it must know them now
    assert (await models(c, created["key"])).status_code == 200
    assert (await models(c, a.key)).status_code == 200
    assert_openai_error(await models(c, revoked["key"]), 401, "invalid_api_key")


async def test_a_provider_token_issued_on_one_instance_registers_on_another(
    world: World,
) -> None:
    a, b = await world.node(**TOKENS), await world.node(**TOKENS)
    issued = (await admin(a, "POST", "/v1/admin/provider-tokens", name="rig")).json()
    tokens = b.daemon.supervisor.store
    began = trio.current_time()
    await poll_until(lambda: tokens.lookup_provider_token(issued["token"]) is not None)
    assert trio.current_time() - began < PROPAGATION_S
    fake = b.fake(auth_token=issued["token"])  # as after a `1001 going away` from a
    await world.connect(fake)
    assert fake.trusted.is_set()
    # Revoked where it was issued: the provider connected to the other instance is cut off.
    assert (await admin(a, "DELETE", f"/v1/admin/provider-tokens/{issued['id']}")).is_success
    with trio.fail_after(BOUND_S):
        await fake.closed.wait()
    assert fake.close_code == 1008
    refused = b.fake(auth_token=issued["token"])
    await world.nursery.start(refused.run)
    assert not refused.trusted.is_set()


async def test_keys_changed_while_redis_was_down_replicate_when_it_returns(
    world: World,
) -> None:
    a, b = await world.node(), await world.node()
    world.redis.kill()
    # Each instance authenticates from its own store meanwhile; a new key lives where made.
    created = await admin(a, "POST", "/v1/admin/keys", name="offline")
    assert created.status_code == 201, created.text
    key = created.json()["key"]
    assert (await models(a, key)).status_code == 200
    assert (await models(b, b.key)).status_code == 200
    assert_openai_error(await models(b, key), 401, "invalid_api_key")
    await world.redis.start()  # empty: it lost everything it held
    await known_within(b, key)  # a pushed what it changed meanwhile
    c = await world.node()
    for known in (key, a.key, b.key):  # and both push every key again (each within a second
        assert await known_within(c, known) < 2.0  # of seeing Redis back: c may start first)
        assert (await models(c, known)).status_code == 200


async def test_every_write_stamps_updated_at_past_the_last_one(tmp_path: Path) -> None:
    async with open_store(tmp_path) as store:
        issued = await store.create_api_key("app")

        async def stamp() -> float:
            rows = await store.credential_rows("api_keys")
            return next(row.updated_at for row in rows if row.id == issued.id)

        stamps = [await stamp()]
        await store.update_api_key(issued.id, {"rpm": 3})
        stamps.append(await stamp())
        await store.rotate_api_key(issued.id)
        stamps.append(await stamp())
        await store.revoke_api_key(issued.id)
        stamps.append(await stamp())
    assert stamps == sorted(set(stamps))  # strictly increasing
