"""Ray Serve wiring: one ingress (the shared API router) plus one LLM server deployment per model.

`app.ray_serve.llm_server` holds the per-model replica (an engine from the engine
protocol), `app.ray_serve.backend` the `ModelBackend` that forwards to deployment
handles, `app.ray_serve.ingress` the ingress deployment and the app builder,
`app.ray_serve.registry` the replica records `cluster status` reads.
Ray is imported only by these modules (inside functions), never by the core.
"""
