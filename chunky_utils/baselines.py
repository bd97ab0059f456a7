"""The baseline cache: unsteered answers (and their metrics) reused by every later run that asks the same.

An unsteered answer depends on the model, its chat template, the prompt, the decoding settings and the
seed, never on the vector, layer, scale or target/baseline pair. With the shared random stream
(chunky_utils.sampling) it does not depend on the batch either, so a run at another layer, scale or pair
generates only its steered rows. Each entry also keeps the answer's mean activation at every layer, so the
concept metrics of any later vector are read without running the model again.

Layout: `{cache}/baselines/{model}-{key}/{prompt hash}.safetensors`, `key.json` says what the key holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chunky_utils.cache import atomic_write, atomic_write_json
from chunky_utils.chat import chat_template_hash
from chunky_utils.data import safe_label
from chunky_utils.generation import GenerationSettings
from chunky_utils.models import LoadedModel

log = logging.getLogger(__name__)

BASELINE_FORMAT_VERSION = 1
VECTOR_FREE_METRICS: tuple[str, ...] = ("perplexity", "distinct_2", "relevance", "n_tokens")
"""Metrics of an unsteered answer that do not depend on the steering vector (the others are re-read per vector)."""


@dataclass
class Baseline:
    """One cached unsteered answer."""

    text: str
    metrics: dict[str, Any] | None = None  # VECTOR_FREE_METRICS, when the answer was scored
    layer_means: torch.Tensor | None = None  # [n_layers, hidden]: mean activation over the answer's tokens


def baseline_key(loaded: LoadedModel, settings: GenerationSettings) -> dict[str, Any]:
    """Everything an unsteered answer depends on besides the prompt."""
    parameter = next(loaded.model.parameters())
    return {
        "format": BASELINE_FORMAT_VERSION,
        "model_name": loaded.name,
        "model_fingerprint": loaded.fingerprint,
        "chat_template_hash": chat_template_hash(loaded.tokenizer),
        "device_type": parameter.device.type,
        "dtype": str(parameter.dtype),
        **settings.decoding_key(),
    }


class BaselineCache:
    """Unsteered answers of one model under one set of decoding settings, one file per prompt."""

    def __init__(self, root: Path | str, loaded: LoadedModel, settings: GenerationSettings) -> None:
        self.key = baseline_key(loaded, settings)
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:12]
        self.folder = Path(root) / "baselines" / f"{safe_label(loaded.name)}-{digest}"

    def path(self, prompt: str) -> Path:
        return self.folder / f"{hashlib.sha256(prompt.encode('utf-8')).hexdigest()[:24]}.safetensors"

    def get(self, prompt: str) -> Baseline | None:
        """The cached answer to `prompt`, or None (absent, unreadable or another prompt's)."""
        path = self.path(prompt)
        if not path.exists():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                header = json.loads((handle.metadata() or {}).get("baseline", "{}"))
                layer_means = handle.get_tensor("layer_means") if "layer_means" in handle.keys() else None  # noqa: SIM118
        except Exception as exc:  # a corrupt entry is recomputed, never used
            log.warning("baseline cache entry %s is unreadable (%s): regenerating", path.name, exc)
            return None
        if header.get("prompt") != prompt or header.get("key") != self.key:
            return None
        return Baseline(header["text"], header.get("metrics"), layer_means)

    def put(self, prompt: str, baseline: Baseline) -> None:
        from safetensors.torch import save_file

        header = {"prompt": prompt, "key": self.key, "text": baseline.text, "metrics": baseline.metrics}
        tensors = {"layer_means": baseline.layer_means.contiguous().float()} if baseline.layer_means is not None else {}
        self.folder.mkdir(parents=True, exist_ok=True)
        key_file = self.folder / "key.json"
        if not key_file.exists():
            atomic_write_json(key_file, self.key)
        atomic_write(
            self.path(prompt), lambda temp: save_file(tensors, str(temp), metadata={"baseline": json.dumps(header)})
        )

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Inter-process lock for one prompt set's baselines: a second sweep worker waits, then reads them."""
        from filelock import FileLock

        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.folder / f".{safe_label(name)}.lock")):
            yield
