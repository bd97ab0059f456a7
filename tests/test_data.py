"""Prompt sets: the Tulu map, the bundled sample, user files and deterministic sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from chunky_utils.data import (
    TULU_SET_MAP,
    bundled_rows,
    load_prompt_set,
    parse_subset,
    read_prompt_file,
    resolve_data_source,
    sample_rows,
)
from chunky_utils.errors import UsageError

SEED_MAP_EXCERPT = {
    "0": "ai2-adapt-dev/numinamath_tir_math_decontaminated",
    "5": "ai2-adapt-dev/flan_v2_converted",
    "12": "ai2-adapt-dev/coconot_converted",
    "18": "ai2-adapt-dev/personahub_ifdata_manual_seed_v3_29980",
}


def test_tulu_map_has_the_seed_keys() -> None:
    assert list(TULU_SET_MAP) == [str(i) for i in range(19)]
    for key, source in SEED_MAP_EXCERPT.items():
        assert TULU_SET_MAP[key] == source
    assert len(set(TULU_SET_MAP.values())) == 19


@pytest.mark.parametrize("key", list(TULU_SET_MAP))
def test_bundled_subset_is_large_distinct_and_in_schema(key: str) -> None:
    rows = bundled_rows(key)
    prompts = [row.prompt for row in rows]
    assert len(set(prompts)) == len(prompts) >= 60
    assert len({row.id for row in rows}) == len(rows)
    from importlib import resources

    text = resources.files("chunky_utils").joinpath("bundled_prompts", f"{key}.jsonl").read_text(encoding="utf-8")
    for line in text.splitlines():
        record = json.loads(line)
        assert record["source"] == TULU_SET_MAP[key]
        assert record["messages"][0]["role"] == "user"


def test_bundled_subsets_have_their_character() -> None:
    def share(key: str, predicate) -> float:
        prompts = [row.prompt for row in bundled_rows(key)]
        return sum(map(predicate, prompts)) / len(prompts)

    assert share("0", lambda p: "$" in p or "\\" in p) > 0.5  # competition math in LaTeX
    assert share("15", lambda p: " the " not in f" {p.lower()} ") > 0.95  # non-English
    assert share("3", lambda p: "|" in p) > 0.8  # tables
    assert share("8", lambda p: "python" in p.lower() or "def " in p or "function" in p.lower()) > 0.8


def test_parse_subset_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown subset key '19'"):
        parse_subset("19")
    with pytest.raises(UsageError, match="not found"):
        parse_subset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UsageError, match="neither a Tulu key"):
        parse_subset("math")


def test_subset_file_label_is_safe(tmp_path: Path) -> None:
    weird = tmp_path / "..evil name;rm -rf.jsonl"
    weird.write_text('{"prompt": "hi"}\n')
    ref = parse_subset(str(weird))
    assert "/" not in ref.label and not ref.label.startswith(".")
    assert ref.is_file


def _write_formats(tmp_path: Path) -> dict[str, Path]:
    records = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"prompt {i}"}]} for i in range(5)]
    paths = {
        "jsonl": tmp_path / "a.jsonl",
        "json": tmp_path / "a.json",
        "csv": tmp_path / "a.csv",
        "parquet": tmp_path / "a.parquet",
    }
    paths["jsonl"].write_text("\n".join(json.dumps(r) for r in records))
    paths["json"].write_text(json.dumps(records))
    pd.DataFrame({"prompt": [f"prompt {i}" for i in range(5)]}).to_csv(paths["csv"], index=False)
    pd.DataFrame({"messages": [r["messages"] for r in records]}).to_parquet(paths["parquet"])
    return paths


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
def test_user_files_in_every_format(tmp_path: Path, kind: str) -> None:
    rows = read_prompt_file(_write_formats(tmp_path)[kind])
    assert [row.prompt for row in rows] == [f"prompt {i}" for i in range(5)]


def test_malformed_jsonl_reports_line_number(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": "broken"\n')
    with pytest.raises(UsageError, match="line 2: malformed JSON"):
        read_prompt_file(path)


def test_record_without_prompt_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "no prompt column"}\n')
    with pytest.raises(UsageError, match="line 1: needs a 'messages' or 'prompt' field"):
        read_prompt_file(path)


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(UsageError, match="no prompts available"):
        load_prompt_set(str(path), 5)


def test_sampling_is_deterministic_and_bounded(prompt_file: Path) -> None:
    first = load_prompt_set(str(prompt_file), 5, seed=3)
    again = load_prompt_set(str(prompt_file), 5, seed=3)
    other = load_prompt_set(str(prompt_file), 5, seed=4)
    assert first.ids == again.ids and first.content_hash == again.content_hash
    assert first.ids != other.ids
    assert len(load_prompt_set(str(prompt_file), -1).rows) == 12
    with pytest.raises(UsageError, match="asked for 13 prompts but only 12"):
        load_prompt_set(str(prompt_file), 13)
    with pytest.raises(UsageError, match="positive or -1"):
        load_prompt_set(str(prompt_file), 0)


def test_exclusion_removes_vector_prompts(prompt_file: Path) -> None:
    vector = load_prompt_set(str(prompt_file), 8)
    rest = load_prompt_set(str(prompt_file), -1, exclude_prompts=vector.prompts)
    assert len(rest.rows) == 4 and not set(rest.prompts) & set(vector.prompts)
    rows = read_prompt_file(prompt_file)
    with pytest.raises(UsageError, match="8 excluded as vector prompts"):
        sample_rows(rows, 5, 0, "x", exclude_prompts=vector.prompts)


def test_auto_source_falls_back_to_bundled_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolve_data_source.cache_clear()
    assert resolve_data_source("auto") == "bundled"
    assert load_prompt_set("12", 10, data_source="auto").data_source == "bundled"
    resolve_data_source.cache_clear()
    with pytest.raises(UsageError, match="unknown data source"):
        resolve_data_source("web")


def test_real_prompt_files_load(realdata: Path) -> None:
    for name in ("gsm8k_test.jsonl", "coconot_eval.jsonl", "humaneval.jsonl"):
        prompt_set = load_prompt_set(str(realdata / name), 20, seed=0)
        assert len(prompt_set.rows) == 20 and prompt_set.data_source == "file"


class FakeMixture:
    """Stands in for the hub's `datasets.Dataset`: filter by a column, iterate rows."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def filter(self, keep, input_columns: list[str]) -> FakeMixture:
        return FakeMixture([row for row in self.rows if keep(*(row[c] for c in input_columns))])

    def __iter__(self):
        return iter(self.rows)


def test_hub_loader_filters_by_source(monkeypatch: pytest.MonkeyPatch) -> None:
    from chunky_utils import data

    rows = [
        {
            "id": f"h{i}",
            "source": TULU_SET_MAP["12" if i % 2 else "0"],
            "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}],
        }
        for i in range(10)
    ]
    monkeypatch.setattr(data, "_tulu_mixture", lambda: FakeMixture(rows))
    prompt_set = load_prompt_set("12", -1, data_source="hub")
    assert prompt_set.data_source == "hub"
    assert sorted(prompt_set.prompts) == sorted(f"q{i}" for i in range(1, 10, 2))


def test_hub_without_datasets_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from chunky_utils import data

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    data._tulu_mixture.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(UsageError, match="needs the `datasets` package"):
        load_prompt_set("12", 5, data_source="hub")
    data._tulu_mixture.cache_clear()


def test_all_rows_are_recorded_as_all_rows_in_file_order() -> None:
    from chunky_utils.data import bundled_rows, load_prompt_set

    every = load_prompt_set("12", -1, "bundled", seed=5)
    assert [row.prompt for row in every.rows] == [row.prompt for row in bundled_rows("12")]
    assert every.sampling["method"] == "all rows, in file order" and every.sampling["seed"] is None
    assert every.sampling["n_used"] == len(every.rows) and every.sampling["n_requested"] == -1
    drawn = load_prompt_set("12", 5, "bundled", seed=5)
    assert drawn.sampling["method"] == "seeded shuffle" and drawn.sampling["n_used"] == 5
