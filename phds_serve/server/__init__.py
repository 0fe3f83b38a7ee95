"""phds-serve: vLLM's OpenAI-compatible server plus a thin declared-k layer.

The layer (:mod:`phds_serve.server.middleware`) is one pure ASGI middleware,
installed with vLLM's own ``--middleware`` flag by :mod:`phds_serve.server.cli`.
Nothing here imports vLLM at package import time: the CLI must set
``PROMETHEUS_MULTIPROC_DIR`` before vLLM or prometheus_client load.
"""
