"""``msn serve``: a real server on a free port with a tiny model, spoken to by the official
``openai`` client (and plain HTTP for malformed requests)."""

import socket
import threading
import time
from types import SimpleNamespace

import httpx2 as httpx
import openai
import pytest
import torch

import msn
from msn.data.records import encode_prompt
from msn.loading import load_for_inference
from msn.serve import Server
from tiny import tiny_checkpoint

NAME = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    path = tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), family="llama")
    model, tok = load_for_inference(str(path), "cpu", "float32")
    # The paper's fixed tree: its steps do not depend on what the recycled table learnt before.
    srv = Server(model, tok, name=NAME, method="tr-jacobi", max_batch=8, tree="small", drafts="paper")
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(srv.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    yield SimpleNamespace(url=url, model=model, tok=tok, srv=srv,
                          client=openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0),
                          aclient=lambda: openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0))
    uv.should_exit = True
    thread.join(timeout=10)


def reference(s, messages=None, prompt=None, max_tokens=16):
    """What ``msn generate`` returns for the same request: tokens, text, finish reason."""
    ids = encode_prompt(s.tok, messages) if messages is not None else s.tok(prompt, return_tensors="pt")["input_ids"]
    r = msn.generate(s.model, ids, method="tr-jacobi", tree="small", drafts="paper", max_new_tokens=max_tokens)
    eos = s.tok.eos_token_id
    text = s.tok.decode([t for t in r.tokens if t != eos], skip_special_tokens=True)
    s.last_steps = r.steps
    return r.tokens, text, "stop" if r.tokens[-1] == eos else "length"


def chat(i):
    return [{"role": "system", "content": "You write code."},
            {"role": "user", "content": f"Write a function number {i} that sorts a list."}]


def test_health_and_models(server):
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == NAME
    assert [m.id for m in server.client.models.list().data] == [NAME]


@pytest.mark.parametrize("max_tokens", [1, 16, 40])
def test_chat_streaming_and_not_equal_msn_generate(server, max_tokens):
    tokens, text, reason = reference(server, chat(1), max_tokens=max_tokens)
    r = server.client.chat.completions.create(model=NAME, messages=chat(1), max_tokens=max_tokens)
    assert r.choices[0].message.content == text and r.choices[0].finish_reason == reason
    assert r.usage.completion_tokens == len(tokens)
    assert r.usage.prompt_tokens == encode_prompt(server.tok, chat(1)).shape[1]
    assert r.usage.model_extra["msn"]["steps"] == server.last_steps     # the same steps as alone
    parts, final, chunks = [], None, []
    for chunk in server.client.chat.completions.create(model=NAME, messages=chat(1), max_tokens=max_tokens,
                                                       stream=True, stream_options={"include_usage": True}):
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            final = chunk
    assert "".join(parts) == text
    assert final.choices[0].finish_reason == reason and final.usage is None
    # OpenAI's include_usage: one last chunk with empty choices carries the usage.
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)


def test_completions_streaming_and_not(server):
    prompt = "def add(a, b):"
    _, text, reason = reference(server, prompt=prompt, max_tokens=20)
    r = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=20)
    assert r.choices[0].text == text and r.choices[0].finish_reason == reason
    streamed = "".join(c.choices[0].text for c in server.client.completions.create(model=NAME, prompt=prompt,
                                                                                    max_tokens=20, stream=True))
    assert streamed == text


def test_sampling_requests_equal_seeded_msn_generate(server):
    ids = encode_prompt(server.tok, chat(2))
    r = msn.generate(server.model, ids, method="tr-jacobi", tree="small", max_new_tokens=20, do_sample=True,
                     temperature=0.9, top_p=0.95, seed=7)
    eos = server.tok.eos_token_id
    text = server.tok.decode([t for t in r.tokens if t != eos], skip_special_tokens=True)
    got = server.client.chat.completions.create(model=NAME, messages=chat(2), max_tokens=20, temperature=0.9,
                                                top_p=0.95, seed=7)
    assert got.choices[0].message.content == text


def test_a_client_that_disconnects_frees_its_row(server):
    before = httpx.get(server.url + "/health").json()["served"]
    body = {"model": NAME, "messages": chat(3), "max_tokens": 1500, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"content"' in line:
                break
    deadline = time.time() + 10
    while httpx.get(server.url + "/health").json()["active"] != 0:
        assert time.time() < deadline, "the row of a disconnected client was not freed"
        time.sleep(0.1)
    assert httpx.get(server.url + "/health").json()["served"] == before      # cancelled, not served to the end


BAD = [
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": NAME, "messages": "hi"}, 400, "messages"),
    ({"model": NAME, "messages": []}, 400, "messages"),
    ({"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": NAME, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400, "max_tokens"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 9}, 400, "max_tokens"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "logprobs"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": 1, "top_p": 2}, 400, "top_p"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}, 400, "frobnicate"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
]


@pytest.mark.parametrize("body, status, param", BAD)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, param):
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"
    ok = server.client.chat.completions.create(model=NAME, messages=chat(0), max_tokens=4)
    assert ok.choices[0].message.content == reference(server, chat(0), max_tokens=4)[1]


@pytest.mark.parametrize("path, content, status", [
    ("/v1/chat/completions", b"{not json", 400),
    ("/v1/chat/completions", b"[1, 2]", 400),
    ("/v1/completions", b'{"model": "tiny", "prompt": ""}', 400),
    ("/v1/completions", b'{"model": "tiny", "prompt": [1, 99999]}', 400),
    ("/v1/nothing", b"{}", 404),
])
def test_malformed_bodies_and_paths(server, path, content, status):
    r = httpx.post(server.url + path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status and "error" in r.json() and r.json()["error"]["message"]


def test_the_openai_client_raises_its_own_errors(server):
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="nope", messages=chat(0))
    with pytest.raises(openai.BadRequestError):
        server.client.chat.completions.create(model=NAME, messages=chat(0), max_tokens=0)


def test_serve_refuses_a_bad_max_batch(server):
    with pytest.raises(msn.MsnError if hasattr(msn, "MsnError") else Exception, match="max-batch"):
        Server(server.model, server.tok, name=NAME, max_batch=0)
    assert torch.is_tensor(encode_prompt(server.tok, chat(0)))
