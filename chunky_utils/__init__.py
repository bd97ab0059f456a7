"""chunky_utils: contrastive activation steering for chat models (see README and ARCHITECTURE.md).

The verbs a notebook needs, in the order of a run:

    loaded = load_model()                                   # the embedded model (or any hub id / folder)
    vector = extract(loaded, target_prompts, baseline_prompts, layers=[16])   # no cache
    # or, cached: contrastive_vector(subset_means(loaded, load_prompt_set("12", 100), [16], "cache"), ...)
    with vector.apply(loaded.model, scale=2.0): ...         # steer every forward inside
    out = generate_with_scales(loaded, prompts, 16, vector, [0.0, 2.0], GenerationSettings())
    records = Runner(loaded).run(RunConfig("12", "0", 16))  # the CLI's whole run, as values
"""

from chunky_utils.activations import extract_last_token_activations, subset_means
from chunky_utils.config import RunConfig
from chunky_utils.data import TULU_SET_LABELS, TULU_SET_MAP, load_prompt_set
from chunky_utils.errors import UsageError
from chunky_utils.generation import GenerationSettings, generate_rows, generate_with_scales
from chunky_utils.models import EMBEDDED_MODEL_ID, LoadedModel, find_decoder_layers, load_model
from chunky_utils.pipeline import Runner, run_experiment
from chunky_utils.steering import SteeringVector, contrastive_vector, extract

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
