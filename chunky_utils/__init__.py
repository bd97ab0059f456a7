"""chunky_utils: contrastive activation steering for chat models (see README and ARCHITECTURE.md).

The verbs a notebook needs, in the order of a run:

    loaded = load_model()                                   # the embedded model (or any hub id / folder)
    vector = extract(loaded, target_prompts, baseline_prompts, layers=[16])   # no cache
    # or, cached: contrastive_vector(subset_means(loaded, load_prompt_set("12", 100), [16], "cache"), ...)
    with vector.apply(loaded.model, scale=2.0): ...         # steer every forward inside
    out = generate_with_scales(loaded, prompts, 16, vector, [0.0, 2.0], GenerationSettings())
    records = Runner(loaded).run(RunConfig("12", "0", 16))  # the CLI's whole run, as values
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> module. Imported on first use, so `import chunky_utils.cli` or `chunky_utils.sweep` stays light.
_EXPORTS: dict[str, str] = {
    "EMBEDDED_MODEL_ID": "chunky_utils.options",
    "TULU_SET_LABELS": "chunky_utils.data",
    "TULU_SET_MAP": "chunky_utils.data",
    "GenerationSettings": "chunky_utils.generation",
    "LoadedModel": "chunky_utils.models",
    "RunConfig": "chunky_utils.config",
    "Runner": "chunky_utils.pipeline",
    "SteeringVector": "chunky_utils.steering",
    "UsageError": "chunky_utils.errors",
    "contrastive_vector": "chunky_utils.steering",
    "extract": "chunky_utils.steering",
    "extract_last_token_activations": "chunky_utils.activations",
    "find_decoder_layers": "chunky_utils.layers",
    "generate_rows": "chunky_utils.generation",
    "generate_with_scales": "chunky_utils.generation",
    "load_model": "chunky_utils.models",
    "load_prompt_set": "chunky_utils.data",
    "run_experiment": "chunky_utils.pipeline",
    "subset_means": "chunky_utils.activations",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'chunky_utils' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "EMBEDDED_MODEL_ID",
    "TULU_SET_LABELS",
    "TULU_SET_MAP",
    "GenerationSettings",
    "LoadedModel",
    "RunConfig",
    "Runner",
    "SteeringVector",
    "UsageError",
    "__version__",
    "contrastive_vector",
    "extract",
    "extract_last_token_activations",
    "find_decoder_layers",
    "generate_rows",
    "generate_with_scales",
    "load_model",
    "load_prompt_set",
    "run_experiment",
    "subset_means",
]
