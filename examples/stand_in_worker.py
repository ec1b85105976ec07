"""Stand in for an sglang-diffusion worker over HTTP, for the router's tests, demo and benchmark.

It speaks the worker contract (/work/shared/worker-api.md: routes, success and error shapes,
status codes) without a GPU. Generations return deterministic filler files, video jobs complete
after a delay, and a mutable `WorkerBehaviour` injects latency and failures while the server
runs. Every request received is recorded under `SEEN`, so tests can assert what was forwarded.

Usage:
    python examples/stand_in_worker.py --port 10090 --task-type T2V --video-latency 2
In process (tests):
    runner, url = await start_worker(WorkerBehaviour(latency=0.1))
    ...
    await runner.cleanup()

Routes:
    GET  /health, /health_generate                   {"status":"ok"}, or health_status
    GET  /v1/models[/{model}], /models, /server_info, /model_info, /v1/model_info, /stats
    POST /v1/images/generations (JSON), /v1/images/edits (multipart)    synchronous images
    GET  /v1/images/{id}/content[?variant=i]                             streamed file
    POST/GET /v1/videos; GET/DELETE /v1/videos/{id}; GET /v1/videos/{id}/content[?variant=i]
    POST /v1/diffusion/generate, /vertex_generate (JSON), /rollout/generate (msgpack)
    POST /update_weights_from_disk, /update_weights_from_tensor,
         /update_weights_from_tensor_checker, /get_weights_checksum
    POST /release_memory_occupation, /resume_memory_occupation
    POST /v1/set_lora, /v1/merge_lora_weights, /v1/unmerge_lora_weights; GET /v1/list_loras
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import http
import json
import logging
import signal
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NoReturn

import click
from aiohttp import MultipartReader, StreamReader, web
from multidict import CIMultiDict
from yarl import URL

log = logging.getLogger("stand_in_worker")

IMAGE_TASKS = frozenset({"T2I", "I2I", "TI2I"})
VIDEO_TASKS = frozenset({"T2V", "I2V", "TI2V", "V2V", "F2V"})
NEEDS_IMAGE = frozenset({"I2V", "I2I", "I2M"})
FAIL_MODES = ("close_mid_body", "garbage", "hang")
WEIGHT_MODULES = ("transformer", "vae", "text_encoder")
OUTPUT_DIR = "/stand-in/outputs"  # reported as file_path; nothing is ever written to disk
# Magic header and media type per output format, so downloads sniff as the right kind of file.
FORMATS = {
    "jpeg": (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "image/jpeg"),
    "png": (b"\x89PNG\r\n\x1a\n", "image/png"),
    "webp": (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image/webp"),
    "mp4": (b"\x00\x00\x00\x18ftypmp42", "video/mp4"),
}
_FILLER = bytes(range(256))


# ---------------------------------------------------------------- behaviour and state

def _knob(default: Any, help: str, **extra: Any) -> Any:
    """Declare a behaviour field whose help text also documents its CLI option."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class WorkerBehaviour:
    """Describe how the stand-in behaves; mutable on purpose, tests change it while it runs."""

    task_type: str | None = _knob("T2I", "Model card task type (T2I, I2I, TI2I, T2V, I2V, TI2V, "
                                         "V2V, F2V, I2M, ...); '' or None reports null.")
    model_path: str = _knob("stand-in/model", "Initial model path (STATE holds the live one).")
    served_model_name: str | None = _knob(None, "Model card id [default: model path].")
    latency: float = _knob(0.0, "Seconds each image, native, rollout and vertex generation takes.")
    image_bytes: int = _knob(1024, "Size of each generated image file (b64 adds 33%).")
    video_bytes: int = _knob(4096, "Size of each generated video file.")
    video_latency: float = _knob(0.0, "Seconds a video job stays queued before it completes.")
    chunk_size: int = _knob(65536, "File downloads are streamed in chunks of this size.")
    download_pause: float = _knob(0.0, "Seconds a file download pauses after its first chunk.")
    fail_status: int | None = _knob(None, "Generation routes (video POST included) answer this "
                                          "status with plain text 'Internal Server Error'.")
    fail_mode: str | None = _knob(None, "Generation routes close the connection mid-body, answer "
                                        "200 non-JSON, or never answer.", choices=FAIL_MODES)
    health_status: int = _knob(200, "Status of /health and /health_generate.")
    health_delay: float = _knob(0.0, "Seconds the health probes wait before answering.")
    models_delay: float = _knob(0.0, "Seconds GET /v1/models waits before answering.")
    weight_update_status: int | None = _knob(None, "Weight updates fail with this status.")
    weight_update_latency: float = _knob(0.0, "Seconds a weight update takes.")
    lora_enabled: bool = _knob(True, "LoRA routes work (off: 500 'Lora is not enabled').")
    sleep_supported: bool = _knob(True, "Release/resume memory work (off: 500).")
    record_requests: bool = _knob(True, "Record every request under SEEN (off for long runs).")
    report_updates: bool = _knob(True, "Metadata routes report the updated model path (off: always the "
                                       "startup one, as builds that read it from their launch arguments).")


@dataclass(frozen=True)
class SeenRequest:
    """Record one request as received: raw path and query, headers and exact body bytes."""

    method: str
    path: str
    query_string: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass(frozen=True)
class StoredFile:
    """Describe generated files (one per variant) whose bytes are produced on demand."""

    fmt: str
    size: int
    variants: int = 1

    def name(self, file_id: str, variant: int) -> str:
        """Return one variant's file name, suffixed with its index when there are several."""
        stem = f"{file_id}_{variant}" if self.variants > 1 else file_id
        return f"{stem}.{'jpg' if self.fmt == 'jpeg' else self.fmt}"


@dataclass
class VideoJob:
    """Hold one video job; its status follows from the clock, so nothing runs in the background."""

    id: str
    model: str
    size: str
    seconds: str
    file: StoredFile
    delay: float
    error: str | None = None  # set when the job was submitted to a sleeping worker
    created_at: float = field(default_factory=time.time)
    ready_at: float = field(init=False)  # monotonic, so clock changes cannot finish jobs early

    def __post_init__(self) -> None:
        self.ready_at = time.monotonic() + self.delay

    @property
    def completed(self) -> bool:
        """Return whether the files can be downloaded."""
        return self.error is None and time.monotonic() >= self.ready_at

    def record(self, submitted: bool = False) -> dict[str, Any]:
        """Return the VideoResponse with its null fields; `submitted`: as the POST answers it."""
        done = not submitted and time.monotonic() >= self.ready_at
        ok = not submitted and self.completed
        paths = [f"{OUTPUT_DIR}/{self.file.name(self.id, i)}" for i in range(self.file.variants)]
        return {
            "id": self.id, "object": "video", "model": self.model,
            "status": ("failed" if self.error else "completed") if done else "queued",
            "progress": 100 if ok else 0, "created_at": int(self.created_at), "size": self.size,
            "seconds": self.seconds, "quality": "standard", "url": None,
            "remixed_from_video_id": None,
            "completed_at": int(self.created_at + self.delay) if ok else None, "expires_at": None,
            "error": {"message": self.error} if done and self.error else None,
            "file_path": paths[0], "file_paths": paths if ok else None,
            "num_outputs": self.file.variants if ok else None,
            "peak_memory_mb": 1024.0 if ok else None,
            "inference_time_s": self.delay if ok else None,
        }


@dataclass
class WorkerState:
    """Hold what a real worker keeps in memory: sleep flag, weights, LoRAs and output stores."""

    model_path: str
    sleeping: bool = False
    weight_updates: list[dict[str, Any]] = field(default_factory=list)  # successful disk updates
    loras: dict[str, str] = field(default_factory=dict)  # nickname -> path
    active_loras: dict[str, list[str]] = field(default_factory=dict)  # module -> nicknames
    lora_merged: bool = False
    image_store: dict[str, StoredFile] = field(default_factory=dict)
    video_store: dict[str, VideoJob] = field(default_factory=dict)  # the worker's VIDEO_STORE


BEHAVIOUR = web.AppKey("behaviour", WorkerBehaviour)
SEEN = web.AppKey("seen", list[SeenRequest])
STATE = web.AppKey("state", WorkerState)
_CREATED = web.AppKey("created", int)


# ---------------------------------------------------------------- responses and encoders

class _Abort(Exception):
    """Carry a finished response out of nested helpers, as FastAPI's HTTPException does."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__(response.status)
        self.response = response


def _abort(status: int, payload: Any) -> NoReturn:
    """Stop the handler with a JSON response."""
    raise _Abort(web.json_response(payload, status=status))


def _plain(status: int, text: str | None = None) -> web.Response:
    """Return a plain-text response, by default the reason phrase as Starlette sends it."""
    try:
        text = text or http.HTTPStatus(status).phrase
    except ValueError:
        text = "Error"
    return web.Response(status=status, text=text)


def _internal_error() -> NoReturn:
    """Stop the handler as an unhandled exception in the real worker does: 500 plain text."""
    raise _Abort(_plain(500, "Internal Server Error"))


def _unprocessable(*errors: dict[str, Any]) -> NoReturn:
    """Stop the handler with FastAPI's 422 listing pydantic errors."""
    _abort(422, {"detail": list(errors)})


def _missing(body: Any, *names: str) -> NoReturn:
    """Stop the handler with pydantic's 422 for missing fields."""
    _unprocessable(*({"type": "missing", "loc": ["body", name], "msg": "Field required",
                      "input": body} for name in names))


async def _json_model(request: web.Request, *required: str) -> dict[str, Any]:
    """Parse a JSON object body as FastAPI does for a pydantic model; 422 otherwise."""
    try:
        body = json.loads(await request.read())
    except ValueError as exc:
        _unprocessable({"type": "json_invalid", "loc": ["body", 0], "msg": "JSON decode error",
                        "input": {}, "ctx": {"error": str(exc)}})
    if not isinstance(body, dict):
        _unprocessable({"type": "model_attributes_type", "loc": ["body"], "input": body,
                        "msg": "Input should be a valid dictionary or object to extract fields "
                               "from"})
    if missing := [name for name in required if body.get(name) is None]:
        _missing(body, *missing)
    return body


async def _json_or_500(request: web.Request) -> dict[str, Any]:
    """Parse a body the worker reads with request.json(); anything but an object crashes it."""
    try:
        body = json.loads(await request.read())
    except ValueError:
        _internal_error()
    if not isinstance(body, dict):
        _internal_error()  # the worker calls body.get and raises AttributeError
    return body


async def _read_form(request: web.Request) -> tuple[dict[str, str], dict[str, int]]:
    """Parse a multipart body; return its text fields and a count of files per field name."""
    if request.content_type != "multipart/form-data":
        return {}, {}  # FastAPI then sees no form fields at all
    body = await request.read()  # the middleware consumed the stream, so parse the cached bytes
    # A limit above the body size means feeding it never asks the live connection to pause.
    stream = StreamReader(request.protocol, max(len(body), 1 << 16),
                          loop=asyncio.get_running_loop())
    stream.feed_data(body)
    stream.feed_eof()
    fields: dict[str, str] = {}
    files: dict[str, int] = {}
    try:
        async for part in MultipartReader(request.headers, stream):
            if isinstance(part, MultipartReader) or part.name is None:
                continue
            if part.filename is None:
                fields[part.name] = await part.text()
            else:
                await part.release()
                files[part.name] = files.get(part.name, 0) + 1
    except ValueError:
        _abort(400, {"detail": "There was an error parsing the body"})
    return fields, files


def _file_chunks(fmt: str, size: int, chunk_size: int) -> Iterator[bytes]:
    """Yield `size` deterministic bytes, the format's magic header then filler, chunk by chunk."""
    magic = FORMATS[fmt][0]
    chunk_size = max(1, chunk_size)
    pattern = _FILLER * (chunk_size // len(_FILLER) + 2)
    for start in range(0, size, chunk_size):
        offset, n = start % len(_FILLER), min(chunk_size, size - start)
        chunk = pattern[offset:offset + n]
        if start < len(magic):
            head = magic[start:start + n]
            chunk = head + chunk[len(head):]
        yield chunk


def _file_bytes(fmt: str, size: int) -> bytes:
    """Return a whole generated file; only for outputs that are inlined in a response anyway."""
    return b"".join(_file_chunks(fmt, size, 1 << 20))


def _b64(data: bytes) -> str:
    """Return base64 text."""
    return base64.b64encode(data).decode()


async def _send_file(request: web.Request, file_id: str, stored: StoredFile) -> web.StreamResponse:
    """Stream one variant of a stored file in chunk_size pieces, never holding it whole."""
    variant = request.query.get("variant", "0")
    if not (variant.isdigit() and int(variant) < stored.variants):
        _abort(404, {"detail": f"Variant {variant} not found"})
    response = web.StreamResponse(headers={
        "Content-Type": FORMATS[stored.fmt][1],
        "Content-Disposition": f'attachment; filename="{stored.name(file_id, int(variant))}"'})
    response.content_length = stored.size
    await response.prepare(request)
    if request.method == "HEAD":  # headers only: a body here would desynchronise a kept-alive connection
        await response.write_eof()
        return response
    behaviour = request.app[BEHAVIOUR]
    for index, chunk in enumerate(_file_chunks(stored.fmt, stored.size, behaviour.chunk_size)):
        await response.write(chunk)  # waits for the socket to drain, so memory stays flat
        if index == 0 and behaviour.download_pause > 0:
            await asyncio.sleep(behaviour.download_pause)
    await response.write_eof()
    return response


def _msgpack(obj: Any) -> bytes:
    """Encode None, bool, int, float, str, bytes, list and dict as MessagePack."""
    out = bytearray()
    _pack(obj, out)
    return bytes(out)


def _pack(obj: Any, out: bytearray) -> None:
    """Append one value to a MessagePack buffer."""
    if obj is None or isinstance(obj, bool):
        out.append({None: 0xC0, False: 0xC2, True: 0xC3}[obj])
    elif isinstance(obj, int):
        if -32 <= obj < 128:
            out += struct.pack(">b", obj) if obj < 0 else bytes([obj])  # the fixint forms
        else:
            out += struct.pack(">BQ", 0xCF, obj) if obj > 0 else struct.pack(">Bq", 0xD3, obj)
    elif isinstance(obj, float):
        out += struct.pack(">Bd", 0xCB, obj)
    elif isinstance(obj, str):
        _msgpack_length(out, len(data := obj.encode()), 0xA0, 31, (0xD9, 0xDA, 0xDB))
        out += data
    elif isinstance(obj, (bytes, bytearray)):
        _msgpack_length(out, len(obj), 0, -1, (0xC4, 0xC5, 0xC6))  # bin has no fix form
        out += obj
    elif isinstance(obj, (list, tuple)):
        _msgpack_length(out, len(obj), 0x90, 15, (None, 0xDC, 0xDD))
        for item in obj:
            _pack(item, out)
    elif isinstance(obj, dict):
        _msgpack_length(out, len(obj), 0x80, 15, (None, 0xDE, 0xDF))
        for key, value in obj.items():
            _pack(key, out)
            _pack(value, out)
    else:
        raise TypeError(f"cannot encode {type(obj).__name__} as msgpack")


def _msgpack_length(out: bytearray, n: int, fix: int, fix_max: int,
                    codes: tuple[int | None, int, int]) -> None:
    """Append a length header: the fix form if it fits, else the 8-, 16- or 32-bit form."""
    if n <= fix_max:
        out.append(fix | n)
    elif codes[0] is not None and n < 1 << 8:
        out += struct.pack(">BB", codes[0], n)
    elif n < 1 << 16:
        out += struct.pack(">BH", codes[1], n)
    else:
        out += struct.pack(">BI", codes[2], n)


def _tensor(data: bytes, shape: list[int], dtype: str) -> dict[str, Any]:
    """Wrap bytes in the worker's tensor envelope: base64 of a one-tensor safetensors file."""
    header = json.dumps({"tensor": {"dtype": {"uint8": "U8", "float32": "F32"}[dtype],
                                    "shape": shape, "data_offsets": [0, len(data)]}}).encode()
    return {"__tensor__": True, "data": _b64(struct.pack("<Q", len(header)) + header + data),
            "shape": shape, "dtype": dtype}


# ---------------------------------------------------------------- generation helpers

async def _generate(request: web.Request, wait: bool = True) -> float:
    """Wait the configured latency, then apply the injected failure; return the seconds spent."""
    behaviour = request.app[BEHAVIOUR]
    started = time.monotonic()
    if wait and behaviour.latency > 0:
        await asyncio.sleep(behaviour.latency)
    if behaviour.fail_mode == "hang":
        await asyncio.Event().wait()  # never set; shutdown cancels it (start_worker's timeout)
    if behaviour.fail_mode == "close_mid_body":
        raise _Abort(await _close_mid_body(request))
    if behaviour.fail_mode == "garbage":
        raise _Abort(web.Response(body=b'{"id": "stand-in", "data": [<<< not json',
                                  content_type="application/json"))
    if behaviour.fail_mode is not None:
        raise ValueError(f"unknown fail_mode {behaviour.fail_mode!r}; use one of {FAIL_MODES}")
    if behaviour.fail_status is not None:
        raise _Abort(_plain(behaviour.fail_status, "Internal Server Error"))
    return time.monotonic() - started


async def _close_mid_body(request: web.Request) -> web.StreamResponse:
    """Promise a body, send image_bytes of it, then close the connection: a truncated transfer."""
    sent = request.app[BEHAVIOUR].image_bytes  # large images make the break land mid-stream
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = max(64 * 1024, 2 * sent)
    await response.prepare(request)
    await response.write(b'{"id": "stand-in", "data": [{"b64_json": "' + b"A" * sent)
    request.transport.close()  # close, not abort: the partial body is flushed first
    return response


def _task(request: web.Request) -> str | None:
    """Return the served task type, None when unset."""
    return request.app[BEHAVIOUR].task_type or None


def _output(request: web.Request) -> tuple[str, bytes]:
    """Return the format and whole bytes of one output of this model, a video or a JPEG image."""
    behaviour = request.app[BEHAVIOUR]
    if _task(request) in VIDEO_TASKS:
        return "mp4", _file_bytes("mp4", behaviour.video_bytes)
    return "jpeg", _file_bytes("jpeg", behaviour.image_bytes)


def _count(value: Any) -> int:
    """Return an output count clamped to 1..10 as the worker does; ValueError if not a number."""
    return min(10, max(1, int(value if value not in (None, "") else 1)))


async def _images_response(request: web.Request, params: dict[str, Any],
                           default_format: str) -> web.Response:
    """Generate images for generations and edits, which answer the same ImageResponse."""
    try:
        n = _count(params.get("n"))
    except (TypeError, ValueError):
        _unprocessable({"type": "int_parsing", "loc": ["body", "n"], "input": params["n"],
                        "msg": "Input should be a valid integer"})
    elapsed = await _generate(request)
    state = request.app[STATE]
    if state.sleeping:
        _internal_error()
    response_format = params.get("response_format") or default_format
    if response_format not in ("url", "b64_json"):
        _abort(400, {"detail": f"response_format={response_format} is not supported"})
    fmt = params.get("output_format") or ("png" if params.get("background") == "transparent"
                                          else "jpeg")
    stored = StoredFile(fmt if fmt in ("png", "webp") else "jpeg",
                        request.app[BEHAVIOUR].image_bytes, n)
    image_id = uuid.uuid4().hex
    state.image_store[image_id] = stored  # kept for /content whatever the response format
    b64 = _b64(_file_bytes(stored.fmt, stored.size)) if response_format == "b64_json" else None
    data = [{"b64_json": b64,
             "url": (f"/v1/images/{image_id}/content" + (f"?variant={i}" if n > 1 else "")
                     if response_format == "url" else None),
             "revised_prompt": params["prompt"],
             "file_path": f"{OUTPUT_DIR}/{stored.name(image_id, i)}", "resize": None}
            for i in range(n)]
    return web.json_response({"id": image_id, "created": int(time.time()), "data": data,
                              "peak_memory_mb": 1024.0, "inference_time_s": elapsed,
                              "usage": None})


# ---------------------------------------------------------------- handlers: health, metadata

async def health(request: web.Request) -> web.Response:
    """Answer a health probe; like the real one it knows nothing about sleep."""
    behaviour = request.app[BEHAVIOUR]
    if behaviour.health_delay > 0:
        await asyncio.sleep(behaviour.health_delay)
    if behaviour.health_status == 200:
        return web.json_response({"status": "ok"})
    return _plain(behaviour.health_status)


def _card(request: web.Request) -> dict[str, Any]:
    """Return the one model card this worker serves."""
    behaviour = request.app[BEHAVIOUR]
    return {"id": behaviour.served_model_name or behaviour.model_path, "object": "model",
            "created": request.app[_CREATED], "owned_by": "sglang",
            "root": request.app[STATE].model_path, "parent": None, "max_model_len": None,
            "num_gpus": 1, "task_type": _task(request), "dit_precision": "bf16",
            "vae_precision": "fp32"}


async def list_models(request: web.Request) -> web.Response:
    """List the served model."""
    if request.app[BEHAVIOUR].models_delay > 0:
        await asyncio.sleep(request.app[BEHAVIOUR].models_delay)
    return web.json_response({"object": "list", "data": [_card(request)]})


async def get_model(request: web.Request) -> web.Response:
    """Return the card for a model id, or the OpenAI-style 404."""
    model, card = request.match_info["model"], _card(request)
    if model != card["id"]:
        _abort(404, {"error": {"message": f"The model '{model}' does not exist",
                               "type": "invalid_request_error", "param": "model",
                               "code": "model_not_found"}})
    return web.json_response(card)


async def metadata(request: web.Request) -> web.Response:
    """Answer /models, /server_info, /model_info, /v1/model_info and /stats."""
    behaviour, task = request.app[BEHAVIOUR], _task(request)
    model_path = request.app[STATE].model_path if behaviour.report_updates else behaviour.model_path
    bodies = {
        "/models": {"model_path": model_path, "num_gpus": 1, "task_type": task,
                    "dit_precision": "bf16", "vae_precision": "fp32"},
        "/server_info": {"model_path": model_path,
                         "served_model_name": behaviour.served_model_name or behaviour.model_path,
                         "tp_size": 1, "dp_size": 1, "version": "stand-in"},
        "/model_info": {"model_path": model_path, "is_generation": True,
                        "model_type": "diffusion", "architectures": ["StandInPipeline"],
                        "has_image_understanding": task in {"I2I", "TI2I", "I2V", "TI2V", "I2M"},
                        "has_audio_understanding": False, "task_type": task,
                        "is_image_gen": task in IMAGE_TASKS},
        "/v1/model_info": {"model_path": model_path},
        "/stats": {"status": "ok", "model_path": model_path,
                   "disagg": {"role": "monolithic", "message": "not in disagg mode"}},
    }
    return web.json_response(bodies[request.path])


# ---------------------------------------------------------------- handlers: images and videos

async def image_generations(request: web.Request) -> web.Response:
    """Generate images from a JSON request; response_format defaults to url."""
    return await _images_response(request, await _json_model(request, "prompt"), "url")


async def image_edits(request: web.Request) -> web.Response:
    """Edit images from a multipart request; response_format defaults to b64_json."""
    fields, files = await _read_form(request)
    if not fields.get("prompt"):
        _missing(None, "prompt")
    if not (files.get("image") or files.get("image[]") or fields.get("url")
            or fields.get("url[]")):
        _abort(422, {"detail": "Field 'image' or 'url' is required"})
    return await _images_response(request, fields, "b64_json")


async def image_content(request: web.Request) -> web.StreamResponse:
    """Stream a stored image, or 404."""
    image_id = request.match_info["image_id"]
    if (stored := request.app[STATE].image_store.get(image_id)) is None:
        _abort(404, {"detail": "Image not found"})
    return await _send_file(request, image_id, stored)


async def _video_params(request: web.Request) -> tuple[dict[str, Any], bool]:
    """Read a JSON or multipart video request, flattening extra_body; return it and has-image."""
    if request.content_type == "multipart/form-data":
        params, files = await _read_form(request)
        extras = ("extra_body", "extra_params")
        if not params.get("prompt"):
            _abort(400, {"detail": "prompt is required"})
    else:
        try:
            params = json.loads(await request.read())
        except ValueError as exc:
            _abort(400, {"detail": f"Invalid request body: {exc}"})
        if not isinstance(params, dict):
            _abort(400, {"detail": "Invalid request body: expected a JSON object"})
        files, extras = {}, ("extra_body", "extra_json")
        if not params.get("prompt"):  # pydantic's error, caught and re-raised as a 400
            _abort(400, {"detail": "Invalid request body: 1 validation error for "
                                   "VideoGenerationsRequest\nprompt\n  Field required"})
    for key in extras:
        extra = params.pop(key, None)
        try:
            extra = json.loads(extra) if isinstance(extra, str) else extra
        except ValueError as exc:
            _abort(400, {"detail": f"Invalid request body: {key}: {exc}"})
        params.update(extra if isinstance(extra, dict) else {})
    has_image = bool(files) or any(params.get(key) for key in (
        "input_reference", "reference_url", "video_path", "video_url"))
    return params, has_image


async def create_video(request: web.Request) -> web.Response:
    """Queue a video job and answer at once; a sleeping worker accepts it, then fails it."""
    params, has_image = await _video_params(request)
    if _task(request) in NEEDS_IMAGE and not has_image:
        _abort(400, {"detail": "input_reference or reference_url is required for "
                               "image-to-video generation"})
    try:
        n = _count(params.get("n") or params.get("num_outputs_per_prompt"))
        seconds = str(int(params.get("seconds") or 4))
    except (TypeError, ValueError) as exc:
        _abort(400, {"detail": f"Invalid request body: {exc}"})
    await _generate(request, wait=False)  # the POST returns at once; only failures apply
    behaviour, state = request.app[BEHAVIOUR], request.app[STATE]
    size = params.get("size") or (f"{params['width']}x{params['height']}"
                                  if params.get("width") and params.get("height") else "1280x720")
    job = VideoJob(id=f"video_{uuid.uuid4().hex}",
                   model=params.get("model") or behaviour.served_model_name or behaviour.model_path,
                   size=size, seconds=seconds, file=StoredFile("mp4", behaviour.video_bytes, n),
                   delay=behaviour.video_latency,
                   error="Server is sleeping" if state.sleeping else None)
    state.video_store[job.id] = job
    return web.json_response(job.record(submitted=True))


async def list_videos(request: web.Request) -> web.Response:
    """List this worker's jobs, newest first unless order=asc, after a cursor id, up to limit."""
    limit = request.query.get("limit", "100")
    if not (limit.isdigit() and 1 <= int(limit) <= 100):
        _unprocessable({"type": "int_parsing", "loc": ["query", "limit"], "input": limit,
                        "msg": "Input should be an integer between 1 and 100"})
    jobs = list(request.app[STATE].video_store.values())  # insertion order is creation order
    if request.query.get("order", "desc").lower() != "asc":
        jobs.reverse()
    if after := request.query.get("after"):
        ids = [job.id for job in jobs]
        jobs = jobs[ids.index(after) + 1:] if after in ids else []
    return web.json_response({"object": "list",
                              "data": [job.record() for job in jobs[:int(limit)]]})


def _job(request: web.Request) -> VideoJob:
    """Return the job named in the path, or stop with 404."""
    if (job := request.app[STATE].video_store.get(request.match_info["video_id"])) is None:
        _abort(404, {"detail": "Video not found"})
    return job


async def video(request: web.Request) -> web.Response:
    """Return a job record (GET), or forget the job and return it marked deleted (DELETE)."""
    job = _job(request)
    if request.method != "DELETE":
        return web.json_response(job.record())
    del request.app[STATE].video_store[job.id]  # a real worker keeps generating regardless
    return web.json_response({**job.record(), "status": "deleted"})


async def video_content(request: web.Request) -> web.StreamResponse:
    """Stream a completed job's video; 404 while queued, and for failed jobs (no file)."""
    if not (job := _job(request)).completed:
        _abort(404, {"detail": "Generation is still in-progress"})
    return await _send_file(request, job.id, job.file)


# ---------------------------------------------------------------- handlers: native, rollout, vertex

async def diffusion_generate(request: web.Request) -> web.Response:
    """Generate one output and return it inline as base64 (whole videos included)."""
    await _json_model(request, "prompt")
    elapsed = await _generate(request)
    if request.app[STATE].sleeping:
        _internal_error()
    fmt, output = _output(request)
    output_id = uuid.uuid4().hex
    return web.json_response({
        "id": output_id, "created": int(time.time()), "output_b64": _b64(output),
        "output_format": fmt, "file_path": f"{OUTPUT_DIR}/{StoredFile(fmt, 0).name(output_id, 0)}",
        "peak_memory_mb": 1024.0, "inference_time_s": elapsed, "trajectory": None})


async def rollout_generate(request: web.Request) -> web.Response:
    """Generate RL rollout samples; answer a msgpack list with one record per output."""
    body = await _json_model(request, "prompt")
    try:
        count = _count(body.get("num_outputs_per_prompt"))
        steps = int(body.get("num_inference_steps") or 4)
    except (TypeError, ValueError) as exc:
        _abort(400, {"detail": f"Invalid sampling params: {exc}"})
    elapsed = await _generate(request)
    if request.app[STATE].sleeping:
        _abort(500, {"detail": "Generation failed: Server is sleeping"})
    _, output = _output(request)
    log_probs = _tensor(struct.pack(f"<{steps}f", *[-1.0] * steps), [steps], "float32")
    samples = [{
        "request_id": uuid.uuid4().hex, "prompt": body["prompt"], "seed": body.get("seed", 1024),
        "generated_output": _tensor(output, [len(output)], "uint8"),
        "rollout_log_probs": log_probs if body.get("rollout", True) else None,
        "rollout_debug_tensors": None, "denoising_env": None, "dit_trajectory": None,
        "inference_time_s": elapsed, "peak_memory_mb": 1024.0,
    } for _ in range(count)]
    return web.Response(body=_msgpack(samples), content_type="application/msgpack")


async def vertex_generate(request: web.Request) -> web.Response:
    """Answer Vertex AI predictions; always 200, failures become per-prediction errors."""
    body = await _json_model(request, "instances")
    if not isinstance(instances := body["instances"], list):
        _unprocessable({"type": "list_type", "loc": ["body", "instances"], "input": instances,
                        "msg": "Input should be a valid list"})
    elapsed = await _generate(request)
    fmt, output = _output(request)
    encoded = _b64(output)
    predictions = []
    for instance in instances:
        prompt = (instance.get("prompt") or instance.get("text")
                  if isinstance(instance, dict) else None)
        if request.app[STATE].sleeping:
            predictions.append({"error": "Server is sleeping"})
        elif not prompt:
            predictions.append({"error": "prompt is required"})
        else:
            predictions.append({"prompt": prompt, "output": encoded,
                                "output_format": fmt, "peak_memory_mb": 1024.0,
                                "inference_time_s": elapsed})
    return web.json_response({"predictions": predictions})


# ---------------------------------------------------------------- handlers: weights, sleep, LoRA

async def _update_weights(request: web.Request, required: str,
                          apply: Callable[[WorkerState, dict[str, Any]], str]) -> web.Response:
    """Run a weight operation as the scheduler does: validate, inject, refuse while asleep."""
    body = await _json_or_500(request)
    behaviour, state = request.app[BEHAVIOUR], request.app[STATE]
    if behaviour.weight_update_latency > 0:
        await asyncio.sleep(behaviour.weight_update_latency)  # queued behind generations
    if not body.get(required):
        _abort(400, {"success": False, "message": f"{required} is required"})
    if behaviour.weight_update_status is not None:
        _abort(behaviour.weight_update_status,
               {"success": False, "message": "Failed to update weights (injected failure)"})
    if state.sleeping:
        _abort(500, {"success": False, "message": "Cannot update weights while the server is "
                                                  "sleeping. Call resume_memory_occupation first."})
    return web.json_response({"success": True, "message": apply(state, body)})


def _load_from_disk(state: WorkerState, body: dict[str, Any]) -> str:
    """Switch to the weights at body["model_path"]; /models and /server_info then report it."""
    state.model_path = body["model_path"]
    state.weight_updates.append(body)
    return f"Updated weights from {body['model_path']}"


async def get_weights_checksum(request: web.Request) -> web.Response:
    """Return a sha256 per module that changes with the weights; "not_found" if unknown."""
    body = await _json_or_500(request)
    model_path = request.app[STATE].model_path
    return web.json_response({
        name: hashlib.sha256(f"{model_path}:{name}".encode()).hexdigest()
        if name in WEIGHT_MODULES else "not_found"
        for name in body.get("module_names") or WEIGHT_MODULES})


async def set_sleeping(request: web.Request, sleeping: bool) -> web.Response:
    """Release (sleep) or resume GPU memory; repeating either is a successful no-op."""
    state = request.app[STATE]
    if not request.app[BEHAVIOUR].sleep_supported:
        _abort(500, {"success": False, "sleeping": state.sleeping,
                     "message": "Sleep mode is not supported with FSDP inference"})
    if state.sleeping == sleeping:
        message = "already sleeping" if sleeping else "already awake"
    else:
        message = "released memory occupation" if sleeping else "resumed memory occupation"
    state.sleeping = sleeping
    log.info("%s: %s", request.path, message)
    return web.json_response({"success": True, "sleeping": sleeping, "message": message})


def _lora_gate(request: web.Request, action: str) -> None:
    """Stop with the worker's 500 when LoRA support is off."""
    if not request.app[BEHAVIOUR].lora_enabled:
        _abort(500, {"detail": f"Failed to {action}: Lora is not enabled"})


async def set_lora(request: web.Request) -> web.Response:
    """Load and activate LoRA adapters on the target modules ("all" means the transformer)."""
    body = await _json_model(request, "lora_nickname")
    _lora_gate(request, "set LoRA adapter")
    state = request.app[STATE]
    nicknames = body["lora_nickname"]
    nicknames = nicknames if isinstance(nicknames, list) else [nicknames]
    paths = body.get("lora_path")
    paths = paths if isinstance(paths, list) else [paths] * len(nicknames)
    for nickname, path in zip(nicknames, paths, strict=False):
        state.loras[nickname] = path or state.loras.get(nickname) or nickname
    target = body.get("target") or "all"
    for module in target if isinstance(target, list) else [target]:
        state.active_loras["transformer" if module == "all" else module] = list(nicknames)
    return web.json_response({"status": "ok",
                              "message": f"Set LoRA adapter(s) {', '.join(map(str, nicknames))}"})


async def merge_lora(request: web.Request, merged: bool) -> web.Response:
    """Merge the active LoRA into the base weights, or unmerge it."""
    verb = "merge" if merged else "unmerge"
    _lora_gate(request, f"{verb} LoRA weights")
    request.app[STATE].lora_merged = merged
    return web.json_response({"status": "ok", "message": f"{verb.capitalize()}d LoRA weights"})


async def list_loras(request: web.Request) -> web.Response:
    """List loaded adapters and the active ones per module."""
    _lora_gate(request, "list LoRA adapters")
    state = request.app[STATE]
    return web.json_response({
        "loaded_adapters": [{"nickname": nick, "path": path} for nick, path in state.loras.items()],
        "active": state.active_loras})


# ---------------------------------------------------------------- app factory

@web.middleware
async def _record_and_shape(request: web.Request,
                            handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                            ) -> web.StreamResponse:
    """Record every request, then answer routing misses and aborts with FastAPI's shapes."""
    body = await request.read()
    if request.app[BEHAVIOUR].record_requests:
        request.app[SEEN].append(SeenRequest(
            request.method, request.rel_url.raw_path, request.rel_url.raw_query_string,
            CIMultiDict(request.headers), body))
    miss = request.match_info.http_exception
    if isinstance(miss, web.HTTPMethodNotAllowed):
        return web.json_response({"detail": "Method Not Allowed"}, status=405,
                                 headers={"Allow": ", ".join(sorted(miss.allowed_methods))})
    if miss is not None:
        return web.json_response({"detail": "Not Found"}, status=miss.status)
    try:
        return await handler(request)
    except _Abort as exc:
        return exc.response


def create_worker_app(behaviour: WorkerBehaviour | None = None) -> web.Application:
    """Build the stand-in worker app; its state lives under BEHAVIOUR, SEEN and STATE."""
    behaviour = behaviour or WorkerBehaviour()
    # aiohttp's 1 MiB default would reject the large bodies tests send.
    app = web.Application(middlewares=[_record_and_shape], client_max_size=1 << 30)
    app[BEHAVIOUR] = behaviour
    app[SEEN] = []
    app[STATE] = WorkerState(model_path=behaviour.model_path)
    app[_CREATED] = int(time.time())
    app.add_routes([
        web.get("/health", health), web.get("/health_generate", health),
        web.get("/v1/models", list_models),
        web.get("/v1/models/{model:.+}", get_model),  # ids are often paths with slashes
        *(web.get(path, metadata)
          for path in ("/models", "/server_info", "/model_info", "/v1/model_info", "/stats")),
        web.post("/v1/images/generations", image_generations),
        web.post("/v1/images/edits", image_edits),
        web.get("/v1/images/{image_id}/content", image_content),
        web.post("/v1/videos", create_video), web.get("/v1/videos", list_videos),
        web.get("/v1/videos/{video_id}", video), web.delete("/v1/videos/{video_id}", video),
        web.get("/v1/videos/{video_id}/content", video_content),
        web.post("/v1/diffusion/generate", diffusion_generate),
        web.post("/rollout/generate", rollout_generate),
        web.post("/vertex_generate", vertex_generate),
        web.post("/update_weights_from_disk",
                 partial(_update_weights, required="model_path", apply=_load_from_disk)),
        web.post("/update_weights_from_tensor",
                 partial(_update_weights, required="serialized_named_tensors",
                         apply=lambda state, body: "Updated weights from tensor")),
        web.post("/update_weights_from_tensor_checker",
                 partial(_update_weights, required="expected_named_tensors_sha256",
                         apply=lambda state, body: f"Checked {body.get('target_module')}")),
        web.post("/get_weights_checksum", get_weights_checksum),
        web.post("/release_memory_occupation", partial(set_sleeping, sleeping=True)),
        web.post("/resume_memory_occupation", partial(set_sleeping, sleeping=False)),
        web.post("/v1/set_lora", set_lora),
        web.post("/v1/merge_lora_weights", partial(merge_lora, merged=True)),
        web.post("/v1/unmerge_lora_weights", partial(merge_lora, merged=False)),
        web.get("/v1/list_loras", list_loras),
    ])
    return app


async def start_worker(behaviour: WorkerBehaviour | None = None, host: str = "127.0.0.1",
                       port: int = 0) -> tuple[web.AppRunner, str]:
    """Start a worker (port 0: a free one); return its runner and base URL."""
    # In-flight slow or hung requests are cancelled after 0.25 s instead of the default 60 s,
    # so teardown stays fast.
    runner = web.AppRunner(create_worker_app(behaviour), access_log=None, shutdown_timeout=0.25)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner, str(URL.build(scheme="http", host=host, port=runner.addresses[0][1]))


# ---------------------------------------------------------------- CLI

async def _serve(behaviour: WorkerBehaviour, host: str, port: int) -> None:
    """Run a worker until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    runner, url = await start_worker(behaviour, host, port)
    log.info("stand-in worker for %s (task %s) listening on %s",
             behaviour.model_path, behaviour.task_type or "none", url)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _behaviour_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add one CLI option per WorkerBehaviour field, with its default and help text."""
    types = {"int": int, "int | None": int, "float": float}
    for knob in reversed(dataclasses.fields(WorkerBehaviour)):
        flag = "--" + knob.name.replace("_", "-")
        if knob.type == "bool":
            command = click.option(f"{flag}/--no-{flag[2:]}", knob.name, default=knob.default,
                                   help=knob.metadata["help"])(command)
            continue
        kind = (click.Choice(knob.metadata["choices"]) if "choices" in knob.metadata
                else types.get(knob.type, str))
        command = click.option(flag, knob.name, type=kind, default=knob.default,
                               help=knob.metadata["help"])(command)
    return command


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--host", default="127.0.0.1", help="Interface to bind.")
@click.option("--port", default=10090, type=int, help="Port to bind; 0 picks a free one.")
@_behaviour_options
def main(host: str, port: int, **behaviour: Any) -> None:
    """Serve a stand-in sglang-diffusion worker for router tests, demos and benchmarks."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(_serve(WorkerBehaviour(**behaviour), host, port))


if __name__ == "__main__":
    main()
