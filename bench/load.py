"""Closed-loop HTTP load generator: a fixed number of requests, a time cap, one JSON line out.

    python bench/load.py --url http://127.0.0.1:8080/generate --requests 5000 --concurrency 64 \
        --time-cap 20 --method POST --body '{"prompt": "a cat"}'

`--concurrency` clients each send a request, read the whole answer (bytes are counted, never
parsed) and send the next, until `--requests` answers arrived or `--time-cap` seconds passed.
The aiohttp connector allows exactly `--concurrency` connections, all kept alive. Given several
`--url`s, the clients are spread over them in turn (client i always uses url i mod n).
`--warmup N` first sends N requests the same way, unmeasured (connections stay open).

Prints one JSON object: count (2xx answers), errors (others, by status or exception name),
elapsed, bytes, rps, mb_per_s (10^6 bytes/s), latency percentiles in ms (p50, p90, p99, max), capped
(the time cap stopped the run) and, with --split-size, how many answers were below / at or
above that many bytes (tells two workers apart when they answer different sizes).
Stdlib and aiohttp only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import resource
import sys
import time

import aiohttp

BIG = 4 << 20  # answers up to this size (by Content-Length) are read in one call, bigger streamed


def raise_fd_limit() -> int:
    """Lift the soft open-file limit to the hard one: a thousand open requests need the fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None if empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


class Run:
    """Counters of one measured phase."""

    def __init__(self, split: int | None):
        self.latencies: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.bytes = 0
        self.split = split
        self.below = 0
        self.above = 0


async def one_request(session: aiohttp.ClientSession, args: argparse.Namespace, url: str, body: bytes | None,
                      run: Run | None) -> None:
    started = time.perf_counter()
    try:
        async with session.request(args.method, url, data=body) as response:
            length = response.content_length
            if length is not None and length <= BIG:
                size = len(await response.read())
            else:
                size = 0
                async for chunk in response.content.iter_chunked(1 << 20):
                    size += len(chunk)
            status = response.status
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - counted, never fatal: a broken answer is a result
        if run is not None:
            run.errors[type(exc).__name__] += 1
        return
    if run is None:
        return
    if not 200 <= status < 300:
        run.errors[f"HTTP {status}"] += 1
        return
    run.latencies.append(time.perf_counter() - started)
    run.bytes += size
    if run.split is not None:
        if size < run.split:
            run.below += 1
        else:
            run.above += 1


async def phase(session: aiohttp.ClientSession, args: argparse.Namespace, body: bytes | None, total: int,
                run: Run | None, deadline: float) -> bool:
    """Send `total` requests over `concurrency` loops; return True if the deadline cut it short."""
    issued = 0

    async def client(url: str) -> None:
        nonlocal issued
        while issued < total and time.perf_counter() < deadline:
            issued += 1
            await one_request(session, args, url, body, run)

    tasks = [asyncio.ensure_future(client(args.url[i % len(args.url)])) for i in range(min(args.concurrency, total))]
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return bool(pending) or issued < total


def request_body(args: argparse.Namespace) -> bytes | None:
    if args.body_file:
        with open(args.body_file, "rb") as f:
            return f.read()
    if args.body is not None:
        return args.body.encode()
    if args.body_size:
        return json.dumps({"prompt": "x" * max(0, args.body_size - 14)}).encode()
    return None


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


async def main_async(args: argparse.Namespace, body: bytes | None) -> dict:
    headers = {"Content-Type": args.content_type} if body is not None else {}
    for header in args.header:
        name, _, value = header.partition(":")
        headers[name.strip()] = value.strip()
    connector = aiohttp.TCPConnector(limit=args.concurrency, limit_per_host=0, force_close=False,
                                     keepalive_timeout=600)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers,
                                     auto_decompress=False, read_bufsize=1 << 20) as session:
        if args.warmup:
            await phase(session, args, body, args.warmup, None, time.perf_counter() + args.time_cap)
        run = Run(args.split_size)
        start = time.perf_counter()
        capped = await phase(session, args, body, args.requests, run, start + args.time_cap)
        elapsed = time.perf_counter() - start
    lat = sorted(run.latencies)
    result = {
        "url": args.url,
        "count": len(lat),
        "errors": sum(run.errors.values()),
        "error_kinds": dict(run.errors),
        "elapsed": round(elapsed, 4),
        "bytes": run.bytes,
        "rps": round(len(lat) / elapsed, 2) if elapsed > 0 else None,
        "mb_per_s": round(run.bytes / elapsed / 1e6, 2) if elapsed > 0 else None,
        "p50_ms": ms(percentile(lat, 50)),
        "p90_ms": ms(percentile(lat, 90)),
        "p99_ms": ms(percentile(lat, 99)),
        "max_ms": ms(lat[-1] if lat else None),
        "capped": capped,
    }
    if args.split_size is not None:
        result["below_split"] = run.below
        result["above_split"] = run.above
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, action="append", help="target (repeatable: clients take turns)")
    p.add_argument("--requests", type=int, required=True, help="answers to wait for")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight (= connections)")
    p.add_argument("--time-cap", type=float, default=60.0,
                   help="seconds the measured requests may take (the warm-up gets as long)")
    p.add_argument("--method", default="GET")
    body = p.add_mutually_exclusive_group()
    body.add_argument("--body", help="request body text")
    body.add_argument("--body-file", help="request body read from this file")
    body.add_argument("--body-size", type=int, help='a JSON {"prompt": "xxx..."} body of about this many bytes')
    p.add_argument("--content-type", default="application/json")
    p.add_argument("--header", action="append", default=[], help="extra header 'Name: value' (repeatable)")
    p.add_argument("--warmup", type=int, default=0, help="unmeasured requests sent first")
    p.add_argument("--split-size", type=int, help="count answers below / at or above this many bytes")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.concurrency < 1 or args.requests < 1:
        print("--requests and --concurrency must be at least 1", file=sys.stderr)
        return 2
    raise_fd_limit()
    result = asyncio.run(main_async(args, request_body(args)))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
