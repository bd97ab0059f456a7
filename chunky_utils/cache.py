"""The activation cache: seed-named per-layer subset means in a folder per model, written atomically."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from chunky_utils.data import safe_label

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
MEAN_FILE_KEYS = ("mean_vector", "norm", "subset", "n_samples", "layer", "model_name")


# ---------------------------------------------------------------- atomic writes


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temp = Path(temp_name)
    try:
        write(temp)
        temp.chmod(0o666 & ~_current_umask())  # mkstemp makes 0600 files; give them the usual mode
        with temp.open("rb") as synced:
            os.fsync(synced.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, payload: Any) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def atomic_torch_save(path: Path, payload: Any) -> Path:
    return atomic_write(path, lambda temp: torch.save(payload, temp))


# ---------------------------------------------------------------- keys


@dataclass(frozen=True)
class CacheKey:
    """Everything besides subset, sample count and layer that changes a cached mean."""

    model_name: str
    model_fingerprint: str
    hidden_size: int
    chat_template_hash: str
    read_position: str
    data_source: str
    format_version: int = CACHE_FORMAT_VERSION

    @property
    def folder_name(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        return f"{safe_label(self.model_name.replace('/', '__'))}-{digest}"


@dataclass(frozen=True)
class SubsetMean:
    """One cached subset mean at one layer."""

    subset: str
    n_samples: int
    layer: int
    mean_vector: torch.Tensor
    norm: float
    path: Path


class ActivationCache:
    """Per-model cache folder holding `{subset}_{n_samples}_layer_{layer}.pt` files (the seed's names)."""

    def __init__(self, root: Path | str, key: CacheKey) -> None:
        self.root = Path(root)
        self.key = key
        self.folder = self.root / key.folder_name

    def mean_path(self, subset: str, n_samples: int, layer: int) -> Path:
        return self._inside(f"{safe_label(subset)}_{n_samples}_layer_{layer}.pt")

    def activations_path(self, subset: str, n_samples: int) -> Path:
        return self._inside(f"{safe_label(subset)}_{n_samples}_activations.safetensors")

    def _inside(self, name: str) -> Path:
        path = (self.folder / name).resolve()
        if path.parent != self.folder.resolve():
            raise ValueError(f"cache file name {name!r} escapes the cache folder")
        return path

    def lock_path(self, subset: str, n_samples: int) -> Path:
        return self._inside(f".{safe_label(subset)}_{n_samples}.lock")

    @contextmanager
    def lock(self, subset: str, n_samples: int) -> Iterator[None]:
        """Inter-process lock for computing one subset entry."""
        from filelock import FileLock

        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.lock_path(subset, n_samples))):
            yield

    def _expected(self, subset: str, n_samples: int, layer: int, data_hash: str) -> dict[str, Any]:
        return {
            "subset": subset,
            "n_samples": n_samples,
            "layer": layer,
            "model_name": self.key.model_name,
            "cache_key": asdict(self.key),
            "data_hash": data_hash,
        }

    def load_mean(self, subset: str, n_samples: int, layer: int, data_hash: str) -> SubsetMean | None:
        """The cached mean if present and valid for this key and data; None (with a log line) otherwise."""
        path = self.mean_path(subset, n_samples, layer)
        if not path.is_file():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            problems = [k for k in MEAN_FILE_KEYS if k not in payload]
            for key, value in self._expected(subset, n_samples, layer, data_hash).items():
                if payload.get(key) != value:
                    problems.append(key)
            vector = payload.get("mean_vector")
            if not isinstance(vector, torch.Tensor) or tuple(vector.shape) != (self.key.hidden_size,):
                problems.append("mean_vector shape")
            elif not torch.isfinite(vector).all():
                problems.append("mean_vector values")
        except Exception as exc:  # any unreadable file is treated as absent, never trusted
            log.warning("cache file %s is unreadable (%s): recomputing", path.name, exc.__class__.__name__)
            return None
        if problems:
            log.warning("cache file %s does not match this run (%s): recomputing", path.name, ", ".join(problems))
            return None
        return SubsetMean(subset, n_samples, layer, vector, float(payload["norm"]), path)

    def load_means(
        self, subset: str, n_samples: int, layers: Sequence[int], data_hash: str
    ) -> dict[int, SubsetMean] | None:
        found = {}
        for layer in layers:
            mean = self.load_mean(subset, n_samples, layer, data_hash)
            if mean is None:
                return None
            found[layer] = mean
        return found

    def save(
        self,
        subset: str,
        n_samples: int,
        layers: Sequence[int],
        activations: torch.Tensor,
        data_hash: str,
        prompt_ids: Sequence[str],
    ) -> dict[int, SubsetMean]:
        """Store the per-prompt activations [n, layers, hidden] and the mean file of every layer."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        key_file = self.folder / "cache_key.json"
        if not key_file.exists():
            atomic_write_json(key_file, asdict(self.key))
        metadata = {
            **{k: json.dumps(v) for k, v in self._expected(subset, n_samples, -1, data_hash).items()},
            "layers": json.dumps(list(layers)),
            "prompt_ids": json.dumps(list(prompt_ids)),
        }
        atomic_write(
            self.activations_path(subset, n_samples),
            lambda temp: save_file({"activations": activations.contiguous()}, str(temp), metadata=metadata),
        )
        means = {}
        for position, layer in enumerate(layers):
            vector = activations[:, position, :].mean(dim=0).contiguous()
            payload = {
                **self._expected(subset, n_samples, layer, data_hash),
                "mean_vector": vector,
                "norm": float(vector.norm()),
            }
            path = atomic_torch_save(self.mean_path(subset, n_samples, layer), payload)
            means[layer] = SubsetMean(subset, n_samples, layer, vector, payload["norm"], path)
        return means

    def load_activations(self, subset: str, n_samples: int, data_hash: str) -> tuple[torch.Tensor, list[int]] | None:
        """Per-prompt activations [n, layers, hidden] and their layer list, if cached and valid."""
        from safetensors import safe_open

        path = self.activations_path(subset, n_samples)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensor = handle.get_tensor("activations")
            expected = self._expected(subset, n_samples, -1, data_hash)
            if any(json.loads(metadata.get(k, "null")) != v for k, v in expected.items()):
                log.warning("cached activations %s do not match this run: ignored", path.name)
                return None
            return tensor, json.loads(metadata["layers"])
        except Exception as exc:
            log.warning("cached activations %s unreadable (%s): ignored", path.name, exc.__class__.__name__)
            return None
