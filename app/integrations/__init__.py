"""Integrations: let a RAG application call the cluster as just another tool.

- `mcp_server`: an MCP server (official `mcp` SDK) exposing `generate` and `list_models`.
- `langgraph_node`: a LangGraph node factory built on `langchain_openai.ChatOpenAI`.
- `prompts`: the chat messages both build for retrieval-augmented generation (documents in a system message).

Both talk to the cluster through `app.client.wire` (the one HTTP client, one retry policy).

Optional dependencies (`mcp`, `langgraph` extras) are imported only by the modules that need them.
"""
