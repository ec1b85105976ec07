"""Tests of diffusion_router against real stand-in workers (examples/stand_in_worker.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

import diffusion_router as dr
from examples.stand_in_worker import BEHAVIOUR, SEEN, STATE, WorkerBehaviour, start_worker

pytestmark = [
    pytest.mark.asyncio,
    # The module-wide asyncio mark also lands on the few plain tests; that is harmless.
    pytest.mark.filterwarnings("ignore:The test <Function.*is marked with '@pytest.mark.asyncio'"),
]

HERE = os.path.dirname(os.path.abspath(__file__))
QUIET = dict(health_check_interval=3600.0)
ROUTER_PROBES = ("/health", "/v1/models", "/server_info")  # what the router asks of a worker by itself  # health is stepped by hand, never by the clock


# --------------------------------------------------------------------------------------------
# Fixtures: stand-in workers and the router under test
# --------------------------------------------------------------------------------------------


@dataclass
class StandIn:
    """A running stand-in worker and handles on what it saw and holds."""

    runner: web.AppRunner
    url: str

    @property
    def app(self) -> web.Application:
        return self.runner.app

    @property
    def seen(self):
        return self.app[SEEN]

    @property
    def state(self):
        return self.app[STATE]

    @property
    def behaviour(self) -> WorkerBehaviour:
        return self.app[BEHAVIOUR]

    def paths(self, method: str | None = None) -> list[str]:
        """Return the paths of the requests this worker saw, less the router's own probes."""
        return [s.path for s in self.seen if s.path not in ROUTER_PROBES and (method is None or s.method == method)]

    def generations(self) -> int:
        return sum(1 for s in self.seen if s.path in ("/v1/images/generations", "/v1/videos") and s.method == "POST")

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def restart(self) -> StandIn:
        """Start a fresh worker process-equivalent on the same port (its memory is gone)."""
        port = int(self.url.rsplit(":", 1)[1])
        runner, url = await start_worker(WorkerBehaviour(**vars(self.behaviour)), port=port)
        return StandIn(runner, url)


@pytest_asyncio.fixture
async def spawn_worker():
    started: list[web.AppRunner] = []

    async def start(**behaviour) -> StandIn:
        runner, url = await start_worker(WorkerBehaviour(**behaviour))
        started.append(runner)
        return StandIn(runner, url)

    yield start
    for runner in started:
        await runner.cleanup()


@pytest_asyncio.fixture
async def router(aiohttp_client):
    """Start a router over the given worker URLs; return its test client."""

    async def start(*urls: str, **config):
        settings = {**QUIET, **config}
        app = dr.create_app(dr.RouterConfig(worker_urls=tuple(urls), **settings))
        return await aiohttp_client(app, server_kwargs=dr.SERVER_OPTIONS)

    return start


def dead_url() -> str:
    """Return the URL of a port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def pool_of(client) -> dr.WorkerPool:
    return client.app[dr.POOL]


def worker_of(client, url: str) -> dr.Worker:
    return pool_of(client).workers[url]


async def health_round(client) -> None:
    await dr.health_round(client.app)


async def settle(client) -> None:
    """Let the router's background tasks (resyncs) finish."""
    tasks = [t for t in client.app[dr.TASKS] if getattr(t, "worker", None) is not None]
    await asyncio.gather(*tasks)


async def wait_for(predicate, timeout: float = 5.0) -> None:
    """Wait until predicate() is true, checking often; fail after timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


PROMPT = {"prompt": "a cat", "response_format": "b64_json"}


# --------------------------------------------------------------------------------------------
# Issue 2: transparent forwarding
# --------------------------------------------------------------------------------------------


async def test_generate_forwards_to_images_generations_with_exact_body_and_query(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(worker.url)
    body = b'{"prompt": "a cat",  "n": 1, "response_format": "b64_json"}'
    resp = await client.post("/generate?trace=1&x=%26%3D", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 200
    assert (await resp.json())["data"][0]["b64_json"]
    seen = worker.seen[-1]
    assert (seen.method, seen.path, seen.query_string) == ("POST", "/v1/images/generations", "trace=1&x=%26%3D")
    assert seen.body == body
    assert seen.headers["Content-Type"] == "application/json"


async def test_generate_video_forwards_to_v1_videos(spawn_worker, router):
    worker = await spawn_worker(task_type="T2V")
    client = await router(worker.url)
    resp = await client.post("/generate_video", json={"prompt": "a wave"})
    assert resp.status == 200
    job = await resp.json()
    assert job["status"] == "queued" and job["id"]
    assert worker.paths("POST") == ["/v1/videos"]


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
async def test_catch_all_forwards_every_method_with_path_and_query(spawn_worker, router, method):
    worker = await spawn_worker()
    client = await router(worker.url)
    data = b"raw-bytes" if method in ("POST", "PUT", "PATCH") else None
    resp = await client.request(method, "/some/odd%20path?a=1&b=%C3%A9", data=data)
    assert resp.status in (404, 405)  # whatever the worker answered, passed through
    seen = worker.seen[-1]
    assert (seen.method, seen.path, seen.query_string) == (method, "/some/odd%20path", "a=1&b=%C3%A9")
    assert seen.body == (data or b"")


async def test_worker_status_headers_and_body_pass_through_unchanged(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(worker.url)
    direct = await client.session.get(worker.url + "/v1/models/nope")
    resp = await client.get("/v1/models/nope")
    assert resp.status == direct.status == 404
    assert await resp.read() == await direct.read()
    assert resp.headers["Content-Type"] == direct.headers["Content-Type"]


async def test_unparsable_worker_errors_are_passed_through_not_rewritten(spawn_worker, router):
    worker = await spawn_worker(fail_status=500)
    client = await router(worker.url)
    resp = await client.post("/generate", json=PROMPT)
    assert resp.status == 500
    assert await resp.text() == "Internal Server Error"  # the worker's plain-text body, untouched


async def test_hop_by_hop_headers_are_dropped_and_end_to_end_ones_kept(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(worker.url)
    resp = await client.post("/generate", json=PROMPT, headers={
        "Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic abc", "TE": "trailers", "Upgrade": "h2c",
        "X-Custom": "kept", "Authorization": "Bearer worker-admin", "X-Forwarded-For": "10.0.0.9",
    })
    assert resp.status == 200
    headers = worker.seen[-1].headers
    for name in ("X-Secret-Hop", "Keep-Alive", "Proxy-Authorization", "TE", "Upgrade"):
        assert name not in headers, name
    assert headers["X-Custom"] == "kept"
    assert headers["Authorization"] == "Bearer worker-admin"  # workers may need their admin key
    assert headers["X-Forwarded-For"] == "10.0.0.9, 127.0.0.1"  # appended, never replaced
    assert "Transfer-Encoding" not in resp.headers
    assert resp.headers["X-Weight-Version"] == "0"


async def test_router_adds_no_client_headers_of_its_own(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(worker.url)
    await client.post("/generate", data=json.dumps(PROMPT).encode(),
                      headers={"User-Agent": "trainer/1.0", "Accept-Encoding": "identity"})
    headers = worker.seen[-1].headers
    assert headers["User-Agent"] == "trainer/1.0"
    assert headers["Accept-Encoding"] == "identity"


async def test_request_bodies_far_above_one_mib_are_forwarded_byte_for_byte(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(worker.url)
    body = os.urandom(5 * dr.MiB)
    resp = await client.put("/upload/blob", data=body)
    assert resp.status == 404
    assert worker.seen[-1].body == body


async def test_chunked_request_body_is_streamed_to_the_worker(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(worker.url)

    async def chunks():
        for i in range(8):
            yield bytes([i]) * 300_000

    resp = await client.put("/upload/chunked", data=chunks())
    assert resp.status == 404
    assert worker.seen[-1].body == b"".join(bytes([i]) * 300_000 for i in range(8))


async def test_body_over_max_request_size_is_refused_with_413_and_never_forwarded(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(worker.url, max_request_size=1 * dr.MiB)
    resp = await client.post("/generate", data=b"x" * (dr.MiB + 1))
    assert resp.status == 413
    assert "error" in await resp.json()
    assert worker.generations() == 0
    assert worker_of(client, worker.url).active_requests == 0


async def test_chunked_body_over_max_request_size_gets_413(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(worker.url, max_request_size=1 * dr.MiB)

    async def chunks():
        for _ in range(5):
            yield b"y" * 400_000

    resp = await client.put("/upload/chunked", data=chunks())
    assert resp.status == 413
    assert "error" in await resp.json()
    assert worker_of(client, worker.url).active_requests == 0


async def test_large_video_download_streams_through_byte_exact(spawn_worker, router):
    size = 20 * dr.MiB + 123
    worker = await spawn_worker(task_type="T2V", video_bytes=size)
    client = await router(worker.url)
    job = await (await client.post("/v1/videos", json={"prompt": "p"})).json()
    direct = await (await client.session.get(f"{worker.url}/v1/videos/{job['id']}/content")).read()
    resp = await client.get(f"/v1/videos/{job['id']}/content")
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(size)
    received = 0
    digest = bytearray()
    async for chunk in resp.content.iter_chunked(dr.MiB):
        received += len(chunk)
        digest.extend(chunk[:1])
    assert received == size == len(direct)


async def test_worker_breaking_off_a_large_response_gives_a_broken_transfer(spawn_worker, router):
    worker = await spawn_worker(fail_mode="close_mid_body", image_bytes=4 * dr.MiB)
    client = await router(worker.url)
    resp = await client.post("/generate", json=PROMPT)
    assert resp.status == 200  # headers were already on their way
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    await wait_for(lambda: worker_of(client, worker.url).active_requests == 0)


async def test_worker_breaking_off_a_small_response_gives_502_json(spawn_worker, router):
    worker = await spawn_worker(fail_mode="close_mid_body")
    client = await router(worker.url)
    resp = await client.post("/generate", json=PROMPT)
    assert resp.status == 502
    assert worker.url in (await resp.json())["error"]
    assert worker_of(client, worker.url).active_requests == 0


# --------------------------------------------------------------------------------------------
# Issue 2: router endpoints
# --------------------------------------------------------------------------------------------


async def test_health_is_200_with_counts_when_a_worker_is_available(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(worker.url, dead_url())
    worker_of(client, next(u for u in pool_of(client).workers if u != worker.url)).state = dr.QUARANTINED
    resp = await client.get("/health")
    assert resp.status == 200
    body = await resp.json()
    assert (body["status"], body["healthy_workers"], body["total_workers"]) == ("healthy", 1, 2)


async def test_health_is_503_unhealthy_without_available_workers(router):
    client = await router()
    resp = await client.get("/health")
    assert resp.status == 503
    assert (await resp.json())["status"] == "unhealthy"


async def test_health_workers_reports_each_worker(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(worker.url)
    await health_round(client)
    entry = (await (await client.get("/health_workers")).json())["workers"][0]
    for key in ("url", "active_requests", "consecutive_failures", "quarantined", "last_error", "last_checked",
                "state", "weight_version"):
        assert key in entry
    assert entry["url"] == worker.url and entry["last_checked"] is not None and entry["quarantined"] is False


@pytest.mark.parametrize("how", ["url", "worker_url", "json"])
async def test_add_worker_accepts_query_and_json_forms(spawn_worker, router, how):
    worker = await spawn_worker()
    client = await router()
    if how == "json":
        resp = await client.post("/add_worker", json={"url": worker.url})
    else:
        resp = await client.post("/add_worker", params={how: worker.url})
    assert resp.status == 201
    assert (await (await client.get("/list_workers")).json()) == {"urls": [worker.url]}
    assert (await client.post("/generate", json=PROMPT)).status == 200


@pytest.mark.parametrize("variant", [
    "HTTP://LOCALHOST:{port}/", "http://localhost:{port}", "http://LocalHost:{port}", " http://localhost:{port} ",
])
async def test_add_worker_normalises_so_a_worker_never_registers_twice(router, variant):
    client = await router()
    port = int(dead_url().rsplit(":", 1)[1])
    await client.post("/add_worker", params={"url": f"http://localhost:{port}"})
    resp = await client.post("/add_worker", json={"url": variant.format(port=port)})
    assert resp.status == 200
    assert (await resp.json())["status"] == "exists"
    assert (await (await client.get("/list_workers")).json())["urls"] == [f"http://localhost:{port}"]


def test_default_ports_are_normalised_away():
    assert dr.normalize_worker_url("http://gpu1:80") == "http://gpu1"
    assert dr.normalize_worker_url("https://gpu1:443/") == "https://gpu1"
    assert dr.normalize_worker_url("http://[::1]:10090") == "http://[::1]:10090"


@pytest.mark.parametrize("bad", [
    "", "gpu1:10090", "ftp://gpu1", "http://", "http://user:pw@gpu1", "http://gpu1/v1", "http://gpu1?x=1",
    "http://gpu1#frag", "http://gpu1:99999", 42, None, ["http://gpu1"], "http://169.254.169.254",
    "http://metadata.google.internal", "http://2852039166", "http://0xa9fea9fe", "http://[fe80::1]",
    "http://[::ffff:169.254.169.254]", "http://instance-data", "http://metadata.google.internal.",
    "http://exa mple.com", "http://xn--metadata-.google.internal", "http://xn--a-.com", "http://" + "a" * 3000,
    "http://[64:ff9b::a9fe:a9fe]", "http://[::169.254.169.254]", "http://[::ffff:0:a9fe:a9fe]", "http://gp\nu1",
])
async def test_add_worker_rejects_bad_urls_with_400_json(router, bad):
    client = await router()
    resp = await client.post("/add_worker", json={"url": bad})
    assert resp.status == 400
    assert "error" in await resp.json()
    assert pool_of(client).workers == {}


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'"http://x"', b"{}", b'{"url": ""}'])
async def test_add_worker_rejects_malformed_bodies_with_400_json(router, body):
    client = await router()
    resp = await client.post("/add_worker", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert "error" in await resp.json()


async def test_readding_a_quarantined_worker_returns_it_to_the_pool(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(worker.url, auto_recover=False)
    w = worker_of(client, worker.url)
    worker.behaviour.health_status = 500
    for _ in range(3):
        await health_round(client)
    assert w.state == dr.QUARANTINED
    worker.behaviour.health_status = 200
    for _ in range(5):
        await health_round(client)
    assert w.state == dr.QUARANTINED  # without auto-recovery only an operator brings it back
    resp = await client.post("/add_worker", params={"url": worker.url})
    assert resp.status == 200
    assert w.state == dr.HEALTHY
    assert (await client.post("/generate", json=PROMPT)).status == 200


async def test_own_paths_answer_405_json_for_other_methods(router):
    client = await router()
    resp = await client.get("/generate")
    assert resp.status == 405
    assert "POST" in resp.headers["Allow"]
    assert "error" in await resp.json()


async def test_unknown_methods_get_405_json_and_are_not_forwarded(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(worker.url)
    resp = await client.request("PROPFIND", "/anything")
    assert resp.status == 405
    assert "error" in await resp.json()
    assert worker.paths() == []


# --------------------------------------------------------------------------------------------
# Issue 2: weight update broadcast
# --------------------------------------------------------------------------------------------


async def test_update_weights_reaches_every_worker_with_one_result_each(spawn_worker, router):
    workers = [await spawn_worker() for _ in range(3)]
    client = await router(*(w.url for w in workers))
    body = {"model_path": "/ckpt/step-10", "flush_cache": True}
    resp = await client.post("/update_weights_from_disk", json=body)
    assert resp.status == 200
    result = await resp.json()
    assert sorted(r["url"] for r in result["results"]) == sorted(w.url for w in workers)
    assert all(r["status"] == 200 and r["body"]["success"] is True for r in result["results"])
    for w in workers:
        assert w.state.weight_updates == [body]
        assert w.state.model_path == "/ckpt/step-10"


async def test_update_weights_is_502_with_results_when_a_worker_fails(spawn_worker, router):
    good, bad = await spawn_worker(), await spawn_worker(weight_update_status=400)
    client = await router(good.url, bad.url)
    resp = await client.post("/update_weights_from_disk", json={"model_path": "/ckpt/2"})
    assert resp.status == 502
    results = {r["url"]: r for r in (await resp.json())["results"]}
    assert results[good.url]["ok"] is True
    assert results[bad.url]["status"] == 400 and results[bad.url]["body"]["success"] is False


async def test_update_weights_reports_unreachable_workers_as_errors(spawn_worker, router):
    good = await spawn_worker()
    gone = await spawn_worker()
    client = await router(good.url, gone.url)
    await gone.stop()
    resp = await client.post("/update_weights_from_disk", json={"model_path": "/ckpt/3"})
    assert resp.status == 502
    results = {r["url"]: r for r in (await resp.json())["results"]}
    assert "error" in results[gone.url] and results[gone.url]["ok"] is False


async def test_update_weights_without_workers_is_503(router):
    client = await router()
    resp = await client.post("/update_weights_from_disk", json={"model_path": "/ckpt/1"})
    assert resp.status == 503
    assert "error" in await resp.json()


async def test_update_weights_skips_quarantined_workers(spawn_worker, router):
    good, out = await spawn_worker(), await spawn_worker()
    client = await router(good.url, out.url, auto_recover=False)
    worker_of(client, out.url).state = dr.QUARANTINED
    resp = await client.post("/update_weights_from_disk", json={"model_path": "/ckpt/4"})
    assert resp.status == 200
    assert [r["url"] for r in (await resp.json())["results"]] == [good.url]
    assert out.state.weight_updates == []


# --------------------------------------------------------------------------------------------
# Issue 2: least-request routing and in-flight counts
# --------------------------------------------------------------------------------------------


def fake(url: str, active: int = 0, picked: int = 0) -> dr.Worker:
    return dr.Worker(url=url, active_requests=active, last_picked=picked)


def test_least_request_picks_the_least_loaded_worker():
    policy = dr.least_request()
    workers = [fake("a", 3), fake("b", 1), fake("c", 2)]
    assert policy(workers).url == "b"


def test_least_request_breaks_ties_by_least_recently_picked():
    policy = dr.least_request()
    assert policy([fake("a", 0, picked=5), fake("b", 0, picked=2), fake("c", 1, picked=0)]).url == "b"


def test_round_robin_takes_candidates_in_turn():
    policy = dr.round_robin()
    workers = [fake("a"), fake("b"), fake("c")]
    assert [policy(workers).url for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_random_picks_only_among_candidates():
    policy = dr.random_choice()
    workers = [fake("a"), fake("b")]
    assert {policy(workers).url for _ in range(200)} == {"a", "b"}


async def test_sequential_requests_spread_over_tied_workers(spawn_worker, router):
    workers = [await spawn_worker() for _ in range(3)]
    client = await router(*(w.url for w in workers))
    for _ in range(9):
        assert (await client.post("/generate", json=PROMPT)).status == 200
    assert [w.generations() for w in workers] == [3, 3, 3]


@pytest.mark.parametrize("algorithm", ["round-robin", "random"])
async def test_other_routing_algorithms_serve_requests(spawn_worker, router, algorithm):
    workers = [await spawn_worker() for _ in range(2)]
    client = await router(*(w.url for w in workers), routing_algorithm=algorithm)
    for _ in range(20):
        assert (await client.post("/generate", json=PROMPT)).status == 200
    assert sum(w.generations() for w in workers) == 20
    if algorithm == "round-robin":
        assert [w.generations() for w in workers] == [10, 10]


async def test_in_flight_count_rises_while_a_request_runs_and_falls_after(spawn_worker, router):
    slow, idle = await spawn_worker(latency=0.3), await spawn_worker()
    client = await router(slow.url, idle.url)
    worker_of(client, idle.url).state = dr.QUARANTINED
    pending = asyncio.ensure_future(client.post("/generate", json=PROMPT))
    await wait_for(lambda: slow.generations() == 1)
    report = (await (await client.get("/health_workers")).json())["workers"]
    assert {w["url"]: w["active_requests"] for w in report}[slow.url] == 1
    assert (await pending).status == 200
    assert worker_of(client, slow.url).active_requests == 0


async def test_busy_worker_is_avoided_while_another_is_free(spawn_worker, router):
    slow, fast = await spawn_worker(latency=0.5), await spawn_worker()
    client = await router(slow.url, fast.url)
    worker_of(client, fast.url).last_picked = 10**9  # the tie would go to slow first
    pending = asyncio.ensure_future(client.post("/generate", json=PROMPT))
    await wait_for(lambda: slow.generations() == 1)
    for _ in range(3):
        assert (await client.post("/generate", json=PROMPT)).status == 200
    assert fast.generations() == 3
    await pending


@pytest.mark.parametrize("behaviour,status", [
    ({"fail_status": 500}, 500), ({"fail_mode": "garbage"}, 200), ({"fail_mode": "close_mid_body"}, 502),
])
async def test_in_flight_count_falls_after_worker_errors(spawn_worker, router, behaviour, status):
    worker = await spawn_worker(**behaviour)
    client = await router(worker.url)
    resp = await client.post("/generate", json=PROMPT)
    assert resp.status == status
    await resp.read()
    assert worker_of(client, worker.url).active_requests == 0


async def test_worker_timeout_gives_504_and_releases_the_count(spawn_worker, router):
    worker = await spawn_worker(fail_mode="hang")
    client = await router(worker.url, timeout=0.3)
    resp = await client.post("/generate", json=PROMPT)
    assert resp.status == 504
    assert "timed out" in (await resp.json())["error"]
    assert worker_of(client, worker.url).active_requests == 0
    assert worker.generations() == 1  # never re-sent


@pytest.mark.parametrize("behaviour", [{"latency": 0.3}, {"fail_mode": "hang"}], ids=["slow", "hung"])
async def test_client_going_away_mid_request_releases_the_count(spawn_worker, router, behaviour):
    worker = await spawn_worker(**behaviour)
    client = await router(worker.url)
    request = asyncio.ensure_future(client.post("/generate", json=PROMPT))
    await wait_for(lambda: worker.generations() == 1)
    request.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await request
    await wait_for(lambda: worker_of(client, worker.url).active_requests == 0)  # the hung one never answers
    metrics = await scrape(client)
    assert sample_value(metrics, "diffusion_router_requests_total", route="/generate", code="499") == 1


async def test_client_going_away_mid_download_releases_the_count(spawn_worker, router):
    worker = await spawn_worker(task_type="T2V", video_bytes=64 * dr.MiB, chunk_size=dr.MiB)
    client = await router(worker.url)
    job = await (await client.post("/generate_video", json={"prompt": "p"})).json()
    resp = await client.get(f"/v1/videos/{job['id']}/content")
    await resp.content.readexactly(dr.MiB)
    resp.close()  # drop the connection mid-body
    await wait_for(lambda: worker_of(client, worker.url).active_requests == 0)


def test_lease_going_negative_shouts():
    pool = dr.WorkerPool(dr.RouterConfig())
    worker, _ = pool.add("http://w")
    worker.active_requests = 0
    with pytest.raises(AssertionError):
        with pool.lease(worker):
            worker.active_requests -= 1


# --------------------------------------------------------------------------------------------
# Issue 2: health checks and quarantine
# --------------------------------------------------------------------------------------------


async def test_failed_probes_quarantine_at_the_threshold(spawn_worker, router):
    worker = await spawn_worker(health_status=503)
    client = await router(worker.url, health_check_failure_threshold=3)
    w = worker_of(client, worker.url)
    for expected in (1, 2):
        await health_round(client)
        assert (w.consecutive_failures, w.state) == (expected, dr.HEALTHY)
    await health_round(client)
    assert w.state == dr.QUARANTINED
    assert "503" in w.last_error
    resp = await client.post("/generate", json=PROMPT)
    assert resp.status == 503
    assert worker.generations() == 0


async def test_unanswered_probe_counts_as_a_failure(spawn_worker, router):
    worker = await spawn_worker(health_delay=5)
    client = await router(worker.url, health_check_timeout=0.1, health_check_failure_threshold=1)
    await health_round(client)
    assert worker_of(client, worker.url).state == dr.QUARANTINED


async def test_a_good_probe_resets_the_failure_count(spawn_worker, router):
    worker = await spawn_worker(health_status=500)
    client = await router(worker.url)
    w = worker_of(client, worker.url)
    await health_round(client)
    await health_round(client)
    worker.behaviour.health_status = 200
    await health_round(client)
    assert (w.consecutive_failures, w.state, w.last_error) == (0, dr.HEALTHY, None)
    worker.behaviour.health_status = 500
    await health_round(client)
    assert w.state == dr.HEALTHY


async def test_quarantined_workers_get_no_broadcast(spawn_worker, router):
    good, sick = await spawn_worker(), await spawn_worker(health_status=500)
    client = await router(good.url, sick.url, health_check_failure_threshold=1, auto_recover=False)
    await health_round(client)
    await client.post("/update_weights_from_disk", json={"model_path": "/m"})
    assert sick.paths("POST") == []


async def test_health_task_starts_with_the_app_and_stops_with_it(spawn_worker, aiohttp_client):
    worker = await spawn_worker()
    app = dr.create_app(dr.RouterConfig(worker_urls=(worker.url,), health_check_interval=0.05))
    client = await aiohttp_client(app)
    await wait_for(lambda: sum(1 for s in worker.seen if s.path == "/health") >= 2)
    tasks = list(app[dr.TASKS])
    assert tasks
    await client.close()
    assert all(t.done() for t in tasks)
    assert not app[dr.TASKS]


# --------------------------------------------------------------------------------------------
# Issue 2: the router's own errors
# --------------------------------------------------------------------------------------------


async def test_no_worker_is_503_json(router):
    client = await router()
    resp = await client.post("/generate", json=PROMPT)
    assert resp.status == 503
    assert resp.content_type == "application/json"
    assert "no available worker" in (await resp.json())["error"]


async def test_unreachable_only_worker_is_502_json(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(worker.url, retries=0)
    await worker.stop()
    resp = await client.post("/generate", json=PROMPT)
    assert resp.status == 502
    assert worker.url in (await resp.json())["error"]


async def test_worker_refusing_at_registration_is_out_until_it_answers(spawn_worker, router):
    url = dead_url()
    client = await router(url)
    w = worker_of(client, url)
    assert w.state == dr.QUARANTINED and "unreachable" in w.out_reason
    port = int(url.rsplit(":", 1)[1])
    runner, _ = await start_worker(WorkerBehaviour(), port=port)  # the model finished loading
    try:
        for _ in range(2):
            await health_round(client)
        assert w.state == dr.HEALTHY and w.task_type == "T2I"
        assert (await client.post("/generate", json=PROMPT)).status == 200
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------------------------
# Issue 2: command line
# --------------------------------------------------------------------------------------------


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(HERE, "diffusion_router.py"), *args],
                          capture_output=True, text=True, timeout=30, env={**os.environ, **(env or {})})


def test_cli_version_and_help():
    assert dr.__version__ in run_cli("--version").stdout
    help_text = run_cli("--help").stdout
    for option in ("--worker-urls", "--max-connections", "--timeout", "--health-check-interval",
                   "--health-check-failure-threshold", "--routing-algorithm", "--max-request-size", "--verbose"):
        assert option in help_text


@pytest.mark.parametrize("args,env,word", [
    (["--port", "notaport"], {}, "--port"),
    (["--port", "70000"], {}, "--port"),
    (["--routing-algorithm", "fastest"], {}, "--routing-algorithm"),
    (["--worker-urls", "ftp://gpu1"], {}, "--worker-urls"),
    (["--max-connections", "0"], {}, "--max-connections"),
    ([], {"DIFFUSION_ROUTER_TIMEOUT": "soon"}, "--timeout"),
    (["--allowed-worker-hosts", "10.0.0.0/33"], {}, "--allowed-worker-hosts"),
    (["--allowed-worker-hosts", "bad_host!"], {}, "--allowed-worker-hosts"),
    (["--worker-urls", "http://xn--a-.com"], {}, "--worker-urls"),
])
def test_cli_bad_values_are_one_line_errors(args, env, word):
    result = run_cli(*args, env=env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error:") and word in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["--host", "999.999.1.1"], ["--host", "127.0.0.1", "--port", "{busy}"]])
def test_cli_cannot_listen_is_a_one_line_error(args):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = run_cli(*[a.format(busy=busy.getsockname()[1]) for a in args])
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "cannot listen" in errors[0]
    assert "Traceback" not in result.stderr


@dataclass
class RouterProcess:
    proc: subprocess.Popen
    url: str
    output: object

    def log(self) -> str:
        self.output.seek(0)
        return self.output.read()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def router_process(*args: str, env: dict | None = None, port: int | None = None):
    """Run the router as a real process on a free port; stop it however the test ends."""
    port = port or free_port()
    output = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would block the router
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "diffusion_router.py"), "--host", "127.0.0.1", *args],
        env={**os.environ, "DIFFUSION_ROUTER_PORT": str(port), **(env or {})},
        stdout=output, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            deadline = time.monotonic() + 20
            while True:
                assert proc.poll() is None, "router exited at startup"
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(url + "/health") as resp:
                        if resp.status in (200, 503):
                            break
                assert time.monotonic() < deadline, "router did not start"
                await asyncio.sleep(0.05)
        yield RouterProcess(proc, url, output)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        output.close()


async def test_cli_reads_options_from_environment_variables(spawn_worker):
    worker = await spawn_worker()
    env = {"DIFFUSION_ROUTER_WORKER_URLS": f"{worker.url} {dead_url()}", "DIFFUSION_ROUTER_MAX_CONNECTIONS": "7"}
    async with router_process(env=env) as router_proc, aiohttp.ClientSession() as session:
        async with session.get(router_proc.url + "/list_workers") as resp:
            assert len((await resp.json())["urls"]) == 2


async def test_cli_takes_several_urls_after_one_worker_urls_flag(spawn_worker):
    a, b = await spawn_worker(), await spawn_worker()
    async with router_process("--worker-urls", a.url, b.url) as router_proc, aiohttp.ClientSession() as session:
        async with session.get(router_proc.url + "/list_workers") as resp:
            assert (await resp.json())["urls"] == [a.url, b.url]


# --------------------------------------------------------------------------------------------
# Issue 3: failover, recovery with consistent weights, graceful shutdown
# --------------------------------------------------------------------------------------------

UPDATE = {"model_path": "/ckpt/step-100", "flush_cache": True}


async def quarantine(client, worker: StandIn) -> None:
    """Fail the worker's probes until the router quarantines it."""
    worker.behaviour.health_status = 500
    for _ in range(client.app[dr.CONFIG].health_check_failure_threshold):
        await health_round(client)
    assert worker_of(client, worker.url).state == dr.QUARANTINED


async def recover(client, worker: StandIn) -> None:
    """Let the worker's probes succeed until it may come back, then let its resync finish."""
    worker.behaviour.health_status = 200
    for _ in range(client.app[dr.CONFIG].health_check_success_threshold):
        await health_round(client)
    await settle(client)


async def test_killed_worker_costs_no_client_error_and_is_out_after_one_refusal(spawn_worker, router):
    a, b, c = [await spawn_worker() for _ in range(3)]
    client = await router(a.url, b.url, c.url)
    await b.stop()
    for _ in range(9):
        resp = await client.post("/generate", json=PROMPT)
        assert resp.status == 200
    dead = worker_of(client, b.url)
    assert dead.state == dr.QUARANTINED and dead.consecutive_failures == 1
    assert "unreachable" in dead.last_error
    assert a.generations() + c.generations() == 9
    assert all(w.active_requests == 0 for w in pool_of(client).workers.values())


async def test_failover_tries_at_most_retries_other_workers(spawn_worker, router):
    workers = [await spawn_worker() for _ in range(4)]
    client = await router(*(w.url for w in workers), retries=2)
    for worker in workers:
        await worker.stop()
    resp = await client.post("/generate", json=PROMPT)
    assert resp.status == 502
    assert sum(w.state == dr.QUARANTINED for w in pool_of(client).workers.values()) == 3


async def test_black_holed_worker_hits_the_connect_timeout_and_fails_over(spawn_worker, router):
    good = await spawn_worker()
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(0)  # never accepted: once the backlog is full, new connections hang in SYN
        port = hole.getsockname()[1]
        fillers = []
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            fillers.append(s)
        await asyncio.sleep(0.05)
        client = await router(f"http://127.0.0.1:{port}", good.url, connect_timeout=0.2)
        worker_of(client, good.url).last_picked = 10**9  # the black hole is tried first
        started = time.monotonic()
        resp = await client.post("/generate", json=PROMPT)
        assert resp.status == 200
        assert time.monotonic() - started < 3
        assert worker_of(client, f"http://127.0.0.1:{port}").consecutive_failures == 1
        for s in fillers:
            s.close()


async def test_request_that_reached_a_worker_is_never_resent(spawn_worker, router):
    broken, spare = await spawn_worker(fail_mode="close_mid_body"), await spawn_worker()
    client = await router(broken.url, spare.url)
    worker_of(client, spare.url).last_picked = 10**9
    resp = await client.post("/generate", json=PROMPT)
    assert resp.status == 502
    assert (broken.generations(), spare.generations()) == (1, 0)


async def test_timed_out_request_is_not_resent(spawn_worker, router):
    hung, spare = await spawn_worker(fail_mode="hang"), await spawn_worker()
    client = await router(hung.url, spare.url, timeout=0.3)
    worker_of(client, spare.url).last_picked = 10**9
    resp = await client.post("/generate", json=PROMPT)
    assert resp.status == 504
    assert (hung.generations(), spare.generations()) == (1, 0)


async def test_quarantined_worker_returns_after_success_threshold(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(worker.url, health_check_success_threshold=2)
    await quarantine(client, worker)
    worker.behaviour.health_status = 200
    await health_round(client)
    assert worker_of(client, worker.url).state == dr.QUARANTINED
    await health_round(client)
    assert worker_of(client, worker.url).state == dr.HEALTHY
    assert (await client.post("/generate", json=PROMPT)).status == 200


async def test_worker_back_after_a_missed_update_gets_it_before_any_generation(spawn_worker, router):
    a, b = await spawn_worker(), await spawn_worker()
    client = await router(a.url, b.url)
    await quarantine(client, b)
    assert (await client.post("/update_weights_from_disk", json=UPDATE)).status == 200
    assert b.state.weight_updates == []
    await recover(client, b)
    assert b.state.weight_updates == [UPDATE]
    assert worker_of(client, b.url).weight_version == 1
    for _ in range(4):
        assert (await client.post("/generate", json=PROMPT)).status == 200
    posts = b.paths("POST")
    assert posts[0] == "/update_weights_from_disk" and "/v1/images/generations" in posts


async def test_restarted_worker_is_resynced_even_if_it_had_the_update(spawn_worker, router):
    a, b = await spawn_worker(), await spawn_worker()
    client = await router(a.url, b.url)
    assert (await client.post("/update_weights_from_disk", json=UPDATE)).status == 200
    await b.stop()
    await quarantine(client, b)
    b = await b.restart()  # a new process: it loaded its startup weights, not the update
    try:
        await recover(client, b)
        assert b.state.weight_updates == [UPDATE]
        assert worker_of(client, b.url).state == dr.HEALTHY
    finally:
        await b.stop()


async def test_worker_added_after_an_update_syncs_before_serving(spawn_worker, router):
    a = await spawn_worker()
    b = await spawn_worker(weight_update_latency=0.3)
    client = await router(a.url)
    assert (await client.post("/update_weights_from_disk", json=UPDATE)).status == 200
    resp = await client.post("/add_worker", json={"url": b.url})
    assert (await resp.json())["worker"]["state"] == dr.SYNCING
    for _ in range(3):
        assert (await client.post("/generate", json=PROMPT)).status == 200
    assert b.generations() == 0
    entry = {w["url"]: w for w in (await (await client.get("/health_workers")).json())["workers"]}[b.url]
    assert entry["state"] == "syncing" and entry["out_reason"]
    await settle(client)
    assert b.state.weight_updates == [UPDATE]
    assert worker_of(client, b.url).state == dr.HEALTHY


async def test_broadcast_failing_on_one_worker_takes_it_out_until_resynced(spawn_worker, router):
    a, b = await spawn_worker(), await spawn_worker(weight_update_status=500)
    client = await router(a.url, b.url)
    resp = await client.post("/update_weights_from_disk", json=UPDATE)
    assert resp.status == 502
    await settle(client)
    assert worker_of(client, b.url).state == dr.SYNCING
    for _ in range(4):
        assert (await client.post("/generate", json=PROMPT)).status == 200
    assert b.generations() == 0
    b.behaviour.weight_update_status = None
    await health_round(client)
    await settle(client)
    assert worker_of(client, b.url).state == dr.HEALTHY
    assert b.state.weight_updates == [UPDATE]
    assert (await (await client.get("/health")).json())["weights_consistent"] is True


async def test_update_failing_everywhere_changes_no_worker_and_no_version(spawn_worker, router):
    a, b = await spawn_worker(weight_update_status=400), await spawn_worker(weight_update_status=400)
    client = await router(a.url, b.url)
    resp = await client.post("/update_weights_from_disk", json={"model_path": "/missing"})
    assert resp.status == 502
    assert pool_of(client).weight_version == 0
    assert all(w.state == dr.HEALTHY for w in pool_of(client).workers.values())


async def test_weight_version_is_reported_and_stamped_on_responses(spawn_worker, router):
    a, b = await spawn_worker(), await spawn_worker()
    client = await router(a.url, b.url)
    assert (await client.post("/generate", json=PROMPT)).headers["X-Weight-Version"] == "0"
    assert (await client.post("/update_weights_from_disk", json=UPDATE)).status == 200
    assert (await client.post("/update_weights_from_disk", json={"model_path": "/ckpt/200"})).status == 200
    resp = await client.post("/generate", json=PROMPT)
    assert resp.headers["X-Weight-Version"] == "2"
    health = await (await client.get("/health")).json()
    assert (health["weight_version"], health["weights_consistent"]) == (2, True)
    report = await (await client.get("/health_workers")).json()
    assert {w["weight_version"] for w in report["workers"]} == {2}


async def test_generation_waits_while_a_weight_update_is_broadcast(spawn_worker, router):
    worker = await spawn_worker(weight_update_latency=0.3)
    client = await router(worker.url)
    update = asyncio.ensure_future(client.post("/update_weights_from_disk", json=UPDATE))
    await wait_for(lambda: "/update_weights_from_disk" in worker.paths())
    generation = asyncio.ensure_future(client.post("/generate", json=PROMPT))
    await asyncio.sleep(0.1)
    assert worker.generations() == 0 and not generation.done()
    assert (await update).status == 200
    resp = await generation
    assert resp.status == 200 and resp.headers["X-Weight-Version"] == "1"


async def test_sigterm_lets_in_flight_requests_finish_and_exits_0(spawn_worker):
    worker = await spawn_worker(latency=0.5)
    async with router_process("--worker-urls", worker.url) as proc, aiohttp.ClientSession() as session:
        requests = [asyncio.ensure_future(session.post(proc.url + "/generate", json=PROMPT)) for _ in range(4)]
        await wait_for(lambda: worker.generations() == 4)
        proc.proc.send_signal(signal.SIGTERM)
        responses = await asyncio.gather(*requests)
        assert [r.status for r in responses] == [200] * 4
        for r in responses:
            assert (await r.json())["data"]
        assert await asyncio.get_running_loop().run_in_executor(None, proc.proc.wait, 15) == 0
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(proc.url + "/health")


async def test_sigint_also_stops_cleanly_and_the_log_is_complete(spawn_worker):
    worker = await spawn_worker()
    async with router_process("--worker-urls", worker.url) as proc:
        async with aiohttp.ClientSession() as session:
            await session.post(proc.url + "/generate", json=PROMPT, headers={"X-Request-ID": "last-words"})
        proc.proc.send_signal(signal.SIGINT)
        assert await asyncio.get_running_loop().run_in_executor(None, proc.proc.wait, 15) == 0
        log = proc.log()
    assert "Running on http://127.0.0.1:" in log
    assert f"last-words POST /generate 200 {worker.url}" in log  # buffered log lines are flushed at exit
    assert "shutting down" in log


# --------------------------------------------------------------------------------------------
# Issue 4: sticky jobs and files, sleep and wake, LoRA, capabilities, models, management
# --------------------------------------------------------------------------------------------


async def test_video_job_is_created_polled_and_downloaded_through_the_router(spawn_worker, router):
    workers = [await spawn_worker(task_type="T2V", video_latency=0.05, video_bytes=300_000) for _ in range(2)]
    client = await router(*(w.url for w in workers))
    jobs = [await (await client.post("/generate_video", json={"prompt": f"p{i}"})).json() for i in range(4)]
    assert all(w.generations() == 2 for w in workers)
    for job in jobs:
        for _ in range(200):
            status = await (await client.get(f"/v1/videos/{job['id']}")).json()
            if status["status"] == "completed":
                break
            await asyncio.sleep(0.02)
        assert status["status"] == "completed"
        resp = await client.get(f"/v1/videos/{job['id']}/content")
        assert resp.status == 200 and resp.content_type == "video/mp4"
        assert len(await resp.read()) == 300_000


async def test_image_url_content_is_fetched_from_the_worker_that_made_it(spawn_worker, router):
    workers = [await spawn_worker() for _ in range(3)]
    client = await router(*(w.url for w in workers))
    urls = []
    for _ in range(3):
        body = await (await client.post("/generate", json={"prompt": "p", "response_format": "url", "n": 2})).json()
        urls += [item["url"] for item in body["data"]]
    for url in urls:
        resp = await client.get(url)
        assert resp.status == 200, url
        assert resp.content_type.startswith("image/")


async def test_unknown_job_id_is_404_json(spawn_worker, router):
    worker = await spawn_worker(task_type="T2V")
    client = await router(worker.url)
    for path in ("/v1/videos/video_nope", "/v1/videos/video_nope/content", "/v1/images/nope/content"):
        resp = await client.get(path)
        assert resp.status == 404
        assert (await resp.json())["code"] == "unknown_job"
    assert worker.paths("GET") == []


async def test_job_of_a_removed_worker_is_a_distinct_gone_error(spawn_worker, router):
    a, b = await spawn_worker(task_type="T2V"), await spawn_worker(task_type="T2V")
    client = await router(a.url, b.url)
    job = await (await client.post("/generate_video", json={"prompt": "p"})).json()
    owner = a if a.generations() else b
    assert (await client.post("/remove_worker", json={"url": owner.url})).status == 200
    assert job["id"] not in pool_of(client).job_owner
    resp = await client.get(f"/v1/videos/{job['id']}")
    assert resp.status == 410
    body = await resp.json()
    assert body["code"] == "job_worker_gone" and owner.url in body["error"]


async def test_job_of_a_quarantined_worker_says_its_worker_is_out(spawn_worker, router):
    worker = await spawn_worker(task_type="T2V")
    client = await router(worker.url)
    job = await (await client.post("/generate_video", json={"prompt": "p"})).json()
    await quarantine(client, worker)
    resp = await client.get(f"/v1/videos/{job['id']}")
    assert resp.status == 503
    assert (await resp.json())["code"] == "job_worker_gone"


async def test_deleting_a_job_forgets_its_id(spawn_worker, router):
    worker = await spawn_worker(task_type="T2V")
    client = await router(worker.url)
    job = await (await client.post("/v1/videos", json={"prompt": "p"})).json()
    resp = await client.delete(f"/v1/videos/{job['id']}")
    assert resp.status == 200 and (await resp.json())["status"] == "deleted"
    assert (await client.get(f"/v1/videos/{job['id']}")).status == 404


async def test_tracked_job_ids_are_bounded_oldest_first(spawn_worker, router):
    worker = await spawn_worker(task_type="T2V")
    client = await router(worker.url, max_tracked_jobs=2)
    ids = [(await (await client.post("/v1/videos", json={"prompt": "p"})).json())["id"] for _ in range(3)]
    assert list(pool_of(client).job_owner) == ids[1:]
    assert (await client.get(f"/v1/videos/{ids[0]}")).status == 404
    assert (await client.get(f"/v1/videos/{ids[2]}")).status == 200


async def test_video_list_merges_every_worker(spawn_worker, router):
    a, b = await spawn_worker(task_type="T2V"), await spawn_worker(task_type="T2V")
    client = await router(a.url, b.url)
    ids = {(await (await client.post("/v1/videos", json={"prompt": "p"})).json())["id"] for _ in range(4)}
    body = await (await client.get("/v1/videos?limit=100")).json()
    assert {job["id"] for job in body["data"]} == ids
    assert a.generations() == b.generations() == 2


async def test_sleep_then_generate_is_503_then_wake_serves_again(spawn_worker, router):
    a, b = await spawn_worker(), await spawn_worker()
    client = await router(a.url, b.url)
    resp = await client.post("/release_memory_occupation", json={})
    assert resp.status == 200
    assert all(r["body"]["sleeping"] is True for r in (await resp.json())["results"])
    resp = await client.post("/generate", json=PROMPT)
    assert resp.status == 503
    assert "asleep" in (await resp.json())["error"]
    assert a.generations() == b.generations() == 0
    states = {w["state"] for w in (await (await client.get("/health_workers")).json())["workers"]}
    assert states == {"sleeping"}
    resp = await client.post("/resume_memory_occupation", json={})
    assert resp.status == 200
    assert (await client.post("/generate", json=PROMPT)).status == 200


async def test_wake_reaches_a_sleeping_worker_that_was_quarantined(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(worker.url)
    await client.post("/release_memory_occupation", json={})
    await quarantine(client, worker)
    resp = await client.post("/resume_memory_occupation", json={})
    assert resp.status == 200
    assert worker.state.sleeping is False
    assert worker_of(client, worker.url).sleeping is False


async def test_failed_sleep_is_502_and_the_worker_keeps_serving(spawn_worker, router):
    a, b = await spawn_worker(), await spawn_worker(sleep_supported=False)
    client = await router(a.url, b.url)
    resp = await client.post("/release_memory_occupation", json={})
    assert resp.status == 502
    assert worker_of(client, b.url).sleeping is False
    assert (await client.post("/generate", json=PROMPT)).status == 200
    assert b.generations() == 1


async def test_worker_asleep_during_an_update_gets_it_when_woken(spawn_worker, router):
    a, b = await spawn_worker(), await spawn_worker()
    client = await router(a.url, b.url)
    await client.post("/release_memory_occupation", json={})
    await client.post("/resume_memory_occupation", json={})  # wake a only, b stays asleep
    await client.session.post(b.url + "/release_memory_occupation", json={})
    worker_of(client, b.url).sleeping = True
    resp = await client.post("/update_weights_from_disk", json=UPDATE)
    assert resp.status == 200
    result = await resp.json()
    assert [r["url"] for r in result["results"]] == [a.url]
    assert [s["url"] for s in result["skipped"]] == [b.url] and "sleeping" in result["skipped"][0]["reason"]
    await client.post("/resume_memory_occupation", json={})
    await settle(client)
    assert b.state.weight_updates == [UPDATE]
    assert worker_of(client, b.url).weight_version == 1


@pytest.mark.parametrize("path,body", [
    ("/v1/set_lora", {"lora_nickname": "style", "lora_path": "/loras/style"}),
    ("/v1/merge_lora_weights", {"target": "all", "strength": 1.0}),
    ("/v1/unmerge_lora_weights", {"target": "all"}),
])
async def test_lora_changes_reach_every_available_worker(spawn_worker, router, path, body):
    workers = [await spawn_worker() for _ in range(3)]
    client = await router(*(w.url for w in workers))
    resp = await client.post(path, json=body)
    assert resp.status == 200
    assert len((await resp.json())["results"]) == 3
    for w in workers:
        assert w.paths("POST") == [path]
        assert json.loads(w.seen[-1].body) == body


async def test_lora_failure_on_one_worker_is_502_with_per_worker_results(spawn_worker, router):
    a, b = await spawn_worker(), await spawn_worker(lora_enabled=False)
    client = await router(a.url, b.url)
    resp = await client.post("/v1/set_lora", json={"lora_nickname": "x", "lora_path": "/l"})
    assert resp.status == 502
    results = {r["url"]: r for r in (await resp.json())["results"]}
    assert results[a.url]["ok"] and results[b.url]["status"] == 500


async def test_weights_checksum_says_whether_workers_agree(spawn_worker, router):
    a, b = await spawn_worker(), await spawn_worker()
    client = await router(a.url, b.url)
    body = {"module_names": ["transformer"]}
    result = await (await client.post("/get_weights_checksum", json=body)).json()
    assert result["consistent"] is True and len(result["results"]) == 2
    await client.session.post(b.url + "/update_weights_from_disk", json={"model_path": "/other"})
    result = await (await client.post("/get_weights_checksum", json=body)).json()
    assert result["consistent"] is False


async def test_update_weights_from_tensor_goes_to_one_worker_only(spawn_worker, router):
    a, b = await spawn_worker(), await spawn_worker()
    client = await router(a.url, b.url)
    body = {"serialized_named_tensors": ["x"]}
    resp = await client.post("/update_weights_from_tensor", json=body, headers={"X-Target-Worker": b.url + "/"})
    assert resp.status == 200
    assert b.paths("POST") == ["/update_weights_from_tensor"] and a.paths("POST") == []
    resp = await client.post("/update_weights_from_tensor", json=body)
    assert resp.status == 200
    assert len(a.paths("POST")) + len(b.paths("POST")) == 2


async def test_target_worker_header_must_name_a_registered_worker(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(worker.url)
    assert (await client.get("/stats", headers={"X-Target-Worker": dead_url()})).status == 404
    assert (await client.get("/stats", headers={"X-Target-Worker": "ftp://x"})).status == 400


async def test_video_request_with_only_image_workers_is_400(spawn_worker, router):
    a, b = await spawn_worker(task_type="T2I"), await spawn_worker(task_type="I2I")
    client = await router(a.url, b.url)
    for path in ("/generate_video", "/v1/videos"):
        resp = await client.post(path, json={"prompt": "p"})
        assert resp.status == 400
        assert "video" in (await resp.json())["error"]
    assert a.generations() == b.generations() == 0


async def test_requests_go_only_to_capable_workers(spawn_worker, router):
    image, video, unknown = (await spawn_worker(task_type="T2I"), await spawn_worker(task_type="TI2V"),
                             await spawn_worker(task_type=None))
    client = await router(image.url, video.url, unknown.url)
    for _ in range(4):
        assert (await client.post("/generate", json=PROMPT)).status == 200
        assert (await client.post("/generate_video", json={"prompt": "p"})).status == 200
    assert image.paths("POST") == ["/v1/images/generations"] * image.generations()
    assert set(video.paths("POST")) == {"/v1/videos"}
    assert unknown.generations() > 0


async def test_image_request_with_only_video_workers_is_400(spawn_worker, router):
    worker = await spawn_worker(task_type="T2V")
    client = await router(worker.url)
    assert (await client.post("/generate", json=PROMPT)).status == 400


async def test_models_are_merged_without_duplicates(spawn_worker, router):
    a, b = await spawn_worker(model_path="org/flux"), await spawn_worker(model_path="org/flux")
    c = await spawn_worker(model_path="org/wan", task_type="T2V")
    client = await router(a.url, b.url, c.url)
    body = await (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert sorted(card["id"] for card in body["data"]) == ["org/flux", "org/wan"]


async def test_removing_a_worker_lets_its_in_flight_request_finish(spawn_worker, router):
    worker = await spawn_worker(latency=0.3)
    client = await router(worker.url)
    pending = asyncio.ensure_future(client.post("/generate", json=PROMPT))
    await wait_for(lambda: worker.generations() == 1)
    resp = await client.post("/remove_worker", params={"url": worker.url})
    assert (await resp.json())["in_flight"] == 1
    assert (await (await client.get("/list_workers")).json())["urls"] == []
    assert (await client.post("/generate", json=PROMPT)).status == 503
    done = await pending
    assert done.status == 200 and (await done.json())["data"]


async def test_removing_an_unknown_worker_is_404(router):
    client = await router()
    assert (await client.post("/remove_worker", json={"url": dead_url()})).status == 404


async def test_rest_worker_api_aliases(spawn_worker, router):
    worker = await spawn_worker()
    client = await router()
    worker_id = quote(worker.url, safe="")
    assert (await client.post("/workers", json={"url": worker.url})).status == 201
    listing = await (await client.get("/workers")).json()
    assert [w["url"] for w in listing["workers"]] == [worker.url]
    assert (await (await client.get(f"/workers/{worker_id}")).json())["url"] == worker.url
    resp = await client.put(f"/workers/{worker_id}", json={"quarantined": True})
    assert (await resp.json())["state"] == dr.QUARANTINED
    assert (await client.post("/generate", json=PROMPT)).status == 503
    resp = await client.put(f"/workers/{worker_id}", json={"is_dead": False})
    assert (await resp.json())["state"] == dr.HEALTHY
    assert (await client.put(f"/workers/{worker_id}", json={"quarantined": "yes"})).status == 400
    assert (await client.delete(f"/workers/{worker_id}")).status == 200
    assert (await client.get(f"/workers/{worker_id}")).status == 404


async def test_download_reaches_the_client_while_the_worker_is_still_sending(spawn_worker, router):
    worker = await spawn_worker(task_type="T2V", video_bytes=4 * dr.MiB, chunk_size=dr.MiB, download_pause=3)
    client = await router(worker.url)
    job = await (await client.post("/v1/videos", json={"prompt": "p"})).json()
    resp = await client.get(f"/v1/videos/{job['id']}/content")
    first = await asyncio.wait_for(resp.content.readexactly(dr.MiB), timeout=1.5)  # before the pause ends
    assert first[:8] == (await (await client.session.get(
        f"{worker.url}/v1/videos/{job['id']}/content")).content.readexactly(8))
    resp.close()


# --------------------------------------------------------------------------------------------
# Issue 5: metrics, request ids, access log, status page
# --------------------------------------------------------------------------------------------

import logging  # noqa: E402
import re  # noqa: E402

SAMPLE_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')


def parse_exposition(text: str) -> dict[str, dict]:
    """Parse the Prometheus text format 0.0.4 strictly; fail on anything its parser would reject."""
    assert text.endswith("\n")
    families: dict[str, dict] = {}
    current = None
    seen_series = set()
    for line in text.splitlines():
        assert line.strip() == line and line, f"blank or padded line: {line!r}"
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            _, kind, name, rest = line.split(" ", 3)
            family = families.setdefault(name, {"samples": []})
            assert kind not in family, f"second {kind} for {name}"
            assert not family["samples"], f"{kind} after samples of {name}"
            family[kind] = rest
            if kind == "TYPE":
                assert rest in ("counter", "gauge", "histogram", "summary", "untyped")
            current = name
            continue
        assert not line.startswith("#"), line
        match = SAMPLE_LINE.match(line)
        assert match, f"bad sample line {line!r}"
        name, labels_text, value = match.groups()
        float(value)
        labels = {}
        if labels_text:
            position = 0
            for pair in LABEL_PAIR.finditer(labels_text):
                assert pair.start() == position, f"bad labels {labels_text!r}"
                labels[pair.group(1)] = pair.group(2)
                position = pair.end()
            assert position == len(labels_text), f"bad labels {labels_text!r}"
        family_name = current
        assert family_name is not None and (name == family_name or (
            families[family_name].get("TYPE") == "histogram" and name in
            (f"{family_name}_bucket", f"{family_name}_sum", f"{family_name}_count"))), f"{name} outside its family"
        key = (name, tuple(sorted(labels.items())))
        assert key not in seen_series, f"duplicate series {key}"
        seen_series.add(key)
        families[family_name]["samples"].append((name, labels, float(value)))
    for name, family in families.items():
        assert "HELP" in family and "TYPE" in family, name
        if family["TYPE"] == "histogram":
            buckets: dict[tuple, list] = {}
            counts = {}
            for sample, labels, value in family["samples"]:
                rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
                if sample.endswith("_bucket"):
                    buckets.setdefault(rest, []).append((labels["le"], value))
                elif sample.endswith("_count"):
                    counts[rest] = value
            for rest, series in buckets.items():
                assert series[-1][0] == "+Inf"
                bounds = [float(le) for le, _ in series[:-1]]
                assert bounds == sorted(bounds)
                values = [v for _, v in series]
                assert values == sorted(values), "buckets must be cumulative"
                assert series[-1][1] == counts[rest]
    return families


def sample_value(families, name: str, **labels) -> float:
    family = families[name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")]
    matches = [v for n, lab, v in family["samples"] if n == name and all(lab.get(k) == v2 for k, v2 in labels.items())]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


async def scrape(client) -> dict[str, dict]:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse_exposition(await resp.text())


async def test_metrics_count_requests_by_route_worker_and_code(spawn_worker, router):
    ok, failing = await spawn_worker(), await spawn_worker(fail_status=500)
    client = await router(ok.url, failing.url)
    for _ in range(4):
        await client.post("/generate", json=PROMPT)
    await client.get("/health")
    metrics = await scrape(client)
    p = "diffusion_router_"
    assert sample_value(metrics, p + "requests_total", route="/generate", worker=ok.url, code="200") == 2
    assert sample_value(metrics, p + "requests_total", route="/generate", worker=failing.url, code="500") == 2
    assert sample_value(metrics, p + "requests_total", route="/health", worker="", code="200") == 1
    assert sample_value(metrics, p + "request_duration_seconds_count", route="/generate") == 4
    assert sample_value(metrics, p + "request_duration_seconds_bucket", route="/generate", le="+Inf") == 4
    assert sample_value(metrics, p + "received_bytes_total", route="/generate") == 4 * len(json.dumps(PROMPT))
    assert sample_value(metrics, p + "sent_bytes_total", route="/generate") > 0
    assert sample_value(metrics, p + "worker_active_requests", worker=ok.url) == 0
    assert sample_value(metrics, p + "worker_state", worker=ok.url, state="healthy") == 1
    assert sample_value(metrics, p + "worker_state", worker=ok.url, state="quarantined") == 0
    assert sample_value(metrics, p + "worker_weight_version", worker=ok.url) == 0


async def test_metrics_catch_all_routes_have_bounded_labels(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(worker.url)
    await client.get("/stats")
    for i in range(5):
        await client.get(f"/random/path/{i}")
    metrics = await scrape(client)
    routes = {lab["route"] for n, lab, _ in metrics["diffusion_router_requests_total"]["samples"]}
    assert routes == {"/stats", "other"}


async def test_metrics_count_health_failures_quarantines_recoveries_and_failovers(spawn_worker, router):
    a, b, doomed = await spawn_worker(), await spawn_worker(), await spawn_worker()
    gone = doomed.url
    client = await router(a.url, b.url, gone)
    await doomed.stop()
    worker_of(client, a.url).last_picked = worker_of(client, b.url).last_picked = 10**9
    await client.post("/generate", json=PROMPT)  # tries the dead worker first, then fails over
    await quarantine(client, b)
    await recover(client, b)
    assert (await client.post("/update_weights_from_disk", json=UPDATE)).status == 200
    metrics = await scrape(client)
    p = "diffusion_router_"
    assert sample_value(metrics, p + "retries_total", route="/generate") == 1
    assert sample_value(metrics, p + "failovers_total", worker=gone) == 1
    assert sample_value(metrics, p + "quarantines_total", worker=gone) == 1
    assert sample_value(metrics, p + "quarantines_total", worker=b.url) == 1
    assert sample_value(metrics, p + "recoveries_total", worker=b.url) == 1
    assert sample_value(metrics, p + "health_probe_failures_total", worker=b.url) == 3
    assert sample_value(metrics, p + "weight_updates_total", result="ok") == 1
    assert sample_value(metrics, p + "weight_update_duration_seconds_count") == 1


def test_metric_label_values_are_escaped():
    assert dr.escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    metrics = dr.Metrics()
    metrics.inc("health_probe_failures_total", 'http://we"ird\\host\n')
    text = metrics.render(dr.WorkerPool(dr.RouterConfig()))
    parsed = parse_exposition(text)
    assert sample_value(parsed, "diffusion_router_health_probe_failures_total",
                        worker='http://we\\"ird\\\\host\\n') == 1


async def test_client_request_id_reaches_the_worker_and_comes_back(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(worker.url)
    resp = await client.post("/generate", json=PROMPT, headers={"X-Request-ID": "rollout-7.step-3"})
    assert resp.headers["X-Request-ID"] == "rollout-7.step-3"
    assert worker.seen[-1].headers["X-Request-ID"] == "rollout-7.step-3"


@pytest.mark.parametrize("given", [None, "", "x" * 500, "bad id\twith tab", "évil"])
async def test_missing_or_unsafe_request_ids_are_replaced(spawn_worker, router, given):
    worker = await spawn_worker()
    client = await router(worker.url)
    headers = {} if given is None else {"X-Request-ID": given}
    resp = await client.post("/generate", json=PROMPT, headers=headers)
    rid = resp.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    assert worker.seen[-1].headers["X-Request-ID"] == rid


async def test_request_id_is_on_streamed_and_error_responses(spawn_worker, router):
    worker = await spawn_worker(task_type="T2V", video_bytes=2 * dr.MiB)
    client = await router(worker.url)
    job = await (await client.post("/v1/videos", json={"prompt": "p"})).json()
    resp = await client.get(f"/v1/videos/{job['id']}/content", headers={"X-Request-ID": "dl-1"})
    assert resp.headers["X-Request-ID"] == "dl-1"
    await resp.read()
    resp = await client.get("/v1/videos/nope", headers={"X-Request-ID": "err-1"})
    assert resp.status == 404 and resp.headers["X-Request-ID"] == "err-1"


async def test_access_log_has_one_line_per_request(spawn_worker, router, caplog):
    worker = await spawn_worker()
    client = await router(worker.url)
    with caplog.at_level(logging.INFO, logger="diffusion_router.access"):
        await client.post("/generate", json=PROMPT, headers={"X-Request-ID": "req-42"})
        await client.get("/health")
        await client.get("/metrics")
    lines = [r.getMessage() for r in caplog.records if r.name == "diffusion_router.access"]
    assert len(lines) == 1
    rid, method, path, status, worker_url, duration, size = lines[0].split(" ")
    assert (rid, method, path, status, worker_url) == ("req-42", "POST", "/generate", "200", worker.url)
    assert duration.endswith("s") and float(duration[:-1]) >= 0 and int(size) > 0
    assert caplog.records[0].created > 0  # time comes from the log record


async def test_verbose_access_log_includes_probes(router, caplog):
    client = await router(verbose=True)
    with caplog.at_level(logging.INFO, logger="diffusion_router.access"):
        await client.get("/health")
        await client.get("/metrics")
    paths = [r.getMessage().split(" ")[2] for r in caplog.records if r.name == "diffusion_router.access"]
    assert paths == ["/health", "/metrics"]


@pytest.mark.parametrize("path", ["/", "/dashboard"])
async def test_status_page_is_self_contained_html_with_the_worker_table(spawn_worker, router, path):
    worker = await spawn_worker()
    client = await router(worker.url, dead_url())
    resp = await client.get(path)
    assert resp.status == 200 and resp.content_type == "text/html"
    page = await resp.text()
    assert worker.url in page and "<table" in page and "healthy" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(\s*['"]?https?:""", page)
    assert "health_workers" in page  # the script refreshes from the router's own JSON
    assert worker.paths() == []  # served by the router, not forwarded


async def test_status_page_escapes_worker_errors(router):
    client = await router()
    pool = pool_of(client)
    w, _ = pool.add("http://127.0.0.1:1")
    w.last_error = "<script>alert(1)</script>"
    page = await (await client.get("/")).text()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page


async def test_health_workers_reports_router_totals(spawn_worker, router):
    worker = await spawn_worker(fail_status=503)
    client = await router(worker.url)
    await client.post("/generate", json=PROMPT)
    totals = (await (await client.get("/health_workers")).json())["totals"]
    assert totals["requests"] == 1 and totals["errors"] == 1 and totals["in_flight"] == 0


# --------------------------------------------------------------------------------------------
# Issue 6: access control, worker addresses, hostile input
# --------------------------------------------------------------------------------------------

ADMIN_REQUESTS = [
    ("POST", "/add_worker", {"url": "http://127.0.0.1:9"}),
    ("POST", "/remove_worker", {"url": "http://127.0.0.1:9"}),
    ("POST", "/update_weights_from_disk", {"model_path": "/m"}),
    ("POST", "/update_weights_from_tensor", {"serialized_named_tensors": []}),
    ("POST", "/release_memory_occupation", {}),
    ("POST", "/resume_memory_occupation", {}),
    ("POST", "/v1/set_lora", {"lora_nickname": "a"}),
    ("POST", "/v1/merge_lora_weights", {}),
    ("POST", "/v1/unmerge_lora_weights", {}),
    ("POST", "/workers", {"url": "http://127.0.0.1:9"}),
    ("PUT", "/workers/http%3A%2F%2F127.0.0.1%3A9", {"quarantined": True}),
    ("DELETE", "/workers/http%3A%2F%2F127.0.0.1%3A9", None),
]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_api_key_is_needed_for_everything_but_health(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(worker.url, api_key="s3cret")
    assert (await client.get("/health")).status == 200
    for headers in ({}, bearer("wrong"), {"Authorization": "Basic czNjcmV0"}, {"Authorization": "Bearer"}):
        resp = await client.post("/generate", json=PROMPT, headers=headers)
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == "Bearer"
        assert "error" in await resp.json()
    for path in ("/list_workers", "/health_workers", "/metrics", "/", "/v1/models"):
        assert (await client.get(path)).status == 401, path
    assert worker.generations() == 0
    resp = await client.post("/generate", json=PROMPT, headers=bearer("s3cret"))
    assert resp.status == 200
    assert "Authorization" not in worker.seen[-1].headers  # the router's key stays at the router


@pytest.mark.parametrize("method,path,body", ADMIN_REQUESTS)
async def test_admin_requests_need_the_admin_key(spawn_worker, router, method, path, body):
    worker = await spawn_worker()
    client = await router(worker.url, api_key="user-key", admin_api_key="admin-key")
    seen_before = len(worker.seen)
    resp = await client.request(method, path, json=body, headers=bearer("user-key"))
    assert resp.status == 403
    assert "admin" in (await resp.json())["error"]
    assert (await client.request(method, path, json=body)).status == 401
    assert len(worker.seen) == seen_before
    resp = await client.request(method, path, json=body, headers=bearer("admin-key"))
    assert resp.status not in (401, 403)


async def test_plain_requests_accept_either_key(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(worker.url, api_key="user-key", admin_api_key="admin-key")
    for key in ("user-key", "admin-key"):
        assert (await client.get("/list_workers", headers=bearer(key))).status == 200
        assert (await client.post("/generate", json=PROMPT, headers=bearer(key))).status == 200


async def test_admin_key_alone_guards_only_changes(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(worker.url, admin_api_key="admin-key")
    assert (await client.post("/generate", json=PROMPT)).status == 200
    assert (await client.post("/add_worker", json={"url": worker.url})).status == 401
    assert (await client.post("/add_worker", json={"url": worker.url}, headers=bearer("admin-key"))).status == 200


async def test_router_sends_its_own_worker_key_and_never_the_clients(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(worker.url, api_key="client-key", worker_api_key="worker-key")
    await client.post("/generate", json=PROMPT, headers=bearer("client-key"))
    await client.post("/update_weights_from_disk", json=UPDATE, headers=bearer("client-key"))
    generation, update = worker.seen[-2:]
    assert generation.headers["Authorization"] == update.headers["Authorization"] == "Bearer worker-key"


async def test_keys_are_never_logged(spawn_worker, router, caplog):
    worker = await spawn_worker()
    client = await router(worker.url, api_key="user-key-123", admin_api_key="admin-key-456", verbose=True)
    with caplog.at_level(logging.DEBUG):
        await client.post("/generate", json=PROMPT, headers=bearer("user-key-123"))
        await client.post("/add_worker", json={"url": worker.url}, headers=bearer("user-key-123"))
        await client.get("/list_workers", headers=bearer("guess-789"))
    text = caplog.text
    assert caplog.records and not any(k in text for k in ("user-key-123", "admin-key-456", "guess-789"))


async def test_api_key_from_the_environment(spawn_worker):
    worker = await spawn_worker()
    async with router_process("--worker-urls", worker.url, env={"DIFFUSION_ROUTER_API_KEY": "env-key"}) as proc:
        async with aiohttp.ClientSession() as session:
            async with session.get(proc.url + "/health") as resp:
                assert resp.status == 200
            async with session.post(proc.url + "/generate", json=PROMPT) as resp:
                assert resp.status == 401
            async with session.post(proc.url + "/generate", json=PROMPT, headers=bearer("env-key")) as resp:
                assert resp.status == 200


def test_allowed_worker_hosts_restrict_registration():
    allowed = dr.RouterConfig(allowed_worker_hosts=("gpu1", "10.0.0.0/8", "::1")).allowed_hosts()
    assert dr.normalize_worker_url("http://GPU1:10090", allowed) == "http://gpu1:10090"
    assert dr.normalize_worker_url("http://10.1.2.3:10090", allowed) == "http://10.1.2.3:10090"
    assert dr.normalize_worker_url("http://[::1]:10090", allowed) == "http://[::1]:10090"
    for url in ("http://gpu2:10090", "http://11.0.0.1:10090", "http://127.0.0.1:10090"):
        with pytest.raises(dr.WorkerURLError):
            dr.normalize_worker_url(url, allowed)


async def test_add_worker_outside_the_allowed_hosts_is_400(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(allowed_worker_hosts=("192.0.2.0/24",))
    resp = await client.post("/add_worker", json={"url": worker.url})
    assert resp.status == 400 and "allowed" in (await resp.json())["error"]
    assert worker.seen == []
    client = await router(allowed_worker_hosts=("127.0.0.0/8",))
    assert (await client.post("/add_worker", json={"url": worker.url})).status == 201


async def raw_exchange(client, data: bytes, *, then: bytes = b"", pause: float = 0.0) -> tuple[int, bytes]:
    """Send raw bytes to the router; return the status and body of its answer."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(data)
        await writer.drain()
        if pause:
            await asyncio.sleep(pause)
            writer.write(then)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status = int(head.split(b" ", 2)[1])
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        body = await asyncio.wait_for(reader.readexactly(int(length.group(1))), 10) if length else b""
        return status, body
    finally:
        writer.close()


async def test_absolute_uri_and_host_header_never_choose_the_destination(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(worker.url)
    request = (b"GET http://169.254.169.254/latest/meta-data HTTP/1.1\r\nHost: 169.254.169.254\r\n"
               b"Connection: close\r\n\r\n")
    status, _ = await raw_exchange(client, request)
    assert status == 404  # the registered worker's own 404
    assert worker.seen[-1].path == "/latest/meta-data"
    await client.get("/stats", headers={"Host": "evil.example:80"})
    assert worker.seen[-1].path == "/stats"


def http(method: str, target: str, body: bytes = b"", headers: str = "") -> bytes:
    return (f"{method} {target} HTTP/1.1\r\nHost: router\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
            f"{headers}\r\n").encode() + body


J = "Content-Type: application/json\r\n"
# Every kind of bad input tried, the status it must get, and whether the router itself answers in JSON
# (False: aiohttp's HTTP parser refuses the framing with plain text before the router sees it).
BAD_INPUT = [
    ("malformed JSON to add_worker", http("POST", "/add_worker", b"{nope", J), 400, True),
    ("JSON nested beyond the parser's depth", http("POST", "/add_worker", b"[" * 100_000, J), 400, True),
    ("deep JSON weight update", http("POST", "/update_weights_from_disk", b"[" * 100_000, J), 400, True),
    ("worker URL with a space", http("POST", "/add_worker", b'{"url": "http://exa mple.com"}', J), 400, True),
    ("request that says it came from this router", http("GET", "/stats", headers="Via: {via}\r\n"), 508, True),
    ("JSON array to add_worker", http("POST", "/add_worker", b"[1]", J), 400, True),
    ("url of the wrong type", http("POST", "/add_worker", b'{"url": 5}', J), 400, True),
    ("missing url", http("POST", "/add_worker", b"{}", J), 400, True),
    ("empty url", http("POST", "/add_worker", b'{"url": ""}', J), 400, True),
    ("metadata worker", http("POST", "/add_worker?url=http://169.254.169.254"), 400, True),
    ("malformed JSON weight update", http("POST", "/update_weights_from_disk", b"{", J), 400, True),
    ("weight update without model_path", http("POST", "/update_weights_from_disk", b"{}", J), 400, True),
    ("weight update with empty model_path", http("POST", "/update_weights_from_disk", b'{"model_path": " "}', J),
     400, True),
    ("weight update of the wrong type", http("POST", "/update_weights_from_disk", b'"m"', J), 400, True),
    ("set_lora without nickname", http("POST", "/v1/set_lora", b'{"lora_path": "/x"}', J), 400, True),
    ("sleep with a non-object body", http("POST", "/release_memory_occupation", b"[]", J), 400, True),
    ("PUT worker with a non-boolean", http("PUT", "/workers/http%3A%2F%2F127.0.0.1%3A9", b'{"quarantined": 1}', J),
     400, True),
    ("worker id that is no URL", http("GET", "/workers/not-a-url"), 400, True),
    ("invalid percent-encoding in the path", http("GET", "/v1/videos/%ZZ"), 400, True),
    ("invalid percent-encoding in the query", http("GET", "/stats?a=%G1"), 400, True),
    ("unknown method", http("PROPFIND", "/stats"), 405, True),
    ("wrong method on a router path", http("DELETE", "/health"), 405, True),
    ("body over the size limit", http("POST", "/generate", b"x" * (2 * dr.MiB + 1), J), 413, True),
    ("unknown job id", http("GET", "/v1/videos/does-not-exist"), 404, True),
    ("header over 8 KiB", http("GET", "/stats", headers="X-Big: " + "a" * 9000 + "\r\n"), 400, False),
    ("malformed header line", http("GET", "/stats", headers="Bad Header\r\n"), 400, False),
    ("110 headers", http("GET", "/stats", headers="".join(f"X-{i}: 1\r\n" for i in range(110))), 431, True),
    ("invalid method token", b"G@T /stats HTTP/1.1\r\nHost: r\r\n\r\n", 400, False),
    ("binary garbage", b"\x00\x01\x02\x03 garbage\r\n\r\n", 400, False),
    ("invalid Content-Length", b"POST /generate HTTP/1.1\r\nHost: r\r\nContent-Length: abc\r\n\r\n", 400, False),
    ("Content-Length with chunked", b"POST /generate HTTP/1.1\r\nHost: r\r\nContent-Length: 5\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, False),
    ("bad chunk size", b"POST /upload HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
     400, False),
]


@pytest.mark.parametrize("name,request_bytes,status,router_json", BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
async def test_bad_input_gets_a_clear_4xx_and_changes_nothing(spawn_worker, router, name, request_bytes, status,
                                                             router_json):
    worker = await spawn_worker()
    client = await router(worker.url, max_request_size=2 * dr.MiB)
    before = (await (await client.get("/health_workers")).json())["workers"]
    got, body = await raw_exchange(client, request_bytes.replace(b"{via}", client.app[dr.VIA].encode()))
    assert got == status
    if router_json:
        assert "error" in json.loads(body)
    after = (await (await client.get("/health_workers")).json())["workers"]
    assert [(w["url"], w["state"], w["weight_version"]) for w in after] == \
        [(w["url"], w["state"], w["weight_version"]) for w in before]
    assert worker.generations() == 0 and not worker.state.weight_updates
    assert (await client.post("/generate", json=PROMPT)).status == 200  # still serving
    assert all(w.active_requests == 0 for w in pool_of(client).workers.values())


@pytest.mark.parametrize("size", [200, 2 * dr.MiB])  # read whole, and streamed
async def test_stalled_request_body_is_cut_off_by_the_client_timeout(spawn_worker, router, size):
    worker = await spawn_worker()
    client = await router(worker.url, client_timeout=0.3)
    head = (f"POST /generate HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n").encode()
    status, body = await raw_exchange(client, head + b"x" * (size // 2))
    assert status == 408
    assert "error" in json.loads(body)
    await wait_for(lambda: worker_of(client, worker.url).active_requests == 0)
    assert worker_of(client, worker.url).state == dr.HEALTHY  # the client's fault, not the worker's


async def test_requests_beyond_the_concurrency_limit_get_503(spawn_worker, router):
    worker = await spawn_worker(latency=0.4)
    client = await router(worker.url, max_concurrent_requests=2)
    held = [asyncio.ensure_future(client.post("/generate", json=PROMPT)) for _ in range(2)]
    await wait_for(lambda: worker.generations() == 2)
    resp = await client.post("/generate", json=PROMPT)
    assert resp.status == 503
    assert "limit" in (await resp.json())["error"]
    assert [r.status for r in await asyncio.gather(*held)] == [200, 200]
    assert (await client.post("/generate", json=PROMPT)).status == 200


# --------------------------------------------------------------------------------------------
# Issue 6: stress (short here; `make soak` runs the long one with STRESS_* set)
# --------------------------------------------------------------------------------------------

STRESS_REQUESTS = int(os.environ.get("STRESS_REQUESTS", "2000"))
STRESS_CONCURRENCY = int(os.environ.get("STRESS_CONCURRENCY", "400"))
STRESS_SECONDS = float(os.environ.get("STRESS_SECONDS", "60"))


def process_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def process_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


async def test_stress_with_vanishing_clients_killed_workers_and_garbage(spawn_worker):
    import random
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    steady = [await spawn_worker(latency=0.005, record_requests=False) for _ in range(2)]
    garbage = await spawn_worker(fail_mode="garbage", record_requests=False)
    flaky = await spawn_worker(latency=0.005, record_requests=False)
    urls = [w.url for w in (*steady, garbage, flaky)]
    rng = random.Random(7)
    statuses: dict[int, int] = {}
    vanished = 0
    async with router_process("--worker-urls", *urls, "--health-check-interval", "0.2",
                              "--health-check-success-threshold", "1", "--max-connections", "16",
                              "--shutdown-timeout", "1") as proc:
        pid = proc.proc.pid
        connector = aiohttp.TCPConnector(limit=STRESS_CONCURRENCY, force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:

            async def one(i: int) -> None:
                nonlocal vanished
                try:
                    if rng.random() < 0.15:  # a client that goes away mid-request
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(session.post(proc.url + "/generate", json=PROMPT), rng.uniform(0, 0.01))
                        vanished += 1
                        return
                    async with session.post(proc.url + "/generate", json=PROMPT) as resp:
                        await resp.read()
                        statuses[resp.status] = statuses.get(resp.status, 0) + 1
                except aiohttp.ClientError:
                    statuses[-1] = statuses.get(-1, 0) + 1

            for i in range(100):  # warm up, then take the baseline
                await one(i)
            base_fds, base_rss = process_fds(pid), process_rss_kb(pid)

            async def chaos() -> None:
                nonlocal flaky
                for _ in range(5):
                    await asyncio.sleep(0.3)
                    await flaky.stop()
                    await asyncio.sleep(0.3)
                    flaky = await flaky.restart()

            deadline = time.monotonic() + STRESS_SECONDS
            chaos_task = asyncio.ensure_future(chaos())
            gate = asyncio.Semaphore(STRESS_CONCURRENCY)

            async def bounded(i: int) -> None:
                async with gate:
                    if time.monotonic() < deadline:
                        await one(i)

            await asyncio.gather(*(bounded(i) for i in range(STRESS_REQUESTS)))
            await chaos_task
            report = {}
            for _ in range(200):  # in-flight counts settle once the vanished clients' requests finish
                report = await (await session.get(proc.url + "/health_workers")).json()
                if all(w["active_requests"] == 0 for w in report["workers"]):
                    break
                await asyncio.sleep(0.05)
        await flaky.stop()
        assert all(w["active_requests"] == 0 for w in report["workers"]), report
        assert 500 not in statuses, statuses
        assert statuses.get(200, 0) > STRESS_REQUESTS // 2, statuses
        assert set(statuses) <= {200, 502, 503, 504}, statuses
        assert vanished > 0
        # Idle keep-alive connections to each worker may stay pooled (aiohttp limits only those in use),
        # so allow --max-connections per worker; a leak of client sockets would be hundreds more.
        limit = base_fds + 16 * len(urls) + 8
        with contextlib.suppress(AssertionError):  # closed client sockets take a moment to be reaped
            await wait_for(lambda: process_fds(pid) <= limit, timeout=5)
        assert process_fds(pid) <= limit, (base_fds, process_fds(pid))
        assert process_rss_kb(pid) <= base_rss + 60_000, (base_rss, process_rss_kb(pid))


# --------------------------------------------------------------------------------------------
# Cases found by attacking the router: each kind fixed, each case kept
# --------------------------------------------------------------------------------------------


async def test_recovering_worker_serves_nothing_until_its_resync_succeeds(spawn_worker, router):
    a, b = await spawn_worker(), await spawn_worker()
    client = await router(a.url, b.url)
    assert (await client.post("/update_weights_from_disk", json=UPDATE)).status == 200
    await quarantine(client, b)
    b.behaviour.weight_update_latency = 0.5  # a realistic weight load takes a while
    b.behaviour.health_status = 200
    for _ in range(2):  # the success threshold
        await health_round(client)
    for _ in range(3):  # more good probes while the replay still runs
        assert worker_of(client, b.url).state == dr.SYNCING
        await health_round(client)
    assert worker_of(client, b.url).state == dr.SYNCING
    for _ in range(3):
        assert (await client.post("/generate", json=PROMPT)).status == 200
    assert b.generations() == 0
    await settle(client)
    assert worker_of(client, b.url).state == dr.HEALTHY and len(b.state.weight_updates) == 2


async def test_quickly_restarted_worker_is_found_and_resynced(spawn_worker, router):
    a, b = await spawn_worker(), await spawn_worker()
    client = await router(a.url, b.url)
    assert (await client.post("/update_weights_from_disk", json=UPDATE)).status == 200
    await b.stop()
    b = await b.restart()  # back before any probe noticed: never quarantined
    try:
        assert b.state.model_path == "stand-in/model"
        await health_round(client)
        assert worker_of(client, b.url).state == dr.SYNCING
        await settle(client)
        assert b.state.weight_updates == [UPDATE] and b.state.model_path == UPDATE["model_path"]
        assert worker_of(client, b.url).state == dr.HEALTHY
        await health_round(client)  # a worker holding the update is left alone
        assert worker_of(client, b.url).state == dr.HEALTHY and len(b.state.weight_updates) == 1
    finally:
        await b.stop()


async def test_the_router_refuses_itself_as_a_worker(router):
    client = await router()
    own_url = f"http://127.0.0.1:{client.server.port}"
    resp = await client.post("/add_worker", json={"url": own_url})
    assert resp.status == 400 and "this router" in (await resp.json())["error"]
    assert pool_of(client).workers == {}


async def test_a_loop_between_two_routers_is_refused_and_cut(aiohttp_client):
    first = await aiohttp_client(dr.create_app(dr.RouterConfig(**QUIET)), server_kwargs=dr.SERVER_OPTIONS)
    second = await aiohttp_client(dr.create_app(dr.RouterConfig(**QUIET)), server_kwargs=dr.SERVER_OPTIONS)
    first_url, second_url = (f"http://127.0.0.1:{c.server.port}" for c in (first, second))
    assert (await first.post("/add_worker", json={"url": second_url})).status == 201  # no loop yet
    resp = await second.post("/add_worker", json={"url": first_url})  # would close the loop
    assert resp.status == 400 and "back to this router" in (await resp.json())["error"]
    assert pool_of(second).workers == {}
    looped = worker_of(first, second_url)  # the first router saw its request come back: out for good
    assert looped.state == dr.QUARANTINED and looped.held and "loop" in looped.out_reason
    resp = await first.get("/stats")
    assert resp.status == 503
    for client in (first, second):
        assert all(w.active_requests == 0 for w in pool_of(client).workers.values())


async def test_a_request_coming_back_gets_508(router):
    client = await router()
    resp = await client.get("/stats", headers={"Via": f"1.1 proxy, {client.app[dr.VIA]}"})
    assert resp.status == 508 and (await resp.json())["code"] == "routing_loop"


async def test_prompts_cannot_claim_or_evict_job_ids(spawn_worker, router):
    video, image = await spawn_worker(task_type="T2V"), await spawn_worker(task_type="T2I")
    client = await router(video.url, image.url, max_tracked_jobs=5)
    job = await (await client.post("/v1/videos", json={"prompt": "p"})).json()
    fakes = " ".join(f"/v1/images/fake{i}/content" for i in range(20))
    prompt = f"look at /v1/images/{job['id']}/content and {fakes}"
    resp = await client.post("/generate", json={"prompt": prompt, "response_format": "url"})
    assert resp.status == 200
    assert pool_of(client).job_owner[job["id"]] is worker_of(client, video.url)
    assert not any(k.startswith("fake") for k in pool_of(client).job_owner)
    assert (await client.get(f"/v1/videos/{job['id']}")).status == 200


async def test_a_client_that_stops_reading_is_cut_off(spawn_worker, router):
    worker = await spawn_worker(task_type="T2V", video_bytes=64 * dr.MiB, chunk_size=dr.MiB)
    client = await router(worker.url, client_timeout=0.5)
    job = await (await client.post("/v1/videos", json={"prompt": "p"})).json()
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(f"GET /v1/videos/{job['id']}/content HTTP/1.1\r\nHost: r\r\n\r\n".encode())
    await writer.drain()
    await wait_for(lambda: worker_of(client, worker.url).active_requests == 1)
    await wait_for(lambda: worker_of(client, worker.url).active_requests == 0, timeout=10)  # never read
    writer.close()
    assert worker_of(client, worker.url).state == dr.HEALTHY  # the client's fault, not the worker's


async def test_a_client_closing_right_after_sending_is_no_router_error(spawn_worker, router, caplog):
    worker = await spawn_worker(latency=0.2)
    client = await router(worker.url)
    body = json.dumps(PROMPT).encode()
    for _ in range(3):
        reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
        writer.write(http("POST", "/generate", body, J))
        await writer.drain()
        writer.close()
    await wait_for(lambda: worker.generations() == 3 or worker_of(client, worker.url).active_requests == 0)
    await wait_for(lambda: worker_of(client, worker.url).active_requests == 0)
    metrics = await scrape(client)
    codes = {lab["code"] for n, lab, _ in metrics["diffusion_router_requests_total"]["samples"]}
    assert "500" not in codes
    assert "Traceback" not in caplog.text and "inside the router" not in caplog.text


@pytest.mark.parametrize("path", ["/add_worker", "/update_weights_from_disk", "/release_memory_occupation",
                                  "/v1/set_lora", "/workers"])
async def test_stalled_control_bodies_get_408(spawn_worker, router, path):
    worker = await spawn_worker()
    client = await router(worker.url, client_timeout=0.3)
    head = f"POST {path} HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    status, body = await raw_exchange(client, head.encode() + b"{")
    assert status == 408 and "error" in json.loads(body)


async def test_control_bodies_are_limited_to_one_mib(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(worker.url)
    big = json.dumps({"url": worker.url, "pad": "x" * (2 * dr.MiB)})
    resp = await client.post("/add_worker", data=big, headers={"Content-Type": "application/json"})
    assert resp.status == 413

    async def chunks():
        yield b'{"model_path": "/m", "pad": "'
        for _ in range(3):
            yield b"x" * dr.MiB
        yield b'"}'

    resp = await client.post("/update_weights_from_disk", data=chunks())
    assert resp.status == 413
    assert not worker.state.weight_updates


async def test_operator_quarantine_is_not_undone_by_good_probes(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(worker.url)
    worker_id = quote(worker.url, safe="")
    await client.put(f"/workers/{worker_id}", json={"quarantined": True})
    for _ in range(5):
        await health_round(client)
    assert worker_of(client, worker.url).state == dr.QUARANTINED
    await client.put(f"/workers/{worker_id}", json={"quarantined": False})
    assert worker_of(client, worker.url).state == dr.HEALTHY


async def test_worker_key_is_on_every_request_the_router_makes_itself(spawn_worker, router):
    a = await spawn_worker()
    client = await router(a.url, worker_api_key="wk")
    assert (await client.post("/update_weights_from_disk", json=UPDATE)).status == 200
    b = await spawn_worker()
    await client.post("/add_worker", json={"url": b.url})
    await settle(client)
    for seen in b.seen:
        if seen.path in ("/v1/models", "/update_weights_from_disk"):
            assert seen.headers["Authorization"] == "Bearer wk", seen.path
    assert b.state.weight_updates == [UPDATE]


async def test_removed_workers_leave_no_metric_series(spawn_worker, router):
    a, b = await spawn_worker(), await spawn_worker()
    client = await router(a.url, b.url)
    for _ in range(4):
        await client.post("/generate", json=PROMPT)
    await client.post("/remove_worker", json={"url": b.url})
    text = await (await client.get("/metrics")).text()
    assert b.url not in text and a.url in text


def test_odd_worker_list_answers_merge_without_error():
    odd = [dr.WorkerResult("w", 200, body) for body in
           ({"data": 7}, {"data": [1, "x", None]}, {"data": [{"id": ["unhashable"]}, {"id": "m"}]}, "text", None)]
    assert [len(dr.listed(r)) for r in odd] == [0, 3, 2, 0, 0]


async def test_target_worker_header_respects_syncing_and_the_update_hold(spawn_worker, router):
    a, b = await spawn_worker(), await spawn_worker(weight_update_status=500)
    client = await router(a.url, b.url)
    await client.post("/update_weights_from_disk", json=UPDATE)
    await settle(client)
    assert worker_of(client, b.url).state == dr.SYNCING
    resp = await client.post("/rollout/generate", json={"prompt": "p"}, headers={"X-Target-Worker": b.url})
    assert resp.status == 503 and "syncing" in (await resp.json())["error"]


async def test_head_of_a_download_passes_headers_only(spawn_worker, router):
    worker = await spawn_worker(task_type="T2V", video_bytes=100_000)
    client = await router(worker.url)
    job = await (await client.post("/v1/videos", json={"prompt": "p"})).json()
    resp = await client.head(f"/v1/videos/{job['id']}/content")
    assert resp.status == 200 and resp.headers["Content-Length"] == "100000"
    assert await resp.read() == b""
    resp = await client.get(f"/v1/videos/{job['id']}/content")  # the kept-alive connection is still sound
    assert resp.status == 200 and len(await resp.read()) == 100_000


async def test_a_hung_resync_does_not_hold_up_weight_updates(spawn_worker, router):
    a, b = await spawn_worker(), await spawn_worker()
    client = await router(a.url, b.url)
    assert (await client.post("/update_weights_from_disk", json=UPDATE)).status == 200
    await quarantine(client, b)
    b.behaviour.weight_update_latency = 60  # its replay will not finish during this test
    b.behaviour.health_status = 200
    for _ in range(2):
        await health_round(client)
    await wait_for(lambda: len([s for s in b.seen if s.path == "/update_weights_from_disk"]) == 2)
    assert worker_of(client, b.url).state == dr.SYNCING
    started = time.monotonic()
    resp = await client.post("/update_weights_from_disk", json={"model_path": "/ckpt/step-200"})
    assert resp.status == 200 and time.monotonic() - started < 5
    assert [r["url"] for r in (await resp.json())["results"]] == [a.url]
    assert pool_of(client).weight_version == 2
    await b.stop()  # ends the replay that would never finish


async def test_workers_whose_metadata_ignores_updates_are_not_reloaded_forever(spawn_worker, router):
    worker = await spawn_worker(report_updates=False)
    client = await router(worker.url)
    assert (await client.post("/update_weights_from_disk", json=UPDATE)).status == 200
    for _ in range(4):
        await health_round(client)
        await settle(client)
    assert len(worker.state.weight_updates) == 1
    assert worker_of(client, worker.url).state == dr.HEALTHY


async def test_a_router_listing_itself_drops_that_entry_quietly():
    port = free_port()
    own_url = f"http://127.0.0.1:{port}"
    async with router_process("--worker-urls", own_url, "--health-check-interval", "0.1",
                              "--health-check-success-threshold", "1", port=port) as proc:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 10
            while True:
                async with session.get(proc.url + "/list_workers") as resp:
                    if (await resp.json())["urls"] == []:
                        break
                assert time.monotonic() < deadline, "the router kept itself as a worker"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # a few more health rounds
        proc.proc.send_signal(signal.SIGTERM)
        assert await asyncio.get_running_loop().run_in_executor(None, proc.proc.wait, 15) == 0
        log = proc.log()
    assert "Traceback" not in log and "health round failed" not in log
    assert "it is this router, or routes back to it" in log


async def test_a_removed_workers_last_requests_add_no_series_back(spawn_worker, router):
    worker = await spawn_worker(latency=0.3)
    client = await router(worker.url)
    pending = asyncio.ensure_future(client.post("/generate", json=PROMPT))
    await wait_for(lambda: worker.generations() == 1)
    await client.post("/remove_worker", json={"url": worker.url})
    assert (await pending).status == 200
    text = await (await client.get("/metrics")).text()
    assert worker.url not in text
    assert 'worker="removed"' in text


async def test_no_background_task_starts_once_the_app_is_stopping(aiohttp_client):
    client = await aiohttp_client(dr.create_app(dr.RouterConfig(**QUIET)))
    app = client.app
    await client.close()

    async def never():
        raise AssertionError("must not run")

    coro = never()
    assert dr.spawn(app, coro) is None
    assert coro.cr_frame is None  # closed, never started


async def test_target_worker_header_refuses_a_sleeping_worker(spawn_worker, router):
    worker = await spawn_worker()
    client = await router(worker.url)
    await client.post("/release_memory_occupation", json={})
    resp = await client.post("/v1/diffusion/generate", json={"prompt": "p"}, headers={"X-Target-Worker": worker.url})
    assert resp.status == 503 and "sleeping" in (await resp.json())["error"]


async def test_a_capable_worker_that_is_only_out_for_now_gives_503_not_400(spawn_worker, router):
    image, video = await spawn_worker(task_type="T2I"), await spawn_worker(task_type="T2V")
    client = await router(image.url, video.url)
    await quarantine(client, image)
    resp = await client.post("/generate", json=PROMPT)
    assert resp.status == 503 and "image" in (await resp.json())["error"]  # retry later, not a bad request
    assert (await client.post("/generate_video", json={"prompt": "p"})).status == 200


async def test_a_worker_being_registered_takes_no_traffic(spawn_worker, router):
    a = await spawn_worker(task_type="T2I")
    b = await spawn_worker(task_type="T2V", models_delay=0.5)  # slow to say what it serves
    client = await router(a.url)
    assert (await client.post("/update_weights_from_disk", json=UPDATE)).status == 200
    adding = asyncio.ensure_future(client.post("/add_worker", json={"url": b.url}))
    await wait_for(lambda: b.url in pool_of(client).workers)
    assert not worker_of(client, b.url).available
    for _ in range(6):
        resp = await client.post("/generate", json=PROMPT)
        assert resp.status == 200 and resp.headers["X-Weight-Version"] == "1"
    assert (await adding).status == 201
    await settle(client)
    assert b.generations() == 0 and b.state.weight_updates == [UPDATE]
    assert worker_of(client, b.url).state == dr.HEALTHY and worker_of(client, b.url).task_type == "T2V"


async def test_a_wake_during_a_weight_update_waits_and_resyncs_the_sleepers(spawn_worker, router):
    a, b = await spawn_worker(weight_update_latency=0.4), await spawn_worker()
    client = await router(a.url, b.url)
    await client.session.post(b.url + "/release_memory_occupation", json={})
    worker_of(client, b.url).sleeping = True
    update = asyncio.ensure_future(client.post("/update_weights_from_disk", json=UPDATE))
    await wait_for(lambda: "/update_weights_from_disk" in a.paths())
    resp = await client.post("/resume_memory_occupation", json={})
    assert resp.status == 200 and (await update).status == 200
    await settle(client)
    assert b.state.weight_updates == [UPDATE] and worker_of(client, b.url).weight_version == 1


async def test_a_sleep_during_a_weight_update_waits_for_it(spawn_worker, router):
    a, b = await spawn_worker(weight_update_latency=0.4), await spawn_worker(weight_update_latency=0.4)
    client = await router(a.url, b.url)
    update = asyncio.ensure_future(client.post("/update_weights_from_disk", json=UPDATE))
    await wait_for(lambda: "/update_weights_from_disk" in a.paths())
    sleep = await client.post("/release_memory_occupation", json={})
    assert (await update).status == 200 and sleep.status == 200
    assert a.state.weight_updates == b.state.weight_updates == [UPDATE]
    assert a.state.sleeping and b.state.sleeping


async def test_files_made_by_a_worker_removed_mid_request_follow_its_url(spawn_worker, router):
    worker = await spawn_worker(latency=0.3)
    client = await router(worker.url)
    pending = asyncio.ensure_future(client.post("/generate", json={"prompt": "p", "response_format": "url"}))
    await wait_for(lambda: worker.generations() == 1)
    await client.post("/remove_worker", json={"url": worker.url})
    url = (await (await pending).json())["data"][0]["url"]
    resp = await client.get(url)
    assert resp.status == 410 and (await resp.json())["code"] == "job_worker_gone"
    await client.post("/add_worker", json={"url": worker.url})
    assert (await client.get(url)).status == 200  # the same worker is back, and still has the file


async def test_shutdown_takes_no_longer_than_the_shutdown_timeout(spawn_worker):
    worker = await spawn_worker(fail_mode="hang")
    async with router_process("--worker-urls", worker.url, "--shutdown-timeout", "1") as proc:
        async with aiohttp.ClientSession() as session:
            request = asyncio.ensure_future(session.post(proc.url + "/generate", json=PROMPT))
            await wait_for(lambda: worker.generations() == 1)
            started = time.monotonic()
            proc.proc.send_signal(signal.SIGTERM)
            assert await asyncio.get_running_loop().run_in_executor(None, proc.proc.wait, 15) == 0
            assert time.monotonic() - started < 1.9  # not twice the timeout
            with pytest.raises(aiohttp.ClientError):
                await request
