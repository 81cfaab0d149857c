"""Ray Serve application: one ingress (the shared API router) plus one LLM server deployment per model.

`app.serving.server` holds the per-model replica (an engine from the engine
protocol), `app.serving.backend` the `ModelBackend` that forwards to deployment
handles, `app.serving.ingress` the ingress deployment and the app builder.
Ray is imported only by these modules, never by the core.
"""
