"""Helpers the notebooks share: the project root, the subsets to compare, cached means and per-prompt activations."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from chunky_utils.activations import SubsetMeans, cache_key_for, extract_last_token_activations, subset_means
from chunky_utils.cache import ActivationCache
from chunky_utils.config import RunConfig
from chunky_utils.data import TULU_SET_MAP, PromptSet, load_prompt_set, parse_subset
from chunky_utils.errors import UsageError
from chunky_utils.models import LoadedModel, check_layer
from chunky_utils.options import BATCH_ROWS

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
    batch_size: int = BATCH_ROWS,
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


# ---------------------------------------------------------------- your own prompts


def typed_prompts(value: str | Sequence[str] | None) -> list[str]:
    """Prompts from a text box (one per line) or a list: stripped, empty ones dropped."""
    if value is None:
        return []
    lines = value.splitlines() if isinstance(value, str) else [str(item) for item in value]
    return [line.strip() for line in lines if line.strip()]


def prompts_file(prompts: Sequence[str], folder: Path | str) -> Path:
    """A JSONL prompt file holding `prompts` (named by their content, so the same prompts reuse one file):
    what `--inference-dataset` takes, so the CLI can rerun the same prompts."""
    import hashlib
    import json

    from chunky_utils.cache import atomic_write_text

    prompts = typed_prompts(prompts)
    if not prompts:
        raise UsageError("no prompts given: type at least one (one per line)")
    lines = [json.dumps({"id": f"typed-{i}", "prompt": p}, ensure_ascii=False) for i, p in enumerate(prompts)]
    text = "".join(line + "\n" for line in lines)
    path = Path(folder) / f"typed_{hashlib.sha256(text.encode()).hexdigest()[:10]}.jsonl"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    return path


def with_typed_prompts(config: RunConfig, prompts: str | Sequence[str] | None) -> RunConfig:
    """`config` generating for your own prompts (all of them, in order, none excluded as vector prompts);
    unchanged when `prompts` is empty. The prompts go to `{output_dir}/prompts/typed_<hash>.jsonl`."""
    found = typed_prompts(prompts)
    if not found:
        return config
    path = prompts_file(found, Path(config.output_dir) / "prompts")
    return config.with_changes(inference_dataset=str(path), inference_n_samples=-1, include_vector_prompts=True)


# ---------------------------------------------------------------- the same run from the command line

CLI_PROGRAM = "test_tulu_contrastive_steering"
_CLI_SWITCHES = {
    "include_vector_prompts": (True, "--include-vector-prompts"),
    "trust_remote_code": (True, "--trust-remote-code"),
    "overwrite": (True, "--overwrite"),
    "metrics": (False, "--no-metrics"),
    "reuse_baselines": (False, "--no-baseline-cache"),
}
_CLI_SKIPPED = frozenset({"progress"})  # a display setting: -q only quiets the log


def cli_command(config: RunConfig, program: str = CLI_PROGRAM) -> str:
    """The command line that runs `config`: the required flags, then every setting that is not the default."""
    import dataclasses
    import shlex

    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    parts = [program]
    for name in RunConfig.field_names():
        value = getattr(config, name)
        required = defaults[name] is dataclasses.MISSING
        if name in _CLI_SKIPPED or (not required and value == defaults[name]):
            continue
        if name in _CLI_SWITCHES:
            wanted, flag = _CLI_SWITCHES[name]
            if bool(value) == wanted:
                parts.append(flag)
            continue
        if value is None:
            continue
        parts += [f"--{name.replace('_', '-')}", shlex.quote(str(float(value) if name == "scale" else value))]
    return " ".join(parts)


# ---------------------------------------------------------------- scale guidance


@dataclass(frozen=True)
class ScaleBands:
    """Bands of the relative magnitude (|scale| x vector norm / the layer's mean residual norm).

    `subtle_below`: under it, fewer than half the steered answers change much from the baseline (difflib
    change under CHANGED_AT); `collapse_from`: at and above it, at least half collapse (chunky_utils.collapse).
    """

    subtle_below: float
    collapse_from: float
    source: str

    def band(self, relative: float) -> str:
        if relative < self.subtle_below:
            return "subtle"
        if relative < self.collapse_from:
            return "strong"
        return "likely to collapse"


CHANGED_AT = 0.5
"""A steered answer counts as changed when 1 - difflib similarity to its baseline is at least this."""
MIN_RUNS_FOR_BANDS = 6

DEFAULT_BANDS = ScaleBands(
    subtle_below=0.071,
    collapse_from=0.71,
    source="24 runs of SmolLM2-135M-Instruct, docs/scale_bands.md",
)
"""What scripts/measure_scale_bands.py found on the embedded model (docs/scale_bands.md has the table)."""


def run_strength_table(sources: Any, model_name: str | None = None) -> pd.DataFrame:
    """One row per results file: relative magnitude, share of steered answers changed, share collapsed."""
    import difflib

    import pandas as pd

    from chunky_utils.collapse import row_collapse
    from chunky_utils.results import iter_results_files, read_results

    paths = []
    for source in [sources] if isinstance(sources, str | Path) else list(sources):
        source = Path(source)
        paths += list(iter_results_files(source)) if source.is_dir() else [source]
    records = []
    for path in paths:
        try:
            payload = read_results(path)
        except UsageError:
            continue
        meta, rows = payload["metadata"], payload["results"]
        if model_name is not None and meta.get("model_name") != model_name:
            continue
        norms = [meta.get("target_norm"), meta.get("baseline_norm")]
        if not rows or meta.get("effective_magnitude") is None or any(not isinstance(n, int | float) for n in norms):
            continue
        mean_norm = (float(norms[0]) + float(norms[1])) / 2
        changes = [
            1 - difflib.SequenceMatcher(None, str(r.get("baseline") or ""), str(r.get("steered") or "")).ratio()
            for r in rows
        ]
        records.append(
            {
                "path": str(path),
                "model_name": meta.get("model_name"),
                "layer": meta.get("layer"),
                "scale": meta.get("scale"),
                "relative_magnitude": abs(float(meta["effective_magnitude"])) / mean_norm if mean_norm else math.inf,
                "changed_share": sum(c >= CHANGED_AT for c in changes) / len(rows),
                "collapsed_share": sum(row_collapse(r, "steered") is not None for r in rows) / len(rows),
                "n": len(rows),
            }
        )
    return pd.DataFrame.from_records(
        records,
        columns=["path", "model_name", "layer", "scale", "relative_magnitude", "changed_share", "collapsed_share", "n"],
    )


def threshold(values: Sequence[float], positive: Sequence[bool]) -> float:
    """The cut that best separates `positive` points (meant to lie at or above it) from the rest, halfway
    (geometrically) between two measured values; inf when no point is positive, 0 when all are. Values equal
    to two significant digits count as one level, so runs asked for the same share never get split."""
    if not any(positive):
        return math.inf
    if all(positive):
        return 0.0
    levels: dict[float, list[bool]] = {}
    for value, flag in zip(values, positive, strict=True):
        levels.setdefault(float(f"{value:.2g}"), []).append(bool(flag))
    ordered = sorted(levels)
    best_errors, best_cut = math.inf, math.inf
    for index in range(len(ordered) + 1):
        below, above = ordered[:index], ordered[index:]
        errors = sum(sum(levels[v]) for v in below) + sum(len(levels[v]) - sum(levels[v]) for v in above)
        if errors < best_errors:
            low = below[-1] if below else 0.0
            high = above[0] if above else math.inf
            best_errors = errors
            best_cut = math.sqrt(low * high) if low > 0 and math.isfinite(high) else (high if low <= 0 else low)
    return best_cut


def scale_bands(sources: Any, model_name: str | None = None, source: str | None = None) -> ScaleBands | None:
    """Bands read from finished results (at least MIN_RUNS_FOR_BANDS files), else None."""
    table = run_strength_table(sources, model_name)
    if len(table) < MIN_RUNS_FOR_BANDS or table["relative_magnitude"].nunique() < 3:
        return None
    values = table["relative_magnitude"].tolist()
    subtle = threshold(values, (table["changed_share"] >= 0.5).tolist())
    collapse = threshold(values, (table["collapsed_share"] >= 0.5).tolist())
    where = source or f"{len(table)} runs{f' of {model_name}' if model_name else ''}"
    return ScaleBands(min(subtle, collapse), collapse, where)


# ---------------------------------------------------------------- readable tables for the notebooks


def example_prompts_html(prompt_sets: Mapping[str, PromptSet], n: int = 3, limit: int = 300) -> str:
    """The first `n` drawn prompts of each subset (cut to `limit` characters), as a wrapped HTML table."""
    import html

    from chunky_utils.tables import CELL_STYLE, subset_title

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


def per_layer_table(frame: pd.DataFrame, experiment: str | None = None) -> pd.DataFrame:
    """Per layer: the best scale (with its concept delta and perplexity), where fluency collapses, and a note
    saying why a layer has no best scale instead of leaving a row of NaN."""
    import pandas as pd

    from chunky_utils.metric_views import best_scale_per_layer, collapse_scale_per_layer, layer_scale_summary

    summary = layer_scale_summary(frame, experiment)
    best = best_scale_per_layer(frame, experiment).set_index("layer")
    collapse = collapse_scale_per_layer(frame, experiment).set_index("layer")
    records = []
    for layer, cells in summary.groupby("layer", sort=True):
        steered = cells[cells["scale"] != 0.0]
        row = best.loc[layer]
        found = not pd.isna(row["best_scale"])
        if found:
            note = ""
        elif not steered.empty and steered["collapsed"].all():
            note = "every steered scale collapsed (✕)"
        elif steered["concept_delta"].isna().all():
            note = "no concept scores (every answer empty, or run with --no-metrics)"
        else:
            note = "no scale that kept fluency raised the concept above the baseline"
        positive, negative = collapse.loc[layer, "collapse_scale"], collapse.loc[layer, "collapse_scale_negative"]
        records.append(
            {
                "layer": int(layer),
                "best scale": float(row["best_scale"]) if found else None,
                "concept delta there": float(row["concept_delta"]) if found else None,
                "perplexity there": float(row["perplexity"]) if found else None,
                "collapses from scale": (
                    f"{positive:g}" if not pd.isna(positive) else f"none up to {steered['scale'].max():g}"
                )
                if (steered["scale"] > 0).any()
                else "no positive scale run",
                "collapses from negative scale": (
                    f"{negative:g}" if not pd.isna(negative) else f"none down to {steered['scale'].min():g}"
                )
                if (steered["scale"] < 0).any()
                else "no negative scale run",
                "note": note,
            }
        )
    return pd.DataFrame.from_records(records)
