"""Peers benchmark on the CPU: our extraction and steered generation next to steering-vectors and repeng.

Run: `make bench-peers` (or `.venv/bin/python benchmarks/peers.py [--repeats 3] [--quick]`).

The peers cannot share our venv (steering-vectors 0.12.2 needs transformers < 5, repeng 0.4.0 does not
import under NumPy 2), so the script builds `.venv-peers` once and drives `benchmarks/peers/peer_worker.py`
there as a subprocess, one JSON command per line; prompts, vectors and logits travel through files in a
temp folder. Both sides load the same converted embedded SmolLM2 folder, which is checked first (weights
hash, rotary frequencies, token ids, logits). Candidates run interleaved within each repeat, one process
busy at a time, and the table reports medians and project/peer ratios, since absolute seconds drift on a
shared machine. Needs ../shared/realdata (HumanEval and T0 prompts); without it the script says so and
exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from chunky_utils.activations import extract_last_token_activations, subset_means  # noqa: E402
from chunky_utils.chat import format_prompts, tokenize_prompts  # noqa: E402
from chunky_utils.data import PromptRow, PromptSet, read_prompt_file  # noqa: E402
from chunky_utils.embedded_model import embedded_model_dir  # noqa: E402
from chunky_utils.generation import GenerationSettings, generate_with_scales  # noqa: E402
from chunky_utils.models import EMBEDDED_MODEL_ID, LoadedModel, load_model  # noqa: E402
from chunky_utils.steering import contrastive_vector  # noqa: E402

log = logging.getLogger("peers")

WORKER = REPO / "benchmarks" / "peers" / "peer_worker.py"
DEFAULT_PEERS_VENV = REPO / ".venv-peers"
DEFAULT_REALDATA = REPO.parent / "shared" / "realdata"
PEER_TORCH = "torch==2.13.0"  # the CPU wheel on this machine's disk; pip, not uv, so the local wheel is found
PEER_PACKAGES = (
    "steering-vectors==0.12.2",
    "repeng==0.4.0",
    "numpy<2",
    "transformers>=4.56,<5",
    "gguf",
    "sentencepiece",
    "safetensors",
)
TARGET_FILE = "humaneval.jsonl"
BASELINE_FILE = "t0_flanlike.jsonl"
PROBE_PROMPTS = ("What is the capital of France?", "def add(a, b):\n    return a + b\n\nExplain this code.")
EXTRACTION_METHODS = ("steering_vectors_single", "steering_vectors_batched", "repeng_pca_diff")
"""Peer extractions timed in every repeat; repeng's `pca_center` runs once, for its vector."""
POSITION_ALIGNMENT = (
    "all three read the last token of the chat-formatted prompt that ends with the generation prompt "
    "(`<|im_start|>assistant\\n`): ours `read_position='generation_prompt'`; steering-vectors "
    "`read_token_index=-1`, shifted past padding by its `adjust_read_indices_for_padding`; repeng the last "
    "attention-mask position of each row. The peers tokenize the text with `add_special_tokens=True`, which "
    "adds nothing for this tokenizer: checked by comparing every token id with ours."
)
LAYER_ALIGNMENT = (
    "layer L is the output of decoder block `model.layers[L]` (0-based) everywhere: ours hooks that block; "
    "steering-vectors' `layers=[L]` indexes the blocks matched by `model.layers.{num}` (a negative L counts "
    "from the end); repeng's `hidden_layers=[L]` reads `output_hidden_states[L + 1]` (index 0 is the "
    "embeddings; a negative L is first turned into n_layers + L) and `ControlModel(model, [L])` wraps "
    "`model.layers[L]`. Checked by reading single prompts through each library and comparing with our "
    "layers L - 1 and L."
)


# ---------------------------------------------------------------- pure helpers (tested without the peers)


def cosine(first: torch.Tensor, second: torch.Tensor) -> float:
    """Cosine similarity of two vectors, in float64."""
    a, b = first.double().flatten(), second.double().flatten()
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def vector_agreement(ours: torch.Tensor, peer: torch.Tensor, unit_norm_peer: bool = False) -> dict[str, float | None]:
    """Cosine and norm ratio (ours / peer) of our vector against a peer's; no ratio for unit-norm methods."""
    return {
        "cosine": cosine(ours, peer),
        "norm_ratio": None if unit_norm_peer else float(ours.double().norm() / peer.double().norm()),
        "ours_norm": float(ours.norm()),
        "peer_norm": float(peer.norm()),
    }


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in samples.items() if values}


def project_peer_ratios(median_seconds: dict[str, float], ours: str, peers: Sequence[str]) -> dict[str, float]:
    """`ours / peer` for each peer timing present: below 1 means the project is faster."""
    return {peer: median_seconds[ours] / median_seconds[peer] for peer in peers if peer in median_seconds}


def equal_rows(first: Sequence[str | None], second: Sequence[str | None]) -> int:
    """How many rows hold the same text in both lists (of equal length)."""
    if len(first) != len(second):
        raise ValueError(f"row counts differ: {len(first)} vs {len(second)}")
    return sum(a is not None and a == b for a, b in zip(first, second, strict=True))


def max_abs_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference over tensors present under the same names in both (shapes must match)."""
    if set(first) != set(second):
        raise ValueError(f"tensor names differ: {sorted(first)} vs {sorted(second)}")
    return max(float((first[name].double() - second[name].double()).abs().max()) for name in first)


def heldout_rows(target: Sequence[PromptRow], baseline: Sequence[PromptRow], skip: int, count: int) -> list[PromptRow]:
    """`count` rows not used for the vector: alternately the next target and the next baseline rows."""
    rows: list[PromptRow] = []
    for index in range(count):
        source = target if index % 2 == 0 else baseline
        position = skip + index // 2
        if position >= len(source):
            raise ValueError(f"only {len(source)} rows: cannot hold out {count} after the first {skip}")
        rows.append(source[position])
    return rows


def layer_match_table(
    peer_activations: dict[str, torch.Tensor], ours_by_layer: dict[int, torch.Tensor]
) -> dict[str, dict[str, float]]:
    """Max abs difference of each peer's read activations against each of our layers (0 = same read)."""
    return {
        reader: {
            f"ours_layer_{layer}": float((values.double() - ours.double()).abs().max())
            for layer, ours in sorted(ours_by_layer.items())
        }
        for reader, values in peer_activations.items()
    }


def _format_seconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s"


def report_table(results: dict[str, Any]) -> str:
    """The README table: vector agreement, extraction and generation ratios, text agreement."""
    agreement = results["vector_agreement"]
    extraction = results["extraction"]["median_s"]
    generation = results["generation"]["median_s"]
    texts = results["generation"]["equal_rows"]
    n_rows = results["settings"]["n_heldout"]
    ours_extract = extraction["ours"]
    mean = agreement["steering_vectors_mean"]
    lines = [
        "| measure | value | detail |",
        "| --- | ---: | --- |",
        f"| cosine, ours vs steering-vectors mean aggregator | {mean['cosine']:.6f} | "
        f"norm ratio {mean['norm_ratio']:.6f} (our norm {mean['ours_norm']:.3f}) |",
    ]
    for method, label in (("repeng_pca_center", "`pca_center`"), ("repeng_pca_diff", "`pca_diff` (its default)")):
        lines.append(
            f"| cosine, ours vs repeng {label} | {agreement[method]['cosine']:.4f} | unit-norm PCA direction |"
        )
    names = {
        "steering_vectors_single": "steering-vectors, one pair at a time",
        "steering_vectors_batched": f"steering-vectors, batch {results['settings']['batch_size']}",
        "repeng_pca_diff": f"repeng `pca_diff`, batch {results['settings']['batch_size']}",
    }
    for key, label in names.items():
        if key in extraction:
            lines.append(
                f"| extraction time, ours / {label} | {ours_extract / extraction[key]:.3f} | "
                f"{_format_seconds(ours_extract)} vs {_format_seconds(extraction[key])} |"
            )
    ours_generate = generation["ours_baseline+steered"]
    for library, label in (("steering_vectors", "steering-vectors"), ("repeng", "repeng")):
        peer_total = generation[f"{library}_baseline"] + generation[f"{library}_steered"]
        lines.append(
            f"| generation time (baseline + steered), ours / {label} | {ours_generate / peer_total:.3f} | "
            f"{_format_seconds(ours_generate)} in one call vs {_format_seconds(peer_total)} in two |"
        )
    for key, label in (
        ("ours_vs_steering_vectors_baseline", "baseline texts equal, ours vs steering-vectors"),
        ("ours_vs_steering_vectors_steered", "steered texts equal, ours vs steering-vectors"),
        ("ours_vs_repeng_steered", "steered texts equal, ours vs repeng (our vector)"),
        ("steered_differs_from_baseline", "steered text differs from baseline (ours)"),
    ):
        lines.append(f"| {label} | {texts[key]} / {n_rows} | |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the peers' venv and worker


def ensure_peers_venv(venv: Path, base_python: str) -> Path:
    """Create the peers' venv once (pip; the stamp records what was installed) and return its python."""
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    wanted = "\n".join([PEER_TORCH, *PEER_PACKAGES]) + "\n"
    if python.is_file() and stamp.is_file() and stamp.read_text(encoding="utf-8") == wanted:
        return python
    log.info("creating the peers' venv %s (once; a few minutes)", venv)
    subprocess.run([base_python, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, PEER_TORCH], check=True)  # first, so no range below pulls a CUDA build
    subprocess.run([*pip, *PEER_PACKAGES], check=True)
    stamp.write_text(wanted, encoding="utf-8")
    return python


class PeerWorker:
    """The worker subprocess: one JSON command line in, one JSON reply line out."""

    def __init__(self, python: Path, threads: int, pythonpath: str | None = None) -> None:
        environment = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        if pythonpath:
            environment["PYTHONPATH"] = pythonpath
        self.process = subprocess.Popen(
            [str(python), str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **environment},
        )

    def request(self, command: str, **arguments: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"cmd": command, **arguments}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"peer worker exited (code {self.process.wait()}) during {command!r}")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise RuntimeError(f"peer worker failed on {command!r}: {reply['error']}\n{reply['traceback']}")
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.process.stdin.close()
            self.process.wait(timeout=60)


def load_worker_module() -> ModuleType:
    """peer_worker.py as a module here too, for its weights digest (it imports only torch and safetensors)."""
    spec = importlib.util.spec_from_file_location("peer_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- our side


@dataclass(frozen=True)
class BenchmarkPrompts:
    """The vector's target and baseline rows and the held-out generation rows."""

    target: PromptSet
    baseline: PromptSet
    heldout: list[PromptRow]


def load_benchmark_prompts(realdata: Path, n_vector: int, n_heldout: int) -> BenchmarkPrompts:
    """First `n_vector` rows of HumanEval (target) and T0 (baseline); the held-out rows come right after."""
    target_rows = read_prompt_file(realdata / TARGET_FILE)
    baseline_rows = read_prompt_file(realdata / BASELINE_FILE)

    def prompt_set(name: str, rows: list[PromptRow]) -> PromptSet:
        sampling = {"method": "first", "n": n_vector}
        return PromptSet(name, name, "file", tuple(rows[:n_vector]), len(rows), sampling)

    return BenchmarkPrompts(
        prompt_set("humaneval", target_rows),
        prompt_set("t0_flanlike", baseline_rows),
        heldout_rows(target_rows, baseline_rows, n_vector, n_heldout),
    )


def our_vector(
    loaded: LoadedModel, prompts: BenchmarkPrompts, layer: int, batch_size: int
) -> tuple[torch.Tensor, float, Path]:
    """Our contrastive vector through the CLI's path with a fresh cache, stopped at `layer`; and its seconds."""
    cache_root = Path(tempfile.mkdtemp(prefix="peers-cache-"))
    started = time.perf_counter()
    means = [
        subset_means(loaded, prompt_set, [layer], cache_root, capture="needed", batch_size=batch_size, progress=False)
        for prompt_set in (prompts.target, prompts.baseline)
    ]
    vector = contrastive_vector(*means).at(layer)
    return vector, time.perf_counter() - started, cache_root


def our_generation(
    loaded: LoadedModel, prompts: Sequence[str], layer: int, vector: torch.Tensor, scale: float, new_tokens: int
) -> tuple[float, list[str | None], list[str | None]]:
    """Baseline and steered rows of every prompt in one greedy `generate_with_scales` call."""
    settings = GenerationSettings(max_new_tokens=new_tokens, temperature=0.0, batch_size=2 * len(prompts))
    started = time.perf_counter()
    output = generate_with_scales(loaded, prompts, layer, vector, [0.0, scale], settings, progress=False)
    seconds = time.perf_counter() - started
    return seconds, list(output.for_scale(0.0)), list(output.for_scale(scale))


@torch.inference_mode()
def our_probe(loaded: LoadedModel, prompts: Sequence[str]) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
    """Token ids of the chat-formatted probe prompts, their logits, and the rotary frequencies."""
    token_ids = tokenize_prompts(loaded.tokenizer, format_prompts(loaded.tokenizer, prompts))
    tensors = {
        f"logits_{index}": loaded.model(input_ids=torch.tensor([ids], device=loaded.device)).logits[0].float().cpu()
        for index, ids in enumerate(token_ids)
    }
    tensors["inv_freq"] = loaded.model.model.rotary_emb.inv_freq.detach().float().cpu()
    return token_ids, tensors


# ---------------------------------------------------------------- the run


def check_same_model(
    loaded: LoadedModel, worker: PeerWorker, prompts: BenchmarkPrompts, folder: Path, digest: str
) -> dict[str, Any]:
    """Both sides load identical weights, rope and tokenizer: compared, not assumed."""
    from safetensors.torch import load_file

    peer = worker.request("probe", out=str(folder / "peer_probe.safetensors"))
    our_ids, our_tensors = our_probe(loaded, PROBE_PROMPTS)
    peer_tensors = load_file(str(folder / "peer_probe.safetensors"))
    vector_texts = format_prompts(loaded.tokenizer, prompts.target.prompts + prompts.baseline.prompts)
    our_vector_ids = tokenize_prompts(loaded.tokenizer, vector_texts)
    config = loaded.model.config
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", None))
    return {
        "weights_sha256_equal": peer["weights_sha256"] == digest,
        "weights_sha256": digest,
        "inv_freq_max_abs_diff": float((peer_tensors.pop("inv_freq") - our_tensors.pop("inv_freq")).abs().max()),
        "probe_token_ids_equal": peer["probe_token_ids"] == our_ids,
        "vector_prompt_token_ids_equal": sum(
            a == b for a, b in zip(peer["vector_token_ids"], our_vector_ids, strict=True)
        ),
        "vector_prompts": len(our_vector_ids),
        "chat_texts_equal": peer["chat_texts"] == format_prompts(loaded.tokenizer, PROBE_PROMPTS),
        "probe_logits_max_abs_diff": max_abs_difference(our_tensors, peer_tensors),
        "ours_rope_theta": rope,
    }


def check_layer_alignment(
    loaded: LoadedModel, worker: PeerWorker, prompts: BenchmarkPrompts, layer: int, folder: Path
) -> dict[str, dict[str, float]]:
    """Each library's read at `layer` (and at the same layer counted from the end) against our layers."""
    from safetensors.torch import load_file

    sample = prompts.target.prompts[:1] + prompts.baseline.prompts[:1]
    out = folder / "peer_reads.safetensors"
    worker.request("read_activations", prompts=sample, out=str(out))
    ours, _ = extract_last_token_activations(
        loaded.model, loaded.tokenizer, sample, [layer - 1, layer, layer + 1], batch_size=len(sample), progress=False
    )
    ours_by_layer = {read_layer: ours[:, index] for index, read_layer in enumerate((layer - 1, layer, layer + 1))}
    return layer_match_table(load_file(str(out)), ours_by_layer)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    prompts = load_benchmark_prompts(args.realdata, args.n_vector, args.n_heldout)
    peer_python = args.peers_python or ensure_peers_venv(args.peers_venv, args.base_python)
    model_id = str(args.model_dir) if args.model_dir else EMBEDDED_MODEL_ID
    loaded = load_model(model_id, cache_dir=args.cache_dir, device=args.device, dtype=args.dtype)
    model_dir = args.model_dir or embedded_model_dir(args.cache_dir)
    layer = args.layer
    heldout = [row.prompt for row in prompts.heldout]
    with tempfile.TemporaryDirectory(prefix="peers-") as temp:
        folder = Path(temp)
        job = {
            "model_dir": str(model_dir),
            "device": args.device,
            "dtype": args.dtype,
            "layer": layer,
            "target_prompts": prompts.target.prompts,
            "baseline_prompts": prompts.baseline.prompts,
            "heldout_prompts": heldout,
            "probe_prompts": list(PROBE_PROMPTS),
        }
        (folder / "job.json").write_text(json.dumps(job), encoding="utf-8")
        worker = PeerWorker(peer_python, args.threads, args.peers_pythonpath)
        try:
            peer_info = worker.request("load", job_file=str(folder / "job.json"), threads=args.threads)
            log.info("peer side: %s", peer_info["versions"])
            digest = load_worker_module().weights_digest(loaded.model)
            same_model = check_same_model(loaded, worker, prompts, folder, digest)
            log.info("same model on both sides: %s", same_model)
            alignment = check_layer_alignment(loaded, worker, prompts, layer, folder)
            log.info("layer alignment: %s", alignment)
            extraction, vectors = time_extractions(loaded, worker, prompts, args, folder)
            generation = time_generations(loaded, worker, heldout, vectors, args, folder)
        finally:
            worker.close()
    ours = vectors["ours"]
    return {
        "benchmark": "peers_cpu",
        "date": date.today().isoformat(),
        "command": " ".join(["benchmarks/peers.py", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "versions": {"ours": our_versions(), "peers": peer_info["versions"]},
        "settings": {
            "model": model_id,
            "device": args.device,
            "dtype": args.dtype,
            "threads": args.threads,
            "layer": layer,
            "scale": args.scale,
            "n_vector_per_side": args.n_vector,
            "n_heldout": args.n_heldout,
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "target": TARGET_FILE,
            "baseline": BASELINE_FILE,
            "heldout_ids": [row.id for row in prompts.heldout],
        },
        "alignment": {"positions": POSITION_ALIGNMENT, "layers": LAYER_ALIGNMENT, "reads_max_abs_diff": alignment},
        "same_model": {
            **same_model,
            "peer_rope_theta": peer_info["rope_theta"],
            "peer_tokenizer": peer_info["tokenizer_class"],
            "peer_has_quantization_config": peer_info["has_quantization_config"],
        },
        "vector_agreement": {
            "steering_vectors_mean": vector_agreement(ours, vectors["steering_vectors_batched"]),
            "steering_vectors_mean_single": vector_agreement(ours, vectors["steering_vectors_single"]),
            "repeng_pca_center": vector_agreement(ours, vectors["repeng_pca_center"], unit_norm_peer=True),
            "repeng_pca_diff": vector_agreement(ours, vectors["repeng_pca_diff"], unit_norm_peer=True),
        },
        "extraction": extraction,
        "generation": generation,
    }


def time_extractions(
    loaded: LoadedModel, worker: PeerWorker, prompts: BenchmarkPrompts, args: argparse.Namespace, folder: Path
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Each repeat: ours, then every peer method, back to back; vectors kept from the first repeat."""
    from safetensors.torch import load_file

    samples: dict[str, list[float]] = {"ours": [], **{method: [] for method in EXTRACTION_METHODS}}
    vectors: dict[str, torch.Tensor] = {}
    for repeat in range(args.repeats):
        vector, seconds, cache_root = our_vector(loaded, prompts, args.layer, args.batch_size)
        shutil.rmtree(cache_root, ignore_errors=True)
        samples["ours"].append(seconds)
        vectors.setdefault("ours", vector)
        for method in EXTRACTION_METHODS:
            out = folder / f"{method}.safetensors"
            reply = worker.request("extract", method=method, batch_size=args.batch_size, out=str(out))
            samples[method].append(reply["seconds"])
            vectors.setdefault(method, load_file(str(out))["vector"])
        log.info(
            "extraction repeat %d: %s", repeat + 1, {name: round(values[-1], 2) for name, values in samples.items()}
        )
    out = folder / "repeng_pca_center.safetensors"
    center = worker.request("extract", method="repeng_pca_center", batch_size=args.batch_size, out=str(out))
    vectors["repeng_pca_center"] = load_file(str(out))["vector"]
    median_seconds = medians(samples)
    return (
        {
            "samples_s": samples,
            "median_s": median_seconds,
            "repeng_pca_center_s": center["seconds"],
            "ours_over_peer": project_peer_ratios(median_seconds, "ours", EXTRACTION_METHODS),
        },
        vectors,
    )


def time_generations(
    loaded: LoadedModel,
    worker: PeerWorker,
    heldout: list[str],
    vectors: dict[str, torch.Tensor],
    args: argparse.Namespace,
    folder: Path,
) -> dict[str, Any]:
    """Each repeat: ours (baseline and steered rows in one call), steering-vectors, repeng; greedy."""
    from safetensors.torch import save_file

    files = {"steering_vectors": folder / "sv_vector.safetensors", "repeng": folder / "our_vector.safetensors"}
    save_file({"vector": vectors["steering_vectors_batched"].contiguous()}, str(files["steering_vectors"]))
    save_file({"vector": vectors["ours"].contiguous()}, str(files["repeng"]))
    # warm-up: one-off costs (first generate, hook set-up) out of the timed runs
    our_generation(loaded, heldout[:2], args.layer, vectors["ours"], args.scale, 2)
    for library, path in files.items():
        worker.request("generate", library=library, vector_file=str(path), scale=args.scale, max_new_tokens=2)
    samples: dict[str, list[float]] = {
        "ours_baseline+steered": [],
        **{f"{library}_{kind}": [] for library in files for kind in ("baseline", "steered")},
    }
    texts: dict[str, list[str | None]] = {}
    for repeat in range(args.repeats):
        seconds, baseline, steered = our_generation(
            loaded, heldout, args.layer, vectors["ours"], args.scale, args.max_new_tokens
        )
        samples["ours_baseline+steered"].append(seconds)
        texts.setdefault("ours_baseline", baseline)
        texts.setdefault("ours_steered", steered)
        for library, path in files.items():
            reply = worker.request(
                "generate",
                library=library,
                vector_file=str(path),
                scale=args.scale,
                max_new_tokens=args.max_new_tokens,
            )
            for kind in ("baseline", "steered"):
                samples[f"{library}_{kind}"].append(reply[f"{kind}_s"])
                texts.setdefault(f"{library}_{kind}", reply[f"{kind}_texts"])
        log.info(
            "generation repeat %d: %s", repeat + 1, {name: round(values[-1], 2) for name, values in samples.items()}
        )
    median_seconds = medians(samples)
    peer_totals = {
        library: median_seconds[f"{library}_baseline"] + median_seconds[f"{library}_steered"] for library in files
    }
    return {
        "samples_s": samples,
        "median_s": median_seconds,
        "peer_baseline+steered_s": peer_totals,
        "ours_over_peer": {
            library: median_seconds["ours_baseline+steered"] / total for library, total in peer_totals.items()
        },
        "equal_rows": {
            "ours_vs_steering_vectors_baseline": equal_rows(texts["ours_baseline"], texts["steering_vectors_baseline"]),
            "ours_vs_repeng_baseline": equal_rows(texts["ours_baseline"], texts["repeng_baseline"]),
            "ours_vs_steering_vectors_steered": equal_rows(texts["ours_steered"], texts["steering_vectors_steered"]),
            "ours_vs_repeng_steered": equal_rows(texts["ours_steered"], texts["repeng_steered"]),
            "steering_vectors_vs_repeng_steered": equal_rows(
                texts["steering_vectors_steered"], texts["repeng_steered"]
            ),
            "steered_differs_from_baseline": len(heldout) - equal_rows(texts["ours_baseline"], texts["ours_steered"]),
        },
        "texts": texts,
    }


def our_versions() -> dict[str, str]:
    import numpy
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per candidate (the median is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--scale", type=float, default=1.0, help="steering scale for the generation comparison")
    parser.add_argument("--n-vector", type=int, default=100, help="prompts per side (HumanEval, T0) for the vector")
    parser.add_argument("--n-heldout", type=int, default=20, help="held-out generation prompts (half from each)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="extraction batch size for ours and batched peers")
    parser.add_argument("--quick", action="store_true", help="8 prompts per side, 4 held out, 8 tokens, 1 repeat")
    parser.add_argument("--realdata", type=Path, default=DEFAULT_REALDATA)
    parser.add_argument("--cache-dir", type=Path, default=REPO / "cache", help="where the converted model lives")
    parser.add_argument("--peers-venv", type=Path, default=DEFAULT_PEERS_VENV)
    parser.add_argument("--peers-python", type=Path, default=None, help="use this interpreter instead of the venv")
    parser.add_argument("--base-python", default="python3", help="interpreter that creates the peers' venv")
    parser.add_argument("--peers-pythonpath", default=None, help="PYTHONPATH for the peer side (wheels unpacked)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, both sides")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="both sides")
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="a model folder both transformers read (default: the converted embedded SmolLM2)",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/peers_cpu_<date>.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_vector, args.n_heldout, args.max_new_tokens, args.repeats = 8, 4, 8, 1
    if args.out is None:
        args.out = REPO / "benchmarks" / "results" / f"peers_cpu_{date.today().isoformat()}.json"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("chunky_utils").setLevel(logging.WARNING)
    args = parse_args(argv)
    missing = [name for name in (TARGET_FILE, BASELINE_FILE) if not (args.realdata / name).is_file()]
    if missing:
        print(f"skipped: {', '.join(missing)} not found under {args.realdata} (the real prompt sets)")
        return 0
    started = time.perf_counter()
    results = run(args)
    results["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(report_table(results))
    print(f"\nraw results: {args.out} ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
