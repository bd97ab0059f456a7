"""Loading models (hub, local, the embedded SmolLM2, tiny random), what identifies one (fingerprint).

Chat templates and tokenisation live in `chat`, the embedded model's GGUF conversion in `embedded_model`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chunky_utils.chat import CHATML_TEMPLATE
from chunky_utils.embedded_model import convert_embedded_model, embedded_model_dir
from chunky_utils.errors import UsageError
from chunky_utils.layers import check_layer as check_layer  # re-exported: models owned these before layers
from chunky_utils.layers import find_decoder_layers as find_decoder_layers

log = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "embedded:smollm2-135m-instruct"
TINY_MODEL_PREFIX = "tiny-random:"
TINY_ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma", "gpt2", "gpt_neox")


@dataclass
class LoadedModel:
    """A causal LM ready for extraction and generation, with what identifies it."""

    model: nn.Module
    tokenizer: Any
    name: str
    fingerprint: str

    @property
    def n_layers(self) -> int:
        return len(find_decoder_layers(self.model))

    @property
    def hidden_size(self) -> int:
        return int(hidden_size_of(self.model))

    @property
    def device(self) -> torch.device:
        return input_device(self.model)


def hidden_size_of(model: nn.Module) -> int:
    """Width of the residual stream, from the config (text config first) or the input embeddings."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None) or config
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(text_config, attr, None)
        if value:
            return int(value)
    return int(model.get_input_embeddings().weight.shape[1])


def input_device(model: nn.Module) -> torch.device:
    """Device of the input embeddings: where a batch's token ids go."""
    return model.get_input_embeddings().weight.device


# ---------------------------------------------------------------- fingerprint


def model_fingerprint(model: nn.Module, name: str) -> str:
    """Hash of the name, the config and a strided sample of the weights (cheap even for 8B models)."""
    digest = hashlib.sha256(name.encode())
    config = getattr(model, "config", None)
    if config is not None:
        config_dict = {
            k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"
        }
        digest.update(json.dumps(config_dict, sort_keys=True, default=str).encode())
    params = list(model.parameters())
    for param in (params[0], params[len(params) // 2], params[-1]):
        flat = param.detach().reshape(-1)
        stride = max(1, flat.numel() // 4096)
        sample = flat[::stride][:4096].float().cpu().numpy()
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- tiny random models


def build_byte_tokenizer() -> Any:
    """A byte-level tokenizer with a ChatML template, built offline in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=[],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def build_tiny_model(
    architecture: str = "llama", n_layers: int = 4, hidden_size: int = 64, seed: int = 0
) -> LoadedModel:
    """A random-weight model of a real architecture, for tests and dry runs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_byte_tokenizer()
    vocab_size = len(tokenizer)
    common: dict[str, Any] = {"vocab_size": vocab_size, "eos_token_id": tokenizer.eos_token_id}
    if architecture == "gpt2":
        kwargs = {"n_embd": hidden_size, "n_layer": n_layers, "n_head": 4, "n_positions": 2048, **common}
    else:
        kwargs = {
            "hidden_size": hidden_size,
            "num_hidden_layers": n_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2 if architecture != "gpt_neox" else None,
            "intermediate_size": hidden_size * 2,
            "max_position_embeddings": 2048,
            **common,
        }
        if architecture == "gemma":
            kwargs["head_dim"] = hidden_size // 4
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if architecture not in TINY_ARCHITECTURES:
        raise UsageError(f"unknown tiny architecture {architecture!r}: choose one of {', '.join(TINY_ARCHITECTURES)}")
    config = AutoConfig.for_model(architecture, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    name = f"{TINY_MODEL_PREFIX}{architecture}:{n_layers}x{hidden_size}"
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, fingerprint=model_fingerprint(model, name))


def parse_tiny_id(model_id: str) -> tuple[str, int, int]:
    """'tiny-random:llama' or 'tiny-random:llama:4x64' -> (architecture, n_layers, hidden_size)."""
    architecture, _, shape = model_id[len(TINY_MODEL_PREFIX) :].partition(":")
    if not shape:
        return architecture, 4, 64
    try:
        n_layers, hidden = (int(x) for x in shape.split("x"))
    except ValueError:
        raise UsageError(f"bad tiny model id {model_id!r}: expected e.g. tiny-random:llama:4x64") from None
    return architecture, n_layers, hidden


# ---------------------------------------------------------------- loading


def peek_n_layers(model_id: str, cache_dir: Path | str = "cache") -> int | None:
    """The layer count from the config alone (no weights), where it is at hand; None otherwise."""
    if model_id.startswith(TINY_MODEL_PREFIX):
        return parse_tiny_id(model_id)[1]
    folder = embedded_model_dir(Path(cache_dir)) if model_id == EMBEDDED_MODEL_ID else Path(model_id)
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    config = config.get("text_config", config)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return None


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """A torch dtype from its name; auto: bfloat16 on CUDA, float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise UsageError(f"unknown dtype {dtype!r}: choose auto, float32, bfloat16 or float16") from None


def resolve_device(device: str) -> str:
    """A device string; auto: cuda when a GPU is available, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} requested but no CUDA GPU is available")
    return device


def check_tensor_parallel(size: int) -> None:
    """Refuse a tensor-parallel size below 1 or above the GPUs available."""
    if size < 1:
        raise UsageError(f"--tensor-parallel-size must be at least 1, got {size}")
    if size > 1:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available < size:
            raise UsageError(f"--tensor-parallel-size {size} needs {size} GPUs but {available} are available")


def load_model(
    model_id: str = EMBEDDED_MODEL_ID,
    cache_dir: Path | str = "cache",
    device: str = "auto",
    dtype: str = "auto",
    tensor_parallel_size: int = 1,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load any causal LM id or folder, the embedded SmolLM2, or a `tiny-random:<arch>` model."""
    check_tensor_parallel(tensor_parallel_size)
    if model_id.startswith(TINY_MODEL_PREFIX):
        architecture, n_layers, hidden = parse_tiny_id(model_id)
        loaded = build_tiny_model(architecture, n_layers=n_layers, hidden_size=hidden)
        log.info("model: %s (random weights, built from a config)", loaded.name)
        return loaded
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source: str | Path = model_id
    if model_id == EMBEDDED_MODEL_ID:
        source = convert_embedded_model(Path(cache_dir))
    started = time.perf_counter()
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if tensor_parallel_size > 1:
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = {
            i: f"{int(torch.cuda.get_device_properties(i).total_memory * 0.9 / 2**30)}GiB"
            for i in range(tensor_parallel_size)
        }
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise UsageError(f"cannot load model {model_id!r}: {str(exc).splitlines()[0]}") from None
    if tensor_parallel_size == 1:
        model = model.to(device)
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    fingerprint = model_fingerprint(model, model_id)
    log.info(
        "model: %s loaded from %s in %.1f s (fingerprint %s)",
        model_id,
        source,
        time.perf_counter() - started,
        fingerprint,
    )
    return LoadedModel(model=model, tokenizer=tokenizer, name=model_id, fingerprint=fingerprint)
