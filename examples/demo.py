"""Walk through the router's example requests against stand-in workers, printing each one.

Run from anywhere (`make demo` does this from the repository root)::

    python examples/demo.py

It starts three stand-in workers (A: image model, B: video model, C: a spare image model) and the
router in front of A and B, each as a subprocess on a free port; then it sends the example requests
through the router, printing for each the equivalent curl command, the HTTP status and the answer.
Everything it started is stopped on the way out: on success, on failure and on Ctrl-C.
Exit status: 0 when every answer had the expected status, 1 otherwise, 130 when interrupted.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER_SCRIPT = HERE / "stand_in_worker.py"
ROUTER_SCRIPT = ROOT / "diffusion_router.py"

STARTUP_DEADLINE = 15.0  # seconds for all workers and the router to answer
VIDEO_DEADLINE = 20.0  # seconds for the video job to complete
VIDEO_POLL = 0.5
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30)
LONG_STRING = 80  # strings longer than this are shown cut to SHOWN_CHARS
SHOWN_CHARS = 60
RULE = "=" * 78

LISTENING = re.compile(r"listening on (http://\S+)")


class DemoFailed(Exception):
    """A failure that ends the demo early: a process died, or something did not answer in time."""


# ---------------------------------------------------------------- subprocesses

@dataclass
class Process:
    """One subprocess the demo started, with its output captured to a file."""

    name: str
    shown_command: str  # what a reader would type, relative to the repository root
    popen: subprocess.Popen[bytes]
    log_path: Path
    url: str | None = None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def check_alive(self) -> None:
        """Raise DemoFailed if the process has exited."""
        if self.popen.poll() is not None:
            raise DemoFailed(f"{self.name} exited with status {self.popen.returncode} "
                             f"(command: {self.shown_command})")


@dataclass
class Processes:
    """Every subprocess the demo started; stop_all ends them all, whatever happened."""

    log_dir: Path
    started: list[Process] = field(default_factory=list)

    def start(self, name: str, script: Path, *args: str) -> Process:
        log_path = self.log_dir / f"{name.split()[0].lower()}-{len(self.started)}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # logs reach the file as they are written
        with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would block the child
            popen = subprocess.Popen([sys.executable, str(script), *args], stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        shown = shlex.join(["python", str(script.relative_to(ROOT)), *args])
        process = Process(name, shown, popen, log_path)
        self.started.append(process)
        return process

    def show_logs(self) -> None:
        for process in self.started:
            status = process.popen.poll()
            state = "running" if status is None else f"exited with status {status}"
            print(f"\n--- last lines of {process.name}'s output ({state}) ---")
            print(process.tail() or "(no output)")

    def stop_all(self) -> None:
        """SIGTERM everything, wait up to STOP_GRACE seconds, then SIGKILL what is left."""
        if not self.started:
            return
        print(f"\n{RULE}\n3. Stop everything the demo started\n{RULE}")
        for process in reversed(self.started):  # the router first, so it sees no workers vanish
            if process.popen.poll() is None:
                process.popen.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for process in reversed(self.started):
            try:
                process.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
                how = f"exit status {process.popen.returncode}"
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()
                how = f"killed after {STOP_GRACE:g} s"
            print(f"stopped {process.name} (pid {process.popen.pid}): {how}")
        self.started.clear()


def free_port() -> int:
    """Return a port the OS says is free on 127.0.0.1, so the router's printed command names its port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- printing

def heading(title: str) -> None:
    print(f"\n{RULE}\n{title}\n{RULE}")


def abridge(value: Any) -> Any:
    """Return a JSON value with long strings (base64, mostly) cut short and their length noted."""
    if isinstance(value, str) and len(value) > LONG_STRING:
        return f"{value[:SHOWN_CHARS]}... ({len(value)} chars in all)"
    if isinstance(value, dict):
        return {key: abridge(item) for key, item in value.items()}
    if isinstance(value, list):
        return [abridge(item) for item in value]
    return value


def show_json(value: Any) -> None:
    print(json.dumps(abridge(value), indent=2))


def curl(method: str, url: str, body: Any = None, output: str | None = None) -> str:
    """Return the curl command that sends the same request."""
    words = ["curl", "-sS"]
    if method != "GET":
        words += ["-X", method]
    words.append(url)
    if body is not None:
        words += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    if output is not None:
        words += ["-o", output]
    return "$ " + shlex.join(words)


# ---------------------------------------------------------------- the requests

@dataclass
class Answer:
    status: int
    reason: str | None
    headers: Any
    body: Any  # parsed JSON, or text when the answer is not JSON


class Demo:
    """Send requests to the router, print them and their answers, and note unexpected statuses."""

    def __init__(self, session: aiohttp.ClientSession, router: str):
        self.session = session
        self.router = router
        self.problems: list[str] = []
        self.count = 0

    def step(self, title: str, explanation: str = "") -> None:
        self.count += 1
        heading(f"2.{self.count}  {title}")
        if explanation:
            print(explanation)

    def check(self, what: str, status: int, expect: int) -> None:
        if status != expect:
            self.problems.append(f"{what}: expected HTTP {expect}, got {status}")
            print(f"!! unexpected status: expected {expect}, got {status}")

    async def call(self, method: str, path: str, body: Any = None, *, expect: int = 200,
                   headers: tuple[str, ...] = (), quiet: bool = False) -> Answer:
        """Send one request, print it as curl and its answer, check its status.

        `quiet`: print nothing and check nothing; the caller shows the answer its own way.
        """
        url = self.router + path
        if not quiet:
            print(curl(method, url, body))
        async with self.session.request(method, url, json=body) as response:
            data = await response.read()
            try:
                parsed = json.loads(data)
            except ValueError:
                parsed = data.decode(errors="replace")
            shown = "".join(f"   {name}: {response.headers.get(name)}" for name in headers)
            if not quiet:
                print(f"-> HTTP {response.status} {response.reason}{shown}")
                if isinstance(parsed, str):
                    print(parsed if len(parsed) <= 2000 else parsed[:2000] + "...")
                else:
                    show_json(parsed)
                self.check(f"{method} {path}", response.status, expect)
            return Answer(response.status, response.reason, response.headers, parsed)

    async def download(self, path: str, filename: str, *, expect: int = 200) -> None:
        """Fetch a file through the router; print status, content type and size, not the bytes."""
        url = self.router + path
        print(curl("GET", url, output=filename))
        async with self.session.get(url) as response:
            data = await response.read()
            print(f"-> HTTP {response.status} {response.reason}")
            print(f"   Content-Type: {response.headers.get('Content-Type')}")
            print(f"   {len(data)} bytes, starting {data[:12].hex(' ')}")
            if response.status != 200:
                print(f"   {data[:300].decode(errors='replace')}")
            self.check(f"GET {path}", response.status, expect)


async def wait_until_ready(session: aiohttp.ClientSession, processes: list[Process],
                           deadline: float) -> None:
    """Wait for each process's URL (from its log line) and a 200 from it; raise DemoFailed."""
    async def answers(url: str) -> bool:
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as response:
                await response.read()
                return response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    pending = list(processes)
    while pending:
        for process in list(pending):
            process.check_alive()
            if process.url is None:
                if (match := LISTENING.search(process.output())) is None:
                    continue
                process.url = match.group(1)
            probe = "/list_workers" if process.name == "router" else "/health"
            if await answers(process.url + probe):
                print(f"   {process.name} answers GET {probe} at {process.url}")
                pending.remove(process)
        if pending and time.monotonic() > deadline:
            names = ", ".join(p.name for p in pending)
            raise DemoFailed(f"no answer from {names} within {STARTUP_DEADLINE:g} s")
        if pending:
            await asyncio.sleep(0.1)


async def start_all(session: aiohttp.ClientSession, procs: Processes) -> tuple[Process, Process]:
    """Start workers A, B, C and the router in front of A and B; return the router and C."""
    heading("1. Start three stand-in workers, then the router in front of A and B")
    print("Each worker binds a free port (--port 0) and logs the URL it listens on.")
    deadline = time.monotonic() + STARTUP_DEADLINE
    worker_a = procs.start("worker A (image, T2I)", WORKER_SCRIPT, "--port", "0", "--task-type", "T2I")
    worker_b = procs.start("worker B (video, T2V)", WORKER_SCRIPT, "--port", "0", "--task-type", "T2V",
                           "--video-latency", "1")
    worker_c = procs.start("worker C (image, T2I; added later)", WORKER_SCRIPT, "--port", "0",
                           "--task-type", "T2I")
    for worker in (worker_a, worker_b, worker_c):
        print(f"$ {worker.shown_command} &    # {worker.name}")
    await wait_until_ready(session, [worker_a, worker_b, worker_c], deadline)

    for attempt in range(3):  # the free port may be taken between our check and the router's bind
        port = free_port()
        router = procs.start("router", ROUTER_SCRIPT, "--host", "127.0.0.1", "--port", str(port),
                             "--worker-urls", str(worker_a.url), str(worker_b.url),
                             "--health-check-interval", "1")
        router.url = f"http://127.0.0.1:{port}"
        print(f"$ {router.shown_command} &")
        try:
            await wait_until_ready(session, [router], deadline)
            break
        except DemoFailed:
            if attempt == 2 or "address already in use" not in router.output().lower():
                raise
            print(f"   port {port} was taken meanwhile; trying another")
            procs.started.remove(router)
    return router, worker_c


async def run_requests(demo: Demo, worker_c: Process) -> None:
    """Send the README's example requests through the router, in order."""
    demo.step("Router health (GET /health)",
              "200 while at least one worker can take requests; weight_version counts updates.")
    await demo.call("GET", "/health")

    demo.step("Add worker C, then list the workers (POST /add_worker?url=..., GET /list_workers)",
              "201 when the worker is new (200 if it was already registered).")
    await demo.call("POST", f"/add_worker?url={worker_c.url}", expect=201)
    print()
    await demo.call("GET", "/list_workers")

    demo.step("Per-worker state (GET /health_workers)",
              "task_type comes from each worker's GET /v1/models: image requests go only to\n"
              "T2I workers (A, C), video requests only to T2V workers (B).")
    await demo.call("GET", "/health_workers")

    demo.step("Generate an image as base64 (POST /generate)",
              "Forwarded to POST /v1/images/generations on the least-loaded image worker.\n"
              "X-Weight-Version: the weight version the chosen worker held.")
    await demo.call("POST", "/generate", {"prompt": "a cat wearing a hat", "n": 1, "size": "1024x1024",
                                          "response_format": "b64_json"}, headers=("X-Weight-Version",))

    demo.step("Generate an image as a URL, then download it (POST /generate, GET its url)",
              "The url is relative to the router, which sends the download to the worker that\n"
              "made the image.")
    answer = await demo.call("POST", "/generate", {"prompt": "a cat wearing a hat", "n": 1,
                                                   "size": "1024x1024", "response_format": "url"},
                             headers=("X-Weight-Version",))
    try:
        image_url = answer.body["data"][0]["url"]
    except (KeyError, IndexError, TypeError):
        image_url = None
    if isinstance(image_url, str):
        print()
        await demo.download(image_url, "image.jpg")
    else:
        demo.problems.append("POST /generate (url): no data[0].url in the answer")
        print("!! no data[0].url in the answer: skipping the download")

    demo.step("Video job: create, poll until completed, download (POST /generate_video)",
              "Forwarded to POST /v1/videos on a video worker; the job id then sticks to it.")
    answer = await demo.call("POST", "/generate_video",
                             {"prompt": "a wave breaking on a beach", "seconds": 4})
    video_id = answer.body.get("id") if isinstance(answer.body, dict) else None
    if isinstance(video_id, str):
        await poll_video(demo, video_id)
    else:
        demo.problems.append("POST /generate_video: no job id in the answer")
        print("!! no job id in the answer: skipping the poll and the download")

    demo.step("Reload weights on every worker (POST /update_weights_from_disk)",
              "Broadcast to every available worker: one result per worker.")
    await demo.call("POST", "/update_weights_from_disk", {"model_path": "/checkpoints/step-100"})
    print()
    await demo.call("GET", "/health")

    demo.step("Sleep and wake (POST /release_memory_occupation, /resume_memory_occupation)",
              "While every worker sleeps, generation requests get 503.")
    await demo.call("POST", "/release_memory_occupation", {})
    print()
    await demo.call("POST", "/generate", {"prompt": "a cat wearing a hat", "n": 1, "size": "1024x1024",
                                          "response_format": "b64_json"}, expect=503)
    print()
    await demo.call("POST", "/resume_memory_occupation", {})

    demo.step("Prometheus metrics (GET /metrics)",
              "Only the request counters are shown (the first 10 lines of them).")
    print(curl("GET", demo.router + "/metrics") + " | grep '^diffusion_router_requests_total' | head -10")
    answer = await demo.call("GET", "/metrics", quiet=True)
    print(f"-> HTTP {answer.status} {answer.reason}   Content-Type: {answer.headers.get('Content-Type')}")
    demo.check("GET /metrics", answer.status, 200)
    if not isinstance(answer.body, str):  # an error answer is JSON
        show_json(answer.body)
        return
    text = answer.body
    counters = [line for line in text.splitlines() if line.startswith("diffusion_router_requests_total")]
    print("\n".join(counters[:10]) or "(no diffusion_router_requests_total lines)")
    if len(counters) > 10:
        print(f"... {len(counters) - 10} more diffusion_router_requests_total lines")


async def poll_video(demo: Demo, video_id: str) -> None:
    """Poll the job every VIDEO_POLL seconds until completed, then download its video."""
    path = f"/v1/videos/{video_id}"
    print(f"\nPolling every {VIDEO_POLL:g} s until status is completed:")
    print(curl("GET", demo.router + path))
    deadline = time.monotonic() + VIDEO_DEADLINE
    started = time.monotonic()
    while True:
        answer = await demo.call("GET", path, quiet=True)
        status = answer.body.get("status") if isinstance(answer.body, dict) else None
        print(f"   after {time.monotonic() - started:4.1f} s: HTTP {answer.status}, status {status!r}")
        demo.check(f"GET {path}", answer.status, 200)
        if answer.status != 200 or status in ("completed", "failed"):
            break
        if time.monotonic() > deadline:
            demo.problems.append(f"GET {path}: not completed within {VIDEO_DEADLINE:g} s")
            print(f"!! not completed within {VIDEO_DEADLINE:g} s")
            return
        await asyncio.sleep(VIDEO_POLL)
    show_json(answer.body)
    if status != "completed":
        demo.problems.append(f"GET {path}: job ended as {status!r}")
        return
    print()
    await demo.download(f"{path}/content", "video.mp4")


# ---------------------------------------------------------------- main

async def run_demo(procs: Processes) -> int:
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        router, worker_c = await start_all(session, procs)
        demo = Demo(session, str(router.url))
        try:
            await run_requests(demo, worker_c)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise DemoFailed(f"request to the router failed: {exc!r}") from None
        for process in procs.started:
            process.check_alive()
    heading("Summary")
    if demo.problems:
        print("Unexpected answers:")
        for problem in demo.problems:
            print(f"  - {problem}")
        procs.show_logs()
        return 1
    print("Every request got the status it should.")
    return 0


def on_sigterm(signum: int, frame: Any) -> None:
    """Stop as Ctrl-C does, so the same cleanup runs."""
    raise KeyboardInterrupt(signum)


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)  # under make, stdout is a pipe: show steps as they run
    signal.signal(signal.SIGTERM, on_sigterm)
    with tempfile.TemporaryDirectory(prefix="diffusion-router-demo-") as log_dir:
        procs = Processes(Path(log_dir))
        try:
            return asyncio.run(run_demo(procs))
        except KeyboardInterrupt as exc:
            terminated = exc.args == (signal.SIGTERM,)
            print("\nTerminated." if terminated else "\nInterrupted.")
            return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
        except DemoFailed as exc:
            print(f"\nFAILED: {exc}")
            procs.show_logs()
            return 1
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
            procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
