"""LangGraph node that answers from retrieved documents with the cluster (`langchain_openai.ChatOpenAI`).

    from app.integrations.langgraph_node import make_generate_node
    graph.add_node("generate", make_generate_node())          # reads state["question"], state["documents"]
    graph.add_edge("retrieve", "generate")                    # writes state["answer"] (+ state["usage"])

The node builds the prompt the same way the MCP `generate` tool does (documents
numbered in a system message, `prompts.build_messages`), calls the cluster through a
`ChatOpenAI` pointed at `CLUSTER_BASE_URL` whose HTTP clients carry the kit's one retry
policy (`app.client.wire.RetryTransport`; the openai SDK's own retries are off), and
works in `graph.invoke` and `graph.ainvoke`. With `response_model` (a pydantic model) the answer is structured
output (`with_structured_output(method="json_schema")`: constrained decoding on every engine) and the node
writes the parsed model instance.
Needs the `langgraph` extra (langgraph, langchain-openai, langchain-core).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage
from langchain_core.runnables import RunnableLambda
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, SecretStr

from app.client.wire import AsyncRetryTransport, ClientError, RetryTransport, list_models_sync
from app.integrations.prompts import DEFAULT_SYSTEM_PROMPT, build_messages
from app.integrations.settings import ClusterSettings

NO_KEY = "none"  # ChatOpenAI insists on a key; a server without API_KEYS ignores it


def _first_model(settings: ClusterSettings, api_key: str) -> str:
    try:
        cards = list_models_sync(settings.base_url, api_key=api_key, timeout_s=min(settings.timeout_s, 30.0),
                                 policy=settings.retry_policy())
    except ClientError as exc:
        raise RuntimeError(f"no model given and listing the models failed ({exc.message}); pass model= or set "
                           "CLUSTER_MODEL") from None
    if not cards:
        raise RuntimeError(f"the cluster at {settings.base_url} serves no models")
    return str(cards[0]["id"])


def cluster_chat_model(
    model: str | None = None, *, settings: ClusterSettings | None = None, **kwargs: Any
) -> ChatOpenAI:
    """A `ChatOpenAI` for the cluster: base URL, key and timeout from `ClusterSettings` (CLUSTER_* env).

    `model` defaults to CLUSTER_MODEL, else the first model the cluster lists (one GET at
    construction). Retries follow the kit's policy (CLUSTER_MAX_ATTEMPTS; `max_retries=N` means N+1
    attempts). Extra keyword arguments go to `ChatOpenAI` (max_tokens, temperature,
    extra_body={"min_tokens": ...}, ...).
    """
    settings = settings or ClusterSettings()
    api_key = settings.effective_api_key
    model = model or settings.model or _first_model(settings, api_key)
    retries = kwargs.pop("max_retries", None)
    policy = settings.retry_policy(None if retries is None else int(retries) + 1)
    kwargs.setdefault("timeout", settings.timeout_s)
    return ChatOpenAI(model=model, base_url=settings.base_url, api_key=SecretStr(api_key or NO_KEY), max_retries=0,
                      http_client=httpx.Client(transport=RetryTransport(policy)),
                      http_async_client=httpx.AsyncClient(transport=AsyncRetryTransport(policy)), **kwargs)


def _usage(message: BaseMessage) -> dict[str, int]:
    meta = getattr(message, "usage_metadata", None) or {}
    return {
        "prompt_tokens": int(meta.get("input_tokens", 0)),
        "completion_tokens": int(meta.get("output_tokens", 0)),
        "total_tokens": int(meta.get("total_tokens", 0)),
    }


def make_generate_node(
    llm: BaseChatModel | None = None,
    *,
    question_key: str = "question",
    documents_key: str = "documents",
    answer_key: str = "answer",
    usage_key: str | None = "usage",
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    name: str = "generate",
    response_model: type[BaseModel] | None = None,
    **llm_kwargs: Any,
) -> RunnableLambda:
    """A graph node: `state[question_key]` + `state[documents_key]` -> `{answer_key: text, usage_key: {...}}`.

    Documents may be strings, LangChain `Document`s or dicts with page_content/content/text;
    a missing or empty documents entry means no context. `llm` defaults to
    `cluster_chat_model(**llm_kwargs)`; pass your own chat model to reuse this node elsewhere.
    Keys absent from the graph's state schema are dropped by LangGraph, so `usage` is harmless.
    `response_model`: the answer is an instance of it (JSON-schema structured output); a reply that does not
    parse (cut at max_tokens) raises ValueError.
    """
    if llm is not None and llm_kwargs:
        raise TypeError("pass either llm= or ChatOpenAI keyword arguments, not both")
    chat = llm if llm is not None else cluster_chat_model(**llm_kwargs)
    structured = (chat.with_structured_output(response_model, method="json_schema", include_raw=True)
                  if response_model is not None else None)

    def _messages(state: Mapping[str, Any]) -> list[tuple[str, str]]:
        question = state.get(question_key)
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"graph state has no question under {question_key!r}")
        docs = state.get(documents_key) or []
        msgs = build_messages(prompt=question, context=list(docs), system_prompt=system_prompt)
        return [(m["role"], m["content"]) for m in msgs]

    def _update(reply: Any) -> dict[str, Any]:
        if structured is not None:  # include_raw: {"raw": message, "parsed": model or None, "parsing_error"}
            if reply.get("parsing_error") is not None or reply.get("parsed") is None:
                raise ValueError(f"the structured answer did not parse: {reply.get('parsing_error')}")
            message, answer = reply["raw"], reply["parsed"]
        else:
            message, answer = reply, str(reply.text)
        update: dict[str, Any] = {answer_key: answer}
        if usage_key:
            update[usage_key] = _usage(message)
        return update

    runnable: Any = structured if structured is not None else chat

    def node(state: Mapping[str, Any]) -> dict[str, Any]:
        return _update(runnable.invoke(_messages(state)))

    async def anode(state: Mapping[str, Any]) -> dict[str, Any]:
        return _update(await runnable.ainvoke(_messages(state)))

    return RunnableLambda(node, afunc=anode, name=name)
