"""Benchmark the router against direct worker access and nginx (least_conn), on 127.0.0.1.

    python bench/bench.py [--rounds 3] [--only small,large,...] [--no-nginx] [--keep-logs]

Every scenario starts its own stand-in workers (examples/stand_in_worker.py, as processes), a
router (diffusion_router.py) in front of them and, when nginx is installed, an nginx with a
least_conn upstream over the same workers; all on free ports the OS picks. Each measurement is
one run of bench/load.py (a separate process: fixed request count, time cap, one JSON line).
The three targets are measured in turn, round after round (the order rotates every round), and
the table shows medians over the rounds, as ratios. Everything started is stopped in a
`finally`, Ctrl-C included. The table goes to stdout and to bench/results/latest.md, the raw
per-round numbers to bench/results/latest.json.

Stdlib and aiohttp only (aiohttp only in load.py, the workers and the router).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ROUTER = ROOT / "diffusion_router.py"
WORKER = ROOT / "examples" / "stand_in_worker.py"
LOAD = ROOT / "bench" / "load.py"
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
KIB_TO_MB = 1024 / 1e6  # /proc/<pid>/status counts in KiB; the targets and the table speak MB and KB

SMALL_IMAGE = 16  # bytes of image: a b64_json answer of about 330 B
LARGE_IMAGE = 1_179_648  # 1.125 MiB of image: 1.5 MiB of base64 in the JSON answer
VIDEO_BYTES = 209_715_200  # 200 MiB
IMAGE_BODY = json.dumps({"prompt": "a cat", "response_format": "b64_json"})
SHARE_FAST_LATENCY, SHARE_SLOW_LATENCY = 0.05, 0.25
SHARE_SPLIT = 8192  # the fast worker answers ~1 KB, the slow one ~22 KB: tells them apart


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


class StartError(RuntimeError):
    pass


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Procs:
    """Every process the benchmark started, stopped newest first."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.running: list[Proc] = []
        self.counter = 0

    def spawn(self, name: str, cmd: list[str]) -> Proc:
        self.counter += 1
        log = self.tmp / f"{self.counter:02d}-{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env=child_env())
        proc = Proc(name, popen, log)
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 5.0) -> None:
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.kill()
                proc.popen.wait()
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.running)):
            self.stop(proc)

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Stop, on leaving, whatever was started inside."""
        before = len(self.running)
        try:
            yield
        finally:
            for proc in reversed(self.running[before:]):
                self.stop(proc)


def child_env() -> dict[str, str]:
    """The environment without DIFFUSION_ROUTER_* settings: the router gets only the bench's options."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DIFFUSION_ROUTER_")}


def free_port() -> int:
    """Return a port the OS picks as free on 127.0.0.1 (released for the child to bind)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Straight to 127.0.0.1, whatever http_proxy says.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with OPENER.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_post(url: str, body: str, timeout: float = 10.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": "application/json"})
    try:
        with OPENER.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(proc: Proc, url: str, ok: Callable[[int, bytes], bool], timeout: float = 20.0) -> None:
    """Poll url until ok(status, body); fail early if the process died."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise StartError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        try:
            status, body = http_get(url, timeout=1.0)
            if ok(status, body):
                return
            last = f"HTTP {status} {body[:200]!r}"
        except (OSError, urllib.error.URLError) as exc:
            last = repr(exc)
        time.sleep(0.05)
    raise StartError(f"{proc.name} not ready at {url} after {timeout:.0f} s ({last}):\n{proc.tail()}")


def start_with_port(procs: Procs, name: str, make_cmd: Callable[[int], list[str]], ready_path: str,
                    ok: Callable[[int, bytes], bool] = lambda s, b: s == 200) -> tuple[Proc, str]:
    """Start a server on a free port (a second port if another process took the first)."""
    for attempt in range(3):
        port = free_port()
        proc = procs.spawn(name, make_cmd(port))
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(proc, url + ready_path, ok)
            return proc, url
        except StartError:
            procs.stop(proc)
            if attempt == 2 or "address already in use" not in proc.tail().lower():
                raise
    raise AssertionError("unreachable")


def start_worker(procs: Procs, name: str, **switches: Any) -> tuple[Proc, str]:
    args = []
    for key, value in switches.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return start_with_port(
        procs, name,
        lambda port: [PY, str(WORKER), "--host", "127.0.0.1", "--port", str(port), "--no-record-requests", *args],
        "/health")


def start_router(procs: Procs, workers: list[str], *extra: str) -> tuple[Proc, str]:
    def ready(status: int, body: bytes) -> bool:
        return status == 200 and json.loads(body).get("healthy_workers", len(workers)) == len(workers)

    return start_with_port(
        procs, "router",
        lambda port: [PY, str(ROUTER), "--host", "127.0.0.1", "--port", str(port), "--shutdown-timeout", "1",
                      *extra, "--worker-urls", *workers],
        "/health", ready)


@dataclass
class Nginx:
    binary: str
    version: str
    worker_processes: str

    def config(self, tmp: Path, port: int, workers: list[str]) -> str:
        nofile = fd_limit()
        servers = "\n".join(f"        server {w.removeprefix('http://')} max_fails=0;" for w in workers)
        return f"""# generated by bench/bench.py
daemon off;
master_process on;
worker_processes {self.worker_processes};
worker_rlimit_nofile {nofile};
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;
events {{
    worker_connections {max(1024, min(16384, nofile - 64))};
}}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body_temp;
    proxy_temp_path {tmp}/proxy_temp;
    fastcgi_temp_path {tmp}/fastcgi_temp;
    uwsgi_temp_path {tmp}/uwsgi_temp;
    scgi_temp_path {tmp}/scgi_temp;
    client_max_body_size 0;
    keepalive_requests 1000000;
    keepalive_timeout 600s;
    upstream workers {{
        least_conn;
{servers}
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 600s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://workers;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
            # Streamed like the router: answers pass through a bounded in-memory window (16 x 64 KiB),
            # never spooled to a temp file, so a slow client slows the worker instead of filling a disk.
            proxy_buffering on;
            proxy_buffer_size 64k;
            proxy_buffers 16 64k;
            proxy_busy_buffers_size 128k;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""

    def start(self, procs: Procs, workers: list[str]) -> tuple[Proc, str]:
        tmp = Path(tempfile.mkdtemp(prefix="nginx-", dir=procs.tmp))
        tmp.chmod(0o755)  # as root, nginx's workers run as nobody and create their temp dirs here

        def cmd(port: int) -> list[str]:
            conf = tmp / "nginx.conf"
            conf.write_text(self.config(tmp, port, workers))
            extra = ["-e", str(tmp / "error.log")] if version_tuple(self.version) >= (1, 19, 5) else []
            return [self.binary, "-p", str(tmp), "-c", str(conf), *extra]

        return start_with_port(procs, "nginx", cmd, "/health")


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def find_nginx(explicit: str | None, worker_processes: str) -> Nginx | None:
    candidates = [explicit] if explicit else [shutil.which("nginx"), "/usr/sbin/nginx", "/usr/local/sbin/nginx",
                                              "/usr/local/nginx/sbin/nginx"]
    for binary in candidates:
        if binary and os.access(binary, os.X_OK):
            out = subprocess.run([binary, "-v"], check=False, capture_output=True, text=True, timeout=10)
            match = re.search(r"nginx/(\S+)", out.stderr + out.stdout)
            return Nginx(binary, match.group(1) if match else "?", worker_processes)
    return None


def fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_fd_limit() -> None:
    """Children inherit it: the router, nginx and workers each hold over a thousand sockets in one scenario."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def proc_status_kb(pid: int, key: str) -> int:
    """Return a kB field (VmRSS, VmHWM) of /proc/<pid>/status, 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
        return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process, 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    return cpu_seconds(pid) + sum(cpu_seconds(c) for c in children(pid))


def tree_kb(pid: int, key: str = "VmRSS") -> int:
    """Sum a kB field over a process and its children (nginx: master and workers)."""
    return proc_status_kb(pid, key) + sum(proc_status_kb(c, key) for c in children(pid))


# --------------------------------------------------------------------------------------------
# Load runs
# --------------------------------------------------------------------------------------------


def load_cmd(url: str | list[str], requests: int, concurrency: int, time_cap: float, method: str = "POST",
             body: str | None = IMAGE_BODY, warmup: int = 0, split_size: int | None = None) -> list[str]:
    """Command line of one load generator run; several URLs share the clients in turn."""
    cmd = [PY, str(LOAD), "--requests", str(requests), "--concurrency", str(concurrency),
           "--time-cap", str(time_cap), "--method", method, "--warmup", str(warmup)]
    for one in [url] if isinstance(url, str) else url:
        cmd += ["--url", one]
    if body is not None:
        cmd += ["--body", body]
    if split_size is not None:
        cmd += ["--split-size", str(split_size)]
    return cmd


def run_load(cmd: list[str], sample: Callable[[], int] | None = None, interval: float = 0.05) -> dict[str, Any]:
    """Run one load generator process; with `sample`, also return the largest value it gave meanwhile."""
    time_cap = float(cmd[cmd.index("--time-cap") + 1])
    deadline = time.monotonic() + 2 * time_cap + 30  # warm-up and measurement each get the cap
    peak = 0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=ROOT)
        try:
            while popen.poll() is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"load generator overran its time cap: {' '.join(cmd)}")
                if sample is not None:
                    peak = max(peak, sample())
                time.sleep(interval)
        finally:
            if popen.poll() is None:
                popen.kill()
                popen.wait()
        out.seek(0)
        err.seek(0)
        text, errors = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if popen.returncode != 0 or not text.strip():
        raise RuntimeError(f"load generator failed ({popen.returncode}): {errors[-2000:]}")
    result = json.loads(text.strip().splitlines()[-1])
    if sample is not None:
        result["peak_sample_kb"] = peak
    return result


def rotated(targets: list[str], round_no: int) -> list[str]:
    k = round_no % len(targets)
    return targets[k:] + targets[:k]


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    measure: str
    router: str
    direct: str
    nginx: str
    ratio: str
    target: str
    passed: bool | None  # None: not judged (nginx missing, or a run failed)
    note: str = ""


@dataclass
class Bench:
    args: argparse.Namespace
    procs: Procs
    nginx: Nginx | None
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        return self.args.rounds

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def targets(self) -> list[str]:
        return ["router", "direct"] + (["nginx"] if self.nginx else [])

    def interleave(self, name: str, urls: dict[str, Any], make: Callable[[Any], list[str]],
                   pids: dict[str, int] | None = None, rounds: int | None = None) -> dict[str, list[dict[str, Any]]]:
        """Measure the targets in turn, round after round (order rotating); return the runs per target.

        `pids` names the proxy process of a target (router, nginx master): the CPU time it and its
        children used during each run is recorded as cpu_ms_per_request.
        """
        rounds = rounds or self.rounds
        pids = pids or {}
        targets = [t for t in self.targets() if t in urls]
        runs: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
        for r in range(rounds):
            for target in rotated(targets, r):
                pid = pids.get(target)
                cpu_before = tree_cpu_seconds(pid) if pid else 0.0
                result = run_load(make(urls[target]))
                if pid and result["count"]:
                    result["cpu_ms_per_request"] = (tree_cpu_seconds(pid) - cpu_before) * 1000 / result["count"]
                runs[target].append(result)
                self.say(f"  {name} round {r + 1}/{rounds} {target:6s}: {brief(result)}")
        self.raw[name] = runs
        return runs

    def image_targets(self, workers: list[str]) -> tuple[dict[str, Any], dict[str, int]]:
        """Start the router and nginx over the workers; return the image-generation URL(s) and proxy pid of each.

        Direct means the load generator's clients split evenly over the same workers, so every worker
        sees the same load as behind a proxy.
        """
        router_proc, router = start_router(self.procs, workers)
        direct = [w + "/v1/images/generations" for w in workers]
        urls: dict[str, Any] = {"router": router + "/generate", "direct": direct}
        pids = {"router": router_proc.pid}
        if self.nginx:
            nginx_proc, nginx = self.nginx.start(self.procs, workers)
            urls["nginx"] = nginx + "/v1/images/generations"
            pids["nginx"] = nginx_proc.pid
        return urls, pids


def brief(result: dict[str, Any]) -> str:
    text = (f"{result['count']} ok, {result['errors']} errors in {result['elapsed']:.2f} s, "
            f"{result['rps']} req/s, {result['mb_per_s']} MB/s, p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms")
    if "cpu_ms_per_request" in result:
        text += f", proxy CPU {result['cpu_ms_per_request']:.3f} ms/request"
    if result.get("error_kinds"):
        text += f" {result['error_kinds']}"
    if result.get("capped"):
        text += " (time cap hit)"
    return text


def fmt(value: float | None, unit: str = "", digits: int = 1, sign: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:{'+' if sign else ''},.{digits}f}{unit}"


def verdict(passed: bool | None) -> str:
    return {True: "pass", False: "**FAIL**", None: "n/a"}[passed]


def markdown(rows: list[Row]) -> str:
    head = ["scenario", "measure", "router", "direct", "nginx", "ratio", "target", "pass/fail"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.scenario, row.measure, row.router, row.direct, row.nginx, row.ratio, row.target,
                 verdict(row.passed)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {row.scenario}: {row.note.strip()}" for row in rows if row.note.strip()]
    return "\n".join(lines + ([""] + notes if notes else []))


def errors_note(runs: dict[str, list[dict[str, Any]]]) -> str:
    bad = {t: sum(r["errors"] for r in rs) for t, rs in runs.items() if any(r["errors"] or r["capped"] for r in rs)}
    capped = [t for t, rs in runs.items() if any(r["capped"] for r in rs)]
    parts = []
    if bad:
        parts.append("errors: " + ", ".join(f"{t} {n}" for t, n in bad.items()))
    if capped:
        parts.append("time cap hit: " + ", ".join(capped))
    return "; ".join(parts)


def cpu_note(runs: dict[str, list[dict[str, Any]]]) -> str:
    """Median proxy CPU time per request, router and nginx."""
    cpu = {t: median([r.get("cpu_ms_per_request") for r in rs]) for t, rs in runs.items()}
    parts = [f"{t} {cpu[t]:.3f} ms" for t in ("router", "nginx") if cpu.get(t) is not None]
    return f"proxy CPU per request: {', '.join(parts)}. " if parts else ""


def clean(runs: dict[str, list[dict[str, Any]]], target: str) -> bool:
    return target in runs and all(not r["errors"] and not r["capped"] for r in runs[target])


# --------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------


def image_throughput(b: Bench, key: str, title: str, image_bytes: int, requests: int, concurrency: int,
                     warmup: int, metric: str, unit: str, digits: int, floor: float) -> None:
    """Measure one image-answer throughput scenario and judge router / nginx against a floor."""
    with b.procs.scope():
        workers = [start_worker(b.procs, f"worker{i}", image_bytes=image_bytes)[1] for i in range(2)]
        urls, pids = b.image_targets(workers)
        n = b.args.scale(requests)
        runs = b.interleave(key, urls, lambda url: load_cmd(url, n, concurrency, 30, warmup=b.args.scale(warmup)),
                            pids)
    value = {t: median([r[metric] for r in rs]) for t, rs in runs.items()}
    ratio = value["router"] / value["nginx"] if value.get("nginx") else None
    judged = ratio is not None and clean(runs, "router")
    b.rows.append(Row(title, unit, fmt(value["router"], digits=digits), fmt(value["direct"], digits=digits),
                      fmt(value.get("nginx"), digits=digits), fmt(ratio, "x nginx", 2), f">= {floor}x nginx",
                      ratio >= floor if judged else None, cpu_note(runs) + errors_note(runs)))


def scenario_small(b: Bench) -> None:
    """~300 B answers from instant workers, 64 concurrent: requests per second."""
    image_throughput(b, "small", "small bodies (~330 B), instant workers, 64 concurrent", SMALL_IMAGE,
                     5000, 64, 500, "rps", "requests/s", 0, 0.15)


def scenario_large(b: Bench) -> None:
    """1.5 MB JSON answers, 16 concurrent: MB/s."""
    image_throughput(b, "large", "1.5 MB JSON answers, 16 concurrent", LARGE_IMAGE,
                     300, 16, 32, "mb_per_s", "MB/s", 1, 0.6)


def scenario_latency(b: Bench) -> None:
    """Workers answering in 200 ms, 64 concurrent: p99 added over direct."""
    with b.procs.scope():
        workers = [start_worker(b.procs, f"worker{i}", image_bytes=SMALL_IMAGE, latency=0.2)[1] for i in range(2)]
        urls, pids = b.image_targets(workers)
        n = b.args.scale(1280)  # 20 waves of 64: a p99 of 1280 latencies per round
        runs = b.interleave("latency", urls, lambda url: load_cmd(url, n, 64, 30, warmup=64), pids)
    p99 = {t: median([r["p99_ms"] for r in rs]) for t, rs in runs.items()}

    def added(target: str, key: str = "p99_ms") -> float | None:
        """Median over rounds of the target's percentile minus direct's in the same round."""
        if target not in runs:
            return None
        return median([a[key] - d[key] for a, d in zip(runs[target], runs["direct"])])

    judged = clean(runs, "router") and clean(runs, "direct")
    b.rows.append(Row("workers answering in 200 ms, 64 concurrent", "p99 latency (ms)",
                      fmt(p99["router"]), fmt(p99["direct"]), fmt(p99.get("nginx")),
                      f"router {fmt(added('router'), ' ms', sign=True)}, nginx {fmt(added('nginx'), ' ms', sign=True)}",
                      "<= 10 ms added over direct", added("router") <= 10 if judged else None,
                      "ratio column: median over rounds of p99(target) - p99(direct) of the same round "
                      f"(at p50: router {fmt(added('router', 'p50_ms'), ' ms', sign=True)}, "
                      f"nginx {fmt(added('nginx', 'p50_ms'), ' ms', sign=True)}). "
                      + cpu_note(runs) + errors_note(runs)))


def scenario_download(b: Bench) -> None:
    """One 200 MB download: router peak RSS and throughput."""
    with b.procs.scope():
        _, worker = start_worker(b.procs, "t2v-worker", task_type="T2V", video_bytes=VIDEO_BYTES)
        router_proc, router = start_router(b.procs, [worker])
        nginx_proc = None
        urls = {}
        if b.nginx:
            nginx_proc, nginx = b.nginx.start(b.procs, [worker])
        status, body = http_post(router + "/v1/videos", json.dumps({"prompt": "a cat"}))
        if status != 200:
            raise RuntimeError(f"POST /v1/videos through the router answered {status}: {body[:300]!r}")
        job = json.loads(body)["id"]
        deadline = time.monotonic() + 10
        while json.loads(http_get(f"{router}/v1/videos/{job}")[1]).get("status") != "completed":
            if time.monotonic() > deadline:
                raise RuntimeError(f"video job {job} never completed")
            time.sleep(0.05)
        path = f"/v1/videos/{job}/content"  # router: sticky, it saw the create; nginx: one-worker upstream
        urls = {"router": router + path, "direct": worker + path}
        if nginx_proc:
            urls["nginx"] = nginx + path
        idle_kb = proc_status_kb(router_proc.pid, "VmRSS")
        for url in urls.values():  # warm-up: one unmeasured download each
            run_load(load_cmd(url, 1, 1, 60, method="GET", body=None))
        # Each measurement: three downloads one after the other (one at a time), 0.1-1 s each.
        make = partial(load_cmd, requests=3, concurrency=1, time_cap=60, method="GET", body=None)
        pids = {"router": router_proc.pid, **({"nginx": nginx_proc.pid} if nginx_proc else {})}
        runs = b.interleave("download", urls, make, pids, rounds=max(b.rounds, 5))  # short runs: a few more
        hwm_kb = proc_status_kb(router_proc.pid, "VmHWM")
        nginx_hwm = max((proc_status_kb(c, "VmHWM") for c in children(nginx_proc.pid)), default=0) \
            if nginx_proc else None
    b.raw["download_rss"] = {"router_idle_kb": idle_kb, "router_hwm_kb": hwm_kb, "nginx_worker_hwm_kb": nginx_hwm}
    ok = all(r["bytes"] == r["count"] * VIDEO_BYTES for rs in runs.values() for r in rs)
    b.rows.append(Row("one 200 MB download", "peak RSS (VmHWM)",
                      f"{fmt(hwm_kb * KIB_TO_MB)} MB (idle {fmt(idle_kb * KIB_TO_MB)})", "—",
                      f"{fmt(nginx_hwm * KIB_TO_MB)} MB (worker process)" if nginx_hwm else "n/a",
                      "—", "router <= 64 MB", hwm_kb * KIB_TO_MB <= 64 if hwm_kb else None,
                      "" if ok else "a download came back short"))
    mbps = {t: median([r["mb_per_s"] for r in rs]) for t, rs in runs.items()}
    ratio = mbps["router"] / mbps["nginx"] if mbps.get("nginx") else None
    judged = ratio is not None and clean(runs, "router") and ok
    b.rows.append(Row("one 200 MB download", "MB/s", fmt(mbps["router"]), fmt(mbps["direct"]),
                      fmt(mbps.get("nginx")), fmt(ratio, "x nginx", 2), ">= 0.5x nginx",
                      ratio >= 0.5 if judged else None, errors_note(runs)))


def scenario_share(b: Bench) -> None:
    """One worker 5x slower than the other, 16 concurrent: share of requests sent to the fast one."""
    with b.procs.scope():
        fast = start_worker(b.procs, "fast-worker", latency=SHARE_FAST_LATENCY, image_bytes=512)[1]
        slow = start_worker(b.procs, "slow-worker", latency=SHARE_SLOW_LATENCY, image_bytes=16384)[1]
        _, router = start_router(b.procs, [fast, slow])
        urls = {"router": router + "/generate"}
        if b.nginx:
            urls["nginx"] = b.nginx.start(b.procs, [fast, slow])[1] + "/v1/images/generations"
        n = b.args.scale(600)
        runs = b.interleave("share", urls,
                            lambda url: load_cmd(url, n, 16, 30, warmup=32, split_size=SHARE_SPLIT))
    # Least outstanding keeps ~8 requests on each worker: the fast one serves 8/0.05 per second,
    # the slow one 8/0.25, so the fast one's ideal share is 5/6.
    ideal = 100 * (1 / SHARE_FAST_LATENCY) / (1 / SHARE_FAST_LATENCY + 1 / SHARE_SLOW_LATENCY)
    share = {t: median([100 * r["below_split"] / r["count"] for r in rs if r["count"]]) for t, rs in runs.items()}
    delta = share["router"] - ideal if share["router"] is not None else None
    nginx_delta = share["nginx"] - ideal if share.get("nginx") is not None else None
    b.rows.append(Row("one worker 5x slower than the other, 16 concurrent", "% of requests to the fast worker",
                      fmt(share["router"], " %"), "—", fmt(share.get("nginx"), " %"),
                      f"router {fmt(delta, ' pts', sign=True)}, nginx {fmt(nginx_delta, ' pts', sign=True)}",
                      f"within 5 pts of ideal {ideal:.1f} %",
                      abs(delta) <= 5 if delta is not None and clean(runs, "router") else None,
                      "share counted from answer sizes (fast worker ~1 KB, slow ~22 KB). " + errors_note(runs)))


def scenario_open(b: Bench) -> None:
    """1000 requests held open by slow workers: RSS per open request (fresh router/nginx every round)."""
    latency = 5.0
    runs: dict[str, list[dict[str, Any]]] = {"router": []}
    if b.nginx:
        runs["nginx"] = []
    with b.procs.scope():
        workers = [start_worker(b.procs, f"worker{i}", image_bytes=SMALL_IMAGE, latency=latency)[1] for i in range(2)]
        for r in range(b.rounds):
            for target in rotated(list(runs), r):
                with b.procs.scope():
                    if target == "router":
                        proc, url = start_router(b.procs, workers, "--max-connections", "2000")
                        sample = partial(proc_status_kb, proc.pid, "VmRSS")
                    else:
                        proc, url = b.nginx.start(b.procs, workers)
                        sample = partial(tree_kb, proc.pid)
                    for _ in range(20):  # warm the forwarding path without waiting on the slow workers
                        http_get(url + "/stats")
                    time.sleep(0.2)
                    idle = sample()
                    path = "/generate" if target == "router" else "/v1/images/generations"
                    result = run_load(load_cmd(url + path, 1000, 1000, latency * 6), sample=sample)
                    result["idle_kb"] = idle
                    result["kb_per_request"] = (result["peak_sample_kb"] - idle) * 1.024 / 1000  # KB
                    runs[target].append(result)
                    b.say(f"  open round {r + 1}/{b.rounds} {target:6s}: idle {idle * KIB_TO_MB:.1f} MB, "
                          f"peak {result['peak_sample_kb'] * KIB_TO_MB:.1f} MB, "
                          f"{result['kb_per_request']:.1f} KB/request; " + brief(result))
    b.raw["open"] = runs
    per = {t: median([r["kb_per_request"] for r in rs]) for t, rs in runs.items()}
    idle = {t: median([r["idle_kb"] * KIB_TO_MB for r in rs]) for t, rs in runs.items()}
    b.rows.append(Row("1000 requests held open by 5 s workers", "RSS per open request (KB)",
                      f"{fmt(per['router'])} (idle {fmt(idle['router'])} MB)", "—",
                      f"{fmt(per['nginx'])} (master+worker)" if "nginx" in per else "n/a", "—",
                      "<= 50 KB", per["router"] <= 50 if clean(runs, "router") else None,
                      "(peak RSS while the requests are open - idle RSS) / 1000, fresh process each round. "
                      + errors_note(runs)))


SCENARIOS: dict[str, Callable[[Bench], None]] = {
    "small": scenario_small,
    "large": scenario_large,
    "latency": scenario_latency,
    "download": scenario_download,
    "share": scenario_share,
    "open": scenario_open,
}


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="measurements per target per scenario (median taken)")
    p.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios: " + ", ".join(SCENARIOS))
    p.add_argument("--quick", action="store_true", help="a quarter of the requests (a smoke test)")
    p.add_argument("--no-nginx", action="store_true", help="skip nginx even if installed")
    p.add_argument("--nginx", help="nginx binary [default: from PATH, /usr/sbin/nginx]")
    p.add_argument("--nginx-workers", default="1", help="nginx worker_processes (1 = one event loop, like the router)")
    p.add_argument("--keep-logs", action="store_true", help="keep the processes' logs and nginx configs")
    args = p.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    args.scale = (lambda n: max(1, n // 4)) if args.quick else (lambda n: n)
    return args


def header(args: argparse.Namespace, nginx: Nginx | None, seconds: float) -> str:
    try:
        import aiohttp
        aiohttp_version = aiohttp.__version__
    except ImportError:
        aiohttp_version = "?"
    if nginx:
        nginx_text = f"nginx {nginx.version}, worker_processes {nginx.worker_processes}, least_conn, keepalive 64"
    elif args.no_nginx:
        nginx_text = "nginx skipped (--no-nginx): nginx columns are n/a"
    else:
        nginx_text = "nginx not installed (`make bench-deps`): nginx columns are n/a"
    return (f"# Router benchmark\n\n"
            f"{datetime.datetime.now().isoformat(timespec='seconds')} - {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, aiohttp {aiohttp_version}, {nginx_text}; "
            f"median of {args.rounds} interleaved rounds{' (--quick)' if args.quick else ''}; {seconds:.0f} s.\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C even when started with SIGINT ignored
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally on `kill` too
    nginx = None if args.no_nginx else find_nginx(args.nginx, args.nginx_workers)
    tmp = Path(tempfile.mkdtemp(prefix="router-bench-"))
    procs = Procs(tmp)
    bench = Bench(args, procs, nginx)
    started = time.monotonic()
    failed = False
    try:
        if nginx is None:
            bench.say("nginx not found: the nginx columns will say n/a (install it with `make bench-deps`)")
        if fd_limit() < 4200:
            bench.say(f"open-file limit {fd_limit()}: the 1000-open-requests scenario needs ~4200 (ulimit -n)")
        for name in args.only.split(","):
            bench.say(f"== {name}")
            try:
                SCENARIOS[name](bench)
            except (StartError, RuntimeError) as exc:
                failed = True
                bench.say(f"scenario {name} failed: {exc}")
                bench.rows.append(Row(name, "failed", "n/a", "n/a", "n/a", "n/a", "", None, str(exc).splitlines()[0]))
    except KeyboardInterrupt:
        bench.say("interrupted; stopping everything")
        return 130
    finally:
        procs.stop_all()
        if args.keep_logs or failed:
            bench.say(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    text = header(args, nginx, time.monotonic() - started) + "\n" + markdown(bench.rows) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.md").write_text(text)
    (RESULTS / "latest.json").write_text(json.dumps(bench.raw, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
