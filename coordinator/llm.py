"""A client for any OpenAI-compatible chat-completions endpoint (httpx).

One `Client` per agent: it walks the agent's model chain (primary, then each
fallback), retries what is worth retrying, and records every HTTP attempt as a
`Call` so `coordinator cost` can count money even for attempts that failed.

    primary --429/5xx/timeout/refused--> retry with backoff (max_retries) --> next model
            --key variable not set-----> not asked: next model (LLMAuthError if none can be)
            --401----------------------> next model with another key at another server (a bad
                                         key stays bad: what would send it, or ask that
                                         server, is not asked in this call); LLMAuthError
                                         when every model refused or could not be asked
            --403----------------------> next model (this one is not the key's to use);
                                         LLMAuthError when no model answers and each refused
            --400 about response_format-> remember, retry once with plain prompting
            --400 refusing max_tokens/temperature (reasoning models)-> remember, retry once
              with max_completion_tokens / the model's own temperature

The API key is read from the environment at call time, sent only as a Bearer
header, and scrubbed from every message this module produces: it never reaches
an exception, a `Call`, a repr or a log line.

Example:
    >>> client = Client(agent.llm, spend_guard=lambda: None)
    >>> reply = client.chat([{"role": "user", "content": "Reply with {}"}])
    >>> reply.text, reply.usage.prompt_tokens, reply.cost
"""

from __future__ import annotations

import contextlib
import email.utils
import ipaddress
import json
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard
from urllib.parse import unquote, unquote_plus, urlsplit, urlunsplit

import httpx

from .budget import wide_chars
from .config import Endpoint, LLMSettings
from .errors import LLMAuthError, LLMError

log = logging.getLogger("coordinator.llm")

BACKOFF_BASE = 1.0  # seconds before the first retry; doubles each time
BACKOFF_CAP = 30.0
RETRY_AFTER_CAP = 60.0  # a server asking for longer is treated as down: move on sooner
CHARS_PER_TOKEN = 4  # the usual estimate when an endpoint reports no usage
# More tokens than any model's context holds: a count past it is garbage (or hostile), not a bill,
# and is estimated instead; else one reply could spend every spend limit for good.
MAX_REPORTED_TOKENS = 10_000_000
ERROR_EXCERPT = 200  # characters of an error body worth showing
# Bytes of one answer, once decoded, read at most: far past any model's longest reply (whole files
# and all), far short of what a gzip bomb or an endless body would take of the supervisor's memory.
MAX_ANSWER_BYTES = 32 << 20
MIN_SECRET = 4  # shorter "keys" are placeholders for local servers; redacting them garbles text
# A reply holding a key is refused (`holds_key`) only for a key this long: a local server's
# placeholder ("ollama", "none") is a word a reply may well use, and real keys are far longer.
MIN_REFUSED_KEY = 16
REDACTED = "***"  # what stands where a key was
MIN_SECRET_PREFIX = 8  # a cut excerpt ending in this much of a key is scrubbed as the key
PLAIN_JSON_HINT = "Reply with one JSON object and nothing else: no prose, no code fences."
# Half of a character: httpx cannot encode it, so it is never sent (U+FFFD goes instead).
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# A query parameter whose value is a secret, by its name (a reply saying another one is no leak).
SECRET_PARAM = re.compile(r"key|token|secret|sig|pass|auth|cred|session|code", re.I)
HEADER_SAFE = re.compile("[\x21-\x7e]+")  # what an API key is made of: visible ASCII, no spaces


class SpendLimitReached(LLMError):
    """The spend guard said stop: no HTTP call was made."""


class LLMTimeout(LLMError):
    """The attempt's deadline passed during the call: the attempt timed out, whichever of the
    call and the supervisor's watch noticed first."""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    estimated: bool = False  # True when the endpoint reported none and we counted characters

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "estimated": self.estimated}


@dataclass(frozen=True)
class Call:
    """One HTTP attempt, successful or not: what `coordinator cost` sums."""

    model: str
    base_url: str
    status: int | None  # None: no HTTP answer (timeout, refused connection)
    error: str | None  # None on success; never contains the key
    usage: Usage | None
    latency: float
    cost: float

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "base_url": self.base_url, "status": self.status,
                "error": self.error, "usage": self.usage.as_dict() if self.usage else None,
                "latency": round(self.latency, 3), "cost": self.cost}


@dataclass(frozen=True)
class Reply:
    """The answer of one `chat`: text of the model that answered, and every attempt it took."""

    text: str
    model: str
    usage: Usage  # of the answering call
    cost: float  # of all calls made for this reply (failed ones included)
    calls: tuple[Call, ...]
    endpoint: Endpoint  # the one that answered: pass it as `prefer` to ask it again
    cut: bool = False  # the endpoint stopped it at the output token limit (finish_reason "length")


def cost_of(usage: Usage, endpoint: Endpoint) -> float:
    """USD for `usage` at the endpoint's prices (USD per million tokens)."""
    prices = endpoint.prices
    return usage.prompt_tokens * prices.input / 1e6 + usage.completion_tokens * prices.output / 1e6


def estimate_tokens(text: str) -> int:
    """Four characters a token, and a token for each wide (Chinese, Japanese, Korean) character:
    counted at a quarter, a prompt in Chinese was billed at a fifth of its tokens."""
    if not text:
        return 0
    wide = wide_chars(text)
    return max(1, math.ceil((len(text) - wide) / CHARS_PER_TOKEN) + wide)


def _refused_setting(status: int, detail: str, body: Mapping[str, Any]) -> str | None:
    """The setting of `body` a 400 says the model does not take, from its (lowered) detail:
    "Unsupported parameter: 'max_tokens' ... Use 'max_completion_tokens' instead", "Unsupported
    value: 'temperature' does not support 0.2 with this model. Only the default (1) value is
    supported"; None for any other 400."""
    if status not in (400, 422):
        return None
    refusing = ("unsupported" in detail or "not supported" in detail or "does not support" in detail
                or "only the default" in detail)
    if "max_tokens" in body and "max_tokens" in detail and ("max_completion_tokens" in detail or refusing):
        return "max_tokens"
    if "temperature" in body and "temperature" in detail and refusing:
        return "temperature"
    return None


class _Unauthorized(Exception):
    """HTTP 401 from one endpoint: its key is wrong there (the message says which to check)."""


class _Forbidden(Exception):
    """An endpoint refused the key for its model (HTTP 403), said as `Client._auth_message` says it."""


class _Failure(Exception):
    """One failed attempt, already described and redacted; `retry` says what to do next."""

    def __init__(self, text: str, *, status: int | None, retry: bool,
                 retry_after: float | None = None, rejects_json_mode: bool = False,
                 rejects: str | None = None, usage: Usage | None = None, timed_out: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.status = status
        self.retry = retry
        self.retry_after = retry_after
        self.rejects_json_mode = rejects_json_mode
        self.rejects = rejects  # a setting the model refuses: "max_tokens" or "temperature"
        self.usage = usage  # what a 200 that is no good answer still used (and is billed for)
        self.timed_out = timed_out  # no answer within llm.timeout


class Client:
    """Chat completions over an agent's model chain, with retries, fallback and cost."""

    def __init__(
        self,
        settings: LLMSettings,
        *,
        env: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        spend_guard: Callable[[], str | None] | None = None,
        on_call: Callable[[Call], None] | None = None,
    ) -> None:
        self.settings = settings
        self._on_call = on_call  # told of each call as it is made (a journal a crash cannot lose)
        self._env = env if env is not None else os.environ
        self._transport = transport
        self._sleep = sleep
        self._clock = clock
        self._spend_guard = spend_guard
        # Endpoints that answered 400 to response_format: asked plainly from then on.
        self._plain: set[tuple[str, str]] = set()
        # Settings an endpoint's model refused (OpenAI's reasoning models take no `max_tokens`
        # but `max_completion_tokens`, and only their own temperature): sent so from then on.
        self._refused: dict[tuple[str, str], set[str]] = {}
        self._lock = threading.Lock()
        self._calls: list[Call] = []
        # The attempt's end: `stop()` (a cancel, the order's timeout) and `deadline` (monotonic,
        # the order's timeout) end a call under way at its next chunk, and every retry after it.
        self._stopped = threading.Event()
        self._why_stopped = ""
        self.deadline: float | None = None
        self._stream: Any = None  # the connection of the call under way (for `stop` to shut)

    def stop(self, why: str) -> None:
        """End this client's calls: the one under way now (its connection is shut, so even a
        model still thinking, with nothing sent yet, lets go at once), and no more after it."""
        self._why_stopped = why
        self._stopped.set()
        stream = self._stream
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __repr__(self) -> str:
        models = ", ".join(e.model for e in self.settings.chain)
        return f"<Client {models}>"

    @property
    def calls(self) -> tuple[Call, ...]:
        """Every HTTP attempt this client made, in order, including those of failed chats."""
        with self._lock:
            return tuple(self._calls)

    def redact(self, text: str, limit: int | None = None) -> str:
        """`text` with every key of this client's chain scrubbed (for logs of model replies),
        cut to `limit` characters after scrubbing (and a key's start at the cut scrubbed too)."""
        if limit is None:
            return _redact(text, self._secrets())
        return excerpt(text, self._secrets(), limit)

    def holds_key(self, text: str) -> bool:
        """Whether `text` holds a key of this client's chain (of at least MIN_REFUSED_KEY characters)."""
        return any(key in text for key in self._secrets(refusable=True) if len(key) >= MIN_REFUSED_KEY)

    @property
    def spent(self) -> float:
        return sum(c.cost for c in self.calls)

    def chat(self, messages: list[dict[str, str]], *, json_object: bool = True,
             prefer: Endpoint | None = None) -> Reply:
        """Ask the chain; return the first good answer.

        `json_object` asks for `response_format: json_object` where the endpoint
        supports it. `prefer` starts the chain at that endpoint (to send a reply
        back to the model that wrote it); the rest follow in their order.
        Raises SpendLimitReached, LLMAuthError, or LLMError when every model failed.
        """
        chain = list(self.settings.chain)
        if prefer is not None and prefer in chain:
            chain.remove(prefer)
            chain.insert(0, prefer)
        secrets = self._secrets()
        made: list[Call] = []
        last_errors: list[str] = []
        timed_out = 0  # models asked whose last try ran out of llm.timeout
        forbidden = 0  # models whose endpoint refused the key for them (HTTP 403)
        # HTTP 401: the key variables refused, and the servers that refused one. A later model
        # that would send such a key, or ask such a server, is not asked.
        bad_keys: set[str] = set()
        bad_servers: set[str] = set()
        unauthorized = 0
        unset: list[str] = []  # endpoints whose key variable is not set (or unusable): never asked
        http = httpx.Client(transport=self._transport, timeout=httpx.Timeout(self.settings.timeout))
        try:
            for n, endpoint in enumerate(chain, 1):
                headers = self._headers(endpoint)
                if headers is None:
                    unset.append(self._unset_message(endpoint))
                    log.warning("%s; %s", unset[-1], "skipping to the next model of the fallback chain"
                                if n < len(chain) else "no model of the fallback chain is left to ask")
                    last_errors.append(f"{endpoint.model} at {shown_url(endpoint.base_url)}: not asked, "
                                       f"{self._unset_why(endpoint)}")
                    continue
                server = _server(endpoint.base_url)
                if server in bad_servers or endpoint.api_key_env in bad_keys:
                    unauthorized += 1
                    last_errors.append(f"{endpoint.model} at {shown_url(endpoint.base_url)}: not asked, "
                                       "as the key or server above refused it")
                    continue
                try:
                    reply, error, slow = self._ask_endpoint(http, endpoint, headers, messages, json_object,
                                                            secrets, made, last=n == len(chain))
                except _Unauthorized as e:
                    # A wrong key stays wrong: asked again, or sent to that server with another
                    # model, it fails the same way. A fallback with a key of its own may answer.
                    unauthorized += 1
                    bad_servers.add(server)
                    if endpoint.api_key_env:
                        bad_keys.add(endpoint.api_key_env)
                    log.warning("%s; %s", e, "asking the next model of the fallback chain that uses another key"
                                if n < len(chain) else "no model of the fallback chain is left to ask")
                    last_errors.append(str(e))
                    continue
                except _Forbidden as e:
                    # A key may use some models of an account and not others: the next model of
                    # the chain may well be one it may use.
                    forbidden += 1
                    log.warning("%s; %s", e, "asking the next model of the fallback chain" if n < len(chain)
                                else "no model of the fallback chain is left to ask")
                    last_errors.append(str(e))
                    continue
                if reply is not None:
                    return reply
                timed_out += slow
                last_errors.append(f"{endpoint.model} at {shown_url(endpoint.base_url)}: {error}")
        finally:
            if self._transport is None:  # an injected transport belongs to the caller
                http.close()
        if len(unset) == len(chain):
            # No model could be asked: retrying cannot help until someone sets the variable.
            raise LLMAuthError("; ".join(unset))
        if len(unset) + forbidden + unauthorized == len(chain):
            # Nor until someone changes a key or its access. Nothing chained: what a server said
            # is in the message, scrubbed, and nowhere else.
            raise LLMAuthError("; ".join(last_errors)) from None
        summary = "; ".join(last_errors)
        if timed_out == len(chain):
            # Every model was asked and none answered in time: a fallback is no advice when there
            # is none, nor when each timed out; the limit is what the user can change.
            who = "the model did not answer" if len(chain) == 1 else "no model of the chain answered"
            raise LLMError(f"{'every model failed: ' if len(chain) > 1 else ''}{summary}; {who} within "
                           f"llm.timeout ({duration(self.settings.timeout)}): raise llm.timeout in the agent's "
                           "llm settings if the model needs longer")
        raise LLMError(f"every model failed: {summary}; check the endpoints or add a fallback model")

    # -- one endpoint -------------------------------------------------------

    def _ask_endpoint(self, http: httpx.Client, endpoint: Endpoint, headers: dict[str, str],
                      messages: list[dict[str, str]], json_object: bool, secrets: list[str],
                      made: list[Call], *, last: bool = True) -> tuple[Reply | None, str, bool]:
        retries = 0
        plain_retried = False
        while True:
            use_format = (json_object and self.settings.json_mode
                          and (endpoint.base_url, endpoint.model) not in self._plain)
            self._check_stop()
            self._check_spend()
            started = self._clock()
            try:
                text, usage, cut = self._post(http, endpoint, headers, messages, use_format,
                                              json_object, secrets)
            except LLMError as e:  # stopped (a cancel, the order's timeout) part-way: said, not retried
                self._record(Call(endpoint.model, shown_url(endpoint.base_url), None, str(e), None,
                                  self._clock() - started, 0.0), made)
                raise
            except _Failure as f:
                if self._stopped.is_set():  # the connection broke because `stop` shut it
                    self._record(Call(endpoint.model, shown_url(endpoint.base_url), None, self._why_stopped, None,
                                      self._clock() - started, 0.0), made)
                    raise LLMError(self._why_stopped) from None
                call = Call(endpoint.model, shown_url(endpoint.base_url), f.status, f.text, f.usage,
                            self._clock() - started, cost_of(f.usage, endpoint) if f.usage else 0.0)
                self._record(call, made)
                if f.status == 401:
                    raise _Unauthorized(self._auth_message(endpoint, f.status)) from None
                if f.status == 403:
                    raise _Forbidden(self._auth_message(endpoint, f.status)) from None
                refused = self._refused.setdefault((endpoint.base_url, endpoint.model), set())
                if f.rejects is not None and f.rejects not in refused:
                    refused.add(f.rejects)
                    log.info("%s at %s refused %s; %s", endpoint.model, shown_url(endpoint.base_url), f.rejects,
                                "sending llm.max_tokens as max_completion_tokens" if f.rejects == "max_tokens"
                                else "leaving llm.temperature out: the model uses its own")
                    continue
                if f.rejects_json_mode and use_format and not plain_retried:
                    # Not every server speaks response_format; the prompt still asks for JSON.
                    self._plain.add((endpoint.base_url, endpoint.model))
                    plain_retried = True
                    log.info("%s at %s refused response_format; asking plainly",
                             endpoint.model, shown_url(endpoint.base_url))
                    continue
                if not f.retry or retries >= self.settings.max_retries:
                    attempts = retries + 1
                    suffix = f" (after {attempts} attempts)" if attempts > 1 else ""
                    return None, f.text + suffix, f.timed_out
                delay = self._delay(retries, f.retry_after)
                too_long = self._wait_too_long(f.retry_after, last) or self._backoff_too_long(delay, retries)
                if too_long:
                    # A provider out of quota for the day, or a wait the order's timeout cuts
                    # short: waiting is no retry, and the fallback model may well answer now.
                    log.warning("%s at %s: %s; %s", endpoint.model, shown_url(endpoint.base_url),
                                f.text, too_long)
                    return None, f"{f.text}; {too_long}", False
                retries += 1
                log.warning("%s at %s: %s; retry %d of %d in %.1fs", endpoint.model,
                            shown_url(endpoint.base_url), f.text, retries, self.settings.max_retries, delay)
                self._pause(delay)
                continue
            cost = cost_of(usage, endpoint)
            call = Call(endpoint.model, shown_url(endpoint.base_url), 200, None, usage,
                        self._clock() - started, cost)
            self._record(call, made)
            return Reply(text=text, model=endpoint.model, usage=usage,
                         cost=sum(c.cost for c in made), calls=tuple(made), endpoint=endpoint,
                         cut=cut), "", False

    def _post(self, http: httpx.Client, endpoint: Endpoint, headers: dict[str, str],
              messages: list[dict[str, str]], use_format: bool, json_object: bool,
              secrets: list[str]) -> tuple[str, Usage, bool]:
        sent = [{k: whole_text(v) for k, v in m.items()} for m in messages]
        if json_object and not use_format:
            sent = [{"role": "system", "content": PLAIN_JSON_HINT}, *sent]
        body: dict[str, Any] = {"model": endpoint.model, "messages": sent}
        refused = self._refused.get((endpoint.base_url, endpoint.model), set())
        if self.settings.temperature is not None and "temperature" not in refused:
            body["temperature"] = self.settings.temperature
        if self.settings.max_tokens is not None:
            body["max_completion_tokens" if "max_tokens" in refused else "max_tokens"] = self.settings.max_tokens
        if use_format:
            body["response_format"] = {"type": "json_object"}
        url = completions_url(endpoint.base_url)
        try:
            response = self._fetch(http, url, body, headers)
        except httpx.TimeoutException:
            raise _Failure(f"timed out after {self.settings.timeout:g}s", status=None,
                           retry=True, timed_out=True) from None
        except httpx.ConnectError as e:
            raise _Failure(_redact(f"cannot connect ({_reason(e)})", secrets), status=None,
                           retry=True) from None
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as e:
            raise _Failure(_redact(f"bad base_url ({e})", secrets), status=None, retry=False) from None
        except httpx.TransportError as e:
            raise _Failure(_redact(f"connection broke ({_reason(e)})", secrets), status=None,
                           retry=True) from None
        except httpx.DecodingError as e:
            # A body that does not decode as its Content-Encoding says is a bad answer, like a
            # 200 that is not JSON: worth another try, never a crash.
            raise _Failure(excerpt(f"the answer could not be decoded ({_reason(e)})", secrets),
                           status=None, retry=True) from None
        except httpx.HTTPError as e:
            raise _Failure(excerpt(f"the request failed ({type(e).__name__}: {_reason(e)})", secrets),
                           status=None, retry=True) from None
        status = response.status_code
        if 300 <= status < 400:
            # Not followed: the request carries the API key, and the answer may name any host.
            where = response.headers.get("location")
            moved = f"a redirect to {excerpt(where, secrets)}" if where else "a redirect that names no place"
            raise _Failure(f"HTTP {status}: the endpoint answered with {moved}, which is not followed (it would "
                           "carry the API key there); set base_url to the endpoint's own address",
                           status=status, retry=False)
        if status != 200:
            detail = _error_detail(response, secrets)
            text = f"HTTP {status}" + (f": {detail}" if detail else "")
            lowered = detail.lower()
            raise _Failure(
                text,
                status=status,
                retry=status == 429 or status >= 500 or status == 408,
                retry_after=_retry_after(response.headers.get("retry-after")),
                rejects_json_mode=status in (400, 422) and use_format
                and ("response_format" in lowered or "json_object" in lowered),
                rejects=_refused_setting(status, lowered, body),
            )
        return _parse_completion(response, sent, secrets)

    def _fetch(self, http: httpx.Client, url: str, body: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
        """POST and read the answer chunk by chunk: a stop or the deadline ends it between two
        chunks (a server that trickles its answer cannot hold the attempt past its time). No
        read waits longer than the time left."""
        timeout = self.settings.timeout
        # llm.timeout bounds the whole call, not each read: a server that trickles keep-alive
        # whitespace (a hung upstream behind a proxy) held the attempt to the order's timeout,
        # and the retries and the fallback models were never asked.
        call_end = self._clock() + timeout
        if self.deadline is not None:
            left = self.deadline - self._clock()
            if left <= 0:
                raise LLMTimeout("the order's timeout ran out before the model was asked")
            timeout = min(timeout, left)
        chunks: list[bytes] = []
        size = 0

        def trace(event: str, info: dict[str, Any]) -> None:
            if event == "connection.connect_tcp.complete":
                self._stream = info.get("return_value")
                if self._stopped.is_set():  # stopped while it connected
                    self.stop(self._why_stopped)

        try:
            with http.stream("POST", url, json=body, headers=headers, timeout=httpx.Timeout(timeout),
                             extensions={"trace": trace}) as response:
                for chunk in response.iter_bytes():
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > MAX_ANSWER_BYTES:
                        # Cut off, never read whole: a bad answer, like a 200 that is not JSON.
                        raise _Failure(f"the answer is larger than {MAX_ANSWER_BYTES >> 20} MiB; cut off",
                                       status=response.status_code, retry=True)
                    self._check_cut(chunks)
                    if self._clock() > call_end and not _whole_json(chunks):
                        raise httpx.ReadTimeout("the call took longer than llm.timeout")
        except httpx.TimeoutException:
            if timeout < self.settings.timeout:
                # The order's deadline, not llm.timeout, bounded the wait: the record says the
                # real wait, not an llm.timeout that was never waited for.
                # No retry nor fallback has any time left: the attempt is over.
                raise LLMTimeout(f"timed out after {timeout:.1f}s, when the order's timeout ran out") from None
            raise
        self._check_cut(chunks)  # a stop that shut the connection ends the answer early, not whole
        # Decoded already (gzip and the like): the whole answer, as a plain response.
        kept = [(k, v) for k, v in response.headers.multi_items()
                if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
        return httpx.Response(response.status_code, headers=kept, content=b"".join(chunks),
                              request=response.request)

    # -- helpers ------------------------------------------------------------

    def _check_cut(self, chunks: list[bytes]) -> None:
        """Raise the stop's reason once the attempt has ended, unless the answer is all there
        (a whole answer is kept: it was paid for)."""
        ended = self._stopped.is_set() or (self.deadline is not None and self._clock() > self.deadline)
        if ended and not _whole_json(chunks):
            self._check_stop()

    def _check_stop(self) -> None:
        if self._stopped.is_set():
            raise LLMError(self._why_stopped or "stopped")
        if self.deadline is not None and self._clock() > self.deadline:
            raise LLMTimeout("the order's timeout ran out while the model was answering")

    def _pause(self, seconds: float) -> None:
        """Wait before a retry; a stop ends the wait (with the injected sleep of tests, after it)."""
        if self.deadline is not None:
            seconds = min(seconds, max(0.0, self.deadline - self._clock()))  # then _check_stop says so
        if self._sleep is time.sleep:
            self._stopped.wait(seconds)
        else:
            self._sleep(seconds)
        self._check_stop()

    def _key(self, endpoint: Endpoint) -> str:
        """The endpoint's key as sent: without the line end or spaces a key file or a paste
        leaves around it ("" when unset)."""
        return (self._env.get(endpoint.api_key_env) or "").strip() if endpoint.api_key_env else ""

    def _headers(self, endpoint: Endpoint) -> dict[str, str] | None:
        """The request's headers; None when the endpoint's key variable is not set, or holds what
        no header can carry (the HTTP library would refuse it with the key in its words)."""
        if not endpoint.api_key_env:
            return {}  # local servers (Ollama, llama.cpp) need no key
        key = self._key(endpoint)
        if not key or not HEADER_SAFE.fullmatch(key) or in_clear(endpoint.base_url):
            return None
        return {"Authorization": f"Bearer {key}"}

    def _unset_why(self, endpoint: Endpoint) -> str:
        if self._key(endpoint) and in_clear(endpoint.base_url):
            return (f"the key in {endpoint.api_key_env} would cross the network unencrypted (plain "
                    f"http:// to {urlsplit(endpoint.base_url).hostname})")
        if self._key(endpoint):
            return (f"{endpoint.api_key_env} holds a character no API key has (a control character, "
                    "a space or a non-ASCII letter)")
        return f"{endpoint.api_key_env} is not set"

    def _unset_message(self, endpoint: Endpoint) -> str:
        where = f"model {endpoint.model} at {shown_url(endpoint.base_url)}"
        if self._key(endpoint) and in_clear(endpoint.base_url):
            return (f"{where}: {self._unset_why(endpoint)}; nothing was sent: use the endpoint's "
                    "https:// address (plain http:// carries a key only to this machine, a private "
                    "address or a one-word host name such as a container's)")
        if self._key(endpoint):
            return (f"{where}: the environment variable {self._unset_why(endpoint)}; export it again "
                    "with the key exactly as the provider shows it")
        return (f"{where}: the environment variable "
                f"{endpoint.api_key_env} is not set; export it with the API key (in the supervisor's "
                "environment), or set api_key_env: null for a server that needs no key")

    def _secrets(self, *, refusable: bool = False) -> list[str]:
        """Every key of the chain, and what its URLs hold; `refusable`: without the query values
        named like no secret (a gateway's api-version: a reply may well say "2024-08-01-preview")."""
        raw = {self._env.get(e.api_key_env, "") for e in self.settings.chain if e.api_key_env}
        # The key as set and as sent, and as a message may quote it (escaped, like b'\n').
        found = {form for key in raw for k in (key, key.strip())
                 for form in (k, k.encode("unicode_escape").decode("ascii"))}
        found |= {s for e in self.settings.chain for s in url_secrets(e.base_url, named=refusable)}
        # Longest first, so a key that contains another is scrubbed whole.
        return sorted((s for s in found if len(s) >= MIN_SECRET), key=len, reverse=True)

    def _auth_message(self, endpoint: Endpoint, status: int) -> str:
        where = f"model {endpoint.model} at {shown_url(endpoint.base_url)}"
        if endpoint.api_key_env:
            fix = f"check the key in {endpoint.api_key_env} and that it may use this model"
        else:
            fix = "this endpoint needs a key: set api_key_env in the agent's llm settings"
        return f"{where} refused the request (HTTP {status}): {fix}"

    def _check_spend(self) -> None:
        if self._spend_guard is None:
            return
        reason = self._spend_guard()
        if reason:
            raise SpendLimitReached(reason)

    def _wait_too_long(self, retry_after: float | None, last: bool) -> str:
        """Why the wait a server asks for (Retry-After) is not worth waiting, or "": longer than
        the order's timeout leaves, or than RETRY_AFTER_CAP when another model can be asked (or
        no deadline bounds the wait)."""
        if retry_after is None:
            return ""
        asked = f"the provider asks to wait {duration(retry_after)} before another try (Retry-After)"
        if self.deadline is not None and retry_after >= self.deadline - self._clock():
            left = max(0.0, self.deadline - self._clock())
            return f"{asked}, longer than the {duration(left)} the order's timeout leaves: not retried"
        if retry_after > RETRY_AFTER_CAP and (not last or self.deadline is None):
            return f"{asked}, longer than the {RETRY_AFTER_CAP:g}s a retry waits at most: not retried"
        return ""

    def _backoff_too_long(self, delay: float, retries: int) -> str:
        """Why the wait before the next try is not worth waiting, or "": the order's timeout runs
        out first (slept through, the fallback model was never asked)."""
        if self.deadline is None or delay < self.deadline - self._clock():
            return ""
        left = max(0.0, self.deadline - self._clock())
        tries = f" after {retries + 1} attempts" if retries else ""
        return (f"not retried{tries}: the next try would wait {duration(delay)}, longer than the "
                f"{duration(left)} the order's timeout leaves")

    def _delay(self, retries: int, retry_after: float | None) -> float:
        if retry_after is not None:
            # Within the order's timeout (`_wait_too_long`) the wait asked for is waited whole: a
            # try after less would only be refused again.
            return max(retry_after, 0.0) if self.deadline is not None else min(max(retry_after, 0.0), RETRY_AFTER_CAP)
        return float(min(BACKOFF_BASE * 2**retries, BACKOFF_CAP))

    def _record(self, call: Call, made: list[Call]) -> None:
        made.append(call)
        with self._lock:
            self._calls.append(call)
        if self._on_call is not None:
            self._on_call(call)


def _parse_completion(response: httpx.Response, sent: list[dict[str, str]],
                      secrets: list[str]) -> tuple[str, Usage, bool]:
    """Text, usage and whether the output token limit cut it, of a 200 answer; a malformed one is
    a retryable failure."""
    data: Any = None
    try:
        data = response.json()
        content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError, RecursionError):
        shown = excerpt(response.text, secrets)
        raw = data.get("usage") if isinstance(data, dict) else None
        raise _Failure(f"HTTP 200 but not a chat completion: {shown!r}", status=200,
                       retry=True, usage=_reported(raw)) from None
    choice = data["choices"][0]
    cut = isinstance(choice, dict) and choice.get("finish_reason") == "length"
    if isinstance(content, list):
        # Some servers answer in parts ({"type": "text", "text": ...}, thinking beside it).
        content = "".join(p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text"
                          and isinstance(p.get("text"), str))
    if not isinstance(content, str) or not content.strip():
        # A reasoning model can spend the whole output limit thinking and say nothing.
        why = " (cut off at the output token limit: raise llm.max_tokens)" if cut else ""
        message = choice.get("message") if isinstance(choice, dict) else None
        refusal = message.get("refusal") if isinstance(message, dict) else None
        if isinstance(refusal, str) and refusal.strip():
            # The model's own words on why: "an empty message" hid them.
            why = f": the model refused ({excerpt(' '.join(refusal.split()), secrets)})"
        elif isinstance(message, dict) and message.get("tool_calls"):
            why = (" but a tool call (this agent offers the model no tools: it must reply with the "
                   "JSON object as text)")
        # Billed all the same (a model that thought to its output limit, most of all): counted.
        raise _Failure(f"HTTP 200 with an empty message{why}", status=200, retry=True,
                       usage=_usage(data.get("usage"), sent, ""))
    return content, _usage(data.get("usage"), sent, content), cut


def _usage(raw: object, sent: list[dict[str, str]], content: str) -> Usage:
    reported = _reported(raw)
    if reported is not None:
        return reported
    prompt_text = "".join(m.get("content", "") for m in sent)
    return Usage(estimate_tokens(prompt_text), estimate_tokens(content), estimated=True)


def _reported(raw: object) -> Usage | None:
    """The usage an answer reports, when it is a pair of token counts."""
    if isinstance(raw, dict):
        prompt, completion = raw.get("prompt_tokens"), raw.get("completion_tokens")
        if _token_count(prompt) and _token_count(completion):
            return Usage(prompt, completion)
    return None


def _token_count(value: object) -> TypeGuard[int]:
    """Whether `value` is a token count a call could have used (a bool is no count)."""
    return type(value) is int and 0 <= value <= MAX_REPORTED_TOKENS


def _error_detail(response: httpx.Response, secrets: list[str]) -> str:
    """The server's own words about an error, short and scrubbed: `error.message` or the body's start."""
    try:
        data = response.json()
    except (ValueError, RecursionError):
        return excerpt(" ".join(response.text.split()), secrets)
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or json.dumps(err)
        else:
            msg = str(err)
        return excerpt(" ".join(str(msg).split()), secrets)
    return excerpt(" ".join(json.dumps(data).split()), secrets)


def _whole_json(chunks: list[bytes]) -> bool:
    """Whether the chunks so far are a whole JSON document (a complete answer)."""
    try:
        json.loads(b"".join(chunks))
    except (ValueError, RecursionError):
        return False
    return True


def duration(seconds: float) -> str:
    """`seconds` as a person reads a wait: 45s, 12 min, 24 h, 3 days."""
    if not math.isfinite(seconds):
        return "forever"
    if seconds < 120:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}".removesuffix(".0") + "s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def completions_url(base_url: str) -> str:
    """The chat-completions address under `base_url`: appended to its path, so a query the
    endpoint needs (`?api-version=...` of a gateway) stays a query and is still sent."""
    try:
        parts = urlsplit(base_url)
    except ValueError:
        return f"{base_url.rstrip('/')}/chat/completions"  # httpx says what is wrong with it
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/chat/completions", fragment=""))


def in_clear(url: str) -> bool:
    """Whether a key sent to `url` would cross the network unencrypted: plain http:// to a host
    that is not this machine, a private or link-local address, or a one-word name (a container's,
    a machine's on the local network). Once: http://api.openai.com/v1, one letter off, sent the
    key in clear across the internet before its redirect was refused."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").rstrip(".")
    except ValueError:
        return False  # httpx says what is wrong with it, before anything is sent
    if parts.scheme.lower() != "http" or not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "." in host and not host.lower().endswith(".localhost")
    return not (address.is_loopback or address.is_private or address.is_link_local)


def _server(url: str) -> str:
    """Who answers at `url`: its scheme, host and port."""
    try:
        parts = urlsplit(url)
        return f"{parts.scheme.lower()}://{(parts.hostname or '').rstrip('.').lower()}:{parts.port}"
    except ValueError:
        return url


def shown_url(url: str) -> str:
    """`url` as it may be shown and stored: a user name and password in it (a proxy's basic auth)
    and each value of its query (a gateway's `?api-key=...`) are a secret like the key, never
    written to a record, a log or the model's next brief: `key=***` stands for `key=<the key>`."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return url
    if host is None or ("@" not in parts.netloc and not parts.query):
        return url
    if "@" in parts.netloc:
        parts = parts._replace(netloc=f"{REDACTED}@" + parts.netloc.rsplit("@", 1)[1])
    if parts.query:
        parts = parts._replace(query="&".join(
            f"{item.split('=', 1)[0]}={REDACTED}" if "=" in item else REDACTED if item else item
            for item in parts.query.split("&")))
    return urlunsplit(parts)


def url_secrets(url: str, *, named: bool = False) -> set[str]:
    """The user information and the query values of `url`, as written and decoded: scrubbed
    wherever an error echoes them. `named`: of the query, only the values named like a secret
    (`key`, `token`, `sig`...) or with no name."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return set()
    found: set[str] = set()
    if "@" in parts.netloc:
        info = parts.netloc.rsplit("@", 1)[0]
        found |= {info, unquote(info)}
        if parts.password:
            found |= {parts.password, unquote(parts.password)}
    for item in parts.query.split("&") if parts.query else ():
        name, value = item.split("=", 1) if "=" in item else ("", item)
        if named and name and not SECRET_PARAM.search(unquote_plus(name)):
            continue
        found |= {value, unquote(value), unquote_plus(value)}
    found.discard("")
    return found


def _reason(e: Exception) -> str:
    text = str(e).strip()
    if "refused" in text.lower():
        return "connection refused"
    return text or type(e).__name__


def _redact(text: str, secrets: list[str]) -> str:
    for s in secrets:
        text = text.replace(s, REDACTED)
    return text


def excerpt(text: str, secrets: list[str], limit: int = ERROR_EXCERPT) -> str:
    """`text` scrubbed of every key, then cut to `limit` characters: scrubbed first, so a key the
    cut would split is still found whole; and a cut end that is the start of a key (its first
    MIN_SECRET_PREFIX characters or more) is scrubbed too."""
    whole = whole_text(_redact(text, secrets))
    text = whole[:limit]
    marker = whole.find(REDACTED, max(0, limit - len(REDACTED) + 1))
    if 0 <= marker < limit:  # never half a marker: a reader must see that a key was there
        text = whole[:marker + len(REDACTED)]
    for s in secrets:
        for n in range(len(s) - 1, MIN_SECRET_PREFIX - 1, -1):
            if text.endswith(s[:n]):
                return text[:-n] + REDACTED
    return text


def whole_text(text: str) -> str:
    """`text` with each lone surrogate (half a character, unencodable) as U+FFFD."""
    return LONE_SURROGATE.sub("\ufffd", text)

