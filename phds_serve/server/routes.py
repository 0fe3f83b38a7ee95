"""Every POST route of vLLM 0.32's OpenAI server, by what it does with declared k.

A generation route either carries k to the engine (the layer writes it where
that route's protocol passes per-request arguments: ``vllm_xargs``, which
vLLM copies into ``SamplingParams.extra_args``, or ``sampling_params.extra_args``
of the token-in/token-out API) or it cannot, and then a request that names a
k, or whose tier or ``--default-k`` asks for one other than the native k, gets
an HTTP 400 saying so. Everything else (tokenizer, pooling, admin) passes
through untouched. ``tests/server/test_server.py`` checks that every POST path
of the running server's OpenAPI schema is in one of these tables, so a route
added by a vLLM upgrade cannot slip past the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

VLLM_XARGS = "vllm_xargs"
SAMPLING_EXTRA_ARGS = "sampling_params.extra_args"


@dataclass(frozen=True)
class Route:
    path: str
    # Where k goes in the body; None: the route has no way to pass it (k is refused).
    carrier: str | None
    stream_options: bool = False  # protocol has stream_options (the layer asks for usage)
    priority: bool = False  # protocol has a scheduling priority
    beam_search: bool = False  # protocol has use_beam_search (which drops vllm_xargs)
    top_level_k: bool = True  # a top-level "k" is declared k (Cohere's "k" is top-k sampling)
    generation: bool = True  # False: renders a request without running it (no metrics, no brownout)
    multipart: bool = False  # form-encoded body (audio)
    why_not: str = ""  # for carrier None: what the route would need

    @property
    def honours_k(self) -> bool:
        return self.carrier is not None


_ROUTES = (
    Route("/v1/completions", VLLM_XARGS, stream_options=True, priority=True, beam_search=True),
    Route("/v1/chat/completions", VLLM_XARGS, stream_options=True, priority=True, beam_search=True),
    # Batch chat has no vllm_xargs field, but its extra fields reach each conversation's
    # ChatCompletionRequest (BatchChatCompletionRequest.to_chat_completion_request dumps them).
    Route("/v1/chat/completions/batch", VLLM_XARGS, priority=True, beam_search=True),
    Route("/v1/responses", VLLM_XARGS, priority=True),
    Route("/v1/messages", VLLM_XARGS),
    Route("/inference/v1/generate", SAMPLING_EXTRA_ARGS, priority=True),
    # SageMaker: the body is a chat or completions request (tried in that order by vLLM).
    Route("/invocations", VLLM_XARGS, stream_options=True, priority=True, beam_search=True),
    # Render routes return the GenerateRequest the generation route would send; its
    # sampling_params.extra_args carry the k, so a later /inference/v1/generate runs it.
    Route("/v1/completions/render", VLLM_XARGS, generation=False),
    Route("/v1/chat/completions/render", VLLM_XARGS, generation=False),
    Route("/v1/responses/render", VLLM_XARGS, generation=False),
    Route("/v1/messages/render", VLLM_XARGS, generation=False),
    Route(
        "/cohere/v2/chat", None, top_level_k=False,
        why_not="vLLM converts Cohere requests to chat requests without vllm_xargs",
    ),
    Route(
        "/cohere/v2/chat/render", None, top_level_k=False, generation=False,
        why_not="vLLM converts Cohere requests to chat requests without vllm_xargs",
    ),
    Route(
        "/generative_scoring", None,
        why_not="vLLM builds this route's sampling parameters without per-request arguments",
    ),
    Route(
        "/v1/systemone", None,
        why_not="vLLM builds this route's sampling parameters without per-request arguments",
    ),
    Route(
        "/v1/audio/transcriptions", None, multipart=True,
        why_not="the layer does not rewrite form-encoded bodies",
    ),
    Route(
        "/v1/audio/translations", None, multipart=True,
        why_not="the layer does not rewrite form-encoded bodies",
    ),
)
ROUTES: dict[str, Route] = {r.path: r for r in _ROUTES}

# POST routes that run no generation: declared k does not apply, the layer stays out of the way.
NOT_GENERATION = frozenset({
    "/v1/messages/count_tokens", "/tokenize", "/detokenize",
    "/v1/completions/derender", "/v1/chat/completions/derender",
    "/pooling", "/classify", "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank",
    "/v1/embeddings", "/v2/embed",
    "/ping", "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
    "/start_profile", "/stop_profile", "/reset_prefix_cache", "/reset_mm_cache",
    "/reset_encoder_cache", "/collective_rpc", "/sleep", "/wake_up", "/release_kv_cache_memory",
    "/scale_elastic_ep", "/is_scaling_elastic_ep", "/fault_tolerance/apply",
    "/pause", "/resume", "/abort_requests", "/inference/v1/abort_requests",
    "/init_weight_transfer_engine", "/shutdown_weight_transfer_engine", "/start_weight_update",
    "/start_draft_weight_update", "/update_weights", "/finish_weight_update",
    "/update_weight_version", "/weight_checker",
    "/v1/responses/{response_id}/cancel",
})


def route_for(path: str) -> Route | None:
    return ROUTES.get(path)
