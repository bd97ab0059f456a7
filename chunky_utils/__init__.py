"""chunky_utils: contrastive activation steering for chat models (see README)."""

from chunky_utils.config import RunConfig
from chunky_utils.data import TULU_SET_LABELS, TULU_SET_MAP, load_prompt_set
from chunky_utils.errors import UsageError
from chunky_utils.models import EMBEDDED_MODEL_ID, LoadedModel, find_decoder_layers, load_model
from chunky_utils.steering import SteeringVector

__version__ = "0.1.0"

__all__ = [
    "EMBEDDED_MODEL_ID",
    "TULU_SET_LABELS",
    "TULU_SET_MAP",
    "LoadedModel",
    "RunConfig",
    "SteeringVector",
    "UsageError",
    "__version__",
    "find_decoder_layers",
    "load_model",
    "load_prompt_set",
]
