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
import time
from dataclasses import dataclass

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

import diffusion_router as dr
from examples.stand_in_worker import BEHAVIOUR, SEEN, STATE, WorkerBehaviour, start_worker

pytestmark = pytest.mark.asyncio

HERE = os.path.dirname(os.path.abspath(__file__))
QUIET = dict(health_check_interval=3600.0)  # health is stepped by hand, never by the clock


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
        return [s.path for s in self.seen if s.path != "/health" and (method is None or s.method == method)]

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
        return await aiohttp_client(app)

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
    assert worker.paths() == ["/v1/models"]


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


async def test_client_going_away_mid_request_releases_the_count(spawn_worker, router):
    worker = await spawn_worker(latency=0.3)
    client = await router(worker.url)
    request = asyncio.ensure_future(client.post("/generate", json=PROMPT))
    await wait_for(lambda: worker.generations() == 1)
    request.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await request
    await wait_for(lambda: worker_of(client, worker.url).active_requests == 0)


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


async def test_unreachable_only_worker_is_502_json(router):
    url = dead_url()
    client = await router(url, retries=0)
    resp = await client.post("/generate", json=PROMPT)
    assert resp.status == 502
    assert url in (await resp.json())["error"]


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
    (["--routing-algorithm", "fastest"], {}, "--routing-algorithm"),
    (["--worker-urls", "ftp://gpu1"], {}, "--worker-urls"),
    (["--max-connections", "0"], {}, "--max-connections"),
    ([], {"DIFFUSION_ROUTER_TIMEOUT": "soon"}, "--timeout"),
])
def test_cli_bad_values_are_one_line_errors(args, env, word):
    result = run_cli(*args, env=env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error:") and word in result.stderr
    assert "Traceback" not in result.stderr


@dataclass
class RouterProcess:
    proc: subprocess.Popen
    url: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def router_process(*args: str, env: dict | None = None):
    """Run the router as a real process on a free port; stop it however the test ends."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "diffusion_router.py"), "--host", "127.0.0.1", *args],
        env={**os.environ, "DIFFUSION_ROUTER_PORT": str(port), **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 20
            while True:
                assert proc.poll() is None, proc.stdout.read()
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(url + "/list_workers") as resp:
                        if resp.status == 200:
                            break
                assert time.monotonic() < deadline, "router did not start"
                await asyncio.sleep(0.05)
        yield RouterProcess(proc, url)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()


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
