"""phds-serve: declared-k serving for Mixture-of-Experts LLMs.

One checkpoint, any k: each request declares how many routed experts its tokens
may use, and requests of different k share one continuous batch in vLLM.
"""

from phds_serve.declared_k import K_FIELD, InvalidK, KPolicy, parse_k

__all__ = ["K_FIELD", "InvalidK", "KPolicy", "parse_k"]
__version__ = "0.1.0"
