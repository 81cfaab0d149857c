"""A real LangGraph graph (stub retriever -> cluster node -> END) against a real tiny-model server.

The tiny model emits random text, so the assertions are on structure: an answer is
present and non-empty, usage is reported, and the retrieved documents reach the prompt.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypedDict

import pytest

from tests.support.env import need
from tests.support.servers import ServerProcess, free_port, spawn_server

try:
    from langchain_core.documents import Document
    from langgraph.graph import END, START, MessagesState, StateGraph

    from app.integrations.langgraph_node import cluster_chat_model, make_generate_node
    from app.integrations.settings import ClusterSettings

    HAVE_LANGGRAPH = True
except ImportError:  # pragma: no cover - the `langgraph` extra is installed by tests/run.sh
    HAVE_LANGGRAPH = False

API_KEY = "graph-key"
CORPUS = [
    "Ray Serve routes requests to LLM replicas on the GPU workers.",
    "nginx fails over to the transformers fallback server when Ray Serve is down.",
    "Prometheus scrapes the metrics of every node.",
]


class RAGState(TypedDict, total=False):
    question: str
    documents: list[Any]
    answer: str
    usage: dict[str, int]


@pytest.fixture(autouse=True)
def _need_langgraph() -> None:
    need(HAVE_LANGGRAPH, "needs the `langgraph` extra (pip install -e .[langgraph])")


@pytest.fixture(scope="module")
def cluster(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = spawn_server(tmp_path_factory.mktemp("langgraph-cluster"), tiny_model, env={"API_KEYS": API_KEY})
    try:
        yield srv
    finally:
        srv.stop(signal.SIGKILL)


def retrieve(state: RAGState) -> dict[str, Any]:
    """Stub retriever: the first two documents, as LangChain Documents."""
    return {"documents": [Document(page_content=text) for text in CORPUS[:2]]}


def build_graph(node: Any) -> Any:
    graph = StateGraph(RAGState)
    graph.add_node("retrieve", retrieve)
    graph.add_node("generate", node)
    graph.add_edge(START, "retrieve")
    graph.add_edge("retrieve", "generate")
    graph.add_edge("generate", END)
    return graph.compile()


def _settings(cluster: ServerProcess, **kw: Any) -> ClusterSettings:
    return ClusterSettings(base_url=cluster.base_url + "/v1", api_key=API_KEY, api_keys="", model="", **kw)


def _check(out: dict[str, Any], max_tokens: int) -> None:
    assert isinstance(out["answer"], str) and out["answer"].strip(), out
    usage = out["usage"]
    assert usage["prompt_tokens"] > 0
    assert 1 <= usage["completion_tokens"] <= max_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_graph_retrieve_then_generate(cluster: ServerProcess) -> None:
    # min_tokens (a vLLM-compatible extension the server accepts) keeps the random model from an empty answer
    llm = cluster_chat_model(settings=_settings(cluster), max_tokens=8, temperature=0.0,
                             extra_body={"min_tokens": 2})
    assert llm.model_name == "tiny"  # resolved from /v1/models
    app = build_graph(make_generate_node(llm))

    out = app.invoke({"question": "What does nginx do when Ray Serve is down?"})
    assert [d.page_content for d in out["documents"]] == CORPUS[:2]
    _check(out, 8)

    out_async = await app.ainvoke({"question": "What routes requests?"})
    _check(out_async, 8)

    # the retrieved documents are in the prompt: without them it is shorter
    bare = build_graph(make_generate_node(llm)).invoke({"question": "What routes requests?", "documents": []})
    no_docs = make_generate_node(llm).invoke({"question": "What routes requests?"})
    assert no_docs["usage"]["prompt_tokens"] < out_async["usage"]["prompt_tokens"] - 20
    assert bare["usage"]["prompt_tokens"] == out_async["usage"]["prompt_tokens"]  # retrieve overwrote []


def test_node_from_environment_with_custom_keys(cluster: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLUSTER_BASE_URL", cluster.base_url + "/v1")
    monkeypatch.setenv("CLUSTER_API_KEY", "")
    monkeypatch.setenv("API_KEYS", f"{API_KEY},other")  # fallback: the first of the server's keys
    monkeypatch.setenv("CLUSTER_MODEL", "tiny")
    node = make_generate_node(question_key="query", documents_key="docs", answer_key="reply", usage_key=None,
                              max_tokens=4, temperature=0.0, extra_body={"min_tokens": 1})
    out = node.invoke({"query": "Hello?", "docs": [{"page_content": "A dict document."}, "a plain string"]})
    assert set(out) == {"reply"} and out["reply"].strip()


def test_errors_surface_as_exceptions(cluster: ServerProcess) -> None:
    import openai

    with pytest.raises(ValueError, match="no question"):
        make_generate_node(cluster_chat_model("tiny", settings=_settings(cluster))).invoke({"documents": CORPUS})
    wrong_key = ClusterSettings(base_url=cluster.base_url + "/v1", api_key="wrong", api_keys="", model="tiny")
    with pytest.raises(openai.AuthenticationError):
        make_generate_node(settings=wrong_key, max_retries=0).invoke({"question": "hi"})
    dead = ClusterSettings(base_url=f"http://127.0.0.1:{free_port()}/v1", api_keys="", model="tiny")
    with pytest.raises(openai.APIConnectionError):
        make_generate_node(settings=dead, max_retries=0).invoke({"question": "hi"})
    with pytest.raises(RuntimeError, match="CLUSTER_MODEL"):
        cluster_chat_model(settings=ClusterSettings(base_url=dead.base_url, api_keys="", model=""))


# ----------------------------------------------------------------------------- tools and structured output (issue 14)


def test_bind_tools_with_a_named_choice_and_a_tool_node_round_trip(cluster: ServerProcess) -> None:
    """LangChain `bind_tools(tool_choice=name)`, then a LangGraph ToolNode runs the tool and its result goes back."""
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool
    from langgraph.prebuilt import ToolNode
    from pydantic import BaseModel, Field

    class CityArgs(BaseModel):
        city: str = Field(max_length=10)  # random weights write long strings: bound it, as real tools often do

    calls: list[str] = []

    @tool(args_schema=CityArgs)
    def lookup(city: str) -> str:
        """Weather of a city."""
        calls.append(city)
        return f"sunny in {city}"

    llm = cluster_chat_model(settings=_settings(cluster), max_tokens=200, temperature=0.7, seed=4)
    forced = llm.bind_tools([lookup], tool_choice="lookup")
    tools_node = ToolNode([lookup])

    def agent(state: MessagesState) -> dict[str, Any]:
        model = forced if len(state["messages"]) == 1 else llm.bind(max_tokens=6)  # then an answer to the result
        return {"messages": [model.invoke(state["messages"])]}

    def route(state: MessagesState) -> str:
        return "tools" if getattr(state["messages"][-1], "tool_calls", None) else END

    graph = StateGraph(MessagesState)
    graph.add_node("agent", agent)
    graph.add_node("tools", tools_node)
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", route, ["tools", END])
    graph.add_edge("tools", "agent")
    out = graph.compile().invoke({"messages": [HumanMessage("Weather in Oslo?")]})
    kinds = [m.type for m in out["messages"]]
    assert kinds == ["human", "ai", "tool", "ai"], kinds
    call = out["messages"][1].tool_calls[0]
    assert call["name"] == "lookup" and isinstance(call["args"]["city"], str) and calls == [call["args"]["city"]]
    assert out["messages"][2].tool_call_id == call["id"] and out["messages"][2].content.startswith("sunny in")


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_returns_the_pydantic_model(cluster: ServerProcess, method: str) -> None:
    from pydantic import BaseModel, Field

    class Answer(BaseModel):
        """An answer with a confidence."""

        text: str = Field(max_length=16)
        confidence: int = Field(ge=0, le=10)

    llm = cluster_chat_model(settings=_settings(cluster), max_tokens=300, temperature=0.7)
    structured = llm.with_structured_output(Answer, method=method)  # type: ignore[arg-type]
    done = 0
    for seed in range(3):
        try:
            out = structured.bind(seed=seed).invoke("What routes requests?")
        except Exception as exc:  # an answer cut at max_tokens is not valid JSON: count, but say what it was
            assert "Invalid" in str(exc) or "validation" in str(exc).lower() or "JSON" in str(exc), exc
            continue
        assert isinstance(out, Answer) and 0 <= out.confidence <= 10
        done += 1
    assert done >= 2, f"only {done} of 3 structured answers parsed"


def test_generate_node_with_a_response_model_writes_the_parsed_object(cluster: ServerProcess) -> None:
    from pydantic import BaseModel, Field

    class Verdict(BaseModel):
        summary: str = Field(max_length=20)
        score: int = Field(ge=1, le=5)

    import openai

    parsed = 0
    for seed in range(3):  # random weights may run a string to max_tokens: that answer cannot parse
        node = make_generate_node(cluster_chat_model(settings=_settings(cluster), max_tokens=300, temperature=0.7,
                                                     seed=seed), response_model=Verdict)
        try:
            out = build_graph(node).invoke({"question": "Does nginx fail over?"})
        except (ValueError, openai.LengthFinishReasonError):
            continue
        assert isinstance(out["answer"], Verdict) and 1 <= out["answer"].score <= 5
        assert out["usage"]["completion_tokens"] > 0
        parsed += 1
    assert parsed >= 2, f"only {parsed} of 3 structured answers parsed"
