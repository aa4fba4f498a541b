"""`GET /metrics` on its own listener, scraped from a real daemon after requests through fakes.

Each test asserts what an operator would graph or alert on: requests completed, a failover, a
backup started and won, a cooldown entered, providers connected, and that a stranger cannot
grow the label sets (random model names) or read the metrics on the API's port.
"""

from __future__ import annotations

import uuid

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from daemon.api.metrics_server import MAX_HEAD_BYTES, serve_metrics
from daemon.metrics import MAX_MODEL_LABELS, Metrics, Sampled
from tests.conftest import StartDaemon
from tests.consumer_harness import BOUND_S, Api, OpenApi, assert_openai_error, in_turn, poll_until
from tests.fakes.provider import Fail, Stall, always, answer, content_chunk, role_chunk

CHAT = "/v1/chat/completions"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(api: Api) -> Samples:
    url = api.daemon.metrics_url
    assert url is not None
    async with httpx.AsyncClient(timeout=BOUND_S) as http:
        reply = await http.get(f"{url}/metrics")
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(key)[label] for n, key in samples if n == name and label in dict(key)}


def requests(samples: Samples, **labels: str) -> float:
    return value(samples, "dinfer_requests_total", route=CHAT, **labels)


async def test_a_completed_request_is_counted_with_its_tokens_timings_and_provider(
    api: Api,
) -> None:
    (fake,) = await api.connect(api.fake())
    response = await api.chat(stream=True)
    assert response.status_code == 200

    samples = await scrape(api)
    assert requests(samples, model="m", outcome="completed", status="200") == 1
    assert value(samples, "dinfer_tokens_total", model="m", kind="prompt") == 3
    assert value(samples, "dinfer_tokens_total", model="m", kind="completion") == 2
    assert value(samples, "dinfer_dispatch_attempts_total", result="success") == 1
    assert value(samples, "dinfer_ttft_seconds_count", model="m") == 1
    assert value(samples, "dinfer_request_duration_seconds_count", model="m") == 1
    assert value(samples, "dinfer_queue_wait_seconds_count") == 1
    assert value(samples, "dinfer_relayed_chunks_total") >= 3  # role, "Hello", " world"
    assert value(samples, "dinfer_providers_connected", version="0.7.0", trusted="true") == 1
    assert value(samples, "dinfer_provider_in_flight", provider_id=fake.provider_id) == 0
    assert ("dinfer_provider_in_flight", frozenset({("provider_id", fake.provider_id)})) in samples


async def test_a_failover_counts_a_retry_before_content_then_a_success(api: Api) -> None:
    behave = in_turn([role_chunk(), Fail(500)], answer("from", " the other one"))
    await api.connect(api.fake(behave), api.fake(behave))
    assert (await api.chat()).status_code == 200

    samples = await scrape(api)
    assert value(samples, "dinfer_dispatch_attempts_total", result="retry") == 1
    assert value(samples, "dinfer_dispatch_attempts_total", result="success") == 1
    assert requests(samples, model="m", outcome="completed", status="200") == 1


async def test_a_backup_that_overtakes_a_silent_primary_is_started_and_won(
    open_api: OpenApi,
) -> None:
    api = await open_api(ttft_base_s="0.4", hedge_budget="1")
    behave = in_turn([Stall()], answer("from the backup"))
    await api.connect(api.fake(behave), api.fake(behave))
    assert (await api.chat(stream=True)).status_code == 200

    samples = await scrape(api)
    assert value(samples, "dinfer_backups_started_total") == 1
    assert value(samples, "dinfer_backups_won_total") == 1


async def test_two_failures_enter_one_cooldown_and_the_failures_are_counted(api: Api) -> None:
    await api.connect(api.fake(always([role_chunk(), Fail(500)])))
    for _ in range(2):
        assert_openai_error(await api.chat(), 502, "provider_error")
    assert_openai_error(await api.chat(), 503)  # cooling down: nobody to ask

    samples = await scrape(api)
    assert value(samples, "dinfer_breaker_cooldowns_total", shape="base") == 1
    assert value(samples, "dinfer_dispatch_attempts_total", result="failure") == 2
    assert requests(samples, model="m", outcome="failed", status="502") == 2
    assert requests(samples, model="m", outcome="failed", status="503") == 1


async def test_an_in_band_error_is_counted_by_reason(api: Api) -> None:
    await api.connect(api.fake(always([role_chunk(), content_chunk("so"), Fail(500)])))
    assert (await api.chat(stream=True)).status_code == 200

    samples = await scrape(api)
    assert value(samples, "dinfer_in_band_errors_total", reason="provider_error") == 1
    assert requests(samples, model="m", outcome="in_band_error", status="200") == 1


async def test_random_model_names_add_no_label_values(api: Api) -> None:
    await api.connect(api.fake())
    for _ in range(MAX_MODEL_LABELS + 5):
        assert_openai_error(await api.chat(model=f"x-{uuid.uuid4()}"), 404)
    assert (await api.chat()).status_code == 200
    assert_openai_error(
        await api.client.post(CHAT, content=b"{", headers={**api.auth}), 400
    )  # rejected before a model is known

    samples = await scrape(api)
    for name in ("dinfer_requests_total", "dinfer_ttft_seconds_count", "dinfer_tokens_total"):
        assert label_values(samples, name, "model") <= {"m", "other"}
    assert requests(samples, model="other", outcome="rejected", status="404") == (
        MAX_MODEL_LABELS + 5
    )
    assert requests(samples, model="other", outcome="rejected", status="400") == 1


def test_model_labels_are_capped_even_for_advertised_models() -> None:
    metrics = Metrics()
    metrics.watch_models(lambda _model: True)  # a provider advertising every name it is asked
    labels = {metrics.model_label(f"m{i}") for i in range(MAX_MODEL_LABELS * 2)}
    assert len(labels) == MAX_MODEL_LABELS + 1 and "other" in labels


async def test_a_providers_series_vanish_when_it_leaves(api: Api) -> None:
    async with trio.open_nursery() as connection:
        fake = await connection.start(api.fake().run)
        samples = await scrape(api)
        assert value(samples, "dinfer_providers_connected", version="0.7.0", trusted="true") == 1
        assert label_values(samples, "dinfer_provider_in_flight", "provider_id") == {
            fake.provider_id
        }
        connection.cancel_scope.cancel(reason="the provider leaves")
    await poll_until(lambda: not api.daemon.supervisor.registry.providers())

    samples = await scrape(api)
    assert not label_values(samples, "dinfer_provider_in_flight", "provider_id")
    assert not label_values(samples, "dinfer_providers_connected", "version")


async def test_the_api_port_has_no_metrics(api: Api) -> None:
    reply = await api.client.get("/metrics")
    assert reply.status_code == 404
    assert "dinfer_requests" not in reply.text


async def test_the_listener_answers_only_metrics_and_drops_an_oversized_head(api: Api) -> None:
    url = api.daemon.metrics_url
    assert url is not None
    async with httpx.AsyncClient(base_url=url, timeout=BOUND_S) as http:
        assert (await http.get("/")).status_code == 404
        assert (await http.post("/metrics")).status_code == 405
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with trio.fail_after(BOUND_S):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            try:
                await stream.send_all(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 2 * MAX_HEAD_BYTES)
            except trio.BrokenResourceError:
                pass  # closed while sending: as refused as it gets
            else:
                assert await _read_all(stream) == b""  # closed without an answer


async def _read_all(stream: trio.SocketStream) -> bytes:
    data = b""
    try:
        while chunk := await stream.receive_some():
            data += chunk
    except trio.BrokenResourceError:
        pass
    return data


async def test_metrics_off_starts_no_listener(start_daemon: StartDaemon) -> None:
    daemon = await start_daemon(metrics_listen="off")
    assert daemon.metrics_url is None


async def test_a_failing_scrape_closes_its_connection_and_the_listener_goes_on(
    nursery: trio.Nursery,
) -> None:
    metrics = Metrics()
    broken = True

    def sample() -> Sampled:
        if broken:
            raise RuntimeError("a bug in the sampler")
        return Sampled()

    metrics.watch(sample)
    url = await nursery.start(serve_metrics, metrics, "127.0.0.1", 0)
    async with httpx.AsyncClient(base_url=url, timeout=BOUND_S) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get("/metrics")
        broken = False
        assert (await http.get("/metrics")).status_code == 200
