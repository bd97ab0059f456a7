"""The peers benchmark's own logic (alignment, agreement, ratios, report, worker protocol) without the peers."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from benchmarks import peers
from chunky_utils.data import PromptRow


def test_vector_agreement_reports_cosine_and_norm_ratio() -> None:
    ours = torch.tensor([3.0, 4.0, 0.0])
    agreement = peers.vector_agreement(ours, ours / 2)
    assert agreement["cosine"] == pytest.approx(1.0)
    assert agreement["norm_ratio"] == pytest.approx(2.0)
    assert agreement["ours_norm"] == pytest.approx(5.0)
    orthogonal = peers.vector_agreement(ours, torch.tensor([0.0, 0.0, 1.0]), unit_norm_peer=True)
    assert orthogonal["cosine"] == pytest.approx(0.0)
    assert orthogonal["norm_ratio"] is None  # a PCA direction has no meaningful norm
    assert peers.cosine(ours, -ours) == pytest.approx(-1.0)


def test_ratios_medians_and_equal_rows() -> None:
    medians = peers.medians({"ours": [3.0, 1.0, 2.0], "slow": [8.0, 4.0, 6.0], "empty": []})
    assert medians == {"ours": 2.0, "slow": 6.0}
    assert peers.project_peer_ratios(medians, "ours", ["slow", "absent"]) == {"slow": pytest.approx(1 / 3)}
    assert peers.equal_rows(["a", "b", None], ["a", "c", None]) == 1  # a missing row never counts as equal
    with pytest.raises(ValueError, match="row counts differ"):
        peers.equal_rows(["a"], ["a", "b"])


def test_max_abs_difference_needs_the_same_tensors() -> None:
    first = {"logits_0": torch.zeros(2, 3), "logits_1": torch.ones(4)}
    second = {"logits_0": torch.full((2, 3), 0.25), "logits_1": torch.ones(4)}
    assert peers.max_abs_difference(first, second) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="tensor names differ"):
        peers.max_abs_difference(first, {"logits_0": torch.zeros(2, 3)})


def test_heldout_rows_alternate_and_skip_the_vector_rows() -> None:
    target = [PromptRow(f"t{i}", f"target {i}") for i in range(5)]
    baseline = [PromptRow(f"b{i}", f"baseline {i}") for i in range(5)]
    rows = peers.heldout_rows(target, baseline, skip=3, count=4)
    assert [row.id for row in rows] == ["t3", "b3", "t4", "b4"]
    with pytest.raises(ValueError, match="cannot hold out 6"):
        peers.heldout_rows(target, baseline, skip=3, count=6)


def test_layer_match_table_finds_the_layer_a_peer_reads() -> None:
    torch.manual_seed(0)
    ours = {layer: torch.randn(2, 8) for layer in (14, 15, 16)}
    reads = {"repeng_hidden_layers_15": ours[15] + 1e-6, "off_by_one": ours[14].clone()}
    table = peers.layer_match_table(reads, ours)
    assert table["repeng_hidden_layers_15"]["ours_layer_15"] < 1e-5
    assert min(table["repeng_hidden_layers_15"].values()) == table["repeng_hidden_layers_15"]["ours_layer_15"]
    assert table["off_by_one"]["ours_layer_14"] == 0.0 < table["off_by_one"]["ours_layer_15"]


def fake_results() -> dict:
    agreement = {"cosine": 0.9999999, "norm_ratio": 1.0000001, "ours_norm": 55.26, "peer_norm": 55.26}
    return {
        "settings": {"n_heldout": 20, "batch_size": 16},
        "vector_agreement": {
            "steering_vectors_mean": agreement,
            "repeng_pca_center": {"cosine": 0.99991, "norm_ratio": None},
            "repeng_pca_diff": {"cosine": 0.0625, "norm_ratio": None},
        },
        "extraction": {
            "median_s": {
                "ours": 10.0,
                "steering_vectors_single": 20.0,
                "steering_vectors_batched": 40.0,
                "repeng_pca_diff": 25.0,
            }
        },
        "generation": {
            "median_s": {
                "ours_baseline+steered": 6.0,
                "steering_vectors_baseline": 4.0,
                "steering_vectors_steered": 4.0,
                "repeng_baseline": 5.0,
                "repeng_steered": 7.0,
            },
            "equal_rows": {
                "ours_vs_steering_vectors_baseline": 20,
                "ours_vs_steering_vectors_steered": 19,
                "ours_vs_repeng_steered": 18,
                "steered_differs_from_baseline": 20,
            },
        },
    }


def test_report_table_holds_every_ratio() -> None:
    table = peers.report_table(fake_results())
    lines = table.splitlines()
    assert lines[0] == "| measure | value | detail |"
    assert "| cosine, ours vs steering-vectors mean aggregator | 1.000000 |" in table
    assert "| extraction time, ours / steering-vectors, one pair at a time | 0.500 |" in table
    assert "| extraction time, ours / steering-vectors, batch 16 | 0.250 |" in table
    assert "| extraction time, ours / repeng `pca_diff`, batch 16 | 0.400 |" in table
    assert "| generation time (baseline + steered), ours / steering-vectors | 0.750 |" in table
    assert "| generation time (baseline + steered), ours / repeng | 0.500 |" in table
    assert "| steered texts equal, ours vs repeng (our vector) | 18 / 20 | |" in table
    assert all(line.startswith("|") and line.endswith("|") for line in lines)


def write_tulu(path: Path, prefix: str, count: int) -> None:
    rows = [
        {"id": f"{prefix}{i}", "messages": [{"role": "user", "content": f"{prefix} prompt {i}"}]} for i in range(count)
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")


def test_benchmark_prompts_keep_heldout_rows_out_of_the_vector(tmp_path: Path) -> None:
    write_tulu(tmp_path / peers.TARGET_FILE, "code", 12)
    write_tulu(tmp_path / peers.BASELINE_FILE, "flan", 12)
    prompts = peers.load_benchmark_prompts(tmp_path, n_vector=8, n_heldout=4)
    assert prompts.target.ids == [f"code{i}" for i in range(8)]
    assert prompts.baseline.prompts[0] == "flan prompt 0"
    assert [row.id for row in prompts.heldout] == ["code8", "flan8", "code9", "flan9"]
    assert not {row.id for row in prompts.heldout} & set(prompts.target.ids + prompts.baseline.ids)


@pytest.fixture
def logging_restored() -> Iterator[None]:
    """peers.main configures logging for a command-line run (chunky_utils quieted): undo it for later tests."""
    logger = logging.getLogger("chunky_utils")
    level, root_handlers = logger.level, list(logging.getLogger().handlers)
    yield
    logger.setLevel(level)
    logging.getLogger().handlers[:] = root_handlers


@pytest.mark.usefixtures("logging_restored")
def test_main_skips_cleanly_without_the_real_prompts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert peers.main(["--realdata", str(tmp_path / "absent"), "--out", str(tmp_path / "out.json")]) == 0
    assert "skipped" in capsys.readouterr().out
    assert not (tmp_path / "out.json").exists()


def test_existing_peers_venv_is_reused_without_installing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / ".installed").write_text("\n".join([peers.PEER_TORCH, *peers.PEER_PACKAGES]) + "\n")

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("nothing may be installed when the stamp matches")

    monkeypatch.setattr(subprocess, "run", refuse)
    assert peers.ensure_peers_venv(venv, "python3") == venv / "bin" / "python"
    assert "steering-vectors==0.12.2" in peers.PEER_PACKAGES and "repeng==0.4.0" in peers.PEER_PACKAGES


def test_worker_answers_each_command_and_reports_failures() -> None:
    worker = peers.load_worker_module()
    commands = io.StringIO('{"cmd": "no_such_command"}\n\n{"cmd": "quit"}\n{"cmd": "never_read"}\n')
    replies = io.StringIO()
    worker.serve(commands, replies)
    (reply,) = [json.loads(line) for line in replies.getvalue().splitlines()]
    assert reply["ok"] is False and reply["error"].startswith("AttributeError")


def test_worker_subprocess_round_trip_keeps_library_output_off_the_reply_stream() -> None:
    client = peers.PeerWorker(Path(sys.executable), threads=1)
    try:
        with pytest.raises(RuntimeError, match="peer worker failed on 'chat_texts'"):
            client.request("chat_texts", prompts=["hello"])  # no model loaded yet: the worker says so and lives on
        with pytest.raises(RuntimeError, match="peer worker failed on 'probe'"):
            client.request("probe", out="/nonexistent/probe.safetensors")
    finally:
        client.close()
    assert client.process.returncode == 0


def test_worker_weights_digest_tracks_every_weight() -> None:
    from chunky_utils.models import build_tiny_model

    worker = peers.load_worker_module()
    first, same = (build_tiny_model("llama", seed=0).model for _ in range(2))
    assert worker.weights_digest(first) == worker.weights_digest(same)
    with torch.no_grad():
        same.model.layers[-1].mlp.up_proj.weight[0, 0] += 1e-3
    assert worker.weights_digest(first) != worker.weights_digest(same)


def test_random_model_folder_reads_back_as_built(tmp_path: Path) -> None:
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.run_gpu import SMOKE_SHAPE, build_random_llama8b
    from chunky_utils.chat import format_prompts

    spec = importlib.util.spec_from_file_location(
        "random_model", peers.REPO / "benchmarks" / "peers" / "random_model.py"
    )
    assert spec is not None and spec.loader is not None
    random_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(random_model)
    folder = random_model.write_random_model(tmp_path / "model", SMOKE_SHAPE, "cpu")
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_theta"] == 500000.0 == config["rope_parameters"]["rope_theta"]
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    built = build_random_llama8b("cpu", SMOKE_SHAPE)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    text = format_prompts(tokenizer, ["Complete def f(x):"])[0]
    assert text == format_prompts(built.tokenizer, ["Complete def f(x):"])[0]
    assert tokenizer(text)["input_ids"] == built.tokenizer(text, add_special_tokens=False)["input_ids"]
    worker = peers.load_worker_module()
    assert worker.weights_digest(model) == worker.weights_digest(built.model)
