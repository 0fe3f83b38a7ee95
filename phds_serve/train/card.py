"""Model card (README.md) for a PHDS checkpoint: what it was trained on and how."""

from __future__ import annotations

import json
from typing import Any, Sequence


def results_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of per-k eval rows (k, loss, ppl, acc, agreement with native k)."""
    if not rows:
        return "_not evaluated_\n"
    lines = [
        "| k | held-out loss | perplexity | next-token acc | agreement with native k |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        agree = r.get("agreement_with_reference")
        lines.append(
            f"| {r['k']} | {r['loss']:.4f} | {r['perplexity']:.2f} | {r['accuracy']:.4f} | "
            f"{'' if agree is None else f'{agree:.4f}'} |"
        )
    return "\n".join(lines) + "\n"


def model_card(
    title: str,
    base: str,
    phds: dict[str, Any],
    data: str,
    results: Sequence[dict[str, Any]] = (),
    extra: str = "",
) -> str:
    """A short card: lineage, data, recipe (the exact config.phds), results, how to serve."""
    return f"""---
library_name: transformers
tags: [moe, phds, declared-k]
---
# {title}

Base: {base}

## Data
{data}

## Recipe
{phds.get('recipe', '')}: k per optimizer step as recorded below (also in `config.json` under `phds`).
Routing while training: `{phds.get('routing', 'topk')}`. Load-balancing loss coefficient {phds.get('aux_loss_coef', 0.0)}.

```json
{json.dumps(phds, indent=2, sort_keys=True)}
```

## Results (held-out)
{results_table(results)}
{extra}
## Use
Serve with phds-serve and declare k per request (`"k": K` in the body, or
`vllm_xargs: {{"k": K}}`); k ranges over 1..native k (`num_experts_per_tok`).
In transformers, k is `config.num_experts_per_tok` (set it before loading).
"""
