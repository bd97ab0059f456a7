"""Robustness: killed writers, concurrent processes, fuzzed inputs, a steering soak."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunky_utils.cache import atomic_write
from chunky_utils.chat import left_pad
from chunky_utils.cli import build_parser, config_from_args
from chunky_utils.data import read_prompt_file
from chunky_utils.errors import UsageError
from chunky_utils.generation import GenerationSettings, generate_with_scales
from chunky_utils.models import LoadedModel
from chunky_utils.steering import SteeringVector, active_hook_count
from tests.conftest import REPO_ROOT

SLOW_WRITER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from chunky_utils.cache import atomic_write

def write(temp: Path) -> None:
    with temp.open("wb") as handle:
        handle.write(b"half a file")
        handle.flush()
        time.sleep(60)
        handle.write(b" and the rest")

atomic_write(Path({target!r}), write)
"""

COMPUTE_SUBSET = """
import logging, sys
sys.path.insert(0, {root!r})
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from chunky_utils.activations import subset_means
from chunky_utils.data import load_prompt_set
from chunky_utils.models import build_tiny_model
loaded = build_tiny_model("llama", seed=0)
subset_means(loaded, load_prompt_set("12", 40, data_source="bundled"), [1], {cache!r}, progress=False)
"""


def test_killed_writer_leaves_no_readable_file(tmp_path: Path) -> None:
    target = tmp_path / "12_100_layer_16.pt"
    process = subprocess.Popen([sys.executable, "-c", SLOW_WRITER.format(root=str(REPO_ROOT), target=str(target))])
    try:
        deadline = time.time() + 60
        while not list(tmp_path.glob(".*.tmp")) and time.time() < deadline:
            time.sleep(0.05)
        assert list(tmp_path.glob(".*.tmp")), "the writer never started"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    assert not target.exists(), "a killed write must not leave the final file"


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    target.write_text("finished")

    def broken(temp: Path) -> None:
        temp.write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, broken)
    assert target.read_text() == "finished"
    assert not list(tmp_path.glob(".*.tmp"))


def test_two_processes_compute_one_cache_entry_once(tmp_path: Path) -> None:
    script = COMPUTE_SUBSET.format(root=str(REPO_ROOT), cache=str(tmp_path))
    processes = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    log = "\n".join(outputs)
    assert log.count("cache miss") == 1 and log.count("cache hit") == 1, log
    files = list(tmp_path.rglob("12_40_layer_*.pt"))
    assert len(files) == 4
    for path in files:
        assert torch.load(path, weights_only=True)["n_samples"] == 40


def test_crafted_pickle_in_cache_is_not_executed(tmp_path: Path, tiny: LoadedModel) -> None:
    from chunky_utils.activations import subset_means
    from chunky_utils.data import load_prompt_set

    prompt_set = load_prompt_set("3", 4, data_source="bundled")
    first = subset_means(tiny, prompt_set, [0], tmp_path, progress=False)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"payload": Exploit()}, first.means[0].path)
    again = subset_means(tiny, prompt_set, [0], tmp_path, progress=False)
    assert not marker.exists() and not again.cache_hit


def test_soak_200_steering_runs_leave_no_hook_and_flat_memory(tiny: LoadedModel) -> None:
    def rss_mb() -> float:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    ids = [[3, 4, 5, 6, 7]]
    inputs = left_pad(ids, 0, torch.device("cpu"))
    with torch.no_grad():
        plain = tiny.model(**inputs).logits
    settings = GenerationSettings(max_new_tokens=3, temperature=0.0)
    vector = torch.randn(64)
    readings = []
    for run in range(200):
        if run % 10 == 0:
            generate_with_scales(tiny, ["hello"], run % 4, vector, [0.0, float(run % 7)], settings, progress=False)
        with SteeringVector({run % 4: vector}).apply(tiny.model, scale=float(run % 5)), torch.no_grad():
            tiny.model(**inputs)
        if run in (20, 199):
            readings.append(rss_mb())
    assert active_hook_count(tiny.model) == 0
    with SteeringVector({1: vector}).apply(tiny.model, scale=0.0), torch.no_grad():
        assert torch.equal(tiny.model(**inputs).logits, plain)
    assert readings[1] - readings[0] < 30, f"memory grew from {readings[0]:.0f} to {readings[1]:.0f} MB"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(
        st.one_of(
            st.text(max_size=40),
            st.builds(
                json.dumps,
                st.dictionaries(
                    st.sampled_from(["prompt", "messages", "id", "x"]),
                    st.one_of(
                        st.text(max_size=10),
                        st.integers(),
                        st.none(),
                        st.lists(
                            st.dictionaries(st.sampled_from(["role", "content"]), st.text(max_size=8)), max_size=2
                        ),
                    ),
                ),
            ),
        ),
        max_size=6,
    )
)
def test_fuzzed_jsonl_gives_rows_or_one_line_error(tmp_path: Path, lines: list[str]) -> None:
    path = tmp_path / "fuzz.jsonl"
    path.write_text("\n".join(line.replace("\n", " ") for line in lines), encoding="utf-8")
    try:
        rows = read_prompt_file(path)
    except UsageError as exc:
        assert "\n" not in str(exc)
    else:
        assert all(isinstance(row.prompt, str) and row.prompt.strip() for row in rows)


FLAG_VALUES = ["0", "12", "99", "-1", "1e9", "nan", "inf", "-3.5", "abc", "", "/nope.jsonl", "2.0"]
FLAGS = [
    "--target-subset",
    "--baseline-subset",
    "--layer",
    "--scale",
    "--n-samples",
    "--max-tokens",
    "--temperature",
    "--inference-dataset",
    "--inference-n-samples",
    "--data-source",
    "--batch-size",
]


@settings(max_examples=80, deadline=None)
@given(pairs=st.lists(st.tuples(st.sampled_from(FLAGS), st.sampled_from(FLAG_VALUES)), max_size=8))
def test_fuzzed_flags_parse_or_fail_cleanly(pairs: list[tuple[str, str]]) -> None:
    argv = ["--target-subset", "12", "--baseline-subset", "0", "--layer", "1", "--model", "tiny-random:llama"]
    for flag, value in pairs:
        argv += [flag, value]
    try:
        args = build_parser().parse_args(argv)
        config_from_args(args).validated()
    except SystemExit as exc:
        assert exc.code == 2
    except UsageError as exc:
        assert "\n" not in str(exc)


def test_trust_remote_code_is_off_unless_asked() -> None:
    args = build_parser().parse_args(["--target-subset", "1", "--baseline-subset", "2", "--layer", "0"])
    assert config_from_args(args).trust_remote_code is False
    args = build_parser().parse_args(
        ["--target-subset", "1", "--baseline-subset", "2", "--layer", "0", "--trust-remote-code"]
    )
    assert config_from_args(args).trust_remote_code is True


def steer_argv(*extra: str) -> list[str]:
    return ["--target-subset", "12", "--baseline-subset", "0", "--data-source", "bundled", "-q", *extra]


def test_unwritable_output_dir_is_refused(tmp_path: Path) -> None:
    from chunky_utils.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(steer_argv("--layer", "1", "--model", "tiny-random:llama", "--output-dir", str(blocker / "sub"))) == 2


def test_layer_out_of_range_is_caught_before_model_load(tmp_path: Path, capsys) -> None:
    from chunky_utils.cli import main

    if not (REPO_ROOT / "cache" / "models" / "smollm2-135m-instruct" / "config.json").is_file():
        pytest.skip("embedded model not converted yet: its layer count is known only after loading")
    code = main(steer_argv("--layer", "30", "--output-dir", str(tmp_path), "--cache-dir", str(REPO_ROOT / "cache")))
    assert code == 2 and "layers 0..29" in capsys.readouterr().err


def test_atomic_writes_get_the_usual_file_mode(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "out.json", lambda temp: temp.write_text("{}"))
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


SWEEP_VALUES = st.one_of(
    st.none(),
    st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.one_of(st.integers(-3, 40), st.text(max_size=6), st.floats(allow_nan=True)), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
SWEEP_KEYS = [
    "pairs",
    "layers",
    "scales",
    "inference_datasets",
    "inference_n_samples",
    "workers",
    "executor",
    "name",
    "model",
    "n_samples",
    "max_tokens",
    "temperature",
    "submitit",
    "bogus",
]


@settings(max_examples=80, deadline=None)
@given(mapping=st.dictionaries(st.sampled_from(SWEEP_KEYS), SWEEP_VALUES, max_size=7))
def test_fuzzed_sweep_configs_load_or_fail_cleanly(mapping: dict) -> None:
    from chunky_utils.sweep import load_sweep

    base = {"pairs": ["12:0"], "layers": [1], "scales": [1.0]}
    try:
        spec, options = load_sweep({**base, **mapping})
    except UsageError as exc:
        assert "\n" not in str(exc)
    else:
        assert spec.layers and all(isinstance(layer, int) and layer >= 0 for layer in spec.layers)
        assert options.workers >= 1
