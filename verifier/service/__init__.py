"""The HTTP gating service (ASGI, FastAPI on uvicorn): `app` assembles it from `config`,
`batching` (micro-batches into one gate pass), `state`, `http`/`guard`/`routes` (bounds, auth,
endpoints), `log` (batched decision log), `metrics` (Prometheus) and the `/review` page."""
