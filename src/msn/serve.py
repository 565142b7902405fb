"""``msn serve``: an OpenAI-compatible HTTP server over batched decoding.

FastAPI + uvicorn serve ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models`` and
``/health``. One scheduler thread owns the model: it admits queued requests as rows of a
``BatchDecoder`` (up to ``max_batch`` at once, new rows joining between steps), runs the
batched steps and hands each row's new tokens to its request's asyncio queue. A client
that disconnects has its row cancelled at the next step.

Requests decode greedily unless they give ``temperature`` > 0 (then ``top_p``, ``top_k``
and ``seed`` apply): the default is msn's, greedy and identical to ``msn generate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
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
from msn.decoding.config import DEFAULT_MAX_NEW_TOKENS, DecodeConfig, is_int, is_number
from msn.decoding.engine import DecodeResult, context_limit, resolve_eos, validate_request
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

    def __init__(self, model, method: str, max_batch: int, eos: set[int], **options):
        self.decoder = BatchDecoder(model, method, **options)
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
        if isinstance(added, Finished):
            self._done(job, added.result)
        else:
            self.jobs[added] = job

    def _done(self, job: Job, result: DecodeResult) -> None:
        self.served += 1
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
                    self._done(self.jobs.pop(fin.rid), fin.result)
            except Exception as e:          # keep serving: fail the rows in flight, start a fresh batch
                log.exception("decoding step failed")
                for job in self.jobs.values():
                    job.send("error", ApiError(500, f"decoding failed: {type(e).__name__}: {e}", kind="server_error"))
                self.jobs.clear()
                self.decoder = BatchDecoder(self.model, self.decoder.method, **self.decoder.options)


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
        raise ApiError(400, f"temperature must be a number in [0, 2], got {t!r}", "temperature")
    top_p, top_k, seed = body.get("top_p"), body.get("top_k"), body.get("seed")
    if top_p is not None and (not is_number(top_p) or not 0 < top_p <= 1):
        raise ApiError(400, f"top_p must be a number in (0, 1], got {top_p!r}", "top_p")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        if top_k not in (-1, 0):         # vLLM's "off"
            raise ApiError(400, f"top_k must be an integer >= 1, got {top_k!r}", "top_k")
        top_k = None
    if seed is not None and not is_int(seed):
        raise ApiError(400, f"seed must be an integer, got {seed!r}", "seed")
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
                 **options):
        from msn.data.records import ensure_chat_template

        if not is_int(max_batch) or max_batch < 1:
            raise MsnError(f"--max-batch must be a positive integer, got {max_batch!r}")
        DecodeConfig.from_options(method, options)
        ensure_chat_template(tokenizer)
        self.model, self.tokenizer, self.name, self.method = model, tokenizer, name, method
        self.eos = resolve_eos(model, None) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        self.scheduler = Scheduler(model, method, max_batch, self.eos, **options)
        self.created = int(time.time())
        self.app = self._build()

    # -- requests ------------------------------------------------------------------------

    def _common(self, body: dict, fields: set[str], max_field: str = "max_tokens") -> tuple[int | None, dict]:
        unknown = sorted(set(body) - fields)
        if unknown:
            raise ApiError(400, f"unsupported parameter(s): {', '.join(unknown)}", unknown[0], "unsupported_parameter")
        model = body.get("model")
        if model != self.name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.name!r}", "model",
                           "model_not_found")
        if not isinstance(body.get("stream", False), bool):
            raise ApiError(400, "stream must be true or false", "stream")
        _check_off(body)
        max_tokens = body.get(max_field, body.get("max_tokens"))
        if max_tokens is not None and (not is_int(max_tokens) or max_tokens < 1):
            raise ApiError(400, f"{max_field} must be a positive integer, got {max_tokens!r}", max_field)
        return max_tokens, _sampling(body)

    def _job(self, ids: torch.Tensor, max_tokens: int | None, sampling: dict, param: str) -> Job:
        limit = context_limit(self.model)
        if max_tokens is None:
            max_tokens = DEFAULT_MAX_NEW_TOKENS
            if limit is not None:
                max_tokens = max(1, min(max_tokens, limit - ids.shape[1]))
        try:
            validate_request(self.model, ids, max_tokens)
            DecodeConfig.from_options(self.method, {**self.scheduler.decoder.options, **sampling})
        except MsnError as e:
            raise ApiError(400, str(e), param) from None
        return Job(ids, max_tokens, sampling, asyncio.get_running_loop())

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
            self.scheduler.stop()

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
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ApiError(400, f"the request body is not valid JSON: {e}") from None
            if not isinstance(body, dict):
                raise ApiError(400, "the request body must be a JSON object")
            return body

        @app.get("/health")
        async def health():
            return {"status": "ok", "model": self.name, "method": self.method, "active": self.scheduler.active,
                    "queued": self.scheduler.pending.qsize(), "served": self.scheduler.served}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                                "owned_by": "msn"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            from msn.data.records import encode_prompt

            body = await read_json(request)
            max_tokens, sampling = self._common(body, CHAT_FIELDS, "max_completion_tokens")
            try:
                ids = encode_prompt(self.tokenizer, _messages(body))
            except ApiError:
                raise
            except Exception as e:      # a template that refuses the conversation (e.g. roles out of order)
                raise ApiError(400, f"the chat template refused the messages: {e}", "messages") from None
            job = self._job(ids, max_tokens, sampling, "max_tokens")
            return await self._respond(request, job, ids.shape[1], body.get("stream", False), chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await read_json(request)
            max_tokens, sampling = self._common(body, COMPLETION_FIELDS)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
                ids = torch.tensor([prompt], dtype=torch.long)
            elif isinstance(prompt, str) and prompt:
                ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
            else:
                raise ApiError(400, "prompt must be a non-empty string (or a list of token ids)", "prompt")
            job = self._job(ids, max_tokens, sampling, "max_tokens")
            return await self._respond(request, job, ids.shape[1], body.get("stream", False), chat=False)

        return app

    async def _respond(self, request, job: Job, prompt_tokens: int, stream: bool, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.name}
        self.scheduler.submit(job)
        if stream:
            return StreamingResponse(self._events(request, job, head, prompt_tokens, chat), media_type="text/event-stream")
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

    async def _events(self, request, job: Job, head: dict, prompt_tokens: int, chat: bool):
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
                if kind == "error":
                    yield f"data: {json.dumps(value.body())}\n\n"
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
                yield chunk(None, self._finish_reason(value), self._usage(prompt_tokens, value))
                yield "data: [DONE]\n\n"
                return
        finally:
            job.cancelled = True        # a client that went away frees its row at the next step


def serve(model_path: str, *, method: str = "tr-jacobi", host: str = "127.0.0.1", port: int = 8000,
          max_batch: int = 8, name: str | None = None, device: str = "auto", dtype: str = "auto", **options) -> None:
    """Loads a checkpoint and serves it until interrupted."""
    from pathlib import Path

    import uvicorn

    from msn.loading import load_for_inference

    if not is_int(port) or not 0 <= port <= 65535:
        raise MsnError(f"--port must be in 0..65535, got {port!r}")
    if not is_int(max_batch) or max_batch < 1:
        raise MsnError(f"--max-batch must be a positive integer, got {max_batch!r}")
    DecodeConfig.from_options(method, options)
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise MsnError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host") from None
    model, tok = load_for_inference(model_path, device, dtype)
    server = Server(model, tok, name=name or Path(model_path).name, method=method, max_batch=max_batch, **options)

    class Quiet(uvicorn.Server):
        """Ctrl-C or SIGTERM stops serving and returns, without re-raising the signal."""

        @contextlib.contextmanager
        def capture_signals(self):
            def stop(*_):
                self.should_exit = True

            previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    Quiet(uvicorn.Config(server.app, host=host, port=port, log_level="info")).run()
