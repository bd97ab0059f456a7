"""Run options declared once: `RunConfig`'s fields carry their help, group, choices and flags here.

The steering command line, `chunky-sweep`'s shared settings, the settings hash and every notebook's
`parameters` cell are generated from these declarations; no option is written anywhere else.
Torch-free, so both command lines start fast and a GPU image without notebook packages can import it.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import MISSING, Field, field, fields
from typing import Any

EMBEDDED_MODEL_ID = "embedded:smollm2-135m-instruct"
READ_POSITIONS: tuple[str, ...] = ("generation_prompt", "user_end")
"""'generation_prompt' reads after the assistant header (the token the model answers from); 'user_end' at the
end of the user turn."""
STEER_POSITIONS: tuple[str, ...] = ("all", "generated")
"""'all' adds the delta at every position, prompt included (the seed's behaviour); 'generated' only where a new
token is predicted: the last prompt token and every decoding step."""
CAPTURE_MODES: tuple[str, ...] = ("all", "needed")
"""'all' reads every layer in the extraction pass (a later layer sweep runs no model); 'needed' stops the pass at
the steering layer (fastest first run)."""
DATA_SOURCES: tuple[str, ...] = ("auto", "hub", "bundled")
BATCH_ROWS = 64
"""Rows per forward or `generate` batch, everywhere unless a caller says otherwise. On a CPU a decoding step
costs nearly the same for 16 or 64 rows (memory-bound), so fewer, fuller batches are faster."""
GROUPS: tuple[str, ...] = ("steering", "inference", "model and data", "output")
GRID_OPTIONS = frozenset(
    {"target_subset", "baseline_subset", "layer", "scale", "inference_dataset", "inference_n_samples"}
)
"""Options a sweep varies over its grid rather than sharing between points."""


def option(
    default: Any = MISSING,
    *,
    help: str,  # noqa: A002 - argparse's word
    group: str,
    choices: tuple[Any, ...] | None = None,
    in_hash: bool = True,
    flag: str | None = None,
    cli: bool = True,
) -> Any:
    """A `RunConfig` field with its declaration. `in_hash`: whether it changes what a run writes; `flag`: the
    command-line spelling when not `--name-with-dashes` (a `--no-...` flag for a boolean that defaults to True)."""
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    if "=" in help:
        raise ValueError(f"help must not contain '=' (papermill skips parameter lines with two): {help!r}")
    metadata = {"help": help, "group": group, "choices": choices, "in_hash": in_hash, "flag": flag, "cli": cli}
    return field(default=default, metadata=metadata)


def declared(config_class: type) -> list[Field[Any]]:
    """The declared fields of a config dataclass, in order."""
    return [f for f in fields(config_class) if "help" in f.metadata]


def flag_of(declaration: Field[Any]) -> str:
    return declaration.metadata["flag"] or "--" + declaration.name.replace("_", "-")


def non_result_fields(config_class: type) -> frozenset[str]:
    """Options that do not change a run's content (left out of the settings hash)."""
    return frozenset(f.name for f in declared(config_class) if not f.metadata["in_hash"])


def finite_float(text: str) -> float:
    """argparse type: a finite float."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


_ARGUMENT_TYPES: dict[str, Any] = {"int": int, "float": finite_float, "str": str, "str | None": str}


def add_options(
    parser: argparse.ArgumentParser, config_class: type, names: frozenset[str] | None = None, shared: bool = False
) -> None:
    """Add the declared options (all, or `names`) to `parser`, one argument group per option group.

    `shared=True` (a sweep's settings): no defaults are set (an absent flag leaves the value to the YAML
    file or `RunConfig`), and boolean flags store their value only when given.
    """
    groups: dict[str, Any] = {}
    for declaration in declared(config_class):
        if not declaration.metadata["cli"] or (names is not None and declaration.name not in names):
            continue
        meta = declaration.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        required = declaration.default is MISSING
        kind = str(declaration.type)
        keywords: dict[str, Any] = {"dest": declaration.name, "help": _help_text(declaration, shared)}
        if kind == "bool":
            keywords["action"] = "store_false" if declaration.default is True else "store_true"
            keywords["default"] = None if shared else declaration.default
        else:
            keywords["type"] = _ARGUMENT_TYPES[kind]
            if meta["choices"]:
                keywords["choices"] = meta["choices"]
            if required and not shared:
                keywords["required"] = True
            else:
                keywords["default"] = None if shared else declaration.default
        group.add_argument(flag_of(declaration), **keywords)


def _help_text(declaration: Field[Any], shared: bool) -> str:
    text = declaration.metadata["help"]
    if declaration.default is MISSING or str(declaration.type) == "bool":
        return text
    return f"{text} (default: {declaration.default})" if not shared else text


def given_options(args: argparse.Namespace, config_class: type) -> dict[str, Any]:
    """The declared options present on a parsed namespace and not None (for `RunConfig(**...)` or overrides)."""
    values = vars(args)
    return {f.name: values[f.name] for f in declared(config_class) if values.get(f.name) is not None}


def parameters_cell(config_class: type, names: list[str], values: dict[str, Any] | None = None) -> list[str]:
    """Lines of a papermill `parameters` cell for declared options: `name: type = value  # help`."""
    values = values or {}
    lines = []
    for declaration in declared(config_class):
        if declaration.name not in names:
            continue
        value = values.get(declaration.name, declaration.default)
        # papermill reads `Optional[str]`, not `str | None`: the cell imports Optional
        kind = "Optional[str]" if str(declaration.type) == "str | None" else str(declaration.type)
        lines.append(f"{declaration.name}: {kind} = {_literal(value)}  # {declaration.metadata['help']}")
    return lines


def _literal(value: Any) -> str:
    """Python source for a parameter value, strings double-quoted as `ruff format` writes them."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        items = ", ".join(_literal(item) for item in value)
        return f"[{items}]" if isinstance(value, list) else f"({items}{',' if len(value) == 1 else ''})"
    return repr(value)


def sync_parameters_cell(path: str, config_class: type, check: bool = False) -> bool:
    """Rewrite the declared options' lines of a notebook's `parameters` cell from the declarations, keeping each
    line's value and every other line. Returns whether the cell already matched; with `check`, writes nothing."""
    with open(path, encoding="utf-8") as handle:
        notebook = json.load(handle)
    names = {f.name for f in declared(config_class)}
    matched = True
    for cell in notebook["cells"]:
        if "parameters" not in cell.get("metadata", {}).get("tags", []):
            continue
        lines = "".join(cell["source"]).split("\n")
        for index, line in enumerate(lines):
            name = line.split(":", 1)[0].strip()
            if name in names and "=" in line and not line.startswith(" "):
                value = eval(line.split("=", 1)[1].split("  #", 1)[0].strip(), {"None": None})  # noqa: S307
                (generated,) = parameters_cell(config_class, [name], {name: value})
                matched &= generated == line
                lines[index] = generated
        cell["source"] = [line + "\n" for line in lines[:-1]] + [lines[-1]]
    if not matched and not check:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
    return matched
