"""Your own prompts: typed in a box or passed as a parameter, written to a prompt file the CLI can rerun."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from chunky_utils.config import RunConfig
from chunky_utils.errors import UsageError


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
