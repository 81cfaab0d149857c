"""Integrations: let a RAG application call the cluster as just another tool.

- `mcp_server`: an MCP server (official `mcp` SDK) exposing `generate` and `list_models`.
- `langgraph_node`: a LangGraph node factory built on `langchain_openai.ChatOpenAI`.
- `cluster_client`: the small async OpenAI-API client (retries, readable errors) the MCP tools use.

Optional dependencies (`mcp`, `langgraph` extras) are imported only by the modules that need them.
"""
