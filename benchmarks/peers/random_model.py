"""A random-weight Llama folder that transformers 4.x and 5 read alike, for the peers benchmark on a GPU.

The embedded GGUF cannot travel to the GPU machine (over the 64 MiB a call may carry), so there both
sides load this folder instead: run_gpu.py's Llama-3.1-8B-shaped random model (byte tokenizer, ChatML
template), written with the same portable config and tokenizer files as the converted embedded model.

    python benchmarks/peers/random_model.py --out /tmp/random-llama [--smoke] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.run_gpu import LLAMA_31_8B, SMOKE_SHAPE, build_random_llama8b  # noqa: E402
from chunky_utils.chat import CHATML_TEMPLATE  # noqa: E402
from chunky_utils.embedded_model import portable_model_config, write_portable_tokenizer  # noqa: E402


def write_random_model(folder: Path, shape: dict[str, object], device: str) -> Path:
    """Save the random model (bf16) with a config and tokenizer that every allowed transformers reads."""
    loaded = build_random_llama8b(device, shape)
    folder.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(folder)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config_file.write_text(json.dumps(portable_model_config(config), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tokenizer = loaded.tokenizer
    special_tokens = {name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "pad_token")}
    max_length = int(shape.get("max_position_embeddings", 2048))  # type: ignore[call-overload]
    write_portable_tokenizer(tokenizer.backend_tokenizer, folder, special_tokens, CHATML_TEMPLATE, max_length)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    generation = {**ids, "pad_token_id": tokenizer.pad_token_id}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="a tiny shape (checks the script on a CPU)")
    parser.add_argument("--device", default="cpu", help="where the random weights are drawn (cuda is faster)")
    args = parser.parse_args()
    print(write_random_model(args.out, SMOKE_SHAPE if args.smoke else LLAMA_31_8B, args.device))


if __name__ == "__main__":
    main()
