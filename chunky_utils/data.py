"""Prompt sets: the Tulu subset map, the hub loader, the bundled offline sample and user files."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from chunky_utils.errors import UsageError
from chunky_utils.options import DATA_SOURCES

log = logging.getLogger(__name__)

DataSource = Literal["auto", "hub", "bundled"]
TULU_DATASET_ID = "allenai/tulu-3-sft-mixture"

TULU_SET_MAP: dict[str, str] = {
    "0": "ai2-adapt-dev/numinamath_tir_math_decontaminated",
    "1": "ai2-adapt-dev/tulu_v3.9_synthetic_finalresp_wildguardmixtrain_decontaminated_50k",
    "2": "ai2-adapt-dev/oasst1_converted",
    "3": "ai2-adapt-dev/tulu_v3.9_table_gpt_5k",
    "4": "allenai/tulu-3-sft-personas-math-grade",
    "5": "ai2-adapt-dev/flan_v2_converted",
    "6": "ai2-adapt-dev/tulu_v3.9_sciriff_10k",
    "7": "ai2-adapt-dev/no_robots_converted",
    "8": "ai2-adapt-dev/personahub_code_v2_34999",
    "9": "ai2-adapt-dev/tulu_v3.9_personahub_math_interm_algebra_20k",
    "10": "ai2-adapt-dev/tulu_v3.9_wildjailbreak_decontaminated_50k",
    "11": "ai2-adapt-dev/tulu_v3.9_open_math_2_gsm8k_50k",
    "12": "ai2-adapt-dev/coconot_converted",
    "13": "ai2-adapt-dev/tulu_hard_coded_repeated_10",
    "14": "ai2-adapt-dev/tulu_v3.9_wildchat_100k",
    "15": "ai2-adapt-dev/tulu_v3.9_aya_100k",
    "16": "ai2-adapt-dev/evol_codealpaca_heval_decontaminated",
    "17": "ai2-adapt-dev/personahub_math_v5_regen_149960",
    "18": "ai2-adapt-dev/personahub_ifdata_manual_seed_v3_29980",
}

TULU_SET_LABELS: dict[str, str] = {
    "0": "Math",
    "1": "Safety",
    "2": "Conversational",
    "3": "Tables",
    "4": "Math Personas",
    "5": "FLAN",
    "6": "Scientific",
    "7": "No Robots",
    "8": "Code",
    "9": "Algebra",
    "10": "Jailbreak",
    "11": "GSM8K Math",
    "12": "CoCoNot",
    "13": "Hard Coded",
    "14": "Wild Chat",
    "15": "Aya Multilingual",
    "16": "Code Evolution",
    "17": "Math Personas Large",
    "18": "IF Data",
}

DEFAULT_INFERENCE_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Explain how photosynthesis works in simple terms.",
    "Write a short poem about the ocean.",
    "How can I improve my time management?",
    "What are the main differences between cats and dogs as pets?",
)

USER_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class PromptRow:
    """One prompt with a stable id."""

    id: str
    prompt: str


@dataclass(frozen=True)
class PromptSet:
    """Prompts drawn from one subset or file, with where they came from."""

    subset: str
    name: str
    data_source: str
    rows: tuple[PromptRow, ...]
    available: int
    sampling: dict[str, Any] = field(default_factory=dict)

    @property
    def prompts(self) -> list[str]:
        return [row.prompt for row in self.rows]

    @property
    def ids(self) -> list[str]:
        return [row.id for row in self.rows]

    @property
    def content_hash(self) -> str:
        """Hash of the drawn rows: part of every cache key built from them."""
        digest = hashlib.sha256()
        for row in self.rows:
            digest.update(row.id.encode())
            digest.update(b"\0")
            digest.update(row.prompt.encode())
            digest.update(b"\1")
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class SubsetRef:
    """A parsed subset argument: a Tulu key or a user file."""

    label: str
    name: str
    path: Path | None = None

    @property
    def is_file(self) -> bool:
        return self.path is not None


def safe_label(text: str) -> str:
    """A file-name-safe label: letters, digits, dot, dash and underscore, never a path."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")
    return cleaned[:60] or "subset"


def parse_subset(value: str | int) -> SubsetRef:
    """Turn a CLI subset argument (Tulu key or file path) into a `SubsetRef`."""
    text = str(value).strip()
    if text in TULU_SET_MAP:
        return SubsetRef(label=text, name=TULU_SET_MAP[text])
    if text.lstrip("-").isdigit():
        raise UsageError(f"unknown subset key {text!r}: valid keys are 0..{len(TULU_SET_MAP) - 1}")
    path = Path(text).expanduser()
    if path.suffix.lower() not in USER_FILE_SUFFIXES:
        raise UsageError(
            f"subset {text!r} is neither a Tulu key (0..{len(TULU_SET_MAP) - 1}) "
            f"nor a {'/'.join(USER_FILE_SUFFIXES)} file"
        )
    if not path.is_file():
        raise UsageError(f"subset file not found: {path}")
    resolved = path.resolve()
    path_hash = hashlib.sha256(str(resolved).encode()).hexdigest()[:8]
    return SubsetRef(label=f"{safe_label(path.stem)}-{path_hash}", name=str(resolved), path=resolved)


# ---------------------------------------------------------------- row readers


def _prompt_from_record(record: Any, where: str) -> str:
    if not isinstance(record, dict):
        raise UsageError(f"{where}: expected an object with 'messages' or 'prompt', got {type(record).__name__}")
    if "messages" in record and record["messages"] is not None:
        messages = record["messages"]
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{where}: 'messages' is not valid JSON ({exc.msg})") from None
        if not isinstance(messages, list | tuple):
            raise UsageError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        for message in messages:
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, str) and content.strip():
                    return content
                break
        raise UsageError(f"{where}: no non-empty user message in 'messages'")
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str) and prompt.strip():
            return prompt
        raise UsageError(f"{where}: 'prompt' must be a non-empty string")
    raise UsageError(f"{where}: needs a 'messages' or 'prompt' field")


def _rows_from_records(records: Iterable[tuple[str, Any]], id_prefix: str) -> list[PromptRow]:
    rows = []
    for index, (where, record) in enumerate(records):
        prompt = _prompt_from_record(record, where)
        raw_id = record.get("id") if isinstance(record, dict) else None
        rows.append(PromptRow(id=str(raw_id) if raw_id is not None else f"{id_prefix}-{index}", prompt=prompt))
    return rows


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path.name} line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path.name} line {number}: malformed JSON ({exc.msg})") from None
    return records


def read_prompt_file(path: Path) -> list[PromptRow]:
    """Read prompts from a .jsonl/.json/.csv/.parquet file with a 'messages' or 'prompt' column."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            records = _read_jsonl(path)
        elif suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path.name}: malformed JSON at line {exc.lineno} ({exc.msg})") from None
            if isinstance(data, dict) and isinstance(data.get("results"), list):
                data = data["results"]
            if not isinstance(data, list):
                raise UsageError(f"{path.name}: expected a JSON list of records")
            records = [(f"{path.name} record {i}", item) for i, item in enumerate(data)]
        elif suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as handle:
                records = [(f"{path.name} row {i + 2}", dict(item)) for i, item in enumerate(csv.DictReader(handle))]
        elif suffix == ".parquet":
            import pandas as pd

            frame = pd.read_parquet(path)
            records = [(f"{path.name} row {i}", item) for i, item in enumerate(frame.to_dict(orient="records"))]
            for _, record in records:
                if "messages" in record and not isinstance(record["messages"], str | list | type(None)):
                    record["messages"] = list(record["messages"])
        else:
            raise UsageError(f"unsupported file type {suffix!r}: use {', '.join(USER_FILE_SUFFIXES)}")
    except UnicodeDecodeError:
        raise UsageError(f"{path.name}: not UTF-8 text") from None
    except (OSError, ImportError, ValueError) as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"{path.name}: cannot read ({exc.__class__.__name__}: {exc})") from None
    return _rows_from_records(records, id_prefix=safe_label(path.stem))


def bundled_rows(key: str) -> list[PromptRow]:
    """The offline sample shipped with the package for one Tulu subset key."""
    if key not in TULU_SET_MAP:
        raise UsageError(f"unknown subset key {key!r}: valid keys are 0..{len(TULU_SET_MAP) - 1}")
    resource = resources.files("chunky_utils").joinpath("bundled_prompts", f"{key}.jsonl")
    lines = resource.read_text(encoding="utf-8").splitlines()
    records = [(f"bundled {key}.jsonl line {i + 1}", json.loads(line)) for i, line in enumerate(lines) if line.strip()]
    return _rows_from_records(records, id_prefix=f"bundled-{key}")


@lru_cache(maxsize=1)
def _tulu_mixture() -> Any:
    try:
        from datasets import load_dataset
    except ImportError:
        raise UsageError("--data-source hub needs the `datasets` package: pip install 'chunky-utils[hub]'") from None
    log.info("loading %s (split train) from the Hugging Face Hub", TULU_DATASET_ID)
    try:
        return load_dataset(TULU_DATASET_ID, split="train")
    except Exception as exc:  # network, auth and format errors all mean "not available here"
        first_line = (str(exc).splitlines() or [""])[0]
        raise UsageError(
            f"cannot load {TULU_DATASET_ID} from the hub ({exc.__class__.__name__}: {first_line})"
        ) from None


def hub_rows(key: str) -> list[PromptRow]:
    """Rows of one Tulu subset from the hub mixture, filtered by its `source` column."""
    source = TULU_SET_MAP[key]
    mixture = _tulu_mixture()
    subset = mixture.filter(lambda src: src == source, input_columns=["source"])
    records = ((f"{source} row {i}", {"id": r["id"], "messages": r["messages"]}) for i, r in enumerate(subset))
    return _rows_from_records(records, id_prefix=f"tulu-{key}")


def hub_reachable(timeout: float = 2.0) -> bool:
    """True when the `datasets` package is installed and huggingface.co answers."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in (
        "",
        "0",
    ):
        return False
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


@lru_cache(maxsize=4)
def resolve_data_source(requested: str) -> str:
    """Map 'auto' to 'hub' or 'bundled' (and log why); pass the others through."""
    if requested not in DATA_SOURCES:
        raise UsageError(f"unknown data source {requested!r}: choose one of {', '.join(DATA_SOURCES)}")
    if requested != "auto":
        return requested
    if hub_reachable():
        log.info("data source: hub (%s reachable)", TULU_DATASET_ID)
        return "hub"
    log.info("data source: bundled offline sample (the Hugging Face Hub or `datasets` is not available)")
    return "bundled"


def all_rows(ref: SubsetRef, data_source: str) -> tuple[list[PromptRow], str]:
    """Every row of a subset, and the concrete source it came from ('hub', 'bundled' or 'file')."""
    if ref.path is not None:
        return read_prompt_file(ref.path), "file"
    source = resolve_data_source(data_source)
    if source == "hub":
        return hub_rows(ref.label), "hub"
    return bundled_rows(ref.label), "bundled"


def sample_rows(
    rows: Sequence[PromptRow], n_samples: int, seed: int, what: str, exclude_prompts: Iterable[str] = ()
) -> list[PromptRow]:
    """Draw `n_samples` rows (-1 = all) deterministically, skipping rows whose prompt text is excluded."""
    excluded = set(exclude_prompts)
    pool = [row for row in rows if row.prompt not in excluded]
    n_excluded = len(rows) - len(pool)
    note = f" ({n_excluded} excluded as vector prompts)" if n_excluded else ""
    if not pool:
        raise UsageError(f"{what}: no prompts available{note}")
    if n_samples == -1:
        return list(pool)
    if n_samples <= 0:
        raise UsageError(f"{what}: sample count must be positive or -1 (all), got {n_samples}")
    if n_samples > len(pool):
        raise UsageError(f"{what}: asked for {n_samples} prompts but only {len(pool)} are available{note}")
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    return [pool[i] for i in order[:n_samples]]


def load_prompt_set(
    subset: str | SubsetRef,
    n_samples: int,
    data_source: str = "auto",
    seed: int = 0,
    exclude_prompts: Iterable[str] = (),
) -> PromptSet:
    """Load and sample one prompt set; the draw depends only on (rows, n_samples, seed, exclusions)."""
    ref = subset if isinstance(subset, SubsetRef) else parse_subset(subset)
    rows, source = all_rows(ref, data_source)
    excluded = set(exclude_prompts)
    drawn = sample_rows(rows, n_samples, seed, what=f"subset {ref.label}", exclude_prompts=excluded)
    n_excluded = sum(1 for row in rows if row.prompt in excluded)
    method = "all rows, in file order" if n_samples == -1 else "seeded shuffle"
    sampling = {
        "seed": seed if n_samples != -1 else None,
        "n_requested": n_samples,
        "n_used": len(drawn),
        "n_excluded": n_excluded,
        "method": method,
    }
    log.info("subset %s (%s): %d of %d prompts from %s", ref.label, ref.name, len(drawn), len(rows), source)
    return PromptSet(
        subset=ref.label, name=ref.name, data_source=source, rows=tuple(drawn), available=len(rows), sampling=sampling
    )


@dataclass(frozen=True)
class PreparedPrompts:
    """The prompt sets of one run: the vector's two sides and the inference prompts."""

    target: PromptSet
    baseline: PromptSet
    inference: PromptSet


def default_prompt_set() -> PromptSet:
    """The five built-in inference prompts."""
    rows = tuple(PromptRow(id=f"default-{i}", prompt=p) for i, p in enumerate(DEFAULT_INFERENCE_PROMPTS))
    return PromptSet(subset="default", name="built-in prompts", data_source="builtin", rows=rows, available=len(rows))
