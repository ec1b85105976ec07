"""Load-balance image and video generation requests across sglang-diffusion workers.

One file, two dependencies (aiohttp, click). Copy it onto a GPU node and run::

    python diffusion_router.py --worker-urls http://gpu1:10090 http://gpu2:10090

Endpoints of the router itself (everything else is forwarded to a worker):

    POST /generate                    -> a worker's POST /v1/images/generations
    POST /generate_video              -> a worker's POST /v1/videos (async job)
    GET  /health                      router health (200 with >= 1 healthy worker, else 503)
    GET  /health_workers              per-worker state, load and last health error
    POST /add_worker                  register a worker (?url= / ?worker_url= / {"url": ...})
    POST /remove_worker               unregister a worker; in-flight requests finish
    GET  /list_workers                {"urls": [...]}
    POST|GET /workers, GET|PUT|DELETE /workers/{worker_id}    REST form of the above
    POST /update_weights_from_disk    broadcast to every available worker, resync the others
    POST /release_memory_occupation   sleep every worker;  POST /resume_memory_occupation  wake
    POST /v1/set_lora, /v1/merge_lora_weights, /v1/unmerge_lora_weights   broadcast
    POST /get_weights_checksum        ask every worker, say whether they agree
    GET  /v1/models                   models of every available worker, merged
    GET  /v1/videos                   video jobs of every worker, merged
    GET|DELETE /v1/videos/{id}[/content], GET /v1/images/{id}/content   sent to the owner
    GET  /metrics                     Prometheus metrics;   GET / or /dashboard   status page
    *    /{path}                      any other request -> the chosen worker, same path and query
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import errno
import hmac
import html
import io
import ipaddress
import itertools
import json
import logging
import os
import random
import re
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import click
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

__version__ = "0.1.0"

log = logging.getLogger("diffusion_router")

MiB = 1 << 20
HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?)*")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterConfig:
    """Every setting of the router, with its default."""

    host: str = "0.0.0.0"
    port: int = 30080
    worker_urls: tuple[str, ...] = ()
    max_connections: int = 100
    timeout: float | None = None  # a worker's queue may hold a request for minutes: wait by default
    connect_timeout: float = 5.0
    retries: int = 2
    health_check_interval: float = 10.0
    health_check_timeout: float = 5.0
    health_check_failure_threshold: int = 3
    health_check_success_threshold: int = 2
    auto_recover: bool = True
    routing_algorithm: str = "least-request"
    max_request_size: int = 256 * MiB
    max_tracked_jobs: int = 100_000
    shutdown_timeout: float = 30.0
    api_key: str | None = None  # needed by every request but GET /health
    admin_api_key: str | None = None  # needed by everything that changes the router or the workers
    worker_api_key: str | None = None  # bearer token the router sends to workers
    allowed_worker_hosts: tuple[str, ...] = ()  # host names, IPs or CIDR ranges; empty: any
    client_timeout: float = 60.0  # a client that sends no body bytes for this long is cut off
    max_concurrent_requests: int = 8192  # beyond this, new requests get 503 instead of exhausting fds
    verbose: bool = False

    @property
    def keys_required(self) -> bool:
        return bool(self.api_key or self.admin_api_key)

    def allowed_hosts(self) -> tuple[Any, ...]:
        """Return --allowed-worker-hosts parsed into names and networks; ValueError names a bad entry."""
        parsed: list[Any] = []
        for entry in self.allowed_worker_hosts:
            try:
                parsed.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = entry.lower().rstrip(".")
            if "/" in entry or ":" in entry or not HOST_NAME.fullmatch(name) or name.replace(".", "").isdigit():
                raise ValueError(f"{entry!r} is neither a host name, an IP address nor a CIDR range")
            parsed.append(name)
        return tuple(parsed)


# --------------------------------------------------------------------------------------------
# Worker pool
# --------------------------------------------------------------------------------------------

HEALTHY, QUARANTINED, SYNCING = "healthy", "quarantined", "syncing"

IMAGE, VIDEO = "image", "video"
TASK_KINDS = {
    **dict.fromkeys(("T2I", "I2I", "TI2I"), IMAGE),
    **dict.fromkeys(("T2V", "I2V", "TI2V", "V2V", "F2V"), VIDEO),
}


class WorkerURLError(ValueError):
    """A worker URL that cannot be registered."""


# Names and addresses that reach a cloud provider's instance metadata service, never a worker.
METADATA_HOSTS = frozenset({
    "metadata", "metadata.google.internal", "metadata.goog", "instance-data",
    "instance-data.ec2.internal", "metadata.azure.com", "metadata.packet.net",
    "metadata.platformequinix.com", "metadata.tencentyun.com", "100.100.100.200",
})
METADATA_NETWORKS = (
    ipaddress.ip_network("169.254.0.0/16"),  # IPv4 link-local, home of 169.254.169.254
    ipaddress.ip_network("fe80::/10"),  # IPv6 link-local
    ipaddress.ip_network("fd00:ec2::/32"),  # AWS IMDS over IPv6
    ipaddress.ip_network("100.100.100.200/32"),  # Alibaba Cloud metadata
)


EMBEDDED_IPV4_NETWORKS = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "::ffff:0:0:0/96", "::/96"))


def parse_host_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Return the IP a host literal denotes, decimal, octal and hex IPv4 forms included."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        try:  # inet_aton reads the legacy forms curl and browsers accept: 2852039166, 0xa9fea9fe
            addr = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


def is_metadata_address(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Tell whether an address is link-local or a metadata service, also inside NAT64/SIIT forms."""
    candidates = [addr]
    if isinstance(addr, ipaddress.IPv6Address) and any(addr in net for net in EMBEDDED_IPV4_NETWORKS):
        candidates.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    return any(a in net for a in candidates for net in METADATA_NETWORKS if a.version == net.version)


def normalize_worker_url(raw: Any, allowed_hosts: Sequence[Any] = ()) -> str:
    """Return the canonical form of a worker URL, or raise WorkerURLError saying what is wrong."""
    if not isinstance(raw, str) or not raw.strip():
        raise WorkerURLError("worker url must be a non-empty string")
    raw = raw.strip()
    if len(raw) > 2048 or any(c.isspace() or ord(c) < 32 for c in raw):
        raise WorkerURLError("worker url is too long or contains whitespace or control characters")
    try:
        url = URL(raw)
        host = url.host
    except (ValueError, TypeError, UnicodeError) as exc:
        raise WorkerURLError(f"invalid worker url {raw!r}: {exc}") from None
    scheme = (url.scheme or "").lower()
    if scheme not in ("http", "https"):
        raise WorkerURLError(f"worker url {raw!r} must start with http:// or https://")
    if not host:
        raise WorkerURLError(f"worker url {raw!r} has no host")
    if url.user is not None or url.password is not None:
        raise WorkerURLError(f"worker url {raw!r} must not carry credentials")
    if url.raw_path not in ("", "/") or url.raw_query_string or url.raw_fragment or raw.endswith(("?", "#")):
        raise WorkerURLError(f"worker url {raw!r} must not have a path, query or fragment")
    try:
        port = url.port
    except ValueError as exc:
        raise WorkerURLError(f"worker url {raw!r} has an invalid port: {exc}") from None
    host = host.lower().rstrip(".")
    addr = parse_host_address(host)
    if host in METADATA_HOSTS or (addr is not None and is_metadata_address(addr)):
        raise WorkerURLError(f"worker url {raw!r} points at a link-local or cloud metadata address")
    if allowed_hosts and not host_allowed(host, addr, allowed_hosts):
        raise WorkerURLError(f"worker host {host!r} is not in --allowed-worker-hosts")
    default_port = 443 if scheme == "https" else 80
    try:
        return str(URL.build(scheme=scheme, host=host, port=None if port == default_port else port))
    except (ValueError, UnicodeError) as exc:
        raise WorkerURLError(f"worker url {raw!r} has an invalid host: {exc}") from None


def host_allowed(host: str, addr: Any, allowed: Sequence[Any]) -> bool:
    """Tell whether a host matches one of the allowed names, addresses or networks."""
    for entry in allowed:
        if isinstance(entry, str):
            if host == entry:
                return True
        elif addr is not None and addr.version == entry.version and addr in entry:
            return True
    return False


@dataclass(eq=False)
class Worker:
    """One upstream worker: its address, its state and its load."""

    url: str
    state: str = HEALTHY
    sleeping: bool = False
    task_type: str | None = None
    startup_model_path: str | None = None  # what it reports when it holds none of our updates
    path_after_update: str | None = None  # what it reported right after our last update reached it
    weight_version: int = 0
    active_requests: int = 0
    last_picked: int = 0
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    last_error: str | None = None
    last_checked: float | None = None
    out_reason: str | None = None
    held: bool = False  # quarantined by an operator: probes do not bring it back
    registering: bool = False  # its capabilities are being read: probes leave its state alone
    served: bool = False  # has been in the pool before (so coming back counts as a recovery)
    removed: bool = False

    @property
    def available(self) -> bool:
        """Tell whether the worker may take new generation requests."""
        return self.state == HEALTHY and not self.sleeping and not self.removed

    @property
    def reachable(self) -> bool:
        """Tell whether the worker may be asked for something it already holds (jobs, files)."""
        return self.state != QUARANTINED and not self.removed

    def serves(self, kind: str | None) -> bool:
        """Tell whether the worker's model can serve an image or video request."""
        worker_kind = TASK_KINDS.get(self.task_type or "")
        return kind is None or self.task_type is None or worker_kind == kind

    @property
    def display_state(self) -> str:
        return "sleeping" if self.sleeping and self.state == HEALTHY else self.state

    def describe(self) -> dict[str, Any]:
        """Return the worker as /health_workers shows it."""
        return {
            "url": self.url,
            "state": self.display_state,
            "available": self.available,
            "quarantined": self.state == QUARANTINED,
            "sleeping": self.sleeping,
            "active_requests": self.active_requests,
            "consecutive_failures": self.consecutive_failures,
            "consecutive_successes": self.consecutive_successes,
            "weight_version": self.weight_version,
            "task_type": self.task_type,
            "out_reason": self.out_reason,
            "last_error": self.last_error,
            "last_checked": self.last_checked,
        }


@dataclass
class WeightUpdate:
    """The body of the last weight update that succeeded, replayed to workers that missed it."""

    version: int
    body: bytes
    content_type: str
    model_path: str | None


class WorkerPool:
    """The registered workers, their leases, the job ids they own and the weights they hold."""

    def __init__(self, config: RouterConfig, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self.workers: dict[str, Worker] = {}
        self.policy = POLICIES[config.routing_algorithm]()
        self.pick_counter = itertools.count(1)
        self.job_owner: collections.OrderedDict[str, Worker] = collections.OrderedDict()
        self.orphaned_jobs: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.weights: WeightUpdate | None = None
        self.weight_lock = asyncio.Lock()
        self.updates_idle = asyncio.Event()
        self.updates_idle.set()

    @property
    def weight_version(self) -> int:
        return self.weights.version if self.weights else 0

    # registration ---------------------------------------------------------------------------

    def add(self, url: str) -> tuple[Worker, bool]:
        """Register a normalised URL; return its worker and whether it is new."""
        worker = self.workers.get(url)
        if worker is not None:
            return worker, False
        worker = self.workers[url] = Worker(url=url)  # version 0: it holds none of our updates
        log.info("worker %s added", url)
        return worker, True

    def remove(self, url: str) -> Worker | None:
        """Unregister a worker; its in-flight requests finish, its job ids are forgotten."""
        worker = self.workers.pop(url, None)
        if worker is None:
            return None
        worker.removed = True
        self.metrics.forget_worker(url)
        for job_id in [j for j, owner in self.job_owner.items() if owner is worker]:
            del self.job_owner[job_id]
            self.remember_orphan(job_id, url)
        log.info("worker %s removed (%d requests still in flight)", url, worker.active_requests)
        return worker

    def by_url(self, url: str) -> Worker | None:
        return self.workers.get(url)

    def available(self, kind: str | None = None) -> list[Worker]:
        """Return the workers that may take a new request of this kind."""
        return [w for w in self.workers.values() if w.available and w.serves(kind)]

    def reachable(self) -> list[Worker]:
        """Return the workers that may be asked about what they hold (not quarantined)."""
        return [w for w in self.workers.values() if w.reachable]

    # selection and leases -------------------------------------------------------------------

    def pick(self, kind: str | None, exclude: Sequence[Worker] = ()) -> Worker | None:
        """Choose a worker for a new request with the configured policy, or None."""
        candidates = self.available(kind)
        if exclude:
            candidates = [w for w in candidates if w not in exclude]
        return self.policy(candidates) if candidates else None

    @contextlib.contextmanager
    def lease(self, worker: Worker):
        """Count one in-flight request on the worker for as long as the block runs."""
        worker.active_requests += 1
        worker.last_picked = next(self.pick_counter)
        try:
            yield worker
        finally:
            worker.active_requests -= 1
            if worker.active_requests < 0:  # a bug, never clamp it away
                log.error("worker %s in-flight count went negative", worker.url)
                raise AssertionError(f"in-flight count of {worker.url} went negative")

    # health bookkeeping (probes and proxied requests both record here) -----------------------

    def record_success(self, worker: Worker) -> bool:
        """Note a good probe; return True when a quarantined worker may now come back."""
        worker.consecutive_failures = 0
        worker.last_error = None
        worker.last_checked = time.time()
        if worker.state != QUARANTINED:
            return False
        worker.consecutive_successes += 1
        return (self.config.auto_recover and not worker.held
                and worker.consecutive_successes >= self.config.health_check_success_threshold)

    def record_failure(self, worker: Worker, reason: str, *, fatal: bool = False) -> None:
        """Note a failed probe or unreachable worker; quarantine it at the threshold."""
        if worker.removed:
            return
        worker.consecutive_failures += 1
        worker.consecutive_successes = 0
        worker.last_error = reason
        worker.last_checked = time.time()
        threshold = self.config.health_check_failure_threshold
        if worker.state != QUARANTINED and (fatal or worker.consecutive_failures >= threshold):
            self.set_state(worker, QUARANTINED, reason)

    def hold(self, worker: Worker, reason: str) -> None:
        """Quarantine a worker until an operator lets it back; good probes do not."""
        if worker.state != QUARANTINED:
            self.set_state(worker, QUARANTINED, reason)
            worker.held = True

    def set_state(self, worker: Worker, state: str, reason: str | None = None) -> None:
        """Move a worker to a state, logging only real changes."""
        if worker.state != state:
            log.log(logging.WARNING if state == QUARANTINED else logging.INFO, "worker %s %s -> %s%s",
                    worker.url, worker.state, state, f": {reason}" if reason else "")
            if state == HEALTHY and worker.served:
                self.metrics.inc("recoveries_total", worker.url)
            elif state == QUARANTINED:
                self.metrics.inc("quarantines_total", worker.url)
        worker.state = state
        worker.out_reason = reason
        worker.served = worker.served or state == HEALTHY
        if state != QUARANTINED:
            worker.consecutive_successes = 0

    # sticky job ids -------------------------------------------------------------------------

    def remember_jobs(self, worker: Worker, job_ids: Iterable[str]) -> None:
        """Record which worker owns each job or file id, dropping the oldest past the bound."""
        for job_id in job_ids:
            if worker.removed:  # its answer arrived after it was removed
                self.remember_orphan(job_id, worker.url)
                continue
            if self.job_owner.setdefault(job_id, worker) is not worker:  # the first owner keeps its id
                continue
            self.job_owner.move_to_end(job_id)
            self.orphaned_jobs.pop(job_id, None)
        while len(self.job_owner) > self.config.max_tracked_jobs:
            self.job_owner.popitem(last=False)

    def remember_orphan(self, job_id: str, url: str) -> None:
        self.orphaned_jobs[job_id] = url
        while len(self.orphaned_jobs) > self.config.max_tracked_jobs:
            self.orphaned_jobs.popitem(last=False)

    def forget_job(self, job_id: str) -> None:
        self.job_owner.pop(job_id, None)


# --------------------------------------------------------------------------------------------
# Selection policies: each takes the non-empty candidate list and returns one worker
# --------------------------------------------------------------------------------------------

Policy = Callable[[Sequence[Worker]], Worker]


def least_request() -> Policy:
    """Pick the worker with the fewest in-flight requests; ties go to the least recently picked."""
    return lambda candidates: min(candidates, key=lambda w: (w.active_requests, w.last_picked))


def round_robin() -> Policy:
    """Pick the candidates in turn."""
    counter = itertools.count()
    return lambda candidates: candidates[next(counter) % len(candidates)]


def random_choice() -> Policy:
    """Pick a candidate uniformly at random."""
    return random.choice


POLICIES: dict[str, Callable[[], Policy]] = {
    "least-request": least_request,
    "round-robin": round_robin,
    "random": random_choice,
}


# --------------------------------------------------------------------------------------------
# Metrics: Prometheus text exposition format 0.0.4, no dependency
# --------------------------------------------------------------------------------------------

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# name -> (type, help, label names); gauges of the pool are computed at scrape time instead.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "requests_total": ("counter", "Requests answered, by route, worker and status code.", ("route", "worker", "code")),
    "request_duration_seconds": ("histogram", "Time to answer a request, by route.", ("route",)),
    "received_bytes_total": ("counter", "Request body bytes received from clients.", ("route",)),
    "sent_bytes_total": ("counter", "Response body bytes sent to clients.", ("route",)),
    "health_probe_failures_total": ("counter", "Failed health probes, by worker.", ("worker",)),
    "retries_total": ("counter", "Requests sent to another worker after a worker could not be reached.", ("route",)),
    "failovers_total": ("counter", "Requests moved off a worker that could not be reached, by worker.", ("worker",)),
    "quarantines_total": ("counter", "Workers taken out of the pool, by worker.", ("worker",)),
    "recoveries_total": ("counter", "Workers returned to the pool, by worker.", ("worker",)),
    "weight_updates_total": ("counter", "Weight update broadcasts, by result.", ("result",)),
    "weight_update_duration_seconds": ("histogram", "Time to broadcast a weight update.", ()),
}


def escape_label(value: str) -> str:
    """Escape a label value as the exposition format requires."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{escape_label(str(v))}"' for n, v in zip(names, values)) + "}"


class Histogram:
    """Cumulative-bucket histogram of one label set."""

    __slots__ = ("counts", "total", "count")

    def __init__(self) -> None:
        self.counts = [0] * len(DURATION_BUCKETS)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(DURATION_BUCKETS, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += value
        self.count += 1


class Metrics:
    """Counters and histograms keyed by label values; rendered on scrape."""

    def __init__(self) -> None:
        self.values: dict[str, dict[tuple[str, ...], Any]] = {name: {} for name in METRICS}
        self.requests = 0
        self.errors = 0

    def inc(self, name: str, *labels: str, value: float = 1) -> None:
        series = self.values[name]
        series[labels] = series.get(labels, 0) + value

    def observe(self, name: str, value: float, *labels: str) -> None:
        series = self.values[name]
        histogram = series.get(labels)
        if histogram is None:
            histogram = series[labels] = Histogram()
        histogram.observe(value)

    def forget_worker(self, url: str) -> None:
        """Drop every series labelled with a removed worker, so churn cannot grow the scrape forever."""
        for name, (_, _, label_names) in METRICS.items():
            if "worker" in label_names:
                position = label_names.index("worker")
                series = self.values[name]
                for labels in [labels for labels in series if labels[position] == url]:
                    del series[labels]

    def record_request(self, route: str, worker: str, status: int, seconds: float, received: int, sent: int) -> None:
        """Count one answered request."""
        self.requests += 1
        if status >= 500:
            self.errors += 1
        self.inc("requests_total", route, worker, str(status))
        self.observe("request_duration_seconds", seconds, route)
        if received:
            self.inc("received_bytes_total", route, value=received)
        if sent:
            self.inc("sent_bytes_total", route, value=sent)

    def render(self, pool: WorkerPool) -> str:
        """Return every metric in the text exposition format."""
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP diffusion_router_{name} {help_text}")
            lines.append(f"# TYPE diffusion_router_{name} {kind}")

        workers = list(pool.workers.values())
        family("worker_active_requests", "gauge", "Requests in flight, by worker.")
        lines += [f"diffusion_router_worker_active_requests{format_labels(('worker',), (w.url,))} {w.active_requests}"
                  for w in workers]
        family("worker_state", "gauge", "1 for the state each worker is in, by worker and state.")
        for w in workers:
            for state in ("healthy", "quarantined", "syncing", "sleeping"):
                value = int(w.display_state == state)
                labels = format_labels(("worker", "state"), (w.url, state))
                lines.append(f"diffusion_router_worker_state{labels} {value}")
        family("worker_weight_version", "gauge", "Weight version each worker holds.")
        lines += [f"diffusion_router_worker_weight_version{format_labels(('worker',), (w.url,))} {w.weight_version}"
                  for w in workers]
        family("weight_version", "gauge", "Weight version of the last successful update.")
        lines.append(f"diffusion_router_weight_version {pool.weight_version}")
        family("tracked_jobs", "gauge", "Job and file ids remembered for sticky routing.")
        lines.append(f"diffusion_router_tracked_jobs {len(pool.job_owner)}")
        for name, (kind, help_text, label_names) in METRICS.items():
            family(name, kind, help_text)
            for labels, value in self.values[name].items():
                if kind != "histogram":
                    lines.append(f"diffusion_router_{name}{format_labels(label_names, labels)} {value}")
                    continue
                cumulative = 0
                for bound, count in zip(DURATION_BUCKETS, value.counts):
                    cumulative += count
                    le = format_labels((*label_names, "le"), (*labels, repr(bound)))
                    lines.append(f"diffusion_router_{name}_bucket{le} {cumulative}")
                inf = format_labels((*label_names, "le"), (*labels, "+Inf"))
                lines.append(f"diffusion_router_{name}_bucket{inf} {value.count}")
                lines.append(f"diffusion_router_{name}_sum{format_labels(label_names, labels)} {value.total}")
                lines.append(f"diffusion_router_{name}_count{format_labels(label_names, labels)} {value.count}")
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Forwarding
# --------------------------------------------------------------------------------------------

CONFIG = web.AppKey("config", RouterConfig)
POOL = web.AppKey("pool", WorkerPool)
REQUEST_DROP_KEY = web.AppKey("request_drop", frozenset)
ALLOWED_HOSTS = web.AppKey("allowed_hosts", tuple)
WORKER_HEADERS = web.AppKey("worker_headers", dict)  # Via, and the worker key: on every request to workers
VIA = web.AppKey("via", str)
ACTIVE = web.AppKey("active", set)
# Per-request values; web.RequestKey where this aiohttp has it (3.13+), plain names before.
RequestKey = getattr(web, "RequestKey", lambda name, kind: f"diffusion_router.{name}")
REQUEST_ID = RequestKey("request_id", str)
WORKER_LABEL = RequestKey("worker", str)
RECEIVED = RequestKey("received", int)
CONTROL_BODY = RequestKey("control_body", bytes)
SESSION = web.AppKey("session", aiohttp.ClientSession)
PROBE_SESSION = web.AppKey("probe_session", aiohttp.ClientSession)
TASKS = web.AppKey("tasks", set)
STOPPING = web.AppKey("stopping", asyncio.Event)

# RFC 9110 section 7.6.1: connection-specific headers never travel past one hop.
HOP_BY_HOP = frozenset({
    "connection", "proxy-connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
# aiohttp sets these for the new hop itself.
REQUEST_DROP = HOP_BY_HOP | {"host", "content-length"}
RESPONSE_DROP = HOP_BY_HOP | {"content-length"}

FORWARDED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
SMALL_BODY = 256 * 1024  # bodies up to this size are read whole: one write, and retries stay possible
SMALL_RESPONSE = 256 * 1024
READ_CHUNK = 256 * 1024

# Failures where nothing reached the worker: safe to send the request to another one.
DIAL_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


async def within(seconds: float, awaitable: Any) -> Any:
    """Await with a deadline (asyncio.TimeoutError past it), without a task per call where Python allows."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


class ProxyError(Exception):
    """A failure the router answers itself with a JSON error."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# Worker routes of the contract that get a metrics label of their own; any other path is "other".
KNOWN_WORKER_PATHS = frozenset({
    "/health_generate", "/models", "/server_info", "/model_info", "/stats", "/v1/model_info", "/v1/list_loras",
    "/v1/diffusion/generate", "/rollout/generate", "/update_weights_from_tensor",
    "/update_weights_from_tensor_checker", "/vertex_generate", "/v1/meshes",
})
CATCH_ALL = "/{tail}"
BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def route_label(request: web.Request) -> str:
    """Return a bounded-cardinality name for the route a request took."""
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else "other"
    if canonical == CATCH_ALL:
        return request.path if request.path in KNOWN_WORKER_PATHS else "other"
    return canonical


def json_error(status: int, message: str, *, headers: dict[str, str] | None = None, **extra: Any) -> web.Response:
    """Return the router's own error response."""
    return web.json_response({"error": message, **extra}, status=status, headers=headers)


def filter_headers(headers: CIMultiDictProxy[str] | CIMultiDict[str], drop: frozenset[str]) -> CIMultiDict[str]:
    """Copy headers without hop-by-hop ones, nor any header the Connection header names."""
    copy = CIMultiDict(headers)  # one C-level copy, then a few C-level deletions
    connection = copy.get("Connection")
    if connection:
        drop = drop | {name.strip().lower() for name in connection.split(",")}
    for name in drop:
        if name in copy:
            del copy[name]  # every occurrence
    return copy


def upstream_headers(request: web.Request) -> CIMultiDict[str]:
    """Return the headers to send to a worker: the client's, minus hop-by-hop, plus X-Forwarded-*."""
    app = request.app
    headers = filter_headers(request.headers, app[REQUEST_DROP_KEY])
    via = headers.get("Via")
    headers.update(app[WORKER_HEADERS])
    if via:
        headers["Via"] = f"{via}, {app[VIA]}"  # RFC 9110 section 7.6.3: append, never replace
    headers["X-Request-ID"] = request[REQUEST_ID]
    peer = request.remote or ""
    prior = headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    headers.setdefault("X-Forwarded-Proto", request.scheme)
    if request.host:
        headers.setdefault("X-Forwarded-Host", request.host)
    return headers


class RequestBody:
    """The client's request body: bytes when small, else a stream that can be sent once."""

    def __init__(self, request: web.Request, data: bytes | None, limit: int, client_timeout: float):
        self.request = request
        self.data = data
        self.limit = limit
        self.client_timeout = client_timeout
        self.started = False
        self.failure: ProxyError | None = None  # why the client's side of a streamed body failed

    @classmethod
    async def read(cls, request: web.Request, config: RouterConfig) -> RequestBody:
        """Read a small body whole; leave a large or unsized one to be streamed."""
        limit, client_timeout = config.max_request_size, config.client_timeout
        length = request.content_length
        if length is not None and length > limit:
            raise ProxyError(413, f"request body of {length} bytes exceeds the limit of {limit} bytes")
        if not request.body_exists:
            return cls(request, None, limit, client_timeout)
        if length is not None and length <= SMALL_BODY:
            try:
                # Usually the whole body came with the headers: then there is nothing to wait for.
                data = await (request.read() if request.content.is_eof() else within(client_timeout, request.read()))
            except asyncio.TimeoutError:
                raise ProxyError(408, f"request body not received within {client_timeout:g} s") from None
            request[RECEIVED] = len(data)
            return cls(request, data, limit, client_timeout)
        return cls(request, None, limit, client_timeout)

    @property
    def retryable(self) -> bool:
        """Tell whether the body can still be sent to another worker."""
        return self.data is not None or not self.started

    def payload(self) -> Any:
        """Return what to pass as the client request's data."""
        if self.data is not None or not self.request.body_exists:
            return self.data
        return self._stream()

    async def _stream(self):
        self.started = True
        content, received = self.request.content, 0
        try:
            while True:
                chunk = await within(self.client_timeout, content.readany())
                if not chunk:
                    break
                received += len(chunk)
                if received > self.limit:
                    raise ProxyError(413, f"request body exceeds the limit of {self.limit} bytes")
                self.request[RECEIVED] = received
                yield chunk
        except asyncio.TimeoutError:
            self.failure = ProxyError(408, f"client sent no body bytes for {self.client_timeout:g} s")
            raise
        except ProxyError as exc:
            self.failure = exc
            raise
        except (OSError, aiohttp.ClientError, web.HTTPException) as exc:  # the client broke off its upload
            self.failure = ProxyError(400, f"client request body broken off: {exc.__class__.__name__}")
            raise


def worker_url(worker: Worker, path_qs: str) -> URL:
    return URL(worker.url + path_qs, encoded=True)


async def proxy(
    request: web.Request,
    *,
    path_qs: str | None = None,
    kind: str | None = None,
    worker: Worker | None = None,
    hold: bool = True,
    on_response: Callable[[WorkerPool, Worker, bytes], None] | None = None,
) -> web.StreamResponse:
    """Forward a request to one worker (chosen, or the one given) and stream the answer back.

    With hold, the request waits while a weight update is being broadcast.
    """
    app = request.app
    config, pool = app[CONFIG], app[POOL]
    if request.method not in FORWARDED_METHODS:
        return json_error(405, f"method {request.method} is not supported")
    try:
        body = await RequestBody.read(request, config)
    except ProxyError as exc:
        return json_error(exc.status, exc.message)
    if path_qs is None:
        path_qs = request.rel_url.raw_path_qs
    if hold and not pool.updates_idle.is_set():
        await pool.updates_idle.wait()  # hold new work until a weight update has reached every worker
    tried: list[Worker] = []
    last_error = "no worker available"
    for _ in range(config.retries + 1):
        target = worker or pool.pick(kind, exclude=tried)
        if target is None:
            break
        if tried:
            pool.metrics.inc("retries_total", route_label(request))
            if not tried[-1].removed:
                pool.metrics.inc("failovers_total", tried[-1].url)
        tried.append(target)
        request[WORKER_LABEL] = target.url
        with pool.lease(target):
            try:
                return await forward(request, target, path_qs, body, on_response)
            except DIAL_ERRORS as exc:
                if out_of_descriptors(exc):
                    log.error("out of file descriptors: refusing %s %s", request.method, path_qs)
                    return json_error(503, "router is out of file descriptors; try again later")
                last_error = f"worker {target.url} unreachable: {describe(exc)}"
                log.warning("%s %s: %s", request.method, path_qs, last_error)
                pool.record_failure(target, last_error, fatal=is_refused(exc))
                if worker is not None or not body.retryable:
                    return json_error(502, last_error)
            except ProxyError as exc:
                return json_error(exc.status, exc.message)
    if tried:
        return json_error(502, last_error)
    return no_worker_error(pool, kind)


def out_of_descriptors(exc: BaseException) -> bool:
    """Tell whether a client error is the router running out of file descriptors, not the worker failing."""
    os_error = getattr(exc, "os_error", None) or exc.__cause__ or exc.__context__
    return isinstance(os_error, OSError) and os_error.errno in (errno.EMFILE, errno.ENFILE)


def is_refused(exc: BaseException) -> bool:
    """Tell whether a dial error means nothing serves there: the port is closed or the name is unknown."""
    return isinstance(exc, aiohttp.ClientConnectorDNSError) or isinstance(
        getattr(exc, "os_error", None), ConnectionRefusedError)


def describe(exc: BaseException) -> str:
    """Return a short, one-line account of a client error for logs and /health_workers."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


def no_worker_error(pool: WorkerPool, kind: str | None) -> web.Response:
    """Explain why no worker can take a request: 400 only when no registered worker ever could."""
    registered = list(pool.workers.values())
    if kind is not None and registered and not any(w.serves(kind) for w in registered):
        types = sorted({w.task_type or "unknown" for w in registered})
        return json_error(400, f"no worker can serve {kind} requests (worker task types: {', '.join(types)})")
    live = [w for w in registered if w.state == HEALTHY and w.serves(kind)]
    if live and all(w.sleeping for w in live):
        return json_error(503, "every worker is asleep; POST /resume_memory_occupation to wake them")
    return json_error(503, "no available worker" + (f" for {kind} requests" if kind and registered else ""))


async def forward(
    request: web.Request,
    worker: Worker,
    path_qs: str,
    body: RequestBody,
    on_response: Callable[[WorkerPool, Worker, bytes], None] | None,
) -> web.StreamResponse:
    """Send one request to one worker and relay its answer; raise DIAL_ERRORS if it was not sent."""
    pool = request.app[POOL]
    headers = upstream_headers(request)
    if body.data is None and request.content_length is not None:
        headers["Content-Length"] = str(request.content_length)  # stream with the client's framing
    version = worker.weight_version
    try:
        upstream = await request.app[SESSION].request(
            request.method,
            worker_url(worker, path_qs),
            headers=headers,
            data=body.payload(),
            allow_redirects=False,  # a redirect is the client's to follow, not ours
        )
    except DIAL_ERRORS:
        raise
    except (aiohttp.ClientError, ProxyError, OSError, asyncio.TimeoutError) as exc:
        if body.failure is not None:  # the client's fault, not the worker's
            raise body.failure from None
        if isinstance(exc, ProxyError):
            raise
        if isinstance(exc, asyncio.TimeoutError):
            log.warning("worker %s timed out on %s %s: %r", worker.url, request.method, path_qs, exc)
            raise ProxyError(504, f"worker {worker.url} timed out") from None
        log.warning("worker %s failed on %s %s: %r", worker.url, request.method, path_qs, exc)
        pool.record_failure(worker, f"request failed: {describe(exc)}")
        raise ProxyError(502, f"worker {worker.url} failed: {exc.__class__.__name__}") from None
    async with upstream:
        return await relay(request, upstream, worker, version, on_response)


async def relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    worker: Worker,
    version: int,
    on_response: Callable[[WorkerPool, Worker, bytes], None] | None,
) -> web.StreamResponse:
    """Copy the worker's answer to the client: whole when small, streamed otherwise."""
    if upstream.status == 508 and upstream.headers.get(LOOP_HEADER):  # it sent the request back to us
        pool = request.app[POOL]
        pool.hold(worker, "routes requests back to this router (a routing loop)")
    elif upstream.status < 200:  # 1xx (or nonsense) as a final answer: nothing a client can use
        request.app[POOL].record_failure(worker, f"invalid status {upstream.status}")
        return json_error(502, f"worker {worker.url} answered with status {upstream.status}")
    headers = filter_headers(upstream.headers, RESPONSE_DROP)
    headers["X-Weight-Version"] = str(version)
    length = upstream.content_length
    if length is not None and length <= SMALL_RESPONSE and request.method != "HEAD":
        try:
            data = await upstream.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return broken_before_headers(request, worker, exc)
        if on_response is not None and 200 <= upstream.status < 300:
            on_response(request.app[POOL], worker, data)  # small answers only: ids live in job records
        response = web.Response(status=upstream.status, reason=upstream.reason, body=data, headers=headers)
        if len(data) > TRANSPORT_BUFFER:  # the write may wait for the client: send it here, with a deadline
            await send_within(request, response)
        return response
    if length is not None:
        headers["Content-Length"] = str(length)
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    await response.prepare(request)
    client_timeout = request.app[CONFIG].client_timeout
    try:
        async for chunk in upstream.content.iter_any():
            try:  # a client that stops reading must not hold a worker connection forever
                await within(client_timeout, response.write(chunk))
            except asyncio.TimeoutError:
                raise ClientGone(f"client read nothing for {client_timeout:g} s") from None
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError, ConnectionError,
            ClientGone) as exc:
        if isinstance(exc, (ConnectionError, ClientGone)):  # the client went away: nothing left to tell it
            log.info("client left during %s %s from %s: %s", request.method, request.path, worker.url,
                     describe(exc))
        else:
            log.warning("worker %s broke off %s %s: %r", worker.url, request.method, request.path, exc)
            request.app[POOL].record_failure(worker, f"broken response: {describe(exc)}")
        # Too late for an error response: cut the connection so the client sees a short transfer.
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response


TRANSPORT_BUFFER = 64 * 1024  # what the server buffers before a write waits for the client to read


async def send_within(request: web.Request, response: web.Response) -> None:
    """Send a whole response now, cutting off a client that reads nothing for --client-timeout."""
    timeout = request.app[CONFIG].client_timeout
    try:
        await within(timeout, response.prepare(request))
        await within(timeout, response.write_eof())
    except asyncio.TimeoutError:
        log.info("client stopped reading %s %s for %g s: connection closed", request.method, request.path, timeout)
        if request.transport is not None:
            request.transport.abort()


class ClientGone(Exception):
    """The client stopped reading or went away while its answer was being sent."""


def broken_before_headers(request: web.Request, worker: Worker, exc: BaseException) -> web.Response:
    """Answer a worker that broke off before the router sent any of its response."""
    if isinstance(exc, asyncio.TimeoutError):
        log.warning("worker %s timed out on %s %s", worker.url, request.method, request.path)
        return json_error(504, f"worker {worker.url} timed out")
    log.warning("worker %s broke off %s %s: %r", worker.url, request.method, request.path, exc)
    request.app[POOL].record_failure(worker, f"broken response: {describe(exc)}")
    return json_error(502, f"worker {worker.url} sent a broken response")


# --------------------------------------------------------------------------------------------
# Broadcast: one request to many workers, one result per worker
# --------------------------------------------------------------------------------------------


@dataclass
class WorkerResult:
    """What one worker answered to a broadcast."""

    url: str
    status: int | None = None
    body: Any = None
    error: str | None = None
    exception: BaseException | None = None

    @property
    def ok(self) -> bool:
        if self.error is not None or self.status is None or not 200 <= self.status < 300:
            return False
        return not (isinstance(self.body, dict) and self.body.get("success") is False)

    def as_dict(self) -> dict[str, Any]:
        result = {"url": self.url, "status": self.status, "ok": self.ok}
        if self.error is not None:
            result["error"] = self.error
        else:
            result["body"] = self.body
        return result


def decode_body(data: bytes) -> Any:
    """Return a worker's small answer as JSON when it is JSON, else as text."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return data.decode("utf-8", "replace")


async def call_worker(
    app: web.Application,
    worker: Worker,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: CIMultiDict[str] | dict[str, str] | None = None,
    timeout: aiohttp.ClientTimeout | None = None,
) -> WorkerResult:
    """Send one control request to a worker and return its parsed answer or the error."""
    try:
        with app[POOL].lease(worker):
            async with app[SESSION].request(
                method, worker_url(worker, path), data=body, headers=headers or app[WORKER_HEADERS],
                timeout=timeout, allow_redirects=False,
            ) as response:
                return WorkerResult(worker.url, response.status, decode_body(await response.read()))
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return WorkerResult(worker.url, error=describe(exc), exception=exc)


async def broadcast(
    request: web.Request, workers: Sequence[Worker], path: str, body: bytes | None
) -> list[WorkerResult]:
    """Send the same request to every given worker at once."""
    headers = upstream_headers(request)
    return list(await asyncio.gather(*(
        call_worker(request.app, w, request.method, path, body=body, headers=headers) for w in workers
    )))


def broadcast_response(results: Sequence[WorkerResult], **extra: Any) -> web.Response:
    """Answer 200 when every worker succeeded, 502 with the same results when any failed."""
    ok = all(r.ok for r in results)
    return web.json_response(
        {"success": ok, "results": [r.as_dict() for r in results], **extra}, status=200 if ok else 502
    )


CONTROL_BODY_LIMIT = MiB


async def read_small_body(request: web.Request) -> bytes:
    """Read a control request's body once: at most 1 MiB (else 413), within --client-timeout (else 408)."""
    cached = request.get(CONTROL_BODY)
    if cached is not None:
        return cached
    if request.content_length is not None and request.content_length > CONTROL_BODY_LIMIT:
        raise ProxyError(413, f"control request bodies are limited to {CONTROL_BODY_LIMIT} bytes")
    chunks: list[bytes] = []
    size = 0

    async def drain() -> None:
        nonlocal size
        while chunk := await request.content.read(65536):
            size += len(chunk)
            if size > CONTROL_BODY_LIMIT:
                raise ProxyError(413, f"control request bodies are limited to {CONTROL_BODY_LIMIT} bytes")
            chunks.append(chunk)

    timeout = request.app[CONFIG].client_timeout
    try:
        await within(timeout, drain())
    except asyncio.TimeoutError:
        raise ProxyError(408, f"request body not received within {timeout:g} s") from None
    request[CONTROL_BODY] = data = b"".join(chunks)
    request[RECEIVED] = len(data)
    return data


async def json_object(request: web.Request, expected: str, *, empty_ok: bool = False) -> dict[str, Any]:
    """Return a control request's body as a JSON object, or raise ProxyError(400) naming what is expected."""
    data = await read_small_body(request)
    if empty_ok and not data.strip():
        return {}
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested beyond the parser's depth
        raise ProxyError(400, f"body is not valid JSON; expected {expected}") from None
    if not isinstance(payload, dict):
        raise ProxyError(400, f"body must be a JSON object; expected {expected}")
    return payload


def require_field(payload: dict[str, Any], name: str, expected: str, *, lists: bool = False) -> None:
    """Raise ProxyError(400) unless the field is a non-empty string (or list of them)."""
    value = payload.get(name)
    if isinstance(value, str) and value.strip():
        return
    if lists and isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
        return
    raise ProxyError(400, f"missing or empty field {name!r}; expected {expected}")


# --------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------

IMAGE_URL = re.compile(r"/v1/images/([A-Za-z0-9._~-]{1,128})/content(?:\?variant=\d+)?")
TARGET_HEADER = "X-Target-Worker"


def track_image_ids(pool: WorkerPool, worker: Worker, data: bytes) -> None:
    """Record the worker as owner of the files its answer's data[].url fields link to (prompts may
    contain anything, so only those fields count)."""
    if b"/v1/images/" not in data:  # b64_json answers: nothing to parse
        return
    body = decode_body(data)
    items = body.get("data") if isinstance(body, dict) else None
    if not isinstance(items, list):
        return
    urls = (item.get("url") for item in items if isinstance(item, dict))
    pool.remember_jobs(worker, dict.fromkeys(
        m.group(1) for m in map(IMAGE_URL.fullmatch, (u for u in urls if isinstance(u, str))) if m))


def track_job_id(pool: WorkerPool, worker: Worker, data: bytes) -> None:
    """Record the worker as owner of the job id in its answer to a job-creating request."""
    body = decode_body(data)
    if isinstance(body, dict) and isinstance(body.get("id"), str) and len(body["id"]) <= 128:
        pool.remember_jobs(worker, [body["id"]])


def with_query(path: str, request: web.Request) -> str:
    query = request.rel_url.raw_query_string
    return f"{path}?{query}" if query else path


async def handle_generate(request: web.Request) -> web.StreamResponse:
    return await proxy(request, path_qs=with_query("/v1/images/generations", request), kind=IMAGE,
                       on_response=track_image_ids)


async def handle_generate_video(request: web.Request) -> web.StreamResponse:
    return await proxy(request, path_qs=with_query("/v1/videos", request), kind=VIDEO, on_response=track_job_id)


async def handle_images(request: web.Request) -> web.StreamResponse:
    return await proxy(request, kind=IMAGE, on_response=track_image_ids)


async def handle_create_video(request: web.Request) -> web.StreamResponse:
    return await proxy(request, kind=VIDEO, on_response=track_job_id)


async def handle_forward(request: web.Request) -> web.StreamResponse:
    """Forward any other request to the worker named by X-Target-Worker, or to the chosen one."""
    target = request.headers.get(TARGET_HEADER)
    if target is None:
        return await proxy(request)
    try:
        worker = request.app[POOL].by_url(normalize_worker_url(target))
    except WorkerURLError as exc:
        return json_error(400, f"{TARGET_HEADER}: {exc}")
    if worker is None:
        return json_error(404, f"{TARGET_HEADER}: worker {target} is not registered")
    if not worker.available:  # quarantined, syncing to the fleet's weights, or asleep
        return json_error(503, f"{TARGET_HEADER}: worker {worker.url} is {worker.display_state}")
    return await proxy(request, worker=worker)


async def handle_sticky(request: web.Request) -> web.StreamResponse:
    """Send a request about a job or file to the worker that made it."""
    pool = request.app[POOL]
    job_id = request.match_info["job_id"]
    owner = pool.job_owner.get(job_id)
    if owner is None and (gone := pool.orphaned_jobs.get(job_id)) in pool.workers:
        owner = pool.workers[gone]  # its worker was removed and added again: the job may still be there
        pool.remember_jobs(owner, [job_id])
    if owner is None:
        if gone is not None:
            return json_error(410, f"the worker of {job_id} ({gone}) was removed; the job is gone",
                              code="job_worker_gone")
        return json_error(404, f"unknown id {job_id}: no worker of this router created it", code="unknown_job")
    if not owner.reachable:
        return json_error(503, f"the worker of {job_id} ({owner.url}) is {owner.display_state}: {owner.out_reason}",
                          code="job_worker_gone")
    response = await proxy(request, worker=owner, hold=False)
    if request.method == "DELETE" and 200 <= response.status < 300:
        pool.forget_job(job_id)
    return response


async def fan_out(request: web.Request, workers: Sequence[Worker]) -> list[WorkerResult]:
    """Ask every given worker the client's GET, same path and query."""
    headers = upstream_headers(request)
    path_qs = request.rel_url.raw_path_qs
    return list(await asyncio.gather(*(
        call_worker(request.app, w, "GET", path_qs, headers=headers) for w in workers
    )))


def merged_list(results: Sequence[WorkerResult], items: list[Any]) -> web.Response:
    """Answer a merged list, 502 when every worker failed, naming the ones that did."""
    errors = [r.as_dict() for r in results if not r.ok]
    body: dict[str, Any] = {"object": "list", "data": items}
    if errors:
        body["errors"] = errors
    return web.json_response(body, status=502 if errors and len(errors) == len(results) else 200)


async def handle_list_videos(request: web.Request) -> web.Response:
    """List the video jobs of every worker, merged and ordered as one worker would."""
    workers = request.app[POOL].reachable()
    if not workers:
        return json_error(503, "no available worker")
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        return json_error(400, "limit must be an integer")
    results = await fan_out(request, workers)
    jobs = [job for r in results for job in listed(r) if isinstance(job, dict)]
    jobs.sort(key=lambda j: j["created_at"] if isinstance(j.get("created_at"), (int, float)) else 0,
              reverse=request.query.get("order", "desc") != "asc")
    return merged_list(results, jobs[:max(limit, 0)])


def listed(result: WorkerResult) -> list[Any]:
    """Return the data list of a worker's list answer, or nothing if the answer is not one."""
    data = result.body.get("data") if result.ok and isinstance(result.body, dict) else None
    return data if isinstance(data, list) else []


async def handle_models(request: web.Request) -> web.Response:
    """List the models of every available worker, without duplicates."""
    workers = request.app[POOL].available()
    if not workers:
        return json_error(503, "no available worker")
    results = await fan_out(request, workers)
    cards: dict[str, Any] = {}
    for card in (card for result in results for card in listed(result)):
        key = card.get("id") if isinstance(card, dict) else None
        cards.setdefault(key if isinstance(key, str) else json.dumps(card, sort_keys=True, default=str), card)
    return merged_list(results, list(cards.values()))


async def handle_memory(request: web.Request) -> web.Response:
    """Sleep (release) or wake (resume) every worker; learn which ones sleep from their answers."""
    app, pool = request.app, request.app[POOL]
    await json_object(request, "an empty body or {}", empty_ok=True)
    release = request.path == "/release_memory_occupation"
    # A wake also reaches sleepers that were quarantined meanwhile: /health says nothing of sleep.
    targets = [w for w in pool.workers.values() if w.reachable or (w.sleeping and not release)]
    if not targets:
        return json_error(503, "no worker to put to sleep" if release else "no worker to wake")
    async with pool.weight_lock:  # never in the middle of a weight load; a wake then sees the new version
        targets = [w for w in targets if not w.removed]
        results = await broadcast(request, targets, request.path, await read_small_body(request))
    for worker, result in zip(targets, results):
        if not result.ok:
            continue
        answer = result.body.get("sleeping") if isinstance(result.body, dict) else None
        worker.sleeping = release if answer is None else bool(answer)
        if not worker.sleeping and worker.state == HEALTHY and worker.weight_version < pool.weight_version:
            begin_rejoin(app, worker)  # it slept through a weight update
    return broadcast_response(results)


LORA_BODIES = {
    "/v1/set_lora": 'JSON like {"lora_nickname": "style", "lora_path": "/loras/style"}',
    "/v1/merge_lora_weights": 'JSON like {"target": "all", "strength": 1.0}',
    "/v1/unmerge_lora_weights": 'JSON like {"target": "all"}',
}


async def handle_broadcast(request: web.Request) -> web.Response:
    """Send a LoRA change to every available worker, one result per worker."""
    payload = await json_object(request, LORA_BODIES[request.path], empty_ok=request.path != "/v1/set_lora")
    if request.path == "/v1/set_lora":
        require_field(payload, "lora_nickname", LORA_BODIES[request.path], lists=True)
    targets = request.app[POOL].available()
    if not targets:
        return json_error(503, "no available worker")
    return broadcast_response(await broadcast(request, targets, request.path, await read_small_body(request)))


async def handle_checksum(request: web.Request) -> web.Response:
    """Ask every worker for its weight checksums and say whether they all agree."""
    await json_object(request, 'JSON like {"module_names": ["transformer"]}', empty_ok=True)
    targets = request.app[POOL].reachable()
    if not targets:
        return json_error(503, "no worker to ask")
    results = await broadcast(request, targets, request.path, await read_small_body(request))
    answers = [json.dumps(r.body, sort_keys=True) for r in results if r.ok]
    return broadcast_response(results, consistent=bool(answers) and len(set(answers)) == 1)


async def handle_health(request: web.Request) -> web.Response:
    """Answer 200 while at least one worker is healthy; a worker put to sleep on purpose still is."""
    pool = request.app[POOL]
    healthy = [w for w in pool.workers.values() if w.state == HEALTHY]
    versions = {w.weight_version for w in healthy}
    body = {
        "status": "healthy" if healthy else "unhealthy",
        "healthy_workers": len(healthy),
        "total_workers": len(pool.workers),
        "available_workers": sum(w.available for w in healthy),
        "sleeping_workers": sum(w.sleeping for w in healthy),
        "weight_version": pool.weight_version,
        "weights_consistent": versions <= {pool.weight_version},
    }
    return web.json_response(body, status=200 if healthy else 503)


async def handle_health_workers(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    return web.json_response({
        "weight_version": pool.weight_version,
        "totals": {"requests": pool.metrics.requests, "errors": pool.metrics.errors,
                   "in_flight": len(request.app[ACTIVE]) - 1, "tracked_jobs": len(pool.job_owner)},
        "workers": [w.describe() for w in pool.workers.values()],
    })


async def handle_metrics(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    return web.Response(body=pool.metrics.render(pool).encode(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def handle_dashboard(request: web.Request) -> web.Response:
    """Serve the status page, its table filled in so it reads without JavaScript."""
    pool = request.app[POOL]
    cell = "<td>{}</td>".format
    rows = "".join(
        f"<tr>{cell(html.escape(w.url))}<td class=\"state {w.display_state}\">{w.display_state}</td>"
        + "".join(cell(html.escape(str(v))) for v in (
            w.active_requests, w.consecutive_failures, w.weight_version, w.task_type or "?",
            w.last_error or w.out_reason or "")) + "</tr>"
        for w in pool.workers.values()
    ) or '<tr><td colspan="7">no workers registered</td></tr>'
    available = sum(w.available for w in pool.workers.values())
    page = (DASHBOARD_HTML.replace("{{ROWS}}", rows)
            .replace("{{SUMMARY}}", html.escape(
                f"{available} of {len(pool.workers)} workers available · weight version {pool.weight_version} · "
                f"{pool.metrics.requests} requests · {pool.metrics.errors} errors"))
            .replace("{{VERSION}}", __version__))
    return web.Response(text=page, content_type="text/html")


async def handle_list_workers(request: web.Request) -> web.Response:
    return web.json_response({"urls": list(request.app[POOL].workers)})


async def worker_url_from(request: web.Request) -> str:
    """Return the normalised worker URL a request names, or raise ProxyError(400)."""
    raw = request.query.get("url") or request.query.get("worker_url")
    if raw is None and request.body_exists:
        payload = await json_object(request, 'JSON like {"url": "http://host:port"}')
        raw = payload.get("url", payload.get("worker_url"))
    if raw is None:
        raise ProxyError(400, "give the worker url as ?url=... or JSON {\"url\": ...}")
    try:
        return normalize_worker_url(raw, request.app[ALLOWED_HOSTS])
    except WorkerURLError as exc:
        raise ProxyError(400, str(exc)) from None


async def handle_add_worker(request: web.Request) -> web.Response:
    url = await worker_url_from(request)
    worker, created = await admit_worker(request.app, url)
    return web.json_response(
        {"status": "added" if created else "exists", "url": url, "worker": worker.describe(),
         "urls": list(request.app[POOL].workers)},
        status=201 if created else 200,
    )


async def admit_worker(app: web.Application, url: str) -> tuple[Worker, bool]:
    """Register a worker (or bring a quarantined one back) and start its sync if it needs one."""
    pool = app[POOL]
    worker, created = pool.add(url)
    if created or worker.state == QUARANTINED:
        worker.consecutive_failures = 0
        worker.held = False
        # Out of the pool until its task type is known and it holds the fleet's weights.
        pool.set_state(worker, SYNCING, "registering: reading its capabilities")
        worker.registering = True
        try:
            await read_capabilities(app, worker)
        except ProxyError:
            pool.remove(url)
            raise
        finally:
            worker.registering = False
        if worker.state != QUARANTINED:  # it may have refused the capability read
            worker.out_reason = None
            begin_rejoin(app, worker, force=True)
    return worker, created


async def handle_remove_worker(request: web.Request) -> web.Response:
    return remove_worker(request, await worker_url_from(request))


def remove_worker(request: web.Request, url: str) -> web.Response:
    """Unregister a worker; answer how many of its requests are still finishing, or 404."""
    worker = request.app[POOL].remove(url)
    if worker is None:
        return json_error(404, f"worker {url} is not registered")
    return web.json_response({"status": "removed", "url": url, "in_flight": worker.active_requests})


async def handle_update_weights(request: web.Request) -> web.Response:
    """Broadcast a weight update; on success it becomes the version every worker must hold."""
    app, pool = request.app, request.app[POOL]
    expected = 'JSON like {"model_path": "/checkpoints/step-100"}'
    require_field(await json_object(request, expected), "model_path", expected)
    body = await read_small_body(request)  # forwarded as sent, byte for byte
    async with pool.weight_lock:
        targets = pool.available()
        if not targets:
            return json_error(503, "no available worker to update")
        pool.updates_idle.clear()
        started = time.monotonic()
        try:
            results = await broadcast(request, targets, "/update_weights_from_disk", body)
        finally:
            pool.updates_idle.set()
        succeeded = [w for w, r in zip(targets, results) if r.ok]
        outcome = "ok" if len(succeeded) == len(targets) else "partial" if succeeded else "failed"
        pool.metrics.inc("weight_updates_total", outcome)
        pool.metrics.observe("weight_update_duration_seconds", time.monotonic() - started)
        if succeeded:
            version = pool.weight_version + 1
            pool.weights = WeightUpdate(version, body, request.headers.get("Content-Type", "application/json"),
                                        model_path_of(body))
            for worker, result in zip(targets, results):
                if result.ok:
                    worker.weight_version = version
                elif not worker.removed:
                    pool.set_state(worker, SYNCING, f"weight update {version} failed: {result.error or result.body}")
            log.info("weight update %d reached %d of %d workers", version, len(succeeded), len(targets))
    if succeeded:
        await asyncio.gather(*(note_reported_path(app, w) for w in succeeded))
    skipped = [{"url": w.url, "reason": f"{w.display_state}: receives the update before it serves again"}
               for w in pool.workers.values() if w not in targets]
    for worker in pool.workers.values():
        if worker.state == SYNCING:
            begin_rejoin(app, worker)
    return broadcast_response(results, weight_version=pool.weight_version, skipped=skipped)


def model_path_of(body: bytes) -> str | None:
    payload = decode_body(body)
    return payload.get("model_path") if isinstance(payload, dict) else None


async def handle_rest_workers_list(request: web.Request) -> web.Response:
    return web.json_response({"workers": [w.describe() for w in request.app[POOL].workers.values()]})


def worker_from_path(request: web.Request) -> Worker:
    """Return the registered worker named by the URL-encoded {worker_id}, or raise ProxyError."""
    try:
        url = normalize_worker_url(request.match_info["worker_id"])
    except WorkerURLError as exc:
        raise ProxyError(400, str(exc)) from None
    worker = request.app[POOL].by_url(url)
    if worker is None:
        raise ProxyError(404, f"worker {url} is not registered")
    return worker


async def quarantine_flag(request: web.Request) -> bool:
    """Return the boolean a PUT /workers/{worker_id} body sets, or raise ProxyError(400)."""
    expected = 'JSON like {"quarantined": true} (or "is_dead")'
    payload = await json_object(request, expected)
    flag = payload.get("quarantined", payload.get("is_dead"))
    if not isinstance(flag, bool):
        raise ProxyError(400, f"missing or non-boolean field 'quarantined'; expected {expected}")
    return flag


async def handle_rest_worker(request: web.Request) -> web.Response:
    """GET, PUT ({"quarantined": bool} or {"is_dead": bool}) or DELETE one worker."""
    app, pool = request.app, request.app[POOL]
    flag = await quarantine_flag(request) if request.method == "PUT" else None
    worker = worker_from_path(request)
    if request.method == "DELETE":
        return remove_worker(request, worker.url)
    if flag is not None:
        if flag:
            pool.hold(worker, "quarantined by an operator")
        elif not flag and worker.state == QUARANTINED:
            await admit_worker(app, worker.url)
    return web.json_response(worker.describe())


# The status page: one self-contained file (no external scripts, fonts or styles) that works on an
# offline node. The server fills in the table; the script then refreshes it from /health_workers.
DASHBOARD_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>diffusion_router</title>
<style>
:root { color-scheme: light dark; --fg: #1d2330; --muted: #667085; --bg: #f7f8fa; --card: #fff;
  --line: #e4e7ec; --ok: #12805c; --bad: #c4320a; --warn: #b54708; --sleep: #5b5bd6; }
@media (prefers-color-scheme: dark) { :root { --fg: #e6e9ef; --muted: #98a2b3; --bg: #111418;
  --card: #1a1f26; --line: #2c333d; } }
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--fg); background: var(--bg); }
header { padding: 16px 24px; border-bottom: 1px solid var(--line); background: var(--card);
  display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap; }
h1 { font-size: 18px; margin: 0; }
h2 { font-size: 14px; margin: 0 0 8px; color: var(--muted); font-weight: 600; }
main { padding: 20px 24px; max-width: 1200px; margin: 0 auto; display: grid; gap: 20px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 16px; }
.stats { display: grid; grid-template-columns: repeat(auto-fit, minmax(140px, 1fr)); gap: 12px; }
.stat b { display: block; font-size: 22px; font-variant-numeric: tabular-nums; }
.stat span { color: var(--muted); font-size: 12px; }
table { width: 100%; border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 7px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 600; font-size: 12px; text-transform: uppercase; }
td:first-child { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }
td:last-child { color: var(--muted); max-width: 380px; overflow-wrap: anywhere; }
.state { font-weight: 600; }
.healthy { color: var(--ok); } .quarantined { color: var(--bad); } .syncing { color: var(--warn); }
.sleeping { color: var(--sleep); }
.muted { color: var(--muted); }
canvas { width: 100%; height: 160px; display: block; }
.legend { display: flex; gap: 16px; font-size: 12px; color: var(--muted); margin-top: 6px; }
.legend i { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 4px; }
.wrap { overflow-x: auto; }
</style></head>
<body>
<header><h1>diffusion_router</h1><span class="muted" id="summary">{{SUMMARY}}</span>
<span class="muted" style="margin-left:auto">v{{VERSION}} · <span id="updated">static view</span></span></header>
<main>
<section class="card stats" id="stats" hidden>
  <div class="stat"><b id="s-avail">–</b><span>workers available</span></div>
  <div class="stat"><b id="s-inflight">–</b><span>requests in flight</span></div>
  <div class="stat"><b id="s-rps">–</b><span>requests / s</span></div>
  <div class="stat"><b id="s-errors">–</b><span>errors (5xx) total</span></div>
  <div class="stat"><b id="s-version">–</b><span>weight version</span></div>
</section>
<section class="card" id="chart-card" hidden><h2>Requests and errors per second (last 5 minutes)</h2>
  <canvas id="chart" width="1100" height="160"></canvas>
  <div class="legend"><span><i style="background:#2e90fa"></i>requests/s</span>
  <span><i style="background:#f04438"></i>errors/s</span></div></section>
<section class="card"><h2>Workers</h2><div class="wrap"><table>
<thead><tr><th>Worker</th><th>State</th><th>In flight</th><th>Failures</th><th>Weights</th><th>Task</th>
<th>Last error</th></tr></thead>
<tbody id="workers">{{ROWS}}</tbody></table></div>
<noscript><p class="muted">JavaScript is off: reload the page to refresh this table.</p></noscript></section>
</main>
<script>
(function () {
  var history = [], last = null, EVERY = 2000, KEEP = 150;
  function text(v) { return v === null || v === undefined ? "" : String(v); }
  function cell(row, value, cls) {
    var td = document.createElement("td"); td.textContent = text(value);
    if (cls) td.className = cls; row.appendChild(td);
  }
  function draw() {
    var c = document.getElementById("chart"), ctx = c.getContext("2d");
    var w = c.width = c.clientWidth * (window.devicePixelRatio || 1), h = c.height = 160 * (window.devicePixelRatio || 1);
    ctx.clearRect(0, 0, w, h);
    var max = 1; history.forEach(function (p) { max = Math.max(max, p.rps, p.eps); });
    ctx.strokeStyle = "rgba(128,128,128,0.25)"; ctx.lineWidth = 1;
    for (var g = 1; g < 4; g++) { ctx.beginPath(); ctx.moveTo(0, h * g / 4); ctx.lineTo(w, h * g / 4); ctx.stroke(); }
    ctx.fillStyle = "rgba(128,128,128,0.9)"; ctx.font = (11 * (window.devicePixelRatio || 1)) + "px system-ui";
    var dpr = window.devicePixelRatio || 1;
    ctx.fillText(max.toFixed(1) + "/s", 4, 12 * dpr);
    ctx.fillText("0", 4, h - 6 * dpr);
    ctx.fillText("now", w - 26 * dpr, h - 6 * dpr);
    ctx.fillText("-2.5 min", w / 2 - 22 * dpr, h - 6 * dpr);
    [["rps", "#2e90fa"], ["eps", "#f04438"]].forEach(function (s) {
      ctx.strokeStyle = s[1]; ctx.lineWidth = 2 * (window.devicePixelRatio || 1); ctx.beginPath();
      history.forEach(function (p, i) {
        var x = w - (history.length - 1 - i) * (w / (KEEP - 1)), y = h - 4 - (h - 20) * p[s[0]] / max;
        if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
      });
      ctx.stroke();
    });
  }
  function render(data) {
    var body = document.getElementById("workers"), now = Date.now(), t = data.totals || {};
    var rows = document.createDocumentFragment(), available = 0;
    data.workers.forEach(function (w) {
      var tr = document.createElement("tr");
      if (w.available) available++;
      cell(tr, w.url); cell(tr, w.state, "state " + w.state); cell(tr, w.active_requests);
      cell(tr, w.consecutive_failures); cell(tr, w.weight_version); cell(tr, w.task_type || "?");
      cell(tr, w.last_error || w.out_reason || ""); rows.appendChild(tr);
    });
    if (!data.workers.length) {
      var tr = document.createElement("tr"), td = document.createElement("td");
      td.colSpan = 7; td.textContent = "no workers registered"; tr.appendChild(td); rows.appendChild(tr);
    }
    body.replaceChildren(rows);
    if (last) {
      var dt = Math.max((now - last.at) / 1000, 0.001);
      history.push({ rps: Math.max(0, (t.requests - last.requests) / dt), eps: Math.max(0, (t.errors - last.errors) / dt) });
      if (history.length > KEEP) history.shift();
      document.getElementById("s-rps").textContent = history[history.length - 1].rps.toFixed(1);
    }
    last = { at: now, requests: t.requests || 0, errors: t.errors || 0 };
    document.getElementById("s-avail").textContent = available + " / " + data.workers.length;
    document.getElementById("s-inflight").textContent = text(t.in_flight);
    document.getElementById("s-errors").textContent = text(t.errors);
    document.getElementById("s-version").textContent = text(data.weight_version);
    document.getElementById("summary").textContent = available + " of " + data.workers.length +
      " workers available · weight version " + data.weight_version + " · " + t.requests + " requests · " +
      t.errors + " errors";
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.getElementById("stats").hidden = false; document.getElementById("chart-card").hidden = false;
    draw();
  }
  function tick() {
    fetch("health_workers", { cache: "no-store" }).then(function (r) {
      if (!r.ok) throw new Error("HTTP " + r.status); return r.json();
    }).then(render).catch(function (e) {
      document.getElementById("updated").textContent = "refresh failed: " + e.message;
    }).finally(function () { setTimeout(tick, EVERY); });
  }
  tick();
})();
</script>
</body></html>
"""


# --------------------------------------------------------------------------------------------
# Health checks, capabilities and resync
# --------------------------------------------------------------------------------------------


async def ask(app: web.Application, worker: Worker, path: str) -> WorkerResult:
    """GET a small path of a worker over the probe pool, within the probe timeout."""
    config = app[CONFIG]
    timeout = aiohttp.ClientTimeout(total=config.health_check_timeout, sock_connect=config.connect_timeout)
    try:
        async with app[PROBE_SESSION].get(worker.url + path, headers=app[WORKER_HEADERS], timeout=timeout) as response:
            return WorkerResult(worker.url, response.status, decode_body(await response.read()))
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return WorkerResult(worker.url, error=describe(exc), exception=exc)


def is_loop(result: WorkerResult) -> bool:
    """Tell whether an answer is this router's (or another's) routing-loop error."""
    return result.status == 508 and isinstance(result.body, dict) and result.body.get("code") == "routing_loop"


async def probe(app: web.Application, worker: Worker) -> None:
    """Probe one worker's GET /health and record the outcome."""
    pool = app[POOL]
    result = await ask(app, worker, "/health")
    if is_loop(result):
        log.error("worker %s removed: it is this router, or routes back to it", worker.url)
        pool.remove(worker.url)
        return
    if not result.ok:
        if result.exception is not None and out_of_descriptors(result.exception):
            log.error("health check of %s skipped: the router is out of file descriptors", worker.url)
            return  # the router's own shortage says nothing about the worker
        reason = (f"health check failed: {result.error}" if result.error is not None
                  else f"health check answered {result.status}")
        log.debug("worker %s: %s", worker.url, reason)
        if not worker.removed:
            pool.metrics.inc("health_probe_failures_total", worker.url)
        pool.record_failure(worker, reason)
        return
    if pool.record_success(worker):
        log.info("worker %s answers health checks again", worker.url)
        try:
            await read_capabilities(app, worker)
        except ProxyError as exc:  # it is this router, or leads back to it
            log.error("worker %s removed: %s", worker.url, exc.message)
            pool.remove(worker.url)
            return
        begin_rejoin(app, worker, force=True)
    elif worker.state == SYNCING and not worker.registering:
        begin_rejoin(app, worker)
    elif worker.state == HEALTHY and await lost_its_weights(app, worker):
        log.warning("worker %s restarted and lost weight version %d", worker.url, worker.weight_version)
        worker.weight_version = 0
        pool.set_state(worker, SYNCING, "restarted: reports its startup model again")
        begin_rejoin(app, worker)


async def health_round(app: web.Application) -> None:
    """Probe every registered worker once, concurrently."""
    workers = list(app[POOL].workers.values())
    await asyncio.gather(*(probe(app, w) for w in workers))


async def health_loop(app: web.Application) -> None:
    interval = app[CONFIG].health_check_interval
    while True:
        await asyncio.sleep(interval)
        try:
            await health_round(app)
        except Exception:  # a bug in one round must not stop health checking for good
            log.exception("health round failed")


async def read_capabilities(app: web.Application, worker: Worker) -> None:
    """Learn the worker's task type (GET /v1/models) and startup model path (GET /server_info).

    Raise ProxyError(400) when the address leads back to this router; quarantine a worker that
    refuses the connection (nothing serves there yet).
    """
    models = await ask(app, worker, "/v1/models")
    if is_loop(models):
        raise ProxyError(400, f"{worker.url} is this router itself (or routes back to it)")
    if models.exception is not None and is_refused(models.exception):
        app[POOL].record_failure(worker, f"unreachable: {models.error}", fatal=True)
        return
    try:
        task_type = models.body["data"][0]["task_type"] if models.ok else None
    except (KeyError, IndexError, TypeError):
        task_type = None
    if task_type is not None:
        worker.task_type = str(task_type)
    info = await ask(app, worker, "/server_info")  # a router passes this path on to one of its workers
    if is_loop(info):
        raise ProxyError(400, f"{worker.url} routes requests back to this router")
    reported = model_path_in(info)
    weights = app[POOL].weights
    if reported is not None and (weights is None or reported != weights.model_path):
        worker.startup_model_path = reported


def model_path_in(result: WorkerResult) -> str | None:
    path = result.body.get("model_path") if result.ok and isinstance(result.body, dict) else None
    return path if isinstance(path, str) else None


async def reported_model_path(app: web.Application, worker: Worker) -> str | None:
    """Return the model path the worker's GET /server_info reports (a weight update changes it)."""
    return model_path_in(await ask(app, worker, "/server_info"))


async def lost_its_weights(app: web.Application, worker: Worker) -> bool:
    """Tell whether a serving worker reports its startup model again: it restarted since its update.

    Only for workers seen to report a different path after our update; a worker whose /server_info
    does not follow updates is never taken for restarted.
    """
    if (worker.weight_version == 0 or worker.startup_model_path is None
            or worker.path_after_update in (None, worker.startup_model_path)):
        return False
    return await reported_model_path(app, worker) == worker.startup_model_path


def begin_rejoin(app: web.Application, worker: Worker, *, force: bool = False) -> None:
    """Return a worker to the pool, first replaying the last weight update if it may lack it.

    A worker already syncing leaves that state only through a successful resync.
    """
    pool = app[POOL]
    if pool.weights is None or (
            worker.state != SYNCING and not force and worker.weight_version >= pool.weight_version):
        pool.set_state(worker, HEALTHY)
        worker.weight_version = pool.weight_version
        return
    pool.set_state(worker, SYNCING, worker.out_reason or f"needs weight version {pool.weight_version}")
    if any(getattr(t, "worker", None) is worker for t in app[TASKS]):
        return
    task = spawn(app, resync(app, worker))
    if task is not None:
        task.worker = worker  # type: ignore[attr-defined]


async def resync(app: web.Application, worker: Worker) -> None:
    """Send the last successful weight update to a worker; it rejoins only if that succeeds.

    No lock is held while the worker loads: a slow or hung worker must not hold up broadcasts, which
    never target a syncing worker anyway. If a newer update lands meanwhile, that one is sent next.
    """
    pool = app[POOL]
    while (weights := pool.weights) is not None and not worker.removed and worker.state == SYNCING:
        result = await call_worker(app, worker, "POST", "/update_weights_from_disk", body=weights.body,
                                   headers={**app[WORKER_HEADERS], "Content-Type": weights.content_type})
        if worker.removed or worker.state != SYNCING:
            return
        if not result.ok:
            worker.out_reason = f"resync to weight version {weights.version} failed: {result.error or result.body}"
            log.warning("worker %s: %s", worker.url, worker.out_reason)
            return
        if pool.weights is weights:
            worker.weight_version = weights.version
            await note_reported_path(app, worker)
            pool.set_state(worker, HEALTHY)
            log.info("worker %s resynced to weight version %d", worker.url, weights.version)
            return


async def note_reported_path(app: web.Application, worker: Worker) -> None:
    """Record the model path a worker reports right after an update reached it (restart detection)."""
    worker.path_after_update = await reported_model_path(app, worker)


def spawn(app: web.Application, coro: Any) -> asyncio.Task | None:
    """Run a background task that the app cancels when it stops; none once it is stopping."""
    if app[STOPPING].is_set():
        coro.close()
        return None
    task = asyncio.get_running_loop().create_task(coro)
    app[TASKS].add(task)
    task.add_done_callback(app[TASKS].discard)
    return task


# --------------------------------------------------------------------------------------------
# App factory
# --------------------------------------------------------------------------------------------


REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
# New ids: a random prefix per process and a counter, unique without a uuid4 per request.
REQUEST_ID_PREFIX = os.urandom(8).hex()
REQUEST_COUNTER = itertools.count(1)
QUIET_PATHS = frozenset({"/health", "/metrics"})
LOOP_HEADER = "X-Diffusion-Router-Loop"
MAX_HEADERS = 100
CLIENT_CLOSED = 499  # nginx's status for "client closed the connection first"; only in logs and metrics
access_log = logging.getLogger("diffusion_router.access")


@web.middleware
async def observe(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Give each request an id, bound concurrency, turn failures into JSON, count and log it."""
    started = time.monotonic()
    request_id = request.headers.get("X-Request-ID")
    if request_id is None or not REQUEST_ID_PATTERN.fullmatch(request_id):  # never echo junk into logs
        request_id = f"{REQUEST_ID_PREFIX}{next(REQUEST_COUNTER):016x}"
    request[REQUEST_ID] = request_id
    app = request.app
    active = app[ACTIVE]  # the handler tasks of the requests being handled
    cancelled: asyncio.CancelledError | None = None
    target = request.raw_path
    via = request.headers.get("Via")
    if via is not None and app[VIA] in via:
        response: web.StreamResponse = json_error(
            508, "request came back to the router that sent it: a worker URL points at this router",
            headers={LOOP_HEADER: "1"}, code="routing_loop")
    elif "%" in target and BAD_PERCENT.search(target):
        response = json_error(400, "invalid percent-encoding in the request target")
    elif len(request.headers) > MAX_HEADERS:  # some aiohttp versions set no limit of their own
        response = json_error(431, f"more than {MAX_HEADERS} request headers")
    elif len(active) >= app[CONFIG].max_concurrent_requests:
        response = json_error(503, "router is at its limit of concurrent requests")
    else:
        task = asyncio.current_task()
        active.add(task)
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # aiohttp's own errors (413 from read(), ...) as JSON
            if exc.status < 400:
                raise
            response = json_error(exc.status, exc.reason)
        except (ConnectionError, asyncio.CancelledError) as exc:  # the client went away mid-request
            log.info("request %s %s %s: client left (%s)", request_id, request.method, request.path, describe(exc))
            response = web.Response(status=CLIENT_CLOSED)  # only counted and logged: no one to send it to
            cancelled = exc if isinstance(exc, asyncio.CancelledError) else None
        except Exception:
            log.exception("request %s %s %s failed inside the router", request_id, request.method, request.path)
            response = json_error(500, "internal router error")
        finally:
            active.discard(task)
    seconds = time.monotonic() - started
    route = route_label(request)
    worker = request.get(WORKER_LABEL, "")
    if worker and worker not in app[POOL].workers:
        worker = "removed"  # its series were dropped with it; one bounded label for its last requests
    sent = response.body_length if response.prepared else (response.content_length or 0)
    app[POOL].metrics.record_request(route, worker, response.status, seconds, request.get(RECEIVED, 0), sent)
    if request.path not in QUIET_PATHS or app[CONFIG].verbose:
        access_log.info("%s %s %s %d %s %.3fs %d", request_id, request.method, request.path_qs, response.status,
                        worker or "-", seconds, sent)
    if cancelled is not None:
        raise cancelled
    return response


async def stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Return the request id on every response, streamed ones included, just before its headers go."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers["X-Request-ID"] = request_id


def bearer_token(request: web.Request) -> str | None:
    value = request.headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def same_key(token: str | None, key: str | None) -> bool:
    """Compare a token with a key in constant time."""
    return token is not None and key is not None and hmac.compare_digest(token.encode(), key.encode())


ADMIN_PATHS = frozenset({
    "/add_worker", "/remove_worker", "/update_weights_from_disk", "/update_weights_from_tensor",
    "/release_memory_occupation", "/resume_memory_occupation", "/v1/set_lora", "/v1/merge_lora_weights",
    "/v1/unmerge_lora_weights",
})


def is_admin_request(request: web.Request) -> bool:
    """Tell whether a request changes the router or every worker."""
    path = request.path
    return path in ADMIN_PATHS or (
        (path == "/workers" or path.startswith("/workers/")) and request.method not in ("GET", "HEAD"))


@web.middleware
async def authorize(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Require the API key for everything but GET /health, and the admin key for admin requests."""
    config = request.app[CONFIG]
    if request.path == "/health" and request.method in ("GET", "HEAD"):
        return await handler(request)
    token = bearer_token(request)
    admin_key, api_key = config.admin_api_key, config.api_key
    if admin_key and is_admin_request(request):
        if same_key(token, admin_key):
            return await handler(request)
        if same_key(token, api_key):
            return json_error(403, "this request changes the router or its workers: it needs the admin API key")
    elif api_key is None or same_key(token, api_key) or same_key(token, admin_key):
        return await handler(request)
    log.warning("refused %s %s from %s: missing or wrong API key", request.method, request.path, request.remote)
    return json_error(401, "missing or invalid API key (Authorization: Bearer <key>)",
                      headers={"WWW-Authenticate": "Bearer"})


def own(*, forwards: bool = False, **handlers: Callable) -> Callable:
    """Return a handler serving the router's own path for the given methods, 405 JSON otherwise.

    The server cancels a handler whose client went away. A forwarding handler lets that cancel its
    request to the worker; the others (registration, broadcasts) run to the end regardless, so the
    router's state never stops half-changed.
    """
    if "GET" in handlers:
        handlers.setdefault("HEAD", handlers["GET"])
    allowed = ", ".join(sorted(handlers))

    async def run(handler: Callable, request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ProxyError as exc:
            return json_error(exc.status, exc.message)

    async def dispatch(request: web.Request) -> web.StreamResponse:
        handler = handlers.get(request.method)
        if handler is None:
            return json_error(405, f"method {request.method} not allowed on {request.path}", headers={"Allow": allowed})
        if forwards:
            return await run(handler, request)
        return await asyncio.shield(run(handler, request))

    return dispatch


async def client_sessions(app: web.Application):
    """Open the one connection pool to workers (and a small one for probes) for the app's life."""
    config = app[CONFIG]
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=config.max_connections, limit_per_host=0),
        # sock_connect, not connect: waiting for a free pooled connection is not the worker's fault.
        timeout=aiohttp.ClientTimeout(total=config.timeout, sock_connect=config.connect_timeout),
        auto_decompress=False,  # bodies pass through as the worker encoded them
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),  # send the client's, not ours
        cookie_jar=aiohttp.DummyCookieJar(),  # one worker's cookies must not reach another
        read_bufsize=READ_CHUNK,
    )
    # Probes get their own small pool: a full generation pool must not make workers look dead.
    app[PROBE_SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    yield
    await app[SESSION].close()
    await app[PROBE_SESSION].close()


async def announce_shutdown(app: web.Application) -> None:
    log.info("shutting down: no new connections; waiting up to %g s for %d in-flight request(s)",
             app[CONFIG].shutdown_timeout, len(app[ACTIVE]))
    # aiohttp waits the timeout for handlers to finish, then as long again for cancelled ones to end;
    # a handler waiting on a worker does not notice that cancel, so end the stragglers ourselves.
    asyncio.get_running_loop().call_later(app[CONFIG].shutdown_timeout, cancel_handlers, app)


def cancel_handlers(app: web.Application) -> None:
    """Cancel the requests still running when the shutdown timeout ends."""
    for task in list(app[ACTIVE]):
        task.cancel()


async def background_tasks(app: web.Application):
    """Register the configured workers, run health checks, and stop every task on shutdown."""
    urls = dict.fromkeys(normalize_worker_url(url) for url in app[CONFIG].worker_urls)
    for url, outcome in zip(urls, await asyncio.gather(*(admit_worker(app, u) for u in urls), return_exceptions=True)):
        if isinstance(outcome, ProxyError):
            log.error("worker %s not registered: %s", url, outcome.message)
        elif isinstance(outcome, BaseException):
            raise outcome
    spawn(app, health_loop(app))
    yield
    app[STOPPING].set()
    tasks = list(app[TASKS])
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# How the HTTP server must run the app (the CLI and the tests both use this): cancel the handler of a
# client that went away, so a request it abandoned stops holding a worker connection and a lease.
SERVER_OPTIONS: dict[str, Any] = {"handler_cancellation": True}


def create_app(config: RouterConfig | None = None) -> web.Application:
    """Build the router application; the only constructor, tests included."""
    config = config or RouterConfig()
    for url in config.worker_urls:
        normalize_worker_url(url, config.allowed_hosts())  # fail at startup, not on the first request
    app = web.Application(
        client_max_size=config.max_request_size,  # aiohttp's 1 MiB default refuses base64 images
        middlewares=[observe, authorize] if config.keys_required else [observe],
    )
    app.on_response_prepare.append(stamp_request_id)
    app.on_shutdown.append(announce_shutdown)
    app[CONFIG] = config
    app[POOL] = WorkerPool(config)
    app[TASKS] = set()
    app[STOPPING] = asyncio.Event()
    app[ACTIVE] = set()
    app[ALLOWED_HOSTS] = config.allowed_hosts()
    # With keys of its own the router forwards the client's Authorization to no worker.
    app[REQUEST_DROP_KEY] = REQUEST_DROP | {"authorization"} if config.keys_required else REQUEST_DROP
    app[VIA] = f"1.1 diffusion_router-{os.urandom(6).hex()}"  # lets the router see its own requests come back
    app[WORKER_HEADERS] = {"Via": app[VIA]}
    if config.worker_api_key:
        app[WORKER_HEADERS]["Authorization"] = f"Bearer {config.worker_api_key}"
    app.cleanup_ctx.append(client_sessions)
    app.cleanup_ctx.append(background_tasks)

    for path, handler in ROUTES.items():
        app.router.add_route("*", path, handler)
    app.router.add_route("*", "/{tail:.*}", handle_forward)
    return app


ROUTES: dict[str, Callable] = {
    "/": own(GET=handle_dashboard),
    "/dashboard": own(GET=handle_dashboard),
    "/metrics": own(GET=handle_metrics),
    "/generate": own(forwards=True, POST=handle_generate),
    "/generate_video": own(forwards=True, POST=handle_generate_video),
    "/health": own(GET=handle_health),
    "/health_workers": own(GET=handle_health_workers),
    "/add_worker": own(POST=handle_add_worker),
    "/remove_worker": own(POST=handle_remove_worker),
    "/list_workers": own(GET=handle_list_workers),
    "/workers": own(GET=handle_rest_workers_list, POST=handle_add_worker),
    "/workers/{worker_id}": own(GET=handle_rest_worker, PUT=handle_rest_worker, DELETE=handle_rest_worker),
    "/update_weights_from_disk": own(POST=handle_update_weights),
    "/release_memory_occupation": own(POST=handle_memory),
    "/resume_memory_occupation": own(POST=handle_memory),
    "/v1/set_lora": own(POST=handle_broadcast),
    "/v1/merge_lora_weights": own(POST=handle_broadcast),
    "/v1/unmerge_lora_weights": own(POST=handle_broadcast),
    "/get_weights_checksum": own(POST=handle_checksum),
    "/v1/models": own(GET=handle_models),
    "/v1/images/generations": own(forwards=True, POST=handle_images),
    "/v1/images/edits": own(forwards=True, POST=handle_images),
    "/v1/images/{job_id}/content": own(forwards=True, GET=handle_sticky),
    "/v1/videos": own(forwards=True, POST=handle_create_video, GET=handle_list_videos),
    "/v1/videos/{job_id}": own(forwards=True, GET=handle_sticky, DELETE=handle_sticky),
    "/v1/videos/{job_id}/content": own(forwards=True, GET=handle_sticky),
}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def positive(kind: type) -> click.ParamType:
    """Return a click type accepting only numbers above zero."""
    return click.IntRange(min=1) if kind is int else click.FloatRange(min=0, min_open=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "DIFFUSION_ROUTER",
                                 "show_default": True, "max_content_width": 100})
@click.option("--host", default=RouterConfig.host, help="Address to listen on.")
@click.option("--port", default=RouterConfig.port, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port, logged at startup).")
@click.option("--worker-urls", multiple=True, metavar="URL...",
              help="Initial workers: --worker-urls URL URL ... (env: space-separated).")
@click.argument("more_worker_urls", nargs=-1, metavar="", required=False)
@click.option("--max-connections", default=RouterConfig.max_connections, type=positive(int),
              help="Most connections open to workers at once.")
@click.option("--timeout", default=None, type=positive(float),
              help="Total seconds for one router-to-worker request  [default: no limit]")
@click.option("--connect-timeout", default=RouterConfig.connect_timeout, type=positive(float),
              help="Seconds to open a connection to a worker before trying another.")
@click.option("--retries", default=RouterConfig.retries, type=click.IntRange(min=0),
              help="Other workers to try when a worker cannot be reached at all.")
@click.option("--health-check-interval", default=RouterConfig.health_check_interval, type=positive(float),
              help="Seconds between health rounds.")
@click.option("--health-check-timeout", default=RouterConfig.health_check_timeout, type=positive(float),
              help="Seconds one health probe may take.")
@click.option("--health-check-failure-threshold", default=RouterConfig.health_check_failure_threshold,
              type=positive(int), help="Consecutive failures before a worker is quarantined.")
@click.option("--health-check-success-threshold", default=RouterConfig.health_check_success_threshold,
              type=positive(int), help="Consecutive good probes before a quarantined worker comes back.")
@click.option("--auto-recover/--no-auto-recover", default=True,
              help="Let quarantined workers rejoin by themselves (else only through /add_worker).")
@click.option("--routing-algorithm", default=RouterConfig.routing_algorithm, type=click.Choice(sorted(POLICIES)),
              help="How to choose a worker for each request.")
@click.option("--max-request-size", default=RouterConfig.max_request_size // MiB, type=positive(int),
              help="Largest request body accepted, in MiB (413 above it).")
@click.option("--max-tracked-jobs", default=RouterConfig.max_tracked_jobs, type=positive(int),
              help="Job and file ids remembered for sticky routing (oldest dropped first).")
@click.option("--shutdown-timeout", default=RouterConfig.shutdown_timeout, type=click.FloatRange(min=0),
              help="Seconds in-flight requests may take to finish on SIGTERM or SIGINT.")
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on every request but GET /health.")
@click.option("--admin-api-key", default=None,
              help="Require this key instead for requests that change the router or every worker.")
@click.option("--worker-api-key", default=None, help="Bearer token the router sends to workers.")
@click.option("--allowed-worker-hosts", multiple=True, metavar="HOST|IP|CIDR...",
              help="Only register workers on these hosts (env: space-separated)  [default: any]")
@click.option("--client-timeout", default=RouterConfig.client_timeout, type=positive(float),
              help="Seconds a client may pause while sending its request body.")
@click.option("--max-concurrent-requests", default=RouterConfig.max_concurrent_requests, type=positive(int),
              help="Requests handled at once; more get 503 instead of exhausting the router.")
@click.option("--verbose", "-v", is_flag=True, help="Log debug messages and probe requests.")
@click.version_option(__version__, "--version", prog_name="diffusion_router")
def main(worker_urls: tuple[str, ...], more_worker_urls: tuple[str, ...], allowed_worker_hosts: tuple[str, ...],
         max_request_size: int, verbose: bool, **options: Any) -> None:
    """Load-balance sglang-diffusion workers behind one HTTP endpoint."""
    # click options take one value each; the URLs after the first arrive as arguments.
    urls = tuple(dict.fromkeys(u for entry in worker_urls + more_worker_urls for u in entry.split()))
    allowed = tuple(h for entry in allowed_worker_hosts for h in entry.replace(",", " ").split())
    config = RouterConfig(worker_urls=urls, max_request_size=max_request_size * MiB, verbose=verbose,
                          allowed_worker_hosts=allowed, **options)
    try:
        allowed_hosts = config.allowed_hosts()
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--allowed-worker-hosts") from None
    for url in urls:
        try:
            normalize_worker_url(url, allowed_hosts)
        except WorkerURLError as exc:
            raise click.BadParameter(str(exc), param_hint="--worker-urls") from None
    raise_open_file_limit()
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[BatchedStderrHandler()],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("diffusion_router %s starting with %d worker(s)", __version__, len(urls))
    # run_app reports the bound address (the real port when --port 0) once it listens.
    announce = lambda message: log.info("%s", message.splitlines()[0].strip("= "))  # noqa: E731
    logging.getLogger("aiohttp.server").setLevel(logging.DEBUG if verbose else logging.CRITICAL)  # parse-error noise
    try:
        web.run_app(create_app(config), host=config.host, port=config.port, print=announce,
                    shutdown_timeout=config.shutdown_timeout, access_log=None, **SERVER_OPTIONS)
    except OSError as exc:  # address in use, unknown host, no such interface
        raise click.ClickException(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None


class BatchedStderrHandler(logging.StreamHandler):
    """Log to stderr through a block buffer flushed within half a second: one write per batch, not per line."""

    FLUSH_AFTER = 0.5

    def __init__(self) -> None:
        super().__init__(io.TextIOWrapper(io.FileIO(sys.stderr.fileno(), "w", closefd=False),
                                          encoding="utf-8", errors="backslashreplace"))
        self.flush_pending = False

    def flush(self) -> None:
        """Schedule the flush on the running loop (the access log writes a line per request)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # startup, exit, or no loop: write now
            self.flush_now()
            return
        if not self.flush_pending:
            self.flush_pending = True
            loop.call_later(self.FLUSH_AFTER, self.flush_now)

    def flush_now(self) -> None:
        self.flush_pending = False
        super().flush()


def raise_open_file_limit() -> None:
    """Lift the soft open-file limit to the hard one: each client and worker connection is a descriptor."""
    try:
        import resource
    except ImportError:  # not on Unix
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cli(argv: Sequence[str] | None = None) -> int:
    """Run the command line; a bad value is one line on stderr and exit status 2, not a traceback."""
    try:
        main.main(args=argv, prog_name="diffusion_router.py", standalone_mode=False)
    except click.ClickException as exc:
        click.echo(f"Error: {exc.format_message()}", err=True)
        return exc.exit_code
    except click.Abort:
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
