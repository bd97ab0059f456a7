"""The peer side of benchmarks/peers.py: steering-vectors and repeng, run in their own venv.

Started by the driver as `.venv-peers/bin/python benchmarks/peers/peer_worker.py`; reads one JSON
command per line on stdin and answers one JSON line per command on the original stdout (everything the
libraries print goes to stderr). Vectors and logits travel as safetensors files named in the commands.
It imports nothing from chunky_utils, whose dependencies this venv does not have.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, TextIO

import torch
from safetensors.torch import save_file


class PeerSession:
    """The model, tokenizer and prompts loaded once, and one method per command."""

    def __init__(self) -> None:
        self.model: Any = None
        self.tokenizer: Any = None
        self.job: dict[str, Any] = {}

    # ------------------------------------------------------------------ commands

    def load(self, job_file: str, threads: int) -> dict[str, Any]:
        """Load the job's model folder (its device and dtype) and its prompts."""
        allow_repeng_under_numpy2()
        import repeng
        import steering_vectors
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        with open(job_file, encoding="utf-8") as handle:
            self.job = json.load(handle)
        folder = self.job["model_dir"]
        dtype = getattr(torch, self.job.get("dtype", "float32"))
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(self.job.get("device", "cpu")).eval()
        config = self.model.config
        return {
            "versions": {
                "python": sys.version.split()[0],
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "steering_vectors": _distribution_version("steering-vectors", steering_vectors),
                "repeng": _distribution_version("repeng", repeng),
                "numpy": __import__("numpy").__version__,
            },
            "threads": torch.get_num_threads(),
            "tokenizer_class": type(self.tokenizer).__name__,
            "rope_theta": _rope_theta(config),
            "has_quantization_config": getattr(config, "quantization_config", None) is not None,
            "n_layers": int(config.num_hidden_layers),
        }

    def probe(self, out: str) -> dict[str, Any]:
        """What identifies the loaded model: weight hash, rotary frequencies, token ids, probe logits."""
        texts = self.chat_texts(self.job["probe_prompts"])
        token_ids = [self.tokenizer(text)["input_ids"] for text in texts]
        with torch.inference_mode():
            logits = [
                self.model(input_ids=torch.tensor([ids], device=self.model.device)).logits[0] for ids in token_ids
            ]
        tensors = {f"logits_{index}": value.float().cpu().contiguous() for index, value in enumerate(logits)}
        tensors["inv_freq"] = self.model.model.rotary_emb.inv_freq.detach().float().cpu().contiguous()
        save_file(tensors, out)
        return {
            "weights_sha256": weights_digest(self.model),
            "probe_token_ids": token_ids,
            "vector_token_ids": [
                self.tokenizer(text)["input_ids"]
                for text in self.chat_texts(self.job["target_prompts"] + self.job["baseline_prompts"])
            ],
            "chat_texts": texts,
        }

    def extract(self, method: str, batch_size: int, out: str) -> dict[str, Any]:
        """One timed extraction of the target-vs-baseline vector at the job's layer with one peer method."""
        layer = int(self.job["layer"])
        target = self.chat_texts(self.job["target_prompts"])
        baseline = self.chat_texts(self.job["baseline_prompts"])
        extractors: dict[str, Callable[[], torch.Tensor]] = {
            "steering_vectors_single": lambda: self._steering_vectors_mean(target, baseline, layer, 1),
            "steering_vectors_batched": lambda: self._steering_vectors_mean(target, baseline, layer, batch_size),
            "repeng_pca_diff": lambda: self._repeng(target, baseline, layer, batch_size, "pca_diff"),
            "repeng_pca_center": lambda: self._repeng(target, baseline, layer, batch_size, "pca_center"),
        }
        synchronize()
        started = time.perf_counter()
        vector = extractors[method]()
        synchronize()
        seconds = time.perf_counter() - started
        save_file({"vector": vector.detach().float().cpu().contiguous()}, out)
        return {"seconds": seconds, "method": method}

    def read_activations(self, prompts: list[str], out: str) -> dict[str, Any]:
        """Each library's own read at the job's layer (and steering-vectors' at the same layer counted
        from the end) on the chat-formatted prompts, for the driver to match against its layers."""
        from repeng.extract import batched_get_hiddens
        from steering_vectors import extract_activations

        layer = int(self.job["layer"])
        from_end = layer - int(self.model.config.num_hidden_layers)
        texts = self.chat_texts(prompts)
        pairs = [(text, text) for text in texts]
        reads: dict[str, torch.Tensor] = {}
        for name, index in (
            (f"steering_vectors_layers_{layer}", layer),
            (f"steering_vectors_layers_{from_end}", from_end),
        ):
            positive, _ = extract_activations(self.model, self.tokenizer, pairs, layers=[index], batch_size=len(pairs))
            (recorded,) = positive.values()
            reads[name] = torch.cat(recorded).float().cpu()
        hiddens = batched_get_hiddens(self.model, self.tokenizer, texts, [layer], len(texts))
        reads[f"repeng_hidden_layers_{layer}"] = torch.from_numpy(hiddens[layer]).float()
        save_file({name: value.contiguous() for name, value in reads.items()}, out)
        return {"readers": sorted(reads)}

    def generate(self, library: str, vector_file: str, scale: float, max_new_tokens: int) -> dict[str, Any]:
        """Baseline and steered greedy texts for the held-out prompts, one `generate` per configuration."""
        from safetensors.torch import load_file

        vector = load_file(vector_file)["vector"]
        texts = self.chat_texts(self.job["heldout_prompts"])
        self.tokenizer.padding_side = "left"
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True)
        inputs = {name: encoded[name].to(self.model.device) for name in ("input_ids", "attention_mask")}
        options = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": self.tokenizer.pad_token_id}
        if library == "steering_vectors":
            runs = self._steering_vectors_generate(inputs, vector, scale, options)
        elif library == "repeng":
            runs = self._repeng_generate(inputs, vector, scale, options)
        else:
            raise ValueError(f"unknown library {library!r}")
        return {
            "baseline_s": runs["baseline"][0],
            "steered_s": runs["steered"][0],
            "baseline_texts": runs["baseline"][1],
            "steered_texts": runs["steered"][1],
        }

    # ------------------------------------------------------------------ the libraries' own ways

    def _steering_vectors_mean(
        self, target: list[str], baseline: list[str], layer: int, batch_size: int
    ) -> torch.Tensor:
        from steering_vectors import train_steering_vector

        pairs = list(zip(target, baseline, strict=True))
        trained = train_steering_vector(
            self.model, self.tokenizer, pairs, layers=[layer], read_token_index=-1, batch_size=batch_size
        )
        return trained.layer_activations[layer]

    def _repeng(self, target: list[str], baseline: list[str], layer: int, batch_size: int, method: str) -> torch.Tensor:
        from repeng import ControlVector, DatasetEntry

        dataset = [DatasetEntry(positive=p, negative=n) for p, n in zip(target, baseline, strict=True)]
        trained = ControlVector.train(
            self.model, self.tokenizer, dataset, hidden_layers=[layer], batch_size=batch_size, method=method
        )
        return torch.from_numpy(trained.directions[layer])

    def _steering_vectors_generate(
        self, inputs: Any, vector: torch.Tensor, scale: float, options: dict[str, Any]
    ) -> dict[str, tuple[float, list[str]]]:
        from steering_vectors import SteeringVector

        layer = int(self.job["layer"])
        steering = SteeringVector({layer: vector.to(self.model.device)}, "decoder_block")
        baseline = self._timed_generate(self.model, inputs, options)
        with steering.apply(self.model, multiplier=scale, min_token_index=0):
            steered = self._timed_generate(self.model, inputs, options)
        return {"baseline": baseline, "steered": steered}

    def _repeng_generate(
        self, inputs: Any, vector: torch.Tensor, scale: float, options: dict[str, Any]
    ) -> dict[str, tuple[float, list[str]]]:
        from repeng import ControlModel, ControlVector

        layer = int(self.job["layer"])
        control_model = ControlModel(self.model, [layer])
        try:
            control = ControlVector(self.model.config.model_type, {layer: vector.numpy()})
            control_model.reset()
            baseline = self._timed_generate(control_model, inputs, options)
            control_model.set_control(control, coeff=scale)
            steered = self._timed_generate(control_model, inputs, options)
            control_model.reset()
        finally:
            self.model = control_model.unwrap()
        return {"baseline": baseline, "steered": steered}

    def _timed_generate(self, model: Any, inputs: Any, options: dict[str, Any]) -> tuple[float, list[str]]:
        with torch.inference_mode():
            synchronize()
            started = time.perf_counter()
            output = model.generate(**inputs, **options)
            synchronize()
            seconds = time.perf_counter() - started
        generated = output[:, inputs["input_ids"].shape[1] :]
        return seconds, [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in generated]

    # ------------------------------------------------------------------ helpers

    def chat_texts(self, prompts: list[str]) -> list[str]:
        """Each prompt as one user turn with the generation prompt, through the model's own template."""
        return [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            for prompt in prompts
        ]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def allow_repeng_under_numpy2() -> None:
    """repeng 0.4.0 names `np.float_` in annotations, gone in NumPy 2; alias it so the module imports.

    Only where NumPy 2 is all there is (the GPU machine); the CPU venv pins NumPy < 2 and skips this.
    """
    import numpy

    if not hasattr(numpy, "float_"):
        numpy.float_ = numpy.float64


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name and fp32 bytes, in name order (tied weights counted once)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def _rope_theta(config: Any) -> float | None:
    parameters = getattr(config, "rope_parameters", None) or {}
    value = parameters.get("rope_theta") if isinstance(parameters, dict) else None
    return float(value) if value is not None else getattr(config, "rope_theta", None)


def _distribution_version(name: str, module: Any) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return str(getattr(module, "__version__", "unknown"))


def serve(commands: TextIO, replies: TextIO) -> None:
    """Answer each command line with one reply line until `quit` or end of input."""
    session = PeerSession()
    for line in commands:
        if not line.strip():
            continue
        request = json.loads(line)
        name = request.pop("cmd")
        if name == "quit":
            break
        try:
            reply = {"ok": True, **getattr(session, name)(**request)}
        except Exception as exc:  # reported to the driver, which stops with the peer's traceback
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main() -> None:
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    sys.stdout = sys.stderr  # library prints must not corrupt the reply stream
    os.dup2(sys.stderr.fileno(), 1)
    serve(sys.stdin, replies)


if __name__ == "__main__":
    main()
