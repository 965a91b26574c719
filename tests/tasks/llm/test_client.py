"""The LLM client's retry policy: what is retried, how often, how long it waits, what stops
at once, and that the API key never leaks. respx for exact sequences of answers; the fake
OpenAI server for faults on a real socket (dropped connections, hangs past the timeout)."""

import asyncio
import dataclasses
import email.utils
import json
import random
import socket
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import respx

from tasks.llm.client import (
    BadOutputError,
    ChatRequest,
    ContextLengthError,
    Endpoint,
    EndpointDownError,
    FatalLLMError,
    LLMClient,
    RetryPolicy,
    TransientLLMError,
    parse_retry_after,
)
from tests.fake_openai import FakeConfig, FakeOpenAIServer

BASE = "http://llm.test/v1"
URL = BASE + "/chat/completions"
KEY = "sk-test-SECRET-0123456789abcdef"
# httpcore: respx intercepts httpx's own transport; the fake-server tests below run the
# default aiohttp transport (and both, where a test says TRANSPORTS).
FAST = RetryPolicy(
    max_attempts=4, initial_backoff_s=0.001, max_backoff_s=0.01, http_transport="httpcore"
)


def ok(content: str = "hello there", finish: str = "stop", **headers: str) -> httpx.Response:
    body = {
        "model": "m",
        "choices": [
            {"message": {"role": "assistant", "content": content}, "finish_reason": finish}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    }
    return httpx.Response(200, json=body, headers=headers)


def request(text: str = "write something", stage: str = "write") -> ChatRequest:
    return ChatRequest.of(stage, [{"role": "user", "content": text}], "v@1", max_tokens=16)


def client(policy: RetryPolicy = FAST, key: str | None = KEY, n: int = 4) -> LLMClient:
    return LLMClient([Endpoint(BASE, api_key=key, max_concurrency=n)], "m", policy)


# -- policy as data ----------------------------------------------------------------------


def test_backoff_is_capped_full_jitter():
    p = RetryPolicy(initial_backoff_s=0.5, max_backoff_s=4.0)
    for attempt in range(1, 12):
        ceiling = min(4.0, 0.5 * 2 ** (attempt - 1))
        waits = [p.backoff(attempt, None) for _ in range(200)]
        assert all(0 <= w <= ceiling for w in waits)
    # Retry-After wins over the exponential schedule, capped, with at most 10% jitter.
    assert 3.0 <= p.backoff(1, 3.0) <= 3.3
    # A longer ask than the cap waits the cap, jitter included: never more.
    capped = RetryPolicy(max_retry_after_s=5.0)
    assert all(4.99 <= capped.backoff(1, 3600.0) <= 5.0 for _ in range(200))


def test_parse_retry_after():
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 0.25 ") == 0.25
    assert parse_retry_after("-5") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    future = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= parse_retry_after(future) <= 31
    past = email.utils.format_datetime(datetime.now(UTC) - timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(past) == 0.0


def test_request_key_is_stable_and_covers_what_determines_the_answer():
    a, b = request("x"), request("x")
    assert a.key("m") == b.key("m")
    assert a.key("m") != request("y").key("m")
    assert a.key("m") != a.key("other-model")
    assert a.key("m") != request("x", stage="plan").key("m")
    hot = ChatRequest.of(
        "write", [{"role": "user", "content": "x"}], "v@1", max_tokens=16, temperature=1.0
    )
    assert hot.key("m") != a.key("m")
    assert ChatRequest.of("write", [{"role": "user", "content": "x"}], "v@2", max_tokens=16).key(
        "m"
    ) != a.key("m")


# -- what is retried ----------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 409, 425, 429, 500, 502, 503, 504])
async def test_retryable_statuses_are_retried_then_succeed(status):
    with respx.mock(assert_all_called=True) as mock:
        route = mock.post(URL).mock(
            side_effect=[httpx.Response(status, json={"error": {"message": "busy"}}), ok("fine")]
        )
        async with client() as c:
            result = await c.chat(request())
    assert result.content == "fine" and result.attempts == 2
    assert route.call_count == 2
    assert c.stats.requests == 2 and c.stats.retries == 1
    assert c.stats.by_status == {str(status): 1, "200": 1}


@pytest.mark.parametrize(
    "effect",
    [
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
        httpx.RemoteProtocolError("server disconnected"),
        httpx.ReadError("reset"),
    ],
    ids=["connect", "read-timeout", "dropped", "reset"],
)
async def test_transport_faults_are_retried(effect):
    with respx.mock() as mock:
        route = mock.post(URL).mock(side_effect=[effect, effect, ok("back")])
        async with client() as c:
            result = await c.chat(request())
    assert result.content == "back" and result.attempts == 3 and route.call_count == 3


@pytest.mark.parametrize(
    "bad",
    [
        httpx.Response(200, text='{"choices": [ {"message": '),
        httpx.Response(200, json={"choices": []}),
        httpx.Response(200, json={"nope": 1}),
        ok(""),
        ok("   \n "),
        httpx.Response(
            200, json={"choices": [{"message": {"content": None}, "finish_reason": "stop"}]}
        ),
    ],
    ids=["invalid-json", "no-choices", "no-choices-key", "empty", "blank", "null-content"],
)
async def test_unusable_bodies_are_retried(bad):
    with respx.mock() as mock:
        route = mock.post(URL).mock(side_effect=[bad, ok("usable")])
        async with client() as c:
            result = await c.chat(request())
    assert result.content == "usable" and route.call_count == 2


async def test_unusable_bodies_until_exhaustion_raise_bad_output():
    with respx.mock() as mock:
        route = mock.post(URL).mock(return_value=ok(""))
        async with client() as c:
            with pytest.raises(BadOutputError):
                await c.chat(request())
    assert route.call_count == FAST.max_attempts


async def test_transient_faults_until_exhaustion_raise_endpoint_down():
    with respx.mock() as mock:
        route = mock.post(URL).mock(return_value=httpx.Response(503))
        async with client() as c:
            with pytest.raises(EndpointDownError) as info:
                await c.chat(request())
    assert route.call_count == FAST.max_attempts
    assert f"after {FAST.max_attempts} attempts" in str(info.value)
    assert isinstance(info.value.__cause__, TransientLLMError)


async def test_finish_reason_length_is_an_answer_not_an_error():
    # The write stage continues a paragraph cut at max_tokens; the client must not retry it.
    with respx.mock() as mock:
        route = mock.post(URL).mock(return_value=ok("half a para", finish="length"))
        async with client() as c:
            result = await c.chat(request())
    assert result.finish_reason == "length" and route.call_count == 1


async def test_retry_after_is_honoured():
    with respx.mock() as mock:
        mock.post(URL).mock(side_effect=[httpx.Response(429, headers={"Retry-After": "0.3"}), ok()])
        slow_default = dataclasses.replace(
            FAST, max_attempts=3, initial_backoff_s=0.0, max_backoff_s=0.0
        )
        async with client(slow_default) as c:
            started = time.monotonic()
            await c.chat(request())
            waited = time.monotonic() - started
    assert waited >= 0.3


async def test_same_request_id_on_every_attempt():
    seen: list[httpx.Request] = []

    def record(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(500) if len(seen) < 3 else ok()

    req = request()
    with respx.mock() as mock:
        mock.post(URL).mock(side_effect=record)
        async with client() as c:
            await c.chat(req)
    assert [r.headers["X-Longwriter-Request-Id"] for r in seen] == [req.key("m")] * 3
    assert [r.headers["X-Longwriter-Attempt"] for r in seen] == ["1", "2", "3"]
    assert {r.headers["X-Longwriter-Stage"] for r in seen} == {"write"}
    assert {r.headers["Authorization"] for r in seen} == {f"Bearer {KEY}"}
    body = json.loads(seen[0].content)
    assert body["model"] == "m" and body["max_tokens"] == 16
    assert body["messages"] == [{"role": "user", "content": "write something"}]


async def test_no_authorization_header_without_a_key():
    with respx.mock() as mock:
        route = mock.post(URL).mock(return_value=ok())
        async with client(key=None) as c:
            await c.chat(request())
    assert "Authorization" not in route.calls.last.request.headers


# -- what is not retried -------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 413, 422])
async def test_client_errors_are_fatal_after_one_request(status):
    with respx.mock() as mock:
        route = mock.post(URL).mock(
            return_value=httpx.Response(status, json={"error": {"message": "nope\nsecond line"}})
        )
        async with client() as c:
            with pytest.raises(FatalLLMError) as info:
                await c.chat(request())
    assert route.call_count == 1
    assert info.value.status == status
    assert "\n" not in str(info.value)  # one line, fit for `longwriter: error: ...`


@pytest.mark.parametrize(
    "message",
    [
        "This model's maximum context length is 4096 tokens",
        "Requested tokens (9000) exceed context window of 8192",
        "the request exceeds the available context size, try increasing n_ctx",
        "prompt is too long: 50000 tokens > 32768 maximum",
    ],
)
async def test_context_errors_are_recognised(message):
    with respx.mock() as mock:
        route = mock.post(URL).mock(
            return_value=httpx.Response(400, json={"error": {"message": message}})
        )
        async with client() as c:
            with pytest.raises(ContextLengthError):
                await c.chat(request())
    assert route.call_count == 1


# -- secrets -------------------------------------------------------------------------------


async def test_api_key_never_in_reprs_or_errors():
    endpoint = Endpoint(BASE, api_key=KEY)
    assert KEY not in repr(endpoint) and KEY not in str(endpoint)
    # A proxy that echoes the credential it refused must not put it in our error line.
    with respx.mock() as mock:
        mock.post(URL).mock(
            return_value=httpx.Response(
                401, json={"error": {"message": f"Incorrect API key provided: {KEY}"}}
            )
        )
        async with client() as c:
            assert KEY not in repr(c)
            with pytest.raises(FatalLLMError) as fatal:
                await c.chat(request())
    assert KEY not in str(fatal.value) and KEY not in repr(fatal.value)
    with respx.mock() as mock:
        mock.post(URL).mock(side_effect=httpx.ConnectError(f"boom {KEY}"))
        async with client() as c:
            with pytest.raises(EndpointDownError) as down:
                await c.chat(request())
    chain = [down.value, down.value.__cause__, down.value.__context__]
    assert all(KEY not in str(e) for e in chain if e is not None)


# -- concurrency and several endpoints ------------------------------------------------------


async def test_concurrency_limit_per_endpoint():
    in_flight = 0
    peak = 0

    async def slow(_req: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return ok()

    with respx.mock() as mock:
        mock.post(URL).mock(side_effect=slow)
        async with client(n=3) as c:
            await asyncio.gather(*(c.chat(request(f"r{i}")) for i in range(20)))
    assert peak == 3


async def test_failing_replica_is_set_aside():
    down, up = "http://down.test/v1", "http://up.test/v1"
    policy = RetryPolicy(
        max_attempts=6,
        initial_backoff_s=0.0,
        max_backoff_s=0.0,
        failures_before_cooldown=2,
        cooldown_s=60,
        http_transport=FAST.http_transport,
    )
    with respx.mock() as mock:
        bad = mock.post(down + "/chat/completions").mock(return_value=httpx.Response(503))
        good = mock.post(up + "/chat/completions").mock(return_value=ok())
        # `down` has more free slots, so the router prefers it for every attempt until it is
        # set aside: with equal slots a replica that just failed loses the tie to the other
        # and was tried once only, so the cool-down was never reached (the old `<=` passed
        # without it).
        endpoints = [Endpoint(down, max_concurrency=8), Endpoint(up, max_concurrency=4)]
        async with LLMClient(endpoints, "m", policy) as c:
            # Sequential calls: `down` fails twice in a row, is set aside, and every later
            # attempt goes straight to `up` (without the cool-down: 6 attempts per call there).
            for i in range(20):
                await c.chat(request(f"r{i}"))
    assert good.call_count == 20
    assert bad.call_count == policy.failures_before_cooldown


async def test_calls_with_an_affinity_stay_on_one_replica():
    """Prefix-cache routing: four chains of sequential calls over two replicas (one slot
    each) keep every chain on the replica that served its first call, while the replicas
    share the load; the affinity is a routing hint, not part of the call's key."""
    urls = ["http://r0.test/v1", "http://r1.test/v1"]
    served: dict[str, list[str]] = {}

    def answer(url: str):
        async def handler(req: httpx.Request) -> httpx.Response:
            chain = json.loads(req.content)["messages"][0]["content"].split(":")[0]
            served.setdefault(chain, []).append(url)
            await asyncio.sleep(0.005)
            return ok()

        return handler

    async def chain(c: LLMClient, name: str, slots: asyncio.Semaphore) -> None:
        think = random.Random(name)
        async with slots:  # as the build's chain slots: one call of a chain at a time
            for step in range(6):
                req = ChatRequest.of(
                    "write",
                    [{"role": "user", "content": f"{name}: step {step}"}],
                    "v@1",
                    affinity=name,
                )
                await c.chat(req)
                # The factory's work between calls (parse, store, next prompt): meanwhile
                # the other chain's replica may free up too, and a plain least-busy choice
                # would then move this chain there.
                await asyncio.sleep(think.uniform(0, 0.012))
            c.release_affinity(name)

    with respx.mock() as mock:
        for url in urls:
            mock.post(url + "/chat/completions").mock(side_effect=answer(url))
        endpoints = [Endpoint(u, max_concurrency=1) for u in urls]
        async with LLMClient(endpoints, "m", FAST) as c:
            slots = asyncio.Semaphore(2)
            await asyncio.gather(*(chain(c, f"c{i}", slots) for i in range(4)))
    assert all(len(set(replicas)) == 1 for replicas in served.values()), served
    assert {r[0] for r in served.values()} == set(urls)  # both replicas got chains
    a = ChatRequest.of("write", [{"role": "user", "content": "x"}], "v@1", affinity="a")
    b = ChatRequest.of("write", [{"role": "user", "content": "x"}], "v@1", affinity="b")
    assert a.key("m") == b.key("m") and a == b


# -- faults on a real socket (the fake server) ---------------------------------------------


TRANSPORTS = pytest.mark.parametrize("transport", ["aiohttp", "httpcore"])


def transport_of(c: LLMClient) -> str:
    """Which transport the client's pools really use (not just what its policy asked)."""
    names = {type(pool._transport).__module__.split(".")[0] for pool in c._pools}
    assert len(names) == 1, names
    return names.pop()


def test_default_transport_is_aiohttp(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("all_proxy", raising=False)
    assert RetryPolicy().http_transport == "aiohttp"
    assert transport_of(LLMClient([Endpoint(BASE)], "m")) == "httpx_aiohttp"
    plain = LLMClient([Endpoint(BASE)], "m", RetryPolicy(http_transport="httpcore"))
    assert transport_of(plain) == "httpx"


@TRANSPORTS
async def test_socket_faults_from_the_fake_server_are_absorbed(transport: str):
    """Every fault kind at a 30% rate, on either transport: every call succeeds, and each
    fault cost exactly one extra request (finish_reason=length is an answer, not a retry)."""
    cfg = FakeConfig(fault_rate=0.3, hang_s=1.0, retry_after_s=0.01, seed=7)
    policy = RetryPolicy(
        max_attempts=12,
        initial_backoff_s=0.001,
        max_backoff_s=0.01,
        read_timeout_s=0.25,
        http_transport=transport,
    )
    with FakeOpenAIServer(cfg).running() as fake:
        async with LLMClient([Endpoint(fake.base_url, max_concurrency=16)], "fake", policy) as c:
            results = await asyncio.gather(*(c.chat(request(f"call {i}")) for i in range(120)))
        stats = fake.stats
    assert len({r.key for r in results}) == 120
    faults = sum(stats.faults.values())
    retried = faults - stats.faults.get("length", 0)
    assert set(stats.faults) >= {"429", "500", "503", "drop", "hang", "bad_json", "empty"}
    assert c.stats.retries == retried
    assert stats.requests == 120 + retried
    assert sum(r.attempts for r in results) == stats.requests
    # every logical call was answered usably exactly once
    assert stats.successes_by_request_id == {r.key: 1 for r in results}
    assert stats.missing_headers == 0


@TRANSPORTS
async def test_hang_past_timeout_is_a_timeout_not_a_stall(transport: str):
    cfg = FakeConfig(fault_rate=1.0, fault_kinds=("hang",), hang_s=5.0)
    policy = RetryPolicy(
        max_attempts=2,
        initial_backoff_s=0.0,
        max_backoff_s=0.0,
        read_timeout_s=0.2,
        http_transport=transport,
    )
    with FakeOpenAIServer(cfg).running() as fake:
        async with LLMClient([Endpoint(fake.base_url)], "fake", policy) as c:
            started = time.monotonic()
            with pytest.raises(EndpointDownError, match="ReadTimeout"):
                await c.chat(request())
            assert time.monotonic() - started < 2.0
    assert fake.stats.requests == 2


@TRANSPORTS
async def test_refused_connection_is_retried_then_endpoint_down(transport: str):
    """Nothing listening: each attempt is a transport fault (retried), then the endpoint is
    down, with httpx's error named (aiohttp's own error types never reach the caller)."""
    with socket.socket() as s:  # a port that was free a moment ago and has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    policy = RetryPolicy(
        max_attempts=3, initial_backoff_s=0.0, max_backoff_s=0.0, http_transport=transport
    )
    async with LLMClient([Endpoint(f"http://127.0.0.1:{port}/v1")], "m", policy) as c:
        assert transport_of(c) == ("httpx_aiohttp" if transport == "aiohttp" else "httpx")
        with pytest.raises(EndpointDownError, match=r"failed after 3 attempts: Connect"):
            await c.chat(request())
        assert c.stats.requests == 3 and c.stats.retries == 2


class _WireServer:
    """A loopback HTTP/1.1 server that records each request's bytes and answers a chat
    completion, setting a cookie when `cookie` is given (one connection at a time)."""

    def __init__(self, cookie: str | None = None) -> None:
        import threading

        self.cookie = cookie
        self.requests: list[bytes] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while True:
                    while b"\r\n\r\n" not in buf:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        buf += chunk
                    if b"\r\n\r\n" not in buf:
                        break
                    head, _, rest = buf.partition(b"\r\n\r\n")
                    length = int(
                        next(
                            line.split(b":", 1)[1]
                            for line in head.split(b"\r\n")
                            if line.lower().startswith(b"content-length:")
                        )
                    )
                    while len(rest) < length:
                        rest += conn.recv(65536)
                    self.requests.append(head + b"\r\n\r\n" + rest[:length])
                    buf = rest[length:]
                    body = json.dumps(
                        {
                            "model": "m",
                            "choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 1},
                        }
                    ).encode()
                    extra = f"Set-Cookie: {self.cookie}; Path=/\r\n" if self.cookie else ""
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        + f"Content-Length: {len(body)}\r\n{extra}\r\n".encode()
                        + body
                    )

    def close(self) -> None:
        self.sock.close()


def _headers_of(raw: bytes) -> list[tuple[bytes, bytes]]:
    lines = raw.partition(b"\r\n\r\n")[0].split(b"\r\n")
    return [tuple(p.strip() for p in line.split(b":", 1)) for line in lines[1:]]  # type: ignore[misc]


@TRANSPORTS
async def test_the_direct_send_puts_the_same_request_on_the_wire(transport: str):
    """_post sends without httpx's client layers (auth, redirects, hooks, cookie jar): the
    request line, headers (the client's defaults merged, ours over them, in order) and
    body are the bytes httpx's own `post` sends."""
    server = _WireServer()
    try:
        policy = RetryPolicy(max_attempts=1, http_transport=transport)
        async with LLMClient([Endpoint(server.base_url, api_key=KEY)], "m", policy) as c:
            state = c._states[0]
            body = {"model": "m", "messages": [{"role": "user", "content": "héllo"}]}
            headers = {"X-Longwriter-Stage": "write", "X-Longwriter-Request-Id": "k1"}
            direct = await c._post(state.chat_url, body, headers)
            pool = c._pools[0]
            whole = await pool.post(
                state.chat_url,
                content=json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode(),
                headers={**headers, "Content-Type": "application/json"},
            )
            assert direct.status_code == whole.status_code == 200
            assert direct.json() == whole.json()
            assert direct.request.url == whole.request.url
    finally:
        server.close()
    sent_direct, sent_whole = server.requests
    assert sent_direct.split(b"\r\n", 1)[0] == sent_whole.split(b"\r\n", 1)[0]
    assert _headers_of(sent_direct) == _headers_of(sent_whole)
    assert sent_direct.partition(b"\r\n\r\n")[2] == sent_whole.partition(b"\r\n\r\n")[2]
    names = [k.lower() for k, _ in _headers_of(sent_direct)]
    assert b"user-agent" in names and b"x-longwriter-request-id" in names


@TRANSPORTS
async def test_a_cookie_an_endpoint_sets_is_sent_back(transport: str):
    """As with httpx's own path: a Set-Cookie from the endpoint (a load balancer's sticky
    session) is kept and sent with the next requests."""
    server = _WireServer(cookie="lb=replica-2")
    try:
        policy = RetryPolicy(max_attempts=1, http_transport=transport)
        async with LLMClient([Endpoint(server.base_url)], "m", policy) as c:
            first = await c.chat(request("one"))
            second = await c.chat(request("two"))
            assert first.content == second.content == "ok"
    finally:
        server.close()
    cookies = [{k.lower(): v for k, v in _headers_of(r)}.get(b"cookie") for r in server.requests]
    assert cookies == [None, b"lb=replica-2"]


@TRANSPORTS
async def test_a_proxy_from_the_environment_carries_the_requests(transport: str, monkeypatch):
    """HTTP_PROXY set: requests go to the proxy, in absolute form for the endpoint's host
    (httpx mounts it on its own transport; the direct send takes the transport the client
    picks for the URL). The aiohttp transport used to go around it."""
    proxy = _WireServer()
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.base_url.removesuffix("/v1"))
    try:
        policy = RetryPolicy(max_attempts=1, http_transport=transport)
        async with LLMClient([Endpoint("http://llm.example.invalid/v1")], "m", policy) as c:
            # httpx's own transport, whichever was asked: only it mounts env proxies.
            assert transport_of(c) == "httpx"
            got = await c.chat(request("through the proxy"))
    finally:
        proxy.close()
    assert got.content == "ok"
    [sent] = proxy.requests
    assert sent.startswith(b"POST http://llm.example.invalid/v1/chat/completions HTTP/1.1")
