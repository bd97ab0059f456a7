"""The subsets a notebook compares: their seeded prompt draws, cached means at every layer, per-prompt
activations, and readable tables of them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from chunky_utils.activations import SubsetMeans, cache_key_for, extract_last_token_activations, prompt_sets_means
from chunky_utils.cache import ActivationCache
from chunky_utils.data import TULU_SET_MAP, PromptSet, load_prompt_set, parse_subset
from chunky_utils.errors import UsageError
from chunky_utils.models import LoadedModel, check_layer
from chunky_utils.options import BATCH_ROWS

if TYPE_CHECKING:
    import pandas as pd


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
    batch_size: int = BATCH_ROWS,
    progress: bool = False,
) -> dict[str, SubsetMeans]:
    """Every layer's mean for each prompt set: from the cache, or one extraction call for the misses (then cached)."""
    layers = list(range(loaded.n_layers))
    found = prompt_sets_means(
        loaded, list(prompt_sets.values()), layers, cache_dir, read_position, "all", batch_size, progress
    )
    return dict(zip(prompt_sets, found, strict=True))


def prompt_activations(
    loaded: LoadedModel,
    prompt_set: PromptSet,
    layer: int,
    cache_dir: Path | str,
    read_position: str = "generation_prompt",
    batch_size: int = BATCH_ROWS,
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


def example_prompts_html(prompt_sets: Mapping[str, PromptSet], n: int = 3, limit: int = 300) -> str:
    """The first `n` drawn prompts of each subset (cut to `limit` characters), as a wrapped HTML table."""
    import html

    from chunky_utils.html_blocks import CELL_STYLE
    from chunky_utils.tables import subset_title

    rows = []
    for subset, prompt_set in prompt_sets.items():
        examples = "".join(
            f'<li style="margin-bottom:4px">{html.escape(p if len(p) <= limit else p[: limit - 3] + "...")}</li>'
            for p in prompt_set.prompts[:n]
        )
        rows.append(
            f'<tr><td style="{CELL_STYLE};width:16em"><b>{html.escape(subset_title(subset))}</b><br>'
            f'<span style="color:#666">{len(prompt_set.rows)} prompts, {html.escape(prompt_set.data_source)}</span>'
            f'</td><td style="{CELL_STYLE}"><ol style="margin:0;padding-left:1.4em">{examples}</ol></td></tr>'
        )
    return (
        '<table class="chunky-examples" style="line-height:1.4;table-layout:fixed;width:100%;'
        'border-collapse:collapse;font-size:13px">'
        f'<thead><tr><th style="{CELL_STYLE}">subset</th><th style="{CELL_STYLE}">first {n} drawn prompts</th>'
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
