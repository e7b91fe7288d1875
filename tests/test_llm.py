"""The LLM client against a real OpenAI-compatible server on loopback (tests/fakellm.py)."""

from __future__ import annotations

import email.utils
import gzip
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fakellm import FakeLLM

from coordinator import llm
from coordinator.config import Endpoint, LLMSettings, Prices
from coordinator.errors import LLMAuthError, LLMError
from coordinator.llm import PLAIN_JSON_HINT, Client, SpendLimitReached

KEY = "sk-test-9f8e7d6c5b4a-SECRET"
OK = '{"ok": true}'


@pytest.fixture
def fake() -> Iterator[FakeLLM]:
    with FakeLLM() as server:
        yield server


class Sleeps(list[float]):
    """The client's sleep: records each wait and moves `clock` on by it (no time passes)."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0

    def __call__(self, seconds: float) -> None:
        self.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


def settings(*endpoints: Endpoint, max_retries: int = 2, timeout: float = 10.0,
             **kw: object) -> LLMSettings:
    return LLMSettings(primary=endpoints[0], fallback=tuple(endpoints[1:]), timeout=timeout,
                       max_retries=max_retries, **kw)  # type: ignore[arg-type]


def test_reply_carries_text_usage_and_cost(fake: FakeLLM, sleeps: Sleeps) -> None:
    ep = Endpoint("qwen3-coder", fake.base_url, prices=Prices(input=3.0, output=15.0))
    fake.script(content=OK, usage={"prompt_tokens": 1000, "completion_tokens": 500})
    reply = Client(settings(ep, temperature=0.2, max_tokens=900), sleep=sleeps).chat(
        [{"role": "user", "content": "hello as JSON"}])

    assert reply.text == OK
    assert reply.model == "qwen3-coder"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (1000, 500)
    assert not reply.usage.estimated
    assert reply.cost == pytest.approx(1000 * 3.0 / 1e6 + 500 * 15.0 / 1e6)
    assert [c.status for c in reply.calls] == [200]
    assert reply.calls[0].cost == pytest.approx(reply.cost)
    sent = fake.requests[0]
    assert sent.path == "/v1/chat/completions"
    assert sent.body["model"] == "qwen3-coder"
    assert sent.body["response_format"] == {"type": "json_object"}
    assert sent.body["temperature"] == 0.2 and sent.body["max_tokens"] == 900
    assert sent.body["messages"] == [{"role": "user", "content": "hello as JSON"}]
    assert "authorization" not in sent.headers  # no api_key_env: a local server
    assert sleeps == []


def test_usage_is_estimated_and_marked_when_the_server_reports_none(fake: FakeLLM) -> None:
    fake.script(content="x" * 400, usage=None)
    reply = Client(settings(Endpoint("m", fake.base_url, prices=Prices(1.0, 1.0)))).chat(
        [{"role": "user", "content": "y" * 800}], json_object=False)
    assert reply.usage.estimated
    assert reply.usage.completion_tokens == 100
    assert 200 <= reply.usage.prompt_tokens <= 210
    assert reply.cost == pytest.approx((reply.usage.prompt_tokens + 100) / 1e6)
    assert "response_format" not in fake.requests[0].body


def test_an_estimate_counts_a_chinese_character_as_a_token(fake: FakeLLM) -> None:
    # Once a quarter token each: a server reporting no usage billed a Chinese prompt at a fifth.
    fake.script(content='{"摘要": "好"}', usage=None)
    reply = Client(settings(Endpoint("m", fake.base_url, prices=Prices(1.0, 1.0)))).chat(
        [{"role": "user", "content": "修复登录错误" * 100}], json_object=False)
    assert reply.usage.estimated and reply.usage.prompt_tokens == 600
    assert reply.usage.completion_tokens == 2 + 3  # 8 narrow characters, 3 wide


def test_429_is_retried_with_backoff_then_the_next_model_answers(fake: FakeLLM, sleeps: Sleeps) -> None:
    for _ in range(3):
        fake.script(status=429, json={"error": {"message": "rate limited"}})
    fake.script(content=OK)
    client = Client(settings(Endpoint("primary", fake.base_url), Endpoint("backup", fake.base_url),
                             max_retries=2), sleep=sleeps)
    reply = client.chat([{"role": "user", "content": "hi"}])

    assert reply.model == "backup"
    assert [b["model"] for b in fake.chat_bodies()] == ["primary"] * 3 + ["backup"]
    assert sleeps == [1.0, 2.0]  # max_retries=2: two waits, exponential
    assert [c.status for c in reply.calls] == [429, 429, 429, 200]
    assert "rate limited" in (reply.calls[0].error or "")
    assert client.calls == reply.calls


def test_retry_after_is_honoured(fake: FakeLLM, sleeps: Sleeps) -> None:
    fake.script(status=429, json={"error": {"message": "wait"}}, headers={"Retry-After": "3"})
    fake.script(content=OK)
    reply = Client(settings(Endpoint("m", fake.base_url), max_retries=3), sleep=sleeps).chat(
        [{"role": "user", "content": "hi"}])
    assert reply.text == OK
    assert sleeps == [3.0]


@pytest.mark.parametrize("after", ["86400", "DAY", "1e400"])
def test_a_retry_after_far_too_long_moves_on_to_the_fallback_at_once(fake: FakeLLM, after: str,
                                                                    sleeps: Sleeps) -> None:
    """A provider out of quota for the day (Retry-After: 86400, or a date a day away): the client
    slept 60 s per retry, and past the order's timeout, the fallback never asked."""
    if after == "DAY":
        after = email.utils.formatdate(time.time() + 86400, usegmt=True)
    fake.script(status=429, json={"error": {"message": "daily quota used up"}}, headers={"Retry-After": after})
    fake.script(content=OK)
    client = Client(settings(Endpoint("m", fake.base_url), Endpoint("backup", fake.base_url), max_retries=3),
                    sleep=sleeps, clock=sleeps.clock)
    client.deadline = sleeps.now + 30
    reply = client.chat([{"role": "user", "content": "hi"}])
    assert reply.model == "backup" and sleeps == []  # no wait at all
    assert [(c.model, c.status) for c in client.calls] == [("m", 429), ("backup", 200)]

    fake.script(status=503, json={"error": {"message": "down"}}, headers={"Retry-After": after})
    alone = Client(settings(Endpoint("m", fake.base_url), max_retries=3), sleep=sleeps, clock=sleeps.clock)
    with pytest.raises(LLMError) as info:
        alone.chat([{"role": "user", "content": "hi"}])
    wait = "forever" if after == "1e400" else "24 h"
    assert f"the provider asks to wait {wait} before another try (Retry-After)" in str(info.value)
    assert len(alone.calls) == 1 and sleeps == []


def test_a_long_retry_after_the_orders_timeout_allows_is_waited_whole_with_no_fallback(
        fake: FakeLLM, sleeps: Sleeps) -> None:
    """No other model to ask, 10 minutes left, the provider asks for 90 s: the attempt is not
    failed at once (an attempt asked again at once is refused again), nor retried too early."""
    fake.script(status=429, json={"error": {"message": "rate limited"}}, headers={"Retry-After": "90"})
    fake.script(content=OK)
    client = Client(settings(Endpoint("m", fake.base_url), max_retries=2), sleep=sleeps, clock=sleeps.clock)
    client.deadline = sleeps.now + 600
    assert client.chat([{"role": "user", "content": "hi"}]).text == OK
    assert sleeps == [90.0]


def test_a_retry_after_past_the_orders_timeout_is_not_waited_for(fake: FakeLLM, sleeps: Sleeps) -> None:
    fake.script(status=429, json={"error": {"message": "busy"}}, headers={"Retry-After": "30"})
    fake.script(content=OK)
    client = Client(settings(Endpoint("m", fake.base_url), Endpoint("backup", fake.base_url), max_retries=3),
                    sleep=sleeps, clock=sleeps.clock)
    client.deadline = sleeps.now + 5
    reply = client.chat([{"role": "user", "content": "hi"}])
    assert reply.model == "backup" and sleeps == []


def test_a_backoff_past_the_orders_timeout_moves_on_to_the_fallback(fake: FakeLLM, sleeps: Sleeps) -> None:
    """A primary down for good, max_retries 3, 5 s left: the third wait (4 s) was slept until the
    order's timeout ran out, and the fallback model, which would have answered, never was asked."""
    for _ in range(3):
        fake.script(status=503, json={"error": {"message": "overloaded"}})
    fake.script(content=OK)
    client = Client(settings(Endpoint("m", fake.base_url), Endpoint("backup", fake.base_url), max_retries=3),
                    sleep=sleeps, clock=sleeps.clock)
    client.deadline = sleeps.now + 5
    reply = client.chat([{"role": "user", "content": "hi"}])
    assert reply.model == "backup" and sleeps == [1.0, 2.0]
    assert [(c.model, c.status) for c in client.calls] == [("m", 503)] * 3 + [("backup", 200)]


def test_a_dead_endpoint_is_retried_then_skipped(fake: FakeLLM, dead_url: str, sleeps: Sleeps) -> None:
    fake.script(content=OK)
    client = Client(settings(Endpoint("local", dead_url), Endpoint("remote", fake.base_url),
                             max_retries=1), sleep=sleeps)
    reply = client.chat([{"role": "user", "content": "hi"}])
    assert reply.model == "remote"
    assert sleeps == [1.0]
    assert [(c.model, c.status) for c in reply.calls] == [("local", None), ("local", None),
                                                          ("remote", 200)]
    assert "connection refused" in (reply.calls[0].error or "")


def test_a_timeout_falls_back(fake: FakeLLM, sleeps: Sleeps) -> None:
    fake.script(delay=30, content=OK)  # answered only when the server stops
    fake.script(content=OK)
    reply = Client(settings(Endpoint("slow", fake.base_url), Endpoint("fast", fake.base_url),
                            max_retries=0, timeout=0.3), sleep=sleeps).chat(
        [{"role": "user", "content": "hi"}])
    assert reply.model == "fast"
    assert reply.calls[0].status is None
    assert "timed out" in (reply.calls[0].error or "")


def test_a_call_cut_by_the_orders_deadline_says_the_real_wait_not_llm_timeout(fake: FakeLLM) -> None:
    fake.script(delay=30, content=OK)  # answered only when the server stops
    client = Client(settings(Endpoint("slow", fake.base_url), max_retries=0, timeout=10.0))
    client.deadline = time.monotonic() + 0.5
    with pytest.raises(LLMError):
        client.chat([{"role": "user", "content": "hi"}])
    assert client.calls[0].error == "timed out after 0.5s, when the order's timeout ran out"
    assert client.calls[0].latency < 5


def test_a_model_that_never_answers_in_time_says_raise_llm_timeout_not_add_a_fallback(
        fake: FakeLLM, sleeps: Sleeps) -> None:
    """With no fallback configured, "add a fallback model" was the advice for a model that was
    only slow: what happened (llm.timeout, how long) and what to change is said instead."""
    for _ in range(2):
        fake.script(delay=30, content=OK)  # answered only when the server stops
    client = Client(settings(Endpoint("slow", fake.base_url), max_retries=1, timeout=0.3), sleep=sleeps)
    with pytest.raises(LLMError) as info:
        client.chat([{"role": "user", "content": "hi"}])
    message = str(info.value)
    assert "timed out after 0.3s (after 2 attempts)" in message
    assert "did not answer within llm.timeout (0.3s): raise llm.timeout" in message
    assert "fallback" not in message


def test_a_call_cut_by_the_orders_deadline_is_not_retried_nor_blamed_on_the_endpoint(fake: FakeLLM) -> None:
    fake.script(delay=30, content=OK)
    fake.script(content=OK)
    client = Client(settings(Endpoint("slow", fake.base_url), Endpoint("backup", fake.base_url),
                             max_retries=2, timeout=10.0))
    client.deadline = time.monotonic() + 0.5
    started = time.monotonic()
    with pytest.raises(llm.LLMTimeout) as info:
        client.chat([{"role": "user", "content": "hi"}])
    assert time.monotonic() - started < 3
    assert "order's timeout" in str(info.value) and "fallback" not in str(info.value)
    assert [c.model for c in client.calls] == ["slow"]


def test_401_fails_at_once_naming_model_and_url(fake: FakeLLM, sleeps: Sleeps) -> None:
    fake.script(status=401, json={"error": {"message": "bad key"}})
    fake.script(content=OK)  # the fallback must not be asked
    client = Client(settings(Endpoint("gpt-x", fake.base_url, api_key_env="FAKE_KEY"),
                             Endpoint("backup", fake.base_url)),
                    env={"FAKE_KEY": KEY}, sleep=sleeps)
    with pytest.raises(LLMAuthError) as info:
        client.chat([{"role": "user", "content": "hi"}])
    message = str(info.value)
    assert "gpt-x" in message and fake.base_url in message and "FAKE_KEY" in message
    assert len(fake.requests) == 1
    assert sleeps == []
    assert [c.status for c in client.calls] == [401]


def test_a_wrong_key_hands_over_to_a_fallback_with_its_own_key_elsewhere(fake: FakeLLM, sleeps: Sleeps,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A 401 at one provider (an expired key) must not block an order whose fallback is another
    provider with another key; what would send the refused key, or ask that server, is skipped."""
    fake.script(status=401, json={"error": {"message": f"Incorrect API key provided: {KEY}"}})
    with FakeLLM() as other:
        other.script(content=OK)
        client = Client(settings(Endpoint("gpt-x", fake.base_url, api_key_env="FAKE_KEY"),
                                 Endpoint("same-server", fake.base_url, api_key_env="OTHER_KEY"),
                                 Endpoint("same-key", other.base_url, api_key_env="FAKE_KEY"),
                                 Endpoint("elsewhere", other.base_url, api_key_env="OTHER_KEY")),
                        env={"FAKE_KEY": KEY, "OTHER_KEY": "sk-other-0123456789"}, sleep=sleeps)
        with caplog.at_level("WARNING"):
            reply = client.chat([{"role": "user", "content": "hi"}])
        assert reply.text == OK and reply.model == "elsewhere"
        assert [(c.model, c.status) for c in client.calls] == [("gpt-x", 401), ("elsewhere", 200)]
        assert len(fake.requests) == 1 and len(other.requests) == 1 and sleeps == []
    assert "HTTP 401" in caplog.text and "FAKE_KEY" in caplog.text and KEY not in caplog.text


def test_a_wrong_key_with_no_other_key_left_blocks_naming_each(fake: FakeLLM, sleeps: Sleeps) -> None:
    fake.script(status=401, json={"error": {"message": "bad key"}})
    with FakeLLM() as other:
        client = Client(settings(Endpoint("gpt-x", fake.base_url, api_key_env="FAKE_KEY"),
                                 Endpoint("same-key", other.base_url, api_key_env="FAKE_KEY")),
                        env={"FAKE_KEY": KEY}, sleep=sleeps)
        with pytest.raises(LLMAuthError) as info:
            client.chat([{"role": "user", "content": "hi"}])
        assert other.requests == []
    message = str(info.value)
    assert "gpt-x" in message and "HTTP 401" in message and "same-key" in message and "not asked" in message
    assert KEY not in message and "\n" not in message


def test_when_every_model_fails_the_error_lists_each(fake: FakeLLM, dead_url: str,
                                                     sleeps: Sleeps) -> None:
    fake.script(status=500, json={"error": {"message": "boom"}})
    fake.script(status=404, json={"error": {"message": "model not found"}})
    client = Client(settings(Endpoint("one", fake.base_url), Endpoint("two", fake.base_url),
                             Endpoint("three", dead_url), max_retries=0), sleep=sleeps)
    with pytest.raises(LLMError) as info:
        client.chat([{"role": "user", "content": "hi"}])
    message = str(info.value)
    assert "\n" not in message
    assert "one at" in message and "HTTP 500: boom" in message
    assert "two at" in message and "HTTP 404: model not found" in message
    assert "three at" in message and "connection refused" in message
    assert sleeps == []


def test_a_200_that_is_not_a_completion_is_retried(fake: FakeLLM, sleeps: Sleeps) -> None:
    fake.script(json={"unexpected": "proxy page"})
    fake.script(content=OK)
    reply = Client(settings(Endpoint("m", fake.base_url)), sleep=sleeps).chat(
        [{"role": "user", "content": "hi"}])
    assert reply.text == OK
    assert "not a chat completion" in (reply.calls[0].error or "")
    assert sleeps == [1.0]


def test_a_message_in_parts_is_its_text_parts_joined(fake: FakeLLM, sleeps: Sleeps) -> None:
    # Once "HTTP 200 with an empty message", retried and failed, though the answer was there.
    parts = [{"type": "thinking", "thinking": [{"type": "text", "text": "hmm {"}]},
             {"type": "text", "text": '{"ok": '}, {"type": "text", "text": "true}"}]
    fake.script(json={"choices": [{"message": {"role": "assistant", "content": parts}}]})
    reply = Client(settings(Endpoint("m", fake.base_url), max_retries=0), sleep=sleeps).chat(
        [{"role": "user", "content": "hi"}])
    assert reply.text == OK and len(reply.calls) == 1


def test_an_empty_message_cut_at_the_token_limit_says_which_limit(fake: FakeLLM, sleeps: Sleeps) -> None:
    fake.script(json={"choices": [{"message": {"content": None}, "finish_reason": "length"}]})
    with pytest.raises(LLMError, match=r"empty message \(cut off at the output token limit: raise "
                                       r"llm.max_tokens\)"):
        Client(settings(Endpoint("m", fake.base_url), max_retries=0), sleep=sleeps).chat(
            [{"role": "user", "content": "hi"}])


def test_an_empty_or_broken_answer_the_server_billed_is_counted_in_the_cost(
        fake: FakeLLM, sleeps: Sleeps) -> None:
    # Once recorded at $0 with no tokens: a reasoning model that thought up to its output limit
    # three times cost real money that `coordinator cost` and the spend limits never saw.
    billed = {"prompt_tokens": 1000, "completion_tokens": 4000}
    fake.script(json={"choices": [{"message": {"content": ""}, "finish_reason": "length"}], "usage": billed})
    fake.script(json={"choices": [], "usage": billed})
    fake.script(json={"choices": [{"message": {"content": None}}]})  # no usage: the prompt is estimated
    ep = Endpoint("m", fake.base_url, prices=Prices(input=3.0, output=15.0))
    client = Client(settings(ep, max_retries=2), sleep=sleeps)
    with pytest.raises(LLMError, match="empty message"):
        client.chat([{"role": "user", "content": "x" * 400}])
    first, second, third = client.calls
    for call in (first, second):
        assert call.usage is not None and (call.usage.prompt_tokens, call.usage.completion_tokens) == (1000, 4000)
        assert call.cost == pytest.approx(1000 * 3.0 / 1e6 + 4000 * 15.0 / 1e6)
    assert third.usage is not None and third.usage.estimated and third.usage.completion_tokens == 0
    assert third.usage.prompt_tokens >= 100 and third.cost > 0
    assert client.spent == pytest.approx(sum(c.cost for c in client.calls))


def test_a_refusal_or_a_tool_call_instead_of_text_is_said_as_such(fake: FakeLLM, sleeps: Sleeps) -> None:
    # Both were "HTTP 200 with an empty message": the model's reason for refusing was lost.
    fake.script(json={"choices": [{"message": {"content": None, "refusal": f"I can't help\nwith that, {KEY}."}}]})
    fake.script(json={"choices": [{"finish_reason": "tool_calls", "message": {"content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "plan", "arguments": "{}"}}]}}]})
    with pytest.raises(LLMError) as info:
        Client(settings(Endpoint("one", fake.base_url, api_key_env="K"), Endpoint("two", fake.base_url),
                        max_retries=0), env={"K": KEY}, sleep=sleeps).chat([{"role": "user", "content": "hi"}])
    message = str(info.value)
    assert "one at" in message and "the model refused (I can't help with that, ***.)" in message
    assert KEY not in message
    assert "two at" in message and "but a tool call (this agent offers the model no tools" in message


def test_refused_response_format_switches_to_plain_prompting_and_is_remembered(
        fake: FakeLLM, sleeps: Sleeps) -> None:
    fake.script(status=400, json={"error": {"message": "response_format is not supported"}})
    fake.script(content=OK)
    fake.script(content=OK)
    client = Client(settings(Endpoint("llama", fake.base_url), max_retries=0), sleep=sleeps)
    assert client.chat([{"role": "user", "content": "hi"}]).text == OK
    client.chat([{"role": "user", "content": "again"}])

    first, second, third = fake.chat_bodies()
    assert first["response_format"] == {"type": "json_object"}
    assert "response_format" not in second and "response_format" not in third
    assert second["messages"][0] == {"role": "system", "content": PLAIN_JSON_HINT}
    assert sleeps == []


def test_json_mode_off_never_sends_response_format(fake: FakeLLM) -> None:
    fake.script(content=OK)
    Client(settings(Endpoint("m", fake.base_url), json_mode=False)).chat(
        [{"role": "user", "content": "hi"}])
    body = fake.chat_bodies()[0]
    assert "response_format" not in body
    assert body["messages"][0]["content"] == PLAIN_JSON_HINT


def test_the_key_is_sent_as_bearer_and_appears_nowhere_else(
        fake: FakeLLM, dead_url: str, sleeps: Sleeps, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    # Some servers echo the key in their errors; it must be scrubbed from ours.
    fake.script(status=500, json={"error": {"message": f"upstream rejected {KEY}"}})
    fake.script(status=401, json={"error": {"message": f"Incorrect API key provided: {KEY}"}})
    ep = Endpoint("m", fake.base_url, api_key_env="FAKE_KEY")
    client = Client(settings(ep, max_retries=1), env={"FAKE_KEY": KEY}, sleep=sleeps)
    with pytest.raises(LLMAuthError) as auth:
        client.chat([{"role": "user", "content": "hi"}])

    dead = Client(settings(Endpoint("d", dead_url, api_key_env="FAKE_KEY"), max_retries=1),
                  env={"FAKE_KEY": KEY}, sleep=sleeps)
    with pytest.raises(LLMError) as down:
        dead.chat([{"role": "user", "content": "hi"}])

    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in fake.requests)
    texts = [str(auth.value), repr(auth.value), str(down.value), repr(down.value),
             repr(client), repr(dead), repr(client.calls), repr(dead.calls),
             str([c.as_dict() for c in client.calls]), caplog.text]
    for text in texts:
        assert KEY not in text
    assert "***" in (client.calls[0].error or "")
    assert "retry 1 of 1" in caplog.text  # the log was written, scrubbed
    assert auth.value.__cause__ is None and auth.value.__suppress_context__


def test_the_key_comes_from_the_process_environment_by_default(
        fake: FakeLLM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_KEY", KEY)
    fake.script(content=OK)
    Client(settings(Endpoint("m", fake.base_url, api_key_env="FAKE_KEY"))).chat(
        [{"role": "user", "content": "hi"}])
    assert fake.requests[0].headers["authorization"] == f"Bearer {KEY}"


def test_an_unset_key_variable_is_named_and_nothing_is_sent(fake: FakeLLM) -> None:
    client = Client(settings(Endpoint("m", fake.base_url, api_key_env="MISSING_KEY")), env={})
    # Like a 401: retrying cannot help until someone sets the variable.
    with pytest.raises(LLMAuthError, match="MISSING_KEY is not set"):
        client.chat([{"role": "user", "content": "hi"}])
    assert fake.requests == []


def test_an_unset_key_variable_skips_to_the_next_model_and_says_so(
        fake: FakeLLM, sleeps: Sleeps, caplog: pytest.LogCaptureFixture) -> None:
    fake.script(content=OK)
    client = Client(settings(Endpoint("paid", fake.base_url, api_key_env="MISSING_KEY"),
                             Endpoint("local", fake.base_url)), env={}, sleep=sleeps)
    reply = client.chat([{"role": "user", "content": "hi"}])
    assert reply.model == "local"
    assert [b["model"] for b in fake.chat_bodies()] == ["local"]
    assert "MISSING_KEY is not set" in caplog.text and "skipping to the next model" in caplog.text
    assert sleeps == []


def test_the_last_model_not_asked_says_no_model_is_left_not_the_next_one(
        fake: FakeLLM, caplog: pytest.LogCaptureFixture) -> None:
    # A key refused over plain http, with no fallback: the log said it skipped to a next model.
    client = Client(settings(Endpoint("m", "http://api.example.com/v1", api_key_env="FAKE_KEY")),
                    env={"FAKE_KEY": KEY})
    with pytest.raises(LLMAuthError, match="unencrypted"):
        client.chat([{"role": "user", "content": "hi"}])
    assert "no model of the fallback chain is left to ask" in caplog.text
    assert "skipping to the next model" not in caplog.text
    assert fake.requests == []


@pytest.mark.parametrize("stray", ["\n", "\r\n", " "])
def test_a_key_set_with_a_line_end_is_sent_without_it(fake: FakeLLM, stray: str) -> None:
    # Once: httpx refused the header with the key in its words, and that error (the key in it,
    # escaped past the scrubbing) was retried, logged and recorded in state/ with every call.
    fake.script(content=OK)
    client = Client(settings(Endpoint("m", fake.base_url, api_key_env="FAKE_KEY")),
                    env={"FAKE_KEY": KEY + stray})
    assert client.chat([{"role": "user", "content": "hi"}]).text == OK
    assert fake.requests[0].headers["authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("bad", [KEY[:8] + "\x00" + KEY[8:], KEY[:8] + "\n" + KEY[8:], KEY + "é"])
def test_a_key_no_header_can_carry_is_named_never_shown_and_never_retried(
        fake: FakeLLM, sleeps: Sleeps, caplog: pytest.LogCaptureFixture, bad: str) -> None:
    fake.script(content=OK)
    client = Client(settings(Endpoint("m", fake.base_url, api_key_env="FAKE_KEY")),
                    env={"FAKE_KEY": bad}, sleep=sleeps)
    with pytest.raises(LLMAuthError) as info:
        client.chat([{"role": "user", "content": "hi"}])
    message = str(info.value)
    assert "FAKE_KEY holds a character no API key has" in message and "\n" not in message
    for text in (message, caplog.text, repr(client.calls)):
        assert KEY[8:] not in text and "SECRET" not in text
    assert fake.requests == [] and sleeps == []


def test_when_no_model_can_be_asked_every_unset_variable_is_named(fake: FakeLLM) -> None:
    client = Client(settings(Endpoint("a", fake.base_url, api_key_env="KEY_A"),
                             Endpoint("b", "http://127.0.0.1:1/v1", api_key_env="KEY_B")), env={})
    with pytest.raises(LLMAuthError) as info:
        client.chat([{"role": "user", "content": "hi"}])
    assert "KEY_A is not set" in str(info.value) and "KEY_B is not set" in str(info.value)
    assert "\n" not in str(info.value)
    assert fake.requests == [] and client.calls == ()


def test_the_spend_guard_stops_calls_before_they_are_made(fake: FakeLLM, sleeps: Sleeps) -> None:
    reason = "chip spent $5.00 of its $5.00 spend_limit; raise it or wait"
    client = Client(settings(Endpoint("m", fake.base_url)), spend_guard=lambda: reason, sleep=sleeps)
    with pytest.raises(SpendLimitReached) as info:
        client.chat([{"role": "user", "content": "hi"}])
    assert str(info.value) == reason
    assert isinstance(info.value, LLMError)
    assert fake.requests == []


def test_the_spend_guard_is_asked_before_every_retry(fake: FakeLLM, sleeps: Sleeps) -> None:
    fake.script(status=429, json={"error": {"message": "slow down"}})
    asked: list[int] = []

    def guard() -> str | None:
        asked.append(1)
        return "workspace spend_limit reached" if len(asked) > 1 else None

    client = Client(settings(Endpoint("m", fake.base_url)), spend_guard=guard, sleep=sleeps)
    with pytest.raises(SpendLimitReached):
        client.chat([{"role": "user", "content": "hi"}])
    assert len(fake.requests) == 1
    assert len(asked) == 2


def test_a_transport_can_be_injected() -> None:
    # MockTransport only for what a real server cannot show: the exact bytes httpx sends.
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"choices": [{"message": {"content": OK}}],
                                         "usage": {"prompt_tokens": 3, "completion_tokens": 4}})

    client = Client(settings(Endpoint("m", "https://llm.invalid/v1/")),
                    transport=httpx.MockTransport(handler))
    assert client.chat([{"role": "user", "content": "hi"}]).usage.completion_tokens == 4
    assert client.chat([{"role": "user", "content": "hi"}]).text == OK  # transport still open
    assert str(seen[0].url) == "https://llm.invalid/v1/chat/completions"


# -- replies that once crashed the supervisor ---------------------------------------------------------


def test_a_body_that_does_not_decode_as_its_encoding_says_is_retried_like_a_bad_answer(
        fake: FakeLLM, sleeps: Sleeps) -> None:
    fake.script(json=b"this is not gzip at all", headers={"Content-Encoding": "gzip"})
    fake.script(content=OK)
    reply = Client(settings(Endpoint("m", fake.base_url)), sleep=sleeps).chat(
        [{"role": "user", "content": "hi"}])
    assert reply.text == OK
    assert "could not be decoded" in (reply.calls[0].error or "")
    assert sleeps == [1.0]


def test_a_body_that_never_decodes_ends_in_one_clear_error(fake: FakeLLM, sleeps: Sleeps) -> None:
    fake.script(json=b"\x00\x01garbage", headers={"Content-Encoding": "gzip"})
    client = Client(settings(Endpoint("m", fake.base_url), max_retries=0), sleep=sleeps)
    with pytest.raises(LLMError) as info:
        client.chat([{"role": "user", "content": "hi"}])
    assert "could not be decoded" in str(info.value) and "\n" not in str(info.value)


def test_a_lone_surrogate_is_never_sent_half_a_character_goes_as_a_replacement(fake: FakeLLM) -> None:
    fake.script(content=OK)
    reply = Client(settings(Endpoint("m", fake.base_url))).chat(
        [{"role": "assistant", "content": '{"blocker": "API \ud800 undecided"}'},
         {"role": "user", "content": "fix \udfff this"}])
    assert reply.text == OK
    sent = fake.chat_bodies()[0]["messages"]
    assert sent[0]["content"] == '{"blocker": "API \ufffd undecided"}'
    assert sent[1]["content"] == "fix \ufffd this"


@pytest.mark.parametrize("where", [190, 195, 199])
def test_a_key_the_excerpt_cut_would_split_is_scrubbed_whole(fake: FakeLLM, sleeps: Sleeps,
                                                             where: int) -> None:
    # Cut first and scrubbed after, the key's first characters used to survive at the cut.
    fake.script(status=500, json={"error": {"message": "x" * where + KEY + " was refused"}})
    fake.script(json={"not": "a completion", "echo": "y" * where + KEY})
    fake.script(status=502, json={"error": {"message": "z" * where + KEY[:12]}})  # a key cut by the server
    ep = Endpoint("m", fake.base_url, api_key_env="FAKE_KEY")
    client = Client(settings(ep, max_retries=2), env={"FAKE_KEY": KEY}, sleep=sleeps)
    with pytest.raises(LLMError) as info:
        client.chat([{"role": "user", "content": "hi"}])
    texts = [str(info.value), *(c.error or "" for c in client.calls)]
    for text in texts:
        assert KEY[:8] not in text, text
    assert len(client.calls) == 3 and "***" in (client.calls[0].error or "")


# -- whose key goes where -----------------------------------------------------------------------------


def agent_llm(llm: dict[str, object]) -> LLMSettings:
    from coordinator.config import from_mapping
    config = from_mapping({"version": 1, "agents": {"chip": {"role": "specialist", "llm": llm}}})
    settings = config.agents["chip"].llm
    assert settings is not None
    return settings


def test_a_fallback_on_another_host_never_gets_the_primarys_key(fake: FakeLLM, sleeps: Sleeps) -> None:
    with FakeLLM() as other:
        for _ in range(3):
            fake.script(status=503, json={"error": {"message": "down"}})
        other.script(status=503, json={"error": {"message": "down"}})
        other.script(status=503, json={"error": {"message": "down"}})
        other.script(content=OK)
        chain = agent_llm({"base_url": fake.base_url, "model": "main", "api_key_env": "FAKE_KEY",
                           "max_retries": 0,
                           "fallback": ["same-host",                                       # the key
                                        {"model": "same-host-keyless", "api_key_env": None},  # none
                                        {"model": "elsewhere", "base_url": other.base_url},   # none
                                        {"model": "elsewhere-own", "base_url": other.base_url,
                                         "api_key_env": "OTHER_KEY"},
                                        {"model": "elsewhere-keyless", "base_url": other.base_url,
                                         "api_key_env": None}]})
        reply = Client(chain, env={"FAKE_KEY": KEY, "OTHER_KEY": "sk-other-0123456789"},
                       sleep=sleeps).chat([{"role": "user", "content": "hi"}])
        assert reply.model == "elsewhere-keyless"
        seen = {r.body["model"]: r.headers.get("authorization") for r in fake.requests + other.requests}
        assert seen == {"main": f"Bearer {KEY}", "same-host": f"Bearer {KEY}", "same-host-keyless": None,
                        "elsewhere": None, "elsewhere-own": "Bearer sk-other-0123456789",
                        "elsewhere-keyless": None}
        assert all(KEY not in str(r.headers) for r in other.requests)


def test_api_key_env_null_means_no_key() -> None:
    settings = agent_llm({"base_url": "http://127.0.0.1:1/v1", "model": "m", "api_key_env": None})
    assert settings.primary.api_key_env is None


def test_an_answer_past_the_size_cap_is_cut_off_never_read_whole(fake: FakeLLM, sleeps: Sleeps,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # A gzip bomb: a few kilobytes on the wire, megabytes once decoded (gigabytes in the wild,
    # enough to take the supervisor's memory). Reading stops at the cap; the next model answers.
    monkeypatch.setattr(llm, "MAX_ANSWER_BYTES", 1 << 20)
    bomb = gzip.compress(b'{"choices": [{"message": {"content": "' + b"a" * (8 << 20), 9)
    assert len(bomb) < 64 << 10
    fake.script(json=bomb, headers={"Content-Encoding": "gzip"})
    fake.script(json=b"x" * (2 << 20))  # plain, and as large
    fake.script(content=OK)
    client = Client(settings(Endpoint("bomb", fake.base_url), Endpoint("backup", fake.base_url),
                             max_retries=1), sleep=sleeps)
    reply = client.chat([{"role": "user", "content": "hi"}])
    assert reply.text == OK and reply.model == "backup"
    assert [c.status for c in reply.calls] == [200, 200, 200]
    for call in reply.calls[:2]:
        assert "larger than 1 MiB" in (call.error or "") and len(call.error or "") < 200


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": 10**400, "completion_tokens": 5},  # once an OverflowError out of chat()
    {"prompt_tokens": 10**30, "completion_tokens": 5},   # once $3e24: every spend limit spent for good
    {"prompt_tokens": True, "completion_tokens": True},  # a bool is no count
    {"prompt_tokens": 10, "completion_tokens": 10**12},
])
def test_usage_no_call_could_have_used_is_estimated_not_billed(fake: FakeLLM, usage: dict[str, Any]) -> None:
    fake.script(json={"choices": [{"message": {"content": OK}}], "usage": usage})
    reply = Client(settings(Endpoint("m", fake.base_url, prices=Prices(3.0, 15.0)))).chat(
        [{"role": "user", "content": "hi"}])
    assert reply.text == OK
    assert reply.usage.estimated
    assert type(reply.usage.prompt_tokens) is int and type(reply.usage.completion_tokens) is int
    assert reply.usage.total < 100
    assert reply.cost < 0.001


def test_a_redirect_is_not_followed_and_says_where_the_endpoint_moved(fake: FakeLLM, sleeps: Sleeps) -> None:
    # Followed, it would carry the API key to whatever host the answer names; not followed,
    # "HTTP 308" alone left the user to find out what to change.
    fake.script(status=308, content="", headers={"Location": "https://api.example.test/v2/chat/completions"})
    client = Client(settings(Endpoint("gpt-x", fake.base_url, api_key_env="FAKE_KEY"), max_retries=0),
                    env={"FAKE_KEY": KEY}, sleep=sleeps)
    with pytest.raises(LLMError) as info:
        client.chat([{"role": "user", "content": "hi"}])
    message = str(info.value)
    assert "308" in message
    assert "https://api.example.test/v2" in message and "base_url" in message
    assert "not followed" in message
    assert len(fake.requests) == 1


@pytest.mark.parametrize("base", ["/v1?api-version=2024-06-01", "/v1/?api-version=2024-06-01"])
def test_a_query_in_base_url_stays_the_query_of_the_request(fake: FakeLLM, sleeps: Sleeps, base: str) -> None:
    """A gateway that needs ?api-version=...: the path goes before the query, not into it (a
    server saw /v1 asked for "?api-version=2024-06-01/chat/completions" and answered 404)."""
    fake.script(content=OK)
    url = fake.base_url.removesuffix("/v1") + base
    reply = Client(settings(Endpoint("m", url)), sleep=sleeps).chat([{"role": "user", "content": "hi"}])
    assert reply.text == OK
    assert [r.path for r in fake.requests] == ["/v1/chat/completions?api-version=2024-06-01"]


def test_a_key_never_crosses_the_network_in_clear(fake: FakeLLM, sleeps: Sleeps,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """http:// (one letter short of https://) to a provider's name: the key went out readable by
    anyone on the way. Not asked now, and said why; the next model is asked instead."""
    fake.script(content=OK)
    remote = Endpoint("paid", "http://api.example.invalid/v1", api_key_env="FAKE_KEY")
    local = Endpoint("local", fake.base_url, api_key_env="FAKE_KEY")  # this machine: http is fine
    client = Client(settings(remote, local), env={"FAKE_KEY": KEY}, sleep=sleeps)
    reply = client.chat([{"role": "user", "content": "hi"}])
    assert reply.model == "local" and fake.requests[0].headers["authorization"] == f"Bearer {KEY}"
    assert "would cross the network unencrypted" in caplog.text and "https://" in caplog.text
    assert [c.model for c in client.calls] == ["local"] and sleeps == []

    alone = Client(settings(remote), env={"FAKE_KEY": KEY}, sleep=sleeps)
    with pytest.raises(LLMAuthError, match="unencrypted") as info:
        alone.chat([{"role": "user", "content": "hi"}])
    assert KEY not in str(info.value) and alone.calls == () and sleeps == []


def test_a_reasoning_model_that_refuses_max_tokens_gets_max_completion_tokens(
        fake: FakeLLM, sleeps: Sleeps) -> None:
    """OpenAI's reasoning models answer 400 to `max_tokens`: the limit goes as
    `max_completion_tokens` at once, and so for the rest of the attempt, no retry spent."""
    fake.script(status=400, json={"error": {
        "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
                   "Use 'max_completion_tokens' instead.", "param": "max_tokens"}})
    fake.script(content=OK)
    fake.script(content=OK)
    client = Client(settings(Endpoint("o-mini", fake.base_url), max_retries=0, max_tokens=900), sleep=sleeps)
    assert client.chat([{"role": "user", "content": "hi"}]).text == OK
    client.chat([{"role": "user", "content": "again"}])
    first, second, third = fake.chat_bodies()
    assert first["max_tokens"] == 900 and "max_completion_tokens" not in first
    for body in (second, third):
        assert body["max_completion_tokens"] == 900 and "max_tokens" not in body
    assert [c.status for c in client.calls] == [400, 200, 200] and sleeps == []


def test_a_model_that_takes_only_its_own_temperature_is_asked_without_one(fake: FakeLLM, sleeps: Sleeps) -> None:
    fake.script(status=400, json={"error": {
        "message": "Unsupported value: 'temperature' does not support 0.2 with this model. "
                   "Only the default (1) value is supported."}})
    fake.script(content=OK)
    client = Client(settings(Endpoint("o-mini", fake.base_url), max_retries=0, temperature=0.2,
                             max_tokens=900), sleep=sleeps)
    assert client.chat([{"role": "user", "content": "hi"}]).text == OK
    first, second = fake.chat_bodies()
    assert first["temperature"] == 0.2 and "temperature" not in second
    assert second["max_tokens"] == 900  # only what was refused changes


def test_a_400_about_a_too_large_max_tokens_is_said_not_worked_around(fake: FakeLLM, sleeps: Sleeps) -> None:
    """A limit the model cannot give is the user's to lower: nothing is renamed or dropped."""
    fake.script(status=400, json={"error": {
        "message": "max_tokens is too large: 100000. This model supports at most 4096 completion tokens"}})
    client = Client(settings(Endpoint("small", fake.base_url), max_retries=0, max_tokens=100000), sleep=sleeps)
    with pytest.raises(LLMError) as info:
        client.chat([{"role": "user", "content": "hi"}])
    assert "at most 4096" in str(info.value)
    assert len(fake.chat_bodies()) == 1


def test_a_refused_setting_is_worked_around_once_then_the_400_stands(fake: FakeLLM, sleeps: Sleeps) -> None:
    refused = {"error": {"message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
                                    "Use 'max_completion_tokens' instead."}}
    fake.script(status=400, json=refused)
    fake.script(status=400, json={"error": {"message": "Unsupported parameter: 'max_completion_tokens'"}})
    client = Client(settings(Endpoint("odd", fake.base_url), max_retries=0, max_tokens=50), sleep=sleeps)
    with pytest.raises(LLMError) as info:
        client.chat([{"role": "user", "content": "hi"}])
    assert "max_completion_tokens" in str(info.value)
    assert len(fake.chat_bodies()) == 2


def test_a_model_the_key_may_not_use_hands_over_to_the_fallback(fake: FakeLLM, sleeps: Sleeps,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """403: this key may not use this model; another model of the chain may be one it may use."""
    fake.script(status=403, json={"error": {"message": "You do not have access to the model gpt-x"}})
    fake.script(content=OK)
    client = Client(settings(Endpoint("gpt-x", fake.base_url, api_key_env="FAKE_KEY"),
                             Endpoint("backup", fake.base_url, api_key_env="FAKE_KEY")),
                    env={"FAKE_KEY": KEY}, sleep=sleeps)
    with caplog.at_level("WARNING"):
        reply = client.chat([{"role": "user", "content": "hi"}])
    assert reply.text == OK and reply.model == "backup"
    assert [c.status for c in client.calls] == [403, 200] and sleeps == []
    assert "gpt-x" in caplog.text and "FAKE_KEY" in caplog.text and "next model" in caplog.text
    assert KEY not in caplog.text


def test_403_from_every_model_blocks_naming_each(fake: FakeLLM, sleeps: Sleeps) -> None:
    fake.script(status=403, json={"error": {"message": "no access"}})
    fake.script(status=403, json={"error": {"message": "no access"}})
    client = Client(settings(Endpoint("gpt-x", fake.base_url, api_key_env="FAKE_KEY"),
                             Endpoint("backup", fake.base_url, api_key_env="OTHER_KEY")),
                    env={"FAKE_KEY": KEY, "OTHER_KEY": KEY}, sleep=sleeps)
    with pytest.raises(LLMAuthError) as info:
        client.chat([{"role": "user", "content": "hi"}])
    message = str(info.value)
    assert "gpt-x" in message and "FAKE_KEY" in message and "backup" in message and "OTHER_KEY" in message
    assert "HTTP 403" in message and "\n" not in message and KEY not in message
    assert len(fake.requests) == 2 and sleeps == []


def test_403_then_a_failing_fallback_is_a_failure_worth_another_attempt(fake: FakeLLM, sleeps: Sleeps) -> None:
    fake.script(status=403, json={"error": {"message": "no access"}})
    fake.script(status=500, json={"error": {"message": "boom"}})
    client = Client(settings(Endpoint("gpt-x", fake.base_url), Endpoint("backup", fake.base_url),
                             max_retries=0), sleep=sleeps)
    with pytest.raises(LLMError) as info:
        client.chat([{"role": "user", "content": "hi"}])
    assert not isinstance(info.value, LLMAuthError)
    assert "HTTP 403" in str(info.value) and "boom" in str(info.value)
