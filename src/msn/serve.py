"""``msn serve``: an OpenAI-compatible HTTP server over batched decoding.

FastAPI + uvicorn serve ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models`` and
``/health``. One scheduler thread owns the model: it admits queued requests as rows of a
``BatchDecoder`` (up to ``max_batch`` at once, new rows joining between steps), runs the
batched steps and hands each row's new tokens to its request's asyncio queue. A client
that disconnects has its row cancelled at the next step.

Requests decode greedily unless they give ``temperature`` >= 1e-5 (then ``top_p``, ``top_k``
and ``seed`` apply): the default is msn's, greedy and identical to ``msn generate``. The values
are checked by the rules of ``msn.generate`` and the CLI, with one difference taken from vLLM's
API: ``top_k`` 0 or -1 means no top-k filter (``msn generate`` and ``msn.generate`` leave it out).

Protection, as ``vllm serve`` and the OpenAI API: every request is validated whole before it
joins the batch; a row whose own decoding raises fails alone (its client gets an error, the
other rows go on); ``--api-key`` (or ``MSN_API_KEY``) guards every ``/v1`` route; a body is
refused above ``--max-body-mb`` (413) or nested deeper than ``MAX_JSON_DEPTH`` (400) before it
is parsed; a string that is not valid text (a lone UTF-16 surrogate) is a 400 naming its field; a
client that does not send a whole request head within ``HEAD_TIMEOUT_S`` is disconnected;
prompts are tokenized off the event loop; SIGINT/SIGTERM end every stream with a final error
event and exit 0; ``/metrics`` speaks Prometheus.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hmac
import itertools
import json
import logging
import os
import queue
import re
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from msn.decoding.batch import BatchDecoder, Finished
from msn.decoding.checks import check_seed, is_int, is_number
from msn.decoding.config import DEFAULT_MAX_NEW_TOKENS, DecodeConfig
from msn.decoding.request import DecodeResult, resolve_eos, validate_request
from msn.decoding.devices import context_limit
from msn.decoding.sampling import MIN_TEMPERATURE
from msn.errors import MsnError

log = logging.getLogger(__name__)

# Request fields accepted and ignored (they change nothing msn computes).
IGNORED = {"user", "stream_options", "metadata", "store", "service_tier", "parallel_tool_calls"}
# Fields with the value that means "off": any other value is refused as unsupported.
OFF = {"n": 1, "logprobs": (None, False), "top_logprobs": None, "echo": False, "best_of": (None, 1), "suffix": None,
       "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
       "tools": (None, []), "tool_choice": (None, "none"), "functions": None, "function_call": None,
       "response_format": (None, {"type": "text"}), "stop": (None, [])}
COMMON = {"model", "stream", "max_tokens", "temperature", "top_p", "top_k", "seed"} | IGNORED | set(OFF)
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = COMMON | {"prompt"}
ROLES = {"system", "user", "assistant", "developer"}
MAX_BODY_MB = 8          # default request-size limit (--max-body-mb)
MAX_JSON_DEPTH = 64      # deeper JSON is refused before parsing (OpenAI bodies nest 4-5 levels)
SHUTDOWN_S = 5           # a stopping server ends its streams and closes within about this long
HEAD_TIMEOUT_S = 10      # a client must send a whole request head within this long, or is disconnected


class ApiError(Exception):
    """A request error, sent as OpenAI's ``{"error": {...}}`` with a 4xx status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One request on its way through the scheduler."""

    ids: torch.Tensor
    max_new_tokens: int
    sampling: dict
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def send(self, kind: str, value) -> None:
        """Called from the scheduler thread: hands an event to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:        # the loop has closed (server shutting down)
            pass


class Scheduler:
    """The one thread that touches the model: admits jobs, steps the batch, cancels rows."""

    def __init__(self, model, method: str, max_batch: int, eos: set[int], metrics=None, **options):
        self.decoder = BatchDecoder(model, method, **options)
        self.metrics = metrics
        self.model = model
        self.max_batch = max_batch
        self.eos = sorted(eos)
        self.pending: queue.Queue[Job] = queue.Queue()
        self.jobs: dict[int, Job] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="msn-scheduler", daemon=True)
        self.served = 0

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.pending.put(None)
        self.thread.join(timeout=10)

    def shutdown(self, reason: str = "the server is shutting down") -> None:
        """Ends every queued and running request with an error event, then stops the thread."""
        self.stopped.set()
        error = ApiError(503, reason, kind="server_error", code="shutdown")
        for job in list(self.jobs.values()):
            job.send("error", error)
        while True:
            try:
                job = self.pending.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.send("error", error)
        self.pending.put(None)

    @property
    def active(self) -> int:
        return len(self.decoder)

    def submit(self, job: Job) -> None:
        self.pending.put(job)

    def _admit(self, job: Job) -> None:
        if job.cancelled:
            return
        try:
            added = self.decoder.add(job.ids, max_new_tokens=job.max_new_tokens, eos_token_id=self.eos,
                                     on_tokens=lambda toks: job.send("tokens", list(toks)), **job.sampling)
        except MsnError as e:
            job.send("error", ApiError(400, str(e)))
            return
        except Exception as e:      # noqa: BLE001 - this request's prefill failed: it alone fails
            log.exception("prefill failed")
            job.send("error", ApiError(500, f"decoding this request failed: {type(e).__name__}: {e}",
                                       kind="server_error"))
            return
        if isinstance(added, Finished):
            self._done(job, added.result)
        else:
            self.jobs[added] = job

    def _done(self, job: Job, result: DecodeResult) -> None:
        self.served += 1
        if self.metrics is not None:
            self.metrics.finished(result)
        job.send("done", result)

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                block = self.decoder.idle
                while len(self.decoder) < self.max_batch:
                    try:
                        job = self.pending.get(block=block, timeout=0.5 if block else None)
                    except queue.Empty:
                        break
                    if job is None:
                        return
                    block = False
                    self._admit(job)
                for rid, job in list(self.jobs.items()):
                    if job.cancelled:
                        self.decoder.cancel(rid)
                        del self.jobs[rid]
                for fin in self.decoder.step():
                    job = self.jobs.pop(fin.rid)
                    if fin.error is not None:       # this row's own decoding raised: it fails alone
                        log.error("request failed alone: %s: %s", type(fin.error).__name__, fin.error)
                        job.send("error", ApiError(500, f"decoding this request failed: "
                                                        f"{type(fin.error).__name__}: {fin.error}",
                                                   kind="server_error"))
                    else:
                        self._done(job, fin.result)
            except Exception as e:          # keep serving: fail the rows in flight, start a fresh batch
                log.exception("decoding step failed")
                for job in self.jobs.values():
                    job.send("error", ApiError(500, f"decoding failed: {type(e).__name__}: {e}", kind="server_error"))
                self.jobs.clear()
                self.decoder = BatchDecoder(self.model, self.decoder.method, **self.decoder.options)


_STRING = re.compile(rb'"(?:[^"\\\\]|\\\\.)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth_exceeds(raw: bytes, limit: int) -> bool:
    """Whether JSON text nests deeper than ``limit``, found without parsing it (strings are
    skipped, then the brackets counted)."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    steps = (1 if b in (0x5B, 0x7B) else -1 for b in brackets)
    return max(itertools.accumulate(steps), default=0) > limit


def invalid_text(value, where: str = "") -> str | None:
    """The field path of the first string in a parsed JSON body that is not valid Unicode text (a
    lone UTF-16 surrogate such as ``"\\ud800"``, which JSON allows and UTF-8 cannot encode), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = invalid_text(v, f"{where}[{k}]" if isinstance(k, int) else f"{where}.{k}" if where else str(k))
        if found:
            return found
    return None


def head_timeout_protocol(seconds: float = HEAD_TIMEOUT_S):
    """uvicorn's h11 protocol with a deadline on each request head: a connection that has not sent
    a whole head within ``seconds`` of connecting (or of its previous response) is closed, so slow
    clients cannot hold connections without limit. Bodies are bounded by ``--max-body-mb``."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeoutH11(H11Protocol):
        _head_timer = None

        def _waiting(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._head_timer is None and self._waiting():
                self._head_timer = self.loop.call_later(seconds, self._late)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _late(self) -> None:
            self._head_timer = None
            if self._waiting() and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            self._arm()
            super().data_received(data)
            if not self._waiting():
                self._disarm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

    return HeadTimeoutH11


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number (every number must be finite)")


class Metrics:
    """The server's Prometheus metrics (``prometheus-client``), in a registry of its own."""

    def __init__(self, method: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        self.requests = Counter("msn_requests", "Requests admitted to decoding", registry=self.registry)
        self.completed = Counter("msn_requests_completed", "Requests decoded to the end", registry=self.registry)
        self.tokens = Counter("msn_generated_tokens", "Tokens generated", registry=self.registry)
        self.steps = Counter("msn_decoding_steps", "Decoding steps of finished requests", registry=self.registry)
        self.accepted = Gauge("msn_mean_accepted_tokens", "Mean tokens per step over finished requests",
                              registry=self.registry)
        self.queued = Gauge("msn_queue_length", "Requests waiting to join the batch", registry=self.registry)
        self.running = Gauge("msn_running_requests", "Rows in the batch", registry=self.registry)
        self.lock = threading.Lock()
        self.total_tokens = self.total_steps = 0

    def finished(self, result: DecodeResult) -> None:
        with self.lock:
            self.completed.inc()
            self.tokens.inc(len(result.tokens))
            self.steps.inc(result.steps)
            self.total_tokens += len(result.tokens)
            self.total_steps += result.steps
            if self.total_steps:
                self.accepted.set(self.total_tokens / self.total_steps)

    def queue(self, queued: int, running: int) -> None:
        self.queued.set(queued)
        self.running.set(running)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _check_off(body: dict) -> None:
    for name, off in OFF.items():
        if name in body:
            allowed = off if isinstance(off, tuple) else (off,)
            if body[name] not in allowed:
                raise ApiError(400, f"{name}={body[name]!r} is not supported by msn serve", name, "unsupported_parameter")


def _sampling(body: dict) -> dict:
    """msn sampling options from OpenAI fields; greedy unless temperature > 0."""
    t = body.get("temperature")
    if t is not None and (not is_number(t) or t < 0 or t > 2):
        raise ApiError(400, f"temperature must be a number in [0, 2] (below {MIN_TEMPERATURE:g} it is greedy), "
                            f"got {t!r}", "temperature")
    top_p, top_k, seed = body.get("top_p"), body.get("top_k"), body.get("seed")
    if top_p is not None and (not is_number(top_p) or not 0 < top_p <= 1):
        raise ApiError(400, f"top_p must be a number in (0, 1], got {top_p!r}", "top_p")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        if top_k not in (-1, 0):         # vLLM's "off"
            raise ApiError(400, f"top_k must be an integer >= 1, got {top_k!r}", "top_k")
        top_k = None
    if seed is not None:
        try:
            check_seed(seed)
        except MsnError as e:
            raise ApiError(400, str(e), "seed") from None
    if not t:
        return {}
    out = {"do_sample": True, "temperature": float(t)}
    if top_p is not None and top_p < 1:
        out["top_p"] = float(top_p)
    if top_k is not None:
        out["top_k"] = top_k
    if seed is not None:
        out["seed"] = seed
    return out


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] needs a role among {', '.join(sorted(ROLES))}", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):          # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


class Server:
    """The FastAPI application and its scheduler for one model."""

    def __init__(self, model, tokenizer, *, name: str, method: str = "tr-jacobi", max_batch: int = 8,
                 api_key: str | None = None, max_body_mb: float = MAX_BODY_MB, **options):
        from msn.data.records import ensure_chat_template

        if not is_int(max_batch) or max_batch < 1:
            raise MsnError(f"--max-batch must be a positive integer, got {max_batch!r}")
        if not is_number(max_body_mb) or max_body_mb <= 0:
            raise MsnError(f"--max-body-mb must be a positive number, got {max_body_mb!r}")
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
            raise MsnError("--api-key (or MSN_API_KEY) must be a non-empty string")
        DecodeConfig.from_options(method, options)
        ensure_chat_template(tokenizer)
        self.model, self.tokenizer, self.name, self.method = model, tokenizer, name, method
        self.api_key, self.max_body = api_key, int(max_body_mb * 2**20)
        self.eos = resolve_eos(model, None) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        self.metrics = Metrics(method)
        self.scheduler = Scheduler(model, method, max_batch, self.eos, metrics=self.metrics, **options)
        # A prompt longer than the context times the longest token (in characters) cannot fit:
        # it is refused before tokenizing, which holds the interpreter for seconds on megabytes.
        limit = context_limit(model)
        longest = max((len(t) for t in tokenizer.get_vocab()), default=0)
        self.max_prompt_chars = limit * longest if limit and longest else None
        # One thread tokenizes, off the event loop: a long prompt never blocks /health or a stream.
        self.tokenize_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="msn-tokenize")
        self.created = int(time.time())
        self.app = self._build()

    # -- requests ------------------------------------------------------------------------

    def _common(self, body: dict, fields: set[str], max_field: str = "max_tokens") -> tuple[int | None, dict, str]:
        """(max_tokens or None, sampling options, the name of the length field the client sent)."""
        unknown = sorted(set(body) - fields)
        if unknown:
            raise ApiError(400, f"unsupported parameter(s): {', '.join(unknown)}", unknown[0], "unsupported_parameter")
        model = body.get("model")
        if model is None:
            raise ApiError(400, f"model is required; this server serves {self.name!r}", "model")
        if model != self.name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.name!r}", "model",
                           "model_not_found")
        if not isinstance(body.get("stream", False), bool):
            raise ApiError(400, "stream must be true or false", "stream")
        _check_off(body)
        given = max_field if body.get(max_field) is not None else "max_tokens"
        max_tokens = body.get(given)
        if max_tokens is not None and (not is_int(max_tokens) or max_tokens < 1):
            raise ApiError(400, f"{given} must be a positive integer, got {max_tokens!r}", given)
        return max_tokens, _sampling(body), given

    def _job(self, ids: torch.Tensor, max_tokens: int | None, sampling: dict, param: str) -> Job:
        limit = context_limit(self.model)
        if max_tokens is None:
            max_tokens = DEFAULT_MAX_NEW_TOKENS
            if limit is not None:
                max_tokens = max(1, min(max_tokens, limit - ids.shape[1]))
        try:
            validate_request(self.model, ids, max_tokens, name=param, fit_hint="or shorten the prompt")
            DecodeConfig.from_options(self.method, {**self.scheduler.decoder.options, **sampling})
        except MsnError as e:
            raise ApiError(400, str(e), param) from None
        return Job(ids, max_tokens, sampling, asyncio.get_running_loop())

    def _authorize(self, request: Request) -> None:
        """``Authorization: Bearer KEY`` on every /v1 route when the server has a key."""
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "a valid API key is required: send Authorization: Bearer KEY", code="invalid_api_key",
                           kind="authentication_error")

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it is known to exceed the limit."""
        length = request.headers.get("content-length")
        too_big = ApiError(413, f"the request body exceeds {self.max_body // 2**20} MiB (--max-body-mb)",
                           code="request_too_large")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise too_big
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > self.max_body:
                raise too_big
            parts.append(part)
        return b"".join(parts)

    def _fits(self, chars: int, param: str) -> None:
        if self.max_prompt_chars is not None and chars > self.max_prompt_chars:
            raise ApiError(400, f"the {param} ({chars} characters) cannot fit the model's context of "
                                f"{context_limit(self.model)} tokens; shorten it", param)

    async def _off_loop(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self.tokenize_pool,
                                                                functools.partial(fn, *args, **kwargs))

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t not in self.eos], skip_special_tokens=True)

    def _usage(self, prompt: int, result: DecodeResult) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": len(result.tokens),
                "total_tokens": prompt + len(result.tokens),
                "msn": {"method": self.method, "steps": result.steps,
                        "mean_accepted_tokens": round(result.mean_accepted_tokens, 4)}}

    def _finish_reason(self, result: DecodeResult) -> str:
        return "stop" if result.tokens and result.tokens[-1] in self.eos else "length"

    # -- the app -------------------------------------------------------------------------

    def _build(self):
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def lifespan(app):
            self.scheduler.start()
            yield
            self.scheduler.shutdown()
            self.scheduler.stop()
            self.tokenize_pool.shutdown(wait=False, cancel_futures=True)

        app = FastAPI(title="msn", lifespan=lifespan)

        @app.exception_handler(ApiError)
        async def api_error(request, exc: ApiError):
            return JSONResponse(exc.body(), status_code=exc.status)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request, exc):
            kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
            return JSONResponse(ApiError(exc.status_code, str(exc.detail), kind=kind).body(), status_code=exc.status_code)

        @app.exception_handler(RequestValidationError)
        async def validation_error(request, exc):
            return JSONResponse(ApiError(400, str(exc)).body(), status_code=400)

        @app.exception_handler(Exception)
        async def any_error(request, exc):
            log.exception("request failed")
            return JSONResponse(ApiError(500, f"{type(exc).__name__}: {exc}", kind="server_error").body(),
                                status_code=500)

        async def read_json(request: Request) -> dict:
            self._authorize(request)
            raw = await self._read_body(request)
            deep = json_depth_exceeds(raw, MAX_JSON_DEPTH)
            if deep:
                raise ApiError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
            try:
                body = json.loads(raw, parse_constant=_refuse_constant)
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as e:
                raise ApiError(400, f"the request body is not valid JSON: {e}") from None
            if not isinstance(body, dict):
                raise ApiError(400, "the request body must be a JSON object")
            bad = invalid_text(body)
            if bad:
                raise ApiError(400, f"{bad} is not valid text (a lone UTF-16 surrogate); send UTF-8 text", bad)
            return body

        @app.get("/metrics")
        async def metrics():
            from fastapi.responses import Response

            self.metrics.queue(self.scheduler.pending.qsize(), self.scheduler.active)
            body, content_type = self.metrics.render()
            return Response(body, media_type=content_type)

        @app.get("/health")
        async def health():
            return {"status": "ok", "model": self.name, "method": self.method, "active": self.scheduler.active,
                    "queued": self.scheduler.pending.qsize(), "served": self.scheduler.served}

        @app.get("/v1/models")
        async def models(request: Request):
            self._authorize(request)
            return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                                "owned_by": "msn"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            from msn.data.records import encode_prompt

            body = await read_json(request)
            max_tokens, sampling, param = self._common(body, CHAT_FIELDS, "max_completion_tokens")
            messages = _messages(body)
            self._fits(sum(len(m["content"]) for m in messages), "messages")
            try:
                ids = await self._off_loop(encode_prompt, self.tokenizer, messages)
            except ApiError:
                raise
            except Exception as e:      # a template that refuses the conversation (e.g. roles out of order)
                raise ApiError(400, f"the chat template refused the messages: {e}", "messages") from None
            job = self._job(ids, max_tokens, sampling, param)
            return await self._respond(request, job, ids.shape[1], body, chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await read_json(request)
            max_tokens, sampling, param = self._common(body, COMPLETION_FIELDS)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
                ids = torch.tensor([prompt], dtype=torch.long)
            elif isinstance(prompt, str) and prompt:
                self._fits(len(prompt), "prompt")
                ids = (await self._off_loop(self.tokenizer, prompt, return_tensors="pt"))["input_ids"]
            else:
                raise ApiError(400, "prompt must be a non-empty string (or a list of token ids)", "prompt")
            job = self._job(ids, max_tokens, sampling, param)
            return await self._respond(request, job, ids.shape[1], body, chat=False)

        return app

    async def _respond(self, request, job: Job, prompt_tokens: int, body: dict, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.name}
        if self.scheduler.stopped.is_set():
            raise ApiError(503, "the server is shutting down", kind="server_error", code="shutdown")
        self.metrics.requests.inc()
        self.scheduler.submit(job)
        if body.get("stream", False):
            options = body.get("stream_options") or {}
            usage = isinstance(options, dict) and options.get("include_usage") is True
            return StreamingResponse(self._events(request, job, head, prompt_tokens, chat, usage),
                                     media_type="text/event-stream")
        watch = asyncio.create_task(self._watch(request, job))
        tokens: list[int] = []
        try:
            while True:
                kind, value = await job.events.get()
                if kind == "tokens":
                    tokens += value
                elif kind == "error":
                    raise value
                else:
                    result = value
                    break
        finally:
            watch.cancel()
        text = self._text(result.tokens)
        reason = self._finish_reason(result)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                  if chat else {"index": 0, "text": text, "finish_reason": reason, "logprobs": None})
        return {**head, "choices": [choice], "usage": self._usage(prompt_tokens, result)}

    async def _watch(self, request, job: Job) -> None:
        """Cancels a non-streaming job whose client went away."""
        while not job.cancelled:
            await asyncio.sleep(0.25)
            if await request.is_disconnected():
                job.cancelled = True

    async def _events(self, request, job: Job, head: dict, prompt_tokens: int, chat: bool, include_usage: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, reason=None, usage=None, role: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta is not None else {})
                choice = {"index": 0, "delta": d, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": None}
            data = {**head, "object": obj, "choices": [choice]}
            if usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        tokens: list[int] = []
        sent = ""
        try:
            if chat:
                yield chunk(None, role=True)
            while True:
                kind, value = await job.events.get()
                if kind == "error":        # the final event of a failed or stopped stream
                    yield f"data: {json.dumps(value.body())}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                if kind == "tokens":
                    tokens += value
                    text = self._text(tokens)
                    if text.endswith("\ufffd"):        # an incomplete UTF-8 sequence: wait for its end
                        continue
                    if len(text) > len(sent):
                        yield chunk(text[len(sent):])
                        sent = text
                    continue
                text = self._text(value.tokens)
                if len(text) > len(sent):
                    yield chunk(text[len(sent):])
                yield chunk(None, self._finish_reason(value))
                if include_usage:        # OpenAI: a last chunk with empty choices carries the usage
                    yield f"data: {json.dumps({**head, 'object': obj, 'choices': [], 'usage': self._usage(prompt_tokens, value)})}\n\n"
                yield "data: [DONE]\n\n"
                return
        finally:
            job.cancelled = True        # a client that went away frees its row at the next step


def serve(model_path: str, *, method: str = "tr-jacobi", host: str = "127.0.0.1", port: int = 8000,
          max_batch: int = 8, name: str | None = None, device: str = "auto", dtype: str = "auto",
          api_key: str | None = None, max_body_mb: float = MAX_BODY_MB, **options) -> None:
    """Loads a checkpoint and serves it until SIGINT or SIGTERM, which end every stream and
    return within about ``SHUTDOWN_S`` seconds. ``api_key`` defaults to ``$MSN_API_KEY``."""
    from pathlib import Path

    import uvicorn

    from msn.loading import load_for_inference

    if not is_int(port) or not 0 <= port <= 65535:
        raise MsnError(f"--port must be in 0..65535, got {port!r}")
    if not is_int(max_batch) or max_batch < 1:
        raise MsnError(f"--max-batch must be a positive integer, got {max_batch!r}")
    DecodeConfig.from_options(method, options)
    if api_key is None:
        api_key = os.environ.get("MSN_API_KEY") or None
    elif not api_key.strip():
        raise MsnError("--api-key must be a non-empty string (or leave it out: no key)")
    if not is_number(max_body_mb) or max_body_mb <= 0:
        raise MsnError(f"--max-body-mb must be a positive number, got {max_body_mb!r}")
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise MsnError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host") from None
    model, tok = load_for_inference(model_path, device, dtype)
    server = Server(model, tok, name=name or Path(model_path).name, method=method, max_batch=max_batch,
                    api_key=api_key, max_body_mb=max_body_mb, **options)

    class Quiet(uvicorn.Server):
        """Ctrl-C or SIGTERM: stop accepting, end every stream with a final error event, and
        return (exit 0) without re-raising the signal; a second signal exits at once."""

        @contextlib.contextmanager
        def capture_signals(self):
            def stop(*_):
                if self.should_exit:
                    self.force_exit = True
                self.should_exit = True
                server.scheduler.shutdown()

            previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    Quiet(uvicorn.Config(server.app, host=host, port=port, log_level="info", http=head_timeout_protocol(),
                         timeout_graceful_shutdown=SHUTDOWN_S)).run()
