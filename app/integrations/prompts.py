"""Chat messages for retrieval-augmented generation, shared by the MCP tool and the LangGraph node.

`build_messages` puts retrieved documents (strings, LangChain `Document`s, dicts) into a numbered
system message, so both integrations ground a prompt the same way. Talking to the cluster is
`app.client.wire`'s job (the one HTTP client, with the one retry policy).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the question using the context documents below. "
    "If the context does not contain the answer, say so."
)


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
