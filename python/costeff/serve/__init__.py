"""``costeff serve``: an HTTP server for a model directory (docs/serve.md).

config (ServeConfig: every knob and its checks), schedulers (the layer-granularity continuous batcher
over costeff.inference.session.SessionWorker, a C++ thread turning an EngineSession, and the
request-level dynamic batcher it is compared with), app (the Starlette application: endpoints, input
rules, errors, metrics), server (engine, warm-up, uvicorn, draining on SIGTERM). Needs the ``serve``
extra (requirements/serve.txt); nothing here is imported by ``import costeff``."""
