"""A small async client for the cluster's OpenAI API, shared by the integrations.

It retries 429/502/503 answers (honouring `Retry-After`) and refused connections
with tenacity, and turns every failure into a `ClusterError` whose message an
agent can read and act on (which URL was unreachable, which model is unknown and
which ones exist, which argument the server rejected). It also builds the chat
messages for retrieval-augmented generation (`build_messages`), so the MCP tool
and the LangGraph node put retrieved documents into the prompt the same way.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from app.client.wire import parse_retry_after
from app.integrations.settings import ClusterSettings

RETRY_STATUSES = frozenset({429, 502, 503})
MODELS_TTL_S = 30.0

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the question using the context documents below. "
    "If the context does not contain the answer, say so."
)


class ClusterError(Exception):
    """A failure the caller (often an LLM agent) should read: the message says what went wrong."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.retry_after = retry_after


class ClusterUnreachableError(ClusterError):
    """No HTTP answer at all (connection refused, DNS, timeout)."""


def _error_text(response: httpx.Response) -> tuple[str, str | None]:
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return (text[:300] or response.reason_phrase or "no body"), None
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err), err.get("code") or err.get("type")
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"]), None
    return str(body)[:300], None


def document_text(doc: Any) -> str:
    """Text of a retrieved document: a str, a LangChain `Document`, or a dict with page_content/content/text."""
    if isinstance(doc, str):
        return doc
    content = getattr(doc, "page_content", None)
    if isinstance(content, str):
        return content
    if isinstance(doc, Mapping):
        for key in ("page_content", "content", "text"):
            if isinstance(doc.get(key), str):
                return doc[key]
    return str(doc)


def format_context(documents: Iterable[Any]) -> str:
    """Number the documents so the model (and a reader) can refer to them."""
    parts = [f"[{i}] {document_text(d).strip()}" for i, d in enumerate(documents, 1)]
    return "\n\n".join(p for p in parts if p.strip())


def build_messages(
    *,
    prompt: str | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
    context: Sequence[Any] | None = None,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> list[dict[str, str]]:
    """Chat messages for a prompt or a conversation, with retrieved documents as a system message.

    Exactly one of `prompt` and `messages` must be given. Documents go into a system
    message placed first (merged with an existing leading system message), so the
    conversation itself is left as the caller wrote it.
    """
    if (prompt is None) == (messages is None):
        raise ValueError("pass exactly one of 'prompt' (a string) or 'messages' (a list of {role, content})")
    if prompt is not None:
        if not prompt.strip():
            raise ValueError("'prompt' must not be empty")
        out = [{"role": "user", "content": prompt}]
    else:
        if not messages:
            raise ValueError("'messages' must contain at least one message")
        out = [{"role": str(m["role"]), "content": str(m.get("content") or "")} for m in messages]
    ctx = format_context(context or [])
    if ctx:
        header = f"{system_prompt}\n\nContext documents:\n{ctx}"
        if out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{header}"}
        else:
            out.insert(0, {"role": "system", "content": header})
    return out


class ClusterClient:
    """Async client of one cluster endpoint; create once, `await aclose()` at the end."""

    def __init__(self, settings: ClusterSettings | None = None):
        self.settings = settings or ClusterSettings()
        self._http: httpx.AsyncClient | None = None
        self._models: list[dict[str, Any]] | None = None
        self._models_at = 0.0

    @property
    def base_url(self) -> str:
        return self.settings.base_url

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            headers = {"Accept": "application/json"}
            key = self.settings.effective_api_key
            if key:
                headers["Authorization"] = f"Bearer {key}"
            self._http = httpx.AsyncClient(
                base_url=self.settings.base_url + "/", headers=headers, timeout=self.settings.timeout_s
            )
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> ClusterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ transport
    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        cap = self.settings.max_retry_wait_s
        if isinstance(exc, ClusterError) and exc.retry_after is not None:
            return min(exc.retry_after, cap)
        return min(0.25 * 2 ** (state.attempt_number - 1), cap)

    @staticmethod
    def _retryable(exc: BaseException) -> bool:
        if isinstance(exc, ClusterUnreachableError):
            return exc.code == "connect_failed"  # the request never reached the server: safe to resend
        return isinstance(exc, ClusterError) and exc.status in RETRY_STATUSES

    async def _once(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        url = f"{self.settings.base_url}/{path}"
        try:
            response = await self._client().request(method, path, json=body)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ClusterUnreachableError(
                f"cluster unreachable at {url}: {exc or type(exc).__name__}. Check that the cluster is up "
                "and CLUSTER_BASE_URL is right.", code="connect_failed",
            ) from None
        except httpx.TimeoutException:
            raise ClusterUnreachableError(
                f"cluster at {url} did not answer within {self.settings.timeout_s:g} s (CLUSTER_TIMEOUT_S)",
                code="timeout",
            ) from None
        except httpx.HTTPError as exc:
            raise ClusterUnreachableError(f"request to {url} failed: {exc or type(exc).__name__}",
                                          code="transport_error") from None
        if response.status_code >= 400:
            message, code = _error_text(response)
            raise ClusterError(
                f"cluster answered {response.status_code} on {method} {url}: {message}",
                status=response.status_code, code=code,
                retry_after=parse_retry_after(response.headers.get("retry-after")),
            )
        try:
            return response.json()
        except ValueError:
            raise ClusterError(f"cluster answered {method} {url} with a body that is not JSON",
                               status=response.status_code) from None

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One API call with retries; raises ClusterError after the last try."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.settings.max_attempts),
            wait=self._wait,
            retry=retry_if_exception(self._retryable),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._once(method, path, body)
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ API
    async def list_models(self, *, refresh: bool = False) -> list[dict[str, Any]]:
        """The cluster's model cards (`id`, `engine`, `ready`, `max_model_len`...), cached for 30 s."""
        if refresh or self._models is None or time.monotonic() - self._models_at > MODELS_TTL_S:
            data = await self.request("GET", "models")
            cards = data.get("data") if isinstance(data, dict) else None
            if not isinstance(cards, list):
                raise ClusterError(f"unexpected answer from {self.base_url}/models: no 'data' list")
            self._models = [c for c in cards if isinstance(c, dict) and "id" in c]
            self._models_at = time.monotonic()
        return list(self._models)

    async def resolve_model(self, model: str | None) -> str:
        """The requested model, else CLUSTER_MODEL, else the first model the cluster lists."""
        if model:
            return model
        if self.settings.model:
            return self.settings.model
        models = await self.list_models()
        if not models:
            raise ClusterError(f"the cluster at {self.base_url} serves no models")
        return str(models[0]["id"])

    async def engine_of(self, model: str) -> str | None:
        """Engine name (`vllm`, `transformers`, ...) the cluster reports for `model`; None if unknown."""
        for refresh in (False, True):
            for card in await self.list_models(refresh=refresh):
                if card.get("id") == model:
                    return card.get("engine")
        return None

    async def chat(
        self,
        messages: list[dict[str, str]],
        *,
        model: str,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stop: list[str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """POST /chat/completions (non-streaming); returns the OpenAI response body."""
        body: dict[str, Any] = {"model": model, "messages": messages, **(extra or {})}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if temperature is not None:
            body["temperature"] = temperature
        if stop:
            body["stop"] = stop
        data = await self.request("POST", "chat/completions", body)
        if not isinstance(data, dict) or not data.get("choices"):
            raise ClusterError(f"unexpected answer from {self.base_url}/chat/completions: no choices")
        return data
