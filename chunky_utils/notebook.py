"""Helpers the notebooks share: the project root, the subsets to compare, cached means and per-prompt activations."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from chunky_utils.activations import SubsetMeans, cache_key_for, extract_last_token_activations, subset_means
from chunky_utils.cache import ActivationCache
from chunky_utils.config import RunConfig
from chunky_utils.data import TULU_SET_MAP, PromptSet, load_prompt_set, parse_subset
from chunky_utils.errors import UsageError
from chunky_utils.models import LoadedModel, check_layer

if TYPE_CHECKING:
    import pandas as pd


def project_root(start: Path | str | None = None) -> Path | None:
    """The workbench folder (holding pyproject.toml and chunky_utils/) at or above `start` (default: cwd)."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "chunky_utils").is_dir():
            return folder
    return None


def use_project_root(start: Path | str | None = None) -> Path:
    """Change into the project root, so relative paths mean what they mean for the CLI; return the folder used.

    JupyterLab starts kernels in `notebooks/`; outside the project the working folder stays as it is.
    """
    root = project_root(start)
    if root is not None:
        os.chdir(root)
    return Path.cwd()


SUBSET_FIELDS: tuple[str, ...] = ("target_subset", "baseline_subset", "inference_dataset")


def config_from_parameters(parameters: Mapping[str, Any], **overrides: Any) -> RunConfig:
    """A validated `RunConfig` from a notebook's parameters (e.g. `globals()`): the names that are RunConfig
    fields are used, the rest ignored. Subsets become strings and the scale a float, since papermill's `-p 12`
    passes an int and the settings hash must match the CLI's."""
    values = {name: parameters[name] for name in RunConfig.field_names() if name in parameters}
    values.update(overrides)
    for name in SUBSET_FIELDS:
        if values.get(name) is not None:
            values[name] = str(values[name])
    if "scale" in values:
        try:
            values["scale"] = float(values["scale"])
        except (TypeError, ValueError):
            raise UsageError(f"scale must be a number, got {values['scale']!r}") from None
    try:
        config = RunConfig(**values)
    except TypeError as exc:
        raise UsageError(f"cannot build a run from these parameters: {exc}") from None
    return config.validated()


def subsets_to_compare(
    target_subset: str, baseline_subset: str, extra_subsets: Iterable[str] = (), all_subsets: bool = False
) -> list[str]:
    """Target and baseline first, then the extra subsets (or every Tulu key), each once."""
    if isinstance(extra_subsets, str):
        raise UsageError(f"extra_subsets must be a list of subset keys, got the string {extra_subsets!r}")
    wanted = [str(target_subset), str(baseline_subset), *map(str, extra_subsets)]
    if all_subsets:
        wanted += list(TULU_SET_MAP)
    ordered: list[str] = []
    for subset in wanted:
        parse_subset(subset)
        if subset not in ordered:
            ordered.append(subset)
    return ordered


def load_prompt_sets(subsets: Sequence[str], n_samples: int, data_source: str, seed: int) -> dict[str, PromptSet]:
    """One seeded prompt draw per subset, keyed by the subset argument."""
    return {subset: load_prompt_set(subset, n_samples, data_source, seed) for subset in subsets}


def all_layer_means(
    loaded: LoadedModel,
    prompt_sets: Mapping[str, PromptSet],
    cache_dir: Path | str,
    read_position: str = "generation_prompt",
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, SubsetMeans]:
    """Every layer's mean for each prompt set: from the cache, or one extraction pass per set (then cached)."""
    layers = list(range(loaded.n_layers))
    return {
        subset: subset_means(
            loaded, prompt_set, layers, cache_dir, read_position, "all", batch_size=batch_size, progress=progress
        )
        for subset, prompt_set in prompt_sets.items()
    }


def prompt_activations(
    loaded: LoadedModel,
    prompt_set: PromptSet,
    layer: int,
    cache_dir: Path | str,
    read_position: str = "generation_prompt",
    batch_size: int = 16,
) -> torch.Tensor:
    """Per-prompt activations [n_prompts, hidden] at `layer`, from the cache when it holds them."""
    check_layer(loaded.model, layer)
    cache = ActivationCache(cache_dir, cache_key_for(loaded, read_position, prompt_set.data_source))
    found = cache.load_activations(prompt_set.subset, len(prompt_set.rows), prompt_set.content_hash)
    if found is not None:
        activations, layers = found
        if layer in layers:
            return activations[:, layers.index(layer), :]
    activations, _ = extract_last_token_activations(
        loaded.model,
        loaded.tokenizer,
        prompt_set.prompts,
        [layer],
        batch_size=batch_size,
        read_position=read_position,
        progress=False,
    )
    return activations[:, 0, :]


def means_table(means: Mapping[str, SubsetMeans], layer: int) -> pd.DataFrame:
    """One row per subset: what it is, how many prompts, where they came from, cache hit, norm and file at `layer`."""
    import pandas as pd

    from chunky_utils.tables import subset_title

    rows = []
    for subset, subset_mean in means.items():
        if layer not in subset_mean.means:
            raise UsageError(f"subset {subset} has no mean at layer {layer}")
        mean = subset_mean.means[layer]
        rows.append(
            {
                "subset": subset_title(subset),
                "prompts": len(subset_mean.prompt_set.rows),
                "data source": subset_mean.prompt_set.data_source,
                "from cache": subset_mean.cache_hit,
                f"norm at layer {layer}": mean.norm,
                "cache file": str(mean.path),
            }
        )
    return pd.DataFrame(rows)
