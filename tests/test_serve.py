"""`troupe serve` on the real embedded model and real loopback sockets, driven by the
official openai and anthropic clients (and httpx for troupe's agents API)."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import anthropic
import anyio
import attrs
import httpx
import openai
import pytest

import troupe
from conftest import PYTHON
from serving import KEY, Server, serving

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with serving() as running:
        yield running


@pytest.fixture(scope="module")
def model(server: Server) -> str:
    return server.rt.model.name


@pytest.fixture
def oai(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture
def claude(server: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as client:
        yield client


def _ask(
    oai: openai.OpenAI, model: str, text: str, **kw: object
) -> openai.types.chat.ChatCompletion:
    return oai.chat.completions.create(  # type: ignore[call-overload, no-any-return]
        model=model, messages=[{"role": "user", "content": text}], **kw)


# -- OpenAI ---------------------------------------------------------------------------------

def test_models_lists_the_served_model(oai: openai.OpenAI, model: str) -> None:
    assert [m.id for m in oai.models.list().data] == [model]
    assert oai.models.retrieve(model).id == model


def test_chat_completion_and_its_stream_agree(oai: openai.OpenAI, model: str,
                                              server: Server) -> None:
    agents = server.statistics().agents
    reply = _ask(oai, model, "Tell me a story.", max_tokens=8, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 8
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8
    # The same greedy turn streamed: the same text, chunk by chunk, then the usage.
    chunks = list(_ask(oai, model, "Tell me a story.", max_completion_tokens=8,
                       temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8
    # Stateless requests leave no agent behind.
    assert server.statistics().agents == agents


def test_seeded_sampling_repeats(oai: openai.OpenAI, model: str) -> None:
    texts = {_ask(oai, model, "Pick a word.", max_tokens=6, temperature=0.9, top_p=0.9,
                  seed=7).choices[0].message.content for _ in range(2)}
    assert len(texts) == 1


def test_stop_sequence_cuts_the_reply(oai: openai.OpenAI, model: str) -> None:
    full = _ask(oai, model, "Count.", max_tokens=12, temperature=0).choices[0].message.content
    assert full is not None
    assert len(full) > 4
    stop = full[3:5]
    cut = _ask(oai, model, "Count.", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_a_resent_conversation_prefills_only_what_is_new(
        oai: openai.OpenAI, model: str, server: Server) -> None:
    agents = server.statistics().agents
    system = "You are a careful narrator of a long story about a village. " * 6
    messages: list[dict[str, str]] = [{"role": "system", "content": system},
                                      {"role": "user", "content": "Begin."}]
    first = oai.chat.completions.create(model=model, messages=messages,  # type: ignore[arg-type]
                                        max_tokens=8, temperature=0)
    assert first.usage is not None
    messages += [{"role": "assistant", "content": first.choices[0].message.content or ""},
                 {"role": "user", "content": "Go on."}]
    second = oai.chat.completions.create(model=model, messages=messages,  # type: ignore[arg-type]
                                         max_tokens=8, temperature=0)
    usage = second.usage
    assert usage is not None
    assert usage.prompt_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens or 0
    # The agent that answered the first request answers the second: all of the first
    # turn's prompt and reply is read from its KV; only the new message is prefilled.
    assert cached >= first.usage.prompt_tokens
    assert usage.prompt_tokens - cached < 32
    # A conversation the client changed (here, the first reply) is a new agent's, which
    # still reads every full 16-token block the two share.
    messages[2]["content"] = "Something else entirely."
    third = oai.chat.completions.create(model=model, messages=messages,  # type: ignore[arg-type]
                                        max_tokens=8, temperature=0)
    assert third.usage is not None
    assert third.usage.prompt_tokens_details is not None
    shared = (first.usage.prompt_tokens // 16) * 16
    assert shared <= (third.usage.prompt_tokens_details.cached_tokens or 0) < cached
    # The same request twice makes the same conversation: one agent is kept for it.
    active = server.statistics().agents_active
    for _ in range(2):
        oai.chat.completions.create(model=model, messages=messages,  # type: ignore[arg-type]
                                    max_tokens=8, temperature=0)
    assert server.statistics().agents_active == active
    assert server.statistics().agents == agents


def test_speaking_as_a_named_agent(oai: openai.OpenAI, model: str, http: httpx.Client) -> None:
    assert http.post("/v1/agents", json={"id": "narrator", "system": "Be brief."}
                     ).status_code == 201
    reply = oai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello."}], max_tokens=3,
        temperature=0, extra_headers={"X-Troupe-Agent": "narrator"})
    assert reply.choices[0].message.content is not None
    agent = http.get("/v1/agents/narrator").json()
    assert [m["role"] for m in agent["transcript"]] == ["user", "assistant"]
    assert agent["transcript"][1]["content"] == reply.choices[0].message.content
    # A stateless request that starts as the agent's conversation reads the agent's blocks.
    stateless = oai.chat.completions.create(model=model, max_tokens=2, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello."},
        {"role": "assistant", "content": reply.choices[0].message.content},
        {"role": "user", "content": "More."}])
    assert stateless.usage is not None
    assert stateless.usage.prompt_tokens_details is not None
    assert (stateless.usage.prompt_tokens_details.cached_tokens or 0) >= 16
    assert http.delete("/v1/agents/narrator").status_code == 200


def test_a_client_leaving_mid_stream_cancels_its_turn(
        oai: openai.OpenAI, model: str, http: httpx.Client, server: Server) -> None:
    assert http.post("/v1/agents", json={"id": "leaver"}).status_code == 201
    stream = oai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Talk for long."}],
        max_tokens=2000, temperature=0, stream=True,
        extra_headers={"X-Troupe-Agent": "leaver"})
    next(iter(stream))
    stream.close()
    # The agent's turns run in order: this one runs once the first is over, which,
    # cancelled, left the transcript as it was (no 2000-token reply in it).
    reply = oai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Short now."}], max_tokens=2,
        extra_headers={"X-Troupe-Agent": "leaver"})
    assert reply.choices[0].message.content is not None
    transcript = http.get("/v1/agents/leaver").json()["transcript"]
    assert [m["content"] for m in transcript if m["role"] == "user"] == ["Short now."]
    assert server.statistics().turns_cancelled >= 1
    http.delete("/v1/agents/leaver")


def test_responses_continue_by_id(oai: openai.OpenAI, model: str, http: httpx.Client) -> None:
    first = oai.responses.create(model=model, input="Name a color.", instructions="Be brief.",
                                 max_output_tokens=4, temperature=0)
    assert first.output_text
    second = oai.responses.create(model=model, input="Another.", previous_response_id=first.id,
                                  max_output_tokens=4, temperature=0)
    assert second.id != first.id
    assert second.usage is not None
    assert second.usage.input_tokens_details.cached_tokens > 0
    # Streamed, OpenAI's event sequence; the chain goes on from the streamed response.
    events = list(oai.responses.create(model=model, input="And a third.", stream=True,
                                       max_output_tokens=4, previous_response_id=second.id,
                                       temperature=0))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-1] == "response.incomplete"  # cut by max_output_tokens
    third = events[-1].response  # type: ignore[union-attr]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert third.output_text == "".join(deltas)
    assert third.id == second.id.rpartition("_")[0] + "_3"
    assert third.usage is not None
    assert third.usage.output_tokens == 4
    fourth = oai.responses.create(model=model, input="Last.", previous_response_id=third.id,
                                  max_output_tokens=2)
    assert fourth.id.endswith("_4")
    again = oai.responses.retrieve(third.id)
    assert again.output_text == third.output_text
    assert again.previous_response_id == second.id
    with pytest.raises(openai.BadRequestError):  # only the latest of a chain goes on
        oai.responses.create(model=model, input="Again.", previous_response_id=first.id,
                             max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        oai.responses.create(model=model, input="x", previous_response_id="resp_nope_1",
                             max_output_tokens=2)
    oai.responses.delete(first.id)  # the whole chain: it is one agent
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(fourth.id)


# -- errors ---------------------------------------------------------------------------------

def test_bad_requests_get_openai_errors(oai: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        _ask(oai, "no-such-model", "hi", max_tokens=2)
    assert "no-such-model" in missing.value.message
    with pytest.raises(openai.BadRequestError) as hot:
        _ask(oai, model, "hi", max_tokens=2, temperature=5)
    assert hot.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as long:
        _ask(oai, model, "hi " * 3000, max_tokens=2)
    assert long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as tools:
        _ask(oai, model, "hi", max_tokens=2, tools=[{"type": "code_interpreter"}])
    assert "not supported by this server yet" in tools.value.message
    with pytest.raises(openai.BadRequestError):
        _ask(oai, model, "hi", max_tokens=2, response_format={"type": "xml"})
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=model, max_tokens=2, messages=[
            {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(openai.BadRequestError):
        _ask(oai, model, "hi", max_tokens=2, n=2)


def test_bad_bodies_and_keys(server: Server, model: str) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        anonymous = client.get("/v1/models")
        assert anonymous.status_code == 401
        assert anonymous.json()["error"]["type"] == "authentication_error"
        assert client.get("/v1/models", headers={"x-api-key": KEY + "x"}).status_code == 401
        assert client.get("/health").json()["ready"] is True  # no key needed
        auth = {"Authorization": f"Bearer {KEY}"}
        assert client.post("/v1/chat/completions", headers=auth,
                           content=b"{not json").status_code == 400
        assert client.post("/v1/chat/completions", headers=auth, content=b"[]").status_code == 400
        huge = client.post("/v1/chat/completions", headers=auth,
                           content=b"x" * (server_limit() + 1))
        assert huge.status_code == 413
        assert huge.json()["error"]["code"] == "request_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it comes
            for _ in range(server_limit() // 65536 + 2):
                yield b" " * 65536

        chunked = client.post("/v1/chat/completions", headers=auth, content=chunks())
        assert chunked.status_code == 413
        assert client.get("/v1/nothing", headers=auth).status_code == 404
        assert client.get("/v1/chat/completions", headers=auth).status_code == 405
        for status in (huge, anonymous):
            assert "Traceback" not in status.text


def server_limit() -> int:
    return troupe.ServeOptions().max_body_bytes


def test_anonymous_on_a_public_address_is_refused() -> None:
    async def attempt() -> None:
        async with troupe.open_runtime("embedded:tiny") as rt:
            await troupe.serve(rt, host="0.0.0.0", port=0)

    import trio

    with pytest.raises(ValueError, match="without an API key"):
        trio.run(attempt)


def test_rate_limit_answers_429_with_retry_after(model: str) -> None:
    options = troupe.ServeOptions(api_keys=(KEY, "other"), rate_limit=0.001, rate_burst=2)
    with serving(options=options) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key=KEY, max_retries=0)
        client.models.list()
        client.models.list()
        with pytest.raises(openai.RateLimitError) as limited:
            client.models.list()
        assert int(limited.value.response.headers["Retry-After"]) >= 1
        # The limit is per key.
        other = openai.OpenAI(base_url=f"{running.url}/v1", api_key="other", max_retries=0)
        assert other.models.list().data
        # A wrong key is refused before it is counted: it cannot spend another's budget.
        wrong = openai.OpenAI(base_url=f"{running.url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    # Without keys, the limit is per client address.
    with serving(options=troupe.ServeOptions(rate_limit=0.001, rate_burst=1)) as running:
        open_client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0)
        open_client.models.list()
        with pytest.raises(openai.RateLimitError):
            open_client.models.list()


def test_a_full_server_answers_503_with_retry_after(model: str) -> None:
    options = troupe.ServeOptions(api_keys=(KEY,), max_pending=1,
                                  cors_origins=("https://app.example",))
    with serving(options=options) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key=KEY, max_retries=0)
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Talk."}], max_tokens=1000,
            stream=True)
        next(iter(stream))  # one turn under way: the server is full
        with pytest.raises(openai.InternalServerError) as busy:
            _ask(client, model, "Me too.", max_tokens=2)
        assert busy.value.status_code == 503
        assert busy.value.response.headers["Retry-After"] == "1"
        stream.close()
        # CORS: a browser on the allowed origin may call.
        preflight = httpx.options(f"{running.url}/v1/chat/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization"})
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    # Admission by KV: a turn under way whose KV is over the budget fills the server.
    with serving(kv_budget="4KB") as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key=KEY, max_retries=0)
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Talk. " * 30}],
            max_tokens=1000, stream=True)
        next(iter(stream))
        with pytest.raises(openai.InternalServerError) as full:
            _ask(client, model, "Me too.", max_tokens=2)
        assert "KV budget" in full.value.message
        stream.close()


def test_one_json_log_line_per_request(http: httpx.Client,
                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="troupe.server")
    assert http.get("/v1/models").status_code == 200
    lines = [json.loads(r.getMessage()) for r in caplog.records
             if r.name == "troupe.server" and r.getMessage().startswith("{")]
    assert [(line["route"], line["status"]) for line in lines] == [("/v1/models", 200)]
    assert lines[0]["key"] is not None
    assert KEY not in caplog.text  # a fingerprint, never the key


# -- Anthropic ------------------------------------------------------------------------------

def test_anthropic_messages_and_stream(claude: anthropic.Anthropic, model: str) -> None:
    message = claude.messages.create(
        model=model, max_tokens=6, system=[{"type": "text", "text": "Be brief."}],
        extra_body={"temperature": 0},
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hello."}]}])
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 6
    text = message.content[0].text  # type: ignore[union-attr]
    with claude.messages.stream(model=model, max_tokens=6, system="Be brief.",
                                extra_body={"temperature": 0},
                                messages=[{"role": "user", "content": "Hello."}]) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 6
    # A resent conversation is read from cache.
    again = claude.messages.create(model=model, max_tokens=2, system="Be brief.", messages=[
        {"role": "user", "content": "Hello."}, {"role": "assistant", "content": text},
        {"role": "user", "content": "More."}])
    assert (again.usage.cache_read_input_tokens or 0) > 0
    count = claude.messages.count_tokens(model=model, system="Be brief.",
                                         messages=[{"role": "user", "content": "Hello."}])
    assert count.input_tokens == (message.usage.input_tokens
                                  + (message.usage.cache_read_input_tokens or 0))


def test_anthropic_errors_in_its_shape(claude: anthropic.Anthropic, model: str) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="nope", max_tokens=2,
                               messages=[{"role": "user", "content": "x"}])
    assert missing.value.body["type"] == "error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as tools:
        claude.messages.create(model=model, max_tokens=2, tools=[{
            "type": "web_search_20250305", "name": "web_search"}],
            messages=[{"role": "user", "content": "x"}])
    assert tools.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    bad_key = anthropic.Anthropic(base_url=claude.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad_key.messages.create(model=model, max_tokens=2,
                                messages=[{"role": "user", "content": "x"}])


# -- the agents API -------------------------------------------------------------------------

def test_agents_api(http: httpx.Client) -> None:
    for i in range(3):
        assert http.post("/v1/agents", json={"id": f"team/{i}", "system": "Be brief."}
                         ).status_code == 201
    assert http.post("/v1/agents", json={"id": "team/0"}).status_code == 409
    page = http.get("/v1/agents", params={"limit": 2}).json()
    assert page["has_more"] is True
    rest = http.get("/v1/agents", params={"after": page["last_id"]}).json()
    ids = [a["id"] for a in page["data"] + rest["data"]]
    assert {"team/0", "team/1", "team/2"} <= set(ids)
    assert len(ids) == len(set(ids))
    assert http.post("/v1/agents/team/0/tell", json={"message": "Remember 7."}
                     ).status_code == 202
    reply = http.post("/v1/agents/team/0/turns",
                      json={"message": "What number?", "max_tokens": 3}).json()
    assert reply["usage"]["completion_tokens"] == 3
    with http.stream("POST", "/v1/agents/team/1/turns",
                     json={"message": "Hi.", "max_tokens": 3, "stream": True}) as streamed:
        events = [json.loads(line[6:]) for line in streamed.iter_lines()
                  if line.startswith("data: {")]
    assert "".join(e.get("delta", "") for e in events[:-1]) == events[-1]["text"]
    fork = http.post("/v1/agents/team/0/fork", json={"id": "team/0b"})
    assert fork.status_code == 201
    got = http.get("/v1/agents/team/0b").json()
    assert [m["role"] for m in got["transcript"]] == ["user", "user", "assistant"]
    assert got["statistics"]["turns"] == 1
    stats = http.get("/v1/statistics").json()
    assert stats["turns_completed"] >= 2
    for agent_id in ("team/0", "team/0b", "team/1", "team/2"):
        assert http.delete(f"/v1/agents/{agent_id}").status_code == 200
    gone = http.get("/v1/agents/team/0")
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "agent_not_found"
    assert http.delete("/v1/agents/team/0").status_code == 404
    assert http.post("/v1/agents/team/0/turns", json={"message": "x"}).status_code == 404


def test_health_metrics_and_schema(http: httpx.Client) -> None:
    assert http.get("/health").json() == {"status": "ok", "live": True, "ready": True}
    metrics = http.get("/metrics").text
    for name in ("troupe_http_requests_total", "troupe_turns_completed_total",
                 "troupe_kv_hot_bytes", "troupe_turns_in_flight", "troupe_evictions_total",
                 "troupe_http_time_to_first_token_seconds_bucket",
                 "troupe_http_conversations_resumed_total", "troupe_http_kept_conversations"):
        assert name in metrics
    schema = http.get("/openapi.json").json()
    assert "/v1/agents/{agent_id}/turns" in schema["paths"]


# -- restarts, backends, the command ---------------------------------------------------------

def test_a_response_chain_survives_a_restart(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with serving(store) as first_run:
        client = openai.OpenAI(base_url=f"{first_run.url}/v1", api_key=KEY, max_retries=0)
        model = first_run.rt.model.name
        first = client.responses.create(model=model, input="Name a fruit.",
                                        max_output_tokens=3, temperature=0)
        # Stateless traffic leaves nothing in the store.
        client.chat.completions.create(model=model, max_tokens=2,
                                       messages=[{"role": "user", "content": "x"}])
    with serving(store, backend="asyncio") as second_run:
        client = openai.OpenAI(base_url=f"{second_run.url}/v1", api_key=KEY, max_retries=0)
        second = client.responses.create(model=model, input="Another.", max_output_tokens=3,
                                         previous_response_id=first.id, temperature=0)
        assert second.output_text is not None
        assert second_run.rt.agent_ids() == (first.id.rpartition("_")[0],)
        with httpx.Client(base_url=second_run.url, headers={"x-api-key": KEY}) as http:
            chain = http.get(f"/v1/agents/{second_run.rt.agent_ids()[0]}").json()
        assert [m["content"] for m in chain["transcript"] if m["role"] == "user"] == [
            "Name a fruit.", "Another."]


# -- the published schema, fuzzed ---------------------------------------------------------

TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def test_fuzzing_the_published_schema_finds_no_5xx_and_no_open_door(
        server: Server, http: httpx.Client) -> None:
    import hypothesis
    import schemathesis
    from schemathesis.checks import not_a_server_error

    raw = http.get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(raw)
    auth = {"Authorization": f"Bearer {KEY}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    for operation in operations:
        # Without a key, every operation but the health check is refused.
        path = operation.path.replace("{agent_id}", "nobody")
        anonymous = httpx.request(operation.method.upper(), server.url + path, json={})
        if operation.path == "/health":
            assert anonymous.status_code == 200
        else:
            assert anonymous.status_code == 401, operation.label

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(max_examples=6, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck),
                             phases=[hypothesis.Phase.generate])
        def fuzz(case: schemathesis.Case) -> None:
            if isinstance(case.body, dict):
                for field in TOKEN_FIELDS:  # a bounded run: short turns
                    if isinstance(case.body.get(field), int):
                        case.body[field] = min(case.body[field], 4)
                case.body.pop("stream", None)
            response = case.call(base_url=server.url, headers=auth, timeout=60)
            case.validate_response(response, checks=[not_a_server_error])

        fuzz()


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_an_embedded_server_is_cancelled_cleanly(backend: str) -> None:
    async def main() -> tuple[int, bool]:
        async with troupe.open_runtime("embedded:tiny") as rt:
            async with anyio.create_task_group() as tg:
                url = await tg.start(lambda task_status: troupe.serve(
                    rt, port=0, task_status=task_status))
                async with httpx.AsyncClient(base_url=url) as client:
                    status = (await client.get("/v1/models")).status_code
                tg.cancel_scope.cancel()
            # The runtime goes on serving Python callers.
            agent = await rt.spawn("after")
            return status, bool((await agent.say("Hi.", max_tokens=2)).tokens)

    assert anyio.run(main, backend=backend) == (200, True)


def test_the_serve_command_stops_gracefully_on_sigterm(troupe_env: dict[str, str],
                                                       tmp_path: Path) -> None:
    # A grace period no machine's 64 tokens outlast (the reference BLAS took more than
    # the default 10 s): the stream must finish because of the grace, not of the clock.
    command = [PYTHON, "-m", "troupe._cli", "serve", "--model", "embedded:tiny", "--port", "0",
               "--store", str(tmp_path / "store"), "--api-key", KEY, "--grace", "600"]
    with subprocess.Popen(command, env=troupe_env, stderr=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        while line.startswith("troupe: note:"):
            line = proc.stderr.readline()
        assert line.startswith("troupe: serving"), line
        url = line.split(" on ")[1].strip()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        reply = client.responses.create(model=client.models.list().data[0].id, input="Hi.",
                                        max_output_tokens=2)
        assert reply.output_text is not None
        # A stream in flight at SIGTERM finishes within the grace period.
        stream = client.chat.completions.create(
            model=reply.model, messages=[{"role": "user", "content": "Talk."}],
            max_tokens=64, stream=True, stream_options={"include_usage": True})
        chunks = iter(stream)
        next(chunks)
        proc.send_signal(signal.SIGTERM)
        tail = list(chunks)
        assert tail[-1].usage is not None
        assert tail[-1].usage.completion_tokens == 64
        rest = proc.stderr.read()
        assert proc.stdout is not None
        log = [json.loads(line) for line in proc.stdout.read().splitlines()]
        assert proc.wait(timeout=60) == 0
    assert rest.splitlines() == ["troupe: stopping", "troupe: stopped"]
    # The access log: one JSON line per request, on stdout.
    assert [(line["route"], line["status"]) for line in log] == [
        ("/v1/models", 200), ("/v1/responses", 200), ("/v1/chat/completions", 200)]
    # The store was closed cleanly: the chain is in it.
    check = subprocess.run([PYTHON, "-m", "troupe._cli", "store", "ls", str(tmp_path / "store")],
                           env=troupe_env, capture_output=True, text=True, timeout=120)
    assert reply.id.rpartition("_")[0] in check.stdout


def test_past_the_grace_period_turns_are_cancelled_and_the_store_closed(
        troupe_env: dict[str, str], tmp_path: Path) -> None:
    store = tmp_path / "store"
    command = [PYTHON, "-m", "troupe._cli", "serve", "--model", "embedded:tiny", "--port", "0",
               "--store", str(store), "--grace", "0", "--quiet"]
    with subprocess.Popen(command, env=troupe_env, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        while line.startswith("troupe: note:"):
            line = proc.stderr.readline()
        url = line.split(" on ")[1].strip()
        with httpx.Client(base_url=url, timeout=60) as http:
            assert http.post("/v1/agents", json={"id": "talker"}).status_code == 201
            with http.stream("POST", "/v1/agents/talker/turns", json={
                    "message": "Talk for long.", "max_tokens": 2000, "stream": True}) as reply:
                lines = reply.iter_lines()
                assert next(lines).startswith("data: ")
                proc.send_signal(signal.SIGTERM)
                with pytest.raises(httpx.HTTPError):  # cut off: no grace
                    for _ in lines:
                        pass
        assert proc.wait(timeout=60) == 0
    # The cancelled turn left the agent as it was, and the store is sound.
    listed = subprocess.run([PYTHON, "-m", "troupe._cli", "store", "check", str(store)],
                            env=troupe_env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    async def transcript() -> int:
        async with troupe.open_runtime("embedded:tiny", store) as rt:
            return len((await rt.get("talker")).transcript())

    assert anyio.run(transcript) == 0


def test_refuses_a_public_address_without_a_key_before_loading(
        troupe_env: dict[str, str]) -> None:
    done = subprocess.run([PYTHON, "-m", "troupe._cli", "serve", "--host", "0.0.0.0"],
                          env=troupe_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "without an API key" in done.stderr
    assert "Traceback" not in done.stderr


# -- typed replies and tools over HTTP --------------------------------------------------------
#
# The model has random weights: only a constrained reply is reliable, so calls are forced
# (tool_choice required or named) and schemas bound their strings.

WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"enum": ["paris", "rome"]}},
                      "required": ["city"], "additionalProperties": False}
OPENAI_TOOLS = [{"type": "function", "function": {
    "name": "weather", "description": "The weather in a city.",
    "parameters": WEATHER_PARAMETERS}}]
ANTHROPIC_TOOLS = [{"name": "weather", "description": "The weather in a city.",
                    "input_schema": WEATHER_PARAMETERS}]
VOTE = {"type": "object", "properties": {
    "choice": {"enum": ["north", "south"]}, "sure": {"type": "boolean"},
    "why": {"type": "string", "maxLength": 6}},
    "required": ["choice", "sure", "why"], "additionalProperties": False}
CALL_TOKENS = 96  # enough for a forced call of WEATHER_PARAMETERS to complete


def test_response_format_json_schema_and_json_object(oai: openai.OpenAI, model: str) -> None:
    import jsonschema

    reply = _ask(oai, model, "Vote.", max_tokens=80, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "vote", "schema": VOTE, "strict": True}})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), VOTE)
    streamed = _ask(oai, model, "Vote.", max_tokens=80, temperature=0, stream=True,
                    response_format={
        "type": "json_schema", "json_schema": {"name": "vote", "schema": VOTE}})
    assert "".join(c.choices[0].delta.content or "" for c in streamed) \
        == reply.choices[0].message.content
    # The client's own structured-output helper: a pydantic model's strict schema.
    import pydantic

    class Vote(pydantic.BaseModel):
        choice: Literal["north", "south"]
        sure: bool

    parsed = oai.chat.completions.parse(model=model, max_tokens=40, response_format=Vote,
                                        messages=[{"role": "user", "content": "Vote."}])
    assert isinstance(parsed.choices[0].message.parsed, Vote)
    anything = _ask(oai, model, "Some JSON.", max_tokens=64,
                    response_format={"type": "json_object"})
    text = anything.choices[0].message.content or ""
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # a random model may go on adding keys: cut, and said so, never a 500
        assert anything.choices[0].finish_reason == "length"
        assert text.startswith("{")
    # Cut by max_tokens before the value is whole: OpenAI's answer, the partial content
    # and finish_reason "length".
    cut = _ask(oai, model, "Vote.", max_tokens=3, response_format={
        "type": "json_schema", "json_schema": {"name": "vote", "schema": VOTE}})
    assert cut.choices[0].finish_reason == "length"
    assert (cut.choices[0].message.content or "").startswith("{")
    assert cut.usage is not None
    assert cut.usage.completion_tokens == 3
    assert cut.usage.prompt_tokens > 0
    cut_chunks = list(_ask(oai, model, "Vote.", max_tokens=3, stream=True, response_format={
        "type": "json_schema", "json_schema": {"name": "vote", "schema": VOTE}}))
    assert cut_chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in cut_chunks).startswith("{")


def test_openai_tools_round_trip(oai: openai.OpenAI, model: str, server: Server) -> None:
    agents = server.statistics().agents
    messages: list[Any] = [{"role": "user", "content": "Is it sunny in Rome?"}]
    called = oai.chat.completions.create(
        model=model, messages=messages, tools=OPENAI_TOOLS, max_tokens=CALL_TOKENS,
        tool_choice={"type": "function", "function": {"name": "weather"}})
    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    [call] = choice.message.tool_calls
    assert call.type == "function"
    assert call.function.name == "weather"
    assert json.loads(call.function.arguments)["city"] in ("paris", "rome")
    # The client sends the call back with its result: the turn answers the result.
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C."}]
    answered = oai.chat.completions.create(model=model, messages=messages,
                                           tools=OPENAI_TOOLS, max_tokens=6)
    assert answered.choices[0].finish_reason in ("length", "stop")
    assert answered.choices[0].message.content is not None
    assert answered.usage is not None
    # The resent call rendered as the model wrote it: the conversation's agent went on
    # from its own KV, so only the tool result was prefilled.
    assert answered.usage.prompt_tokens_details is not None
    assert (answered.usage.prompt_tokens_details.cached_tokens or 0) \
        >= called.usage.prompt_tokens  # type: ignore[union-attr]
    # "required" streamed: no text, the call whole in one delta, then "tool_calls".
    chunks = list(oai.chat.completions.create(
        model=model, messages=messages[:1], tools=OPENAI_TOOLS, tool_choice="required",
        max_tokens=CALL_TOKENS, stream=True))
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert [(d.index, d.function.name) for d in deltas] == [(0, "weather")]  # type: ignore[union-attr]
    assert json.loads(deltas[0].function.arguments)["city"] in ("paris", "rome")  # type: ignore[union-attr, arg-type]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert server.statistics().agents == agents


def test_responses_with_a_schema_and_tools(oai: openai.OpenAI, model: str) -> None:
    import jsonschema

    voted = oai.responses.create(model=model, input="Vote.", max_output_tokens=80,
                                 text={"format": {"type": "json_schema", "name": "vote",
                                                  "schema": VOTE, "strict": True}})
    jsonschema.validate(json.loads(voted.output_text), VOTE)
    tools: list[Any] = [{"type": "function", "name": "weather", "strict": True,
                         "description": "The weather in a city.",
                         "parameters": WEATHER_PARAMETERS}]
    called = oai.responses.create(model=model, input="Sunny in Rome?", tools=tools,
                                  tool_choice="required", max_output_tokens=CALL_TOKENS)
    [item] = called.output
    assert item.type == "function_call"
    assert item.name == "weather"
    assert json.loads(item.arguments)["city"] in ("paris", "rome")
    # The chain holds the call: only its output is sent to continue it.
    answered = oai.responses.create(
        model=model, previous_response_id=called.id, tools=tools, max_output_tokens=6,
        input=[{"type": "function_call_output", "call_id": item.call_id,
                "output": "Sunny."}])
    assert answered.output[0].type == "message"
    assert answered.status in ("completed", "incomplete")
    # Streamed: the call's item, its arguments, and the completed response holding it.
    events = list(oai.responses.create(
        model=model, input="Sunny in Rome?", tools=tools, max_output_tokens=CALL_TOKENS,
        tool_choice={"type": "function", "name": "weather"}, stream=True))
    kinds = [e.type for e in events]
    assert "response.output_text.delta" not in kinds
    assert kinds[-4:] == ["response.function_call_arguments.delta",
                          "response.function_call_arguments.done",
                          "response.output_item.done", "response.completed"]
    final = events[-1].response  # type: ignore[union-attr]
    assert [o.type for o in final.output] == ["function_call"]
    # An idle keep-alive connection would hold the server's shutdown for its grace period.
    oai.close()


def test_anthropic_tools_round_trip_and_stream(claude: anthropic.Anthropic, model: str) -> None:
    messages: list[Any] = [{"role": "user", "content": "Is it sunny in Rome?"}]
    called = claude.messages.create(model=model, max_tokens=CALL_TOKENS, messages=messages,
                                    tools=ANTHROPIC_TOOLS,  # type: ignore[arg-type]
                                    tool_choice={"type": "tool", "name": "weather"})
    assert called.stop_reason == "tool_use"
    [use] = called.content
    assert use.type == "tool_use"
    assert use.name == "weather"
    assert use.input["city"] in ("paris", "rome")  # type: ignore[index]
    messages += [{"role": "assistant", "content": [b.model_dump() for b in called.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                               "content": "Sunny, 24 C."}]}]
    answered = claude.messages.create(model=model, max_tokens=6, messages=messages,
                                      tools=ANTHROPIC_TOOLS)  # type: ignore[arg-type]
    assert answered.stop_reason in ("max_tokens", "end_turn")
    assert [b.type for b in answered.content] == ["text"]
    assert (answered.usage.cache_read_input_tokens or 0) >= called.usage.input_tokens
    # Streamed with a required call: the official client's accumulator puts the
    # input_json_delta back together.
    with claude.messages.stream(model=model, max_tokens=CALL_TOKENS, messages=messages[:1],
                                tools=ANTHROPIC_TOOLS,  # type: ignore[arg-type]
                                tool_choice={"type": "any"}) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["tool_use"]
    assert final.content[0].input["city"] in ("paris", "rome")  # type: ignore[union-attr, index]
    assert "text" not in kinds
    # Cut before the call is whole: max_tokens, with what was written.
    cut = claude.messages.create(model=model, max_tokens=3, messages=messages[:1],
                                 tools=ANTHROPIC_TOOLS,  # type: ignore[arg-type]
                                 tool_choice={"type": "any"})
    assert cut.stop_reason == "max_tokens"
    assert cut.usage.output_tokens == 3
    assert [b.type for b in cut.content] == ["text"]
    with claude.messages.stream(model=model, max_tokens=3, messages=messages[:1],
                                tools=ANTHROPIC_TOOLS,  # type: ignore[arg-type]
                                tool_choice={"type": "any"}) as stream:
        cut_streamed = stream.get_final_message()
    assert cut_streamed.stop_reason == "max_tokens"
    assert [b.type for b in cut_streamed.content] == ["text"]
    # An idle keep-alive connection would hold the server's shutdown for its grace period.
    claude.close()


def test_streamed_text_holds_back_what_may_start_a_call() -> None:
    from troupe.server._turns import CallFilter, Structure

    tools = (troupe.Tool("f", "", {"type": "object"}),)
    reply = troupe.Reply("a", "Hi <tool_call>...", (), 0, 0, "stop",
                         tool_calls=(troupe.ToolCall("c", "f", {}),))
    free = CallFilter(Structure(tools=tools), ["<tool_call>"])
    out = [free.feed(d) for d in ["Hi <", "tool", "_call>", "{\"name\""]]
    assert out == ["Hi ", "", "", ""]
    assert free.rest(reply) == ""
    # A "<" that starts no call is let through once that is clear, or at the end.
    text = CallFilter(Structure(tools=tools), ["<tool_call>"])
    said = text.feed("a <b") + text.feed("> c <")
    assert said == "a <b> c "
    assert text.rest(attrs.evolve(reply, tool_calls=())) == "<"
    forced = CallFilter(Structure(tools=tools, tool_choice="required"), ["<tool_call>"])
    assert forced.feed("<tool_") == ""
    assert forced.rest(attrs.evolve(reply, tool_calls=())) == "<tool_"
    assert CallFilter(Structure(), ["<tool_call>"]).feed("<tool_") == "<tool_"


def test_schemas_the_grammar_engine_cannot_compile_are_400s(
        oai: openai.OpenAI, claude: anthropic.Anthropic, model: str) -> None:
    bad = {"type": "object", "properties": {"a": {"type": "nonsense"}}}
    with pytest.raises(openai.BadRequestError) as chat:
        _ask(oai, model, "hi", max_tokens=2, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": bad}})
    assert chat.value.code == "invalid_schema"
    assert "nonsense" in chat.value.message
    with pytest.raises(openai.BadRequestError) as tool:
        _ask(oai, model, "hi", max_tokens=2, stream=True, tools=[{
            "type": "function", "function": {"name": "f", "parameters": bad}}])
    assert tool.value.body["param"] == "tools[0].parameters"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        oai.responses.create(model=model, input="hi", max_output_tokens=2, text={
            "format": {"type": "json_schema", "name": "x", "schema": bad}})
    with pytest.raises(openai.BadRequestError) as unknown:
        _ask(oai, model, "hi", max_tokens=2, tools=OPENAI_TOOLS,
             tool_choice={"type": "function", "function": {"name": "nope"}})
    assert unknown.value.body["param"] == "tool_choice"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as anthropic_bad:
        claude.messages.create(model=model, max_tokens=2, tools=[{
            "name": "f", "input_schema": bad}],  # type: ignore[list-item]
            messages=[{"role": "user", "content": "x"}])
    assert anthropic_bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


def test_agents_api_typed_turns_and_tool_results(http: httpx.Client) -> None:
    import jsonschema

    assert http.post("/v1/agents", json={"id": "typed"}).status_code == 201
    voted = http.post("/v1/agents/typed/turns", json={
        "message": "Vote.", "schema": VOTE, "max_tokens": 80}).json()
    jsonschema.validate(voted["data"], VOTE)
    assert json.loads(voted["text"]) == voted["data"]
    picked = http.post("/v1/agents/typed/turns", json={
        "message": "Where?", "choices": ["north", "south"], "max_tokens": 8}).json()
    assert picked["data"] in ("north", "south")
    tools = [{"name": "weather", "description": "The weather in a city.",
              "parameters": WEATHER_PARAMETERS}]
    called = http.post("/v1/agents/typed/turns", json={
        "message": "Sunny in Rome?", "tools": tools, "tool_choice": "weather",
        "max_tokens": CALL_TOKENS}).json()
    [call] = called["tool_calls"]
    assert call["name"] == "weather"
    assert call["arguments"]["city"] in ("paris", "rome")
    with http.stream("POST", "/v1/agents/typed/turns", json={
            "tool_results": ["Sunny."], "tools": tools, "tool_choice": "none",
            "max_tokens": 4, "stream": True}) as streamed:
        events = [json.loads(line[6:]) for line in streamed.iter_lines()
                  if line.startswith("data: {")]
    assert events[-1]["tool_calls"] == []
    transcript = http.get("/v1/agents/typed").json()["transcript"]
    assert [m["role"] for m in transcript][-3:] == ["assistant", "tool", "assistant"]
    assert transcript[-2]["content"] == "Sunny."
    both = http.post("/v1/agents/typed/turns", json={
        "message": "x", "schema": VOTE, "choices": ["a"]})
    assert both.status_code == 400
    assert http.delete("/v1/agents/typed").status_code == 200
