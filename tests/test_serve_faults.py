"""``msn serve`` under faults: bad requests among 64 live streams, one row whose decoding
raises, an API key, size and depth limits, metrics, and SIGINT with streams in flight."""

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import openai

from msn.serve import Server
from test_serve import NAME, chat, free_port, reference  # noqa: F401 - the shared fixture's helpers
from test_serve import server as _server  # noqa: F401
from tiny import tiny_checkpoint

server = _server
BIN = Path(sys.executable).parent


def _post(url, body=None, content=None, headers=None):
    return httpx.post(url + "/v1/chat/completions", json=body, content=content, headers=headers, timeout=30)


def _bad_requests(url) -> list[tuple[str, httpx.Response]]:
    hi = [{"role": "user", "content": "hi"}]
    return [
        ("NaN temperature", _post(url, content=b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}],'
                                             b' "temperature": NaN}', headers={"content-type": "application/json"})),
        ("huge seed", _post(url, {"model": NAME, "messages": hi, "temperature": 0.5, "seed": 2**64})),
        ("deep JSON", _post(url, content=b"[" * 100000, headers={"content-type": "application/json"})),
        ("oversize body", _post(url, content=b'{"model": "tiny", "x": "' + b"a" * (9 * 2**20) + b'"}',
                                headers={"content-type": "application/json"})),
        ("no model", _post(url, {"messages": hi})),
        ("infinite top_p", _post(url, content=b'{"model": "tiny", "messages": [], "top_p": Infinity}',
                                 headers={"content-type": "application/json"})),
        ("huge max_tokens", _post(url, {"model": NAME, "messages": hi, "max_tokens": 10**12})),
        ("bool max_tokens", _post(url, {"model": NAME, "messages": hi, "max_tokens": True})),
    ]


def test_bad_requests_and_a_failing_row_leave_64_streams_exact(server):
    expected = {i: reference(server, chat(i), max_tokens=20)[1] for i in range(64)}
    decoder = server.srv.scheduler.decoder
    add = decoder.add
    poisoned = reference(server, chat(999), max_tokens=20)[0]

    def add_and_poison(ids, **kw):         # the row of one prompt raises in its third step
        rid = add(ids, **kw)
        if ids.shape[1] == len(_ids(server, 999)) and ids[0].tolist() == _ids(server, 999):
            row = next(r for r in decoder.rows if r.rid == rid)
            calls = {"n": 0}
            propose = row.proposer.propose

            def faulty(history):
                calls["n"] += 1
                if calls["n"] == 3:
                    raise RuntimeError("injected fault")
                return propose(history)
            row.proposer.propose = faulty
        return rid

    decoder.add = add_and_poison
    try:
        async def one(client, i):
            parts = []
            stream = await client.chat.completions.create(model=NAME, messages=chat(i), max_tokens=20, stream=True)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
            return i, "".join(parts)

        async def poisoned_one(client):
            try:
                await one(client, 999)
            except openai.APIError as e:
                return str(e)
            return "no error"

        async def everything():
            client = server.aclient()
            streams = [asyncio.create_task(one(client, i)) for i in range(64)]
            bad = asyncio.create_task(poisoned_one(client))
            await asyncio.sleep(0.5)
            bad_http = await asyncio.to_thread(_bad_requests, server.url)
            return dict(await asyncio.gather(*streams)), await bad, bad_http

        got, fault, bad_http = asyncio.run(everything())
    finally:
        decoder.add = add
    assert got == expected                                    # all 64 exact
    assert "injected fault" in fault                          # the faulty row failed, alone
    for what, r in bad_http:
        assert 400 <= r.status_code < 500 and r.json()["error"]["message"], (what, r.status_code, r.text[:200])
    assert poisoned                                           # that prompt decodes fine without the fault


def _ids(server, i):
    from msn.data.records import encode_prompt

    return encode_prompt(server.tok, chat(i))[0].tolist()


def test_tiny_temperature_is_greedy_and_metrics_count(server):
    _, text, _ = reference(server, chat(5), max_tokens=12)
    got = server.client.chat.completions.create(model=NAME, messages=chat(5), max_tokens=12, temperature=1e-45)
    assert got.choices[0].message.content == text
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("msn_requests_total", "msn_generated_tokens_total", "msn_decoding_steps_total",
                 "msn_mean_accepted_tokens", "msn_queue_length"):
        assert name in metrics
    value = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("msn_requests_total")))
    assert value >= 1


def test_an_api_key_guards_every_v1_route(server):
    srv = Server(server.model, server.tok, name=NAME, tree="small", api_key="s3cret")
    from fastapi.testclient import TestClient

    with TestClient(srv.app) as client:
        body = {"model": NAME, "messages": chat(0), "max_tokens": 4}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = client.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models").status_code == 401
        assert client.get("/health").status_code == 200             # health and metrics stay open
        ok = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200, ok.text
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_sigint_with_16_streams_in_flight_ends_them_all_and_exits_0(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "model")
    port = free_port()
    proc = subprocess.Popen([str(BIN / "msn"), "serve", "--model", str(ckpt), "--port", str(port), "--name", NAME,
                             "--max-batch", "16", "--method", "ar"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        assert proc.poll() is None and time.time() < deadline, "server did not start"
        try:
            httpx.get(url + "/health", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.2)

    async def one(i, started):
        ends = []
        async with httpx.AsyncClient(timeout=30) as client:
            body = {"model": NAME, "messages": chat(i), "max_tokens": 1900, "stream": True}
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    started.set()
                    if line == "data: [DONE]":
                        return "done after " + (ends[-1] if ends else "nothing")
                    doc = json.loads(line[6:])
                    if "error" in doc:
                        ends.append("error")
                    elif doc["choices"] and doc["choices"][0]["finish_reason"]:
                        ends.append("finish")
        return "cut"

    async def run():
        started = asyncio.Event()
        tasks = [asyncio.create_task(one(i, started)) for i in range(16)]
        await started.wait()
        await asyncio.sleep(1.0)
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        ends = await asyncio.gather(*tasks)
        return ends, t0

    ends, t0 = asyncio.run(run())
    code = proc.wait(timeout=15)
    elapsed = time.time() - t0
    print(f"SIGINT with 16 streams in flight: exit {code} after {elapsed:.2f} s; stream ends {sorted(set(ends))}")
    assert code == 0, proc.stdout.read()[-2000:]
    assert elapsed < 10
    assert all(e in ("done after error", "done after finish") for e in ends), ends
