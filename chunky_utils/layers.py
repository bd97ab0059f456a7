"""Every way the code touches a model's decoder layers, in one place.

- `find_decoder_layers`: the list of decoder blocks across architectures, looked up once per model;
- `add_deltas`: add one delta per batch row to chosen layers' outputs (steering);
- `read_layers`: capture chosen layers' outputs, optionally stopping the forward after the deepest one;
- `skipped_layers`: let layers a shared trunk already ran pass their input through.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from chunky_utils.errors import UsageError
from chunky_utils.options import STEER_POSITIONS

DECODER_LAYER_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi3
    "model.language_model.layers",  # multimodal wrappers (Gemma3, Llava-style)
    "language_model.model.layers",
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "transformer.layers",
    "layers",
    "h",
)
_FOUND: weakref.WeakKeyDictionary[nn.Module, nn.ModuleList] = weakref.WeakKeyDictionary()


class StopForward(Exception):
    """Raised after the deepest layer a reader needs, so the layers past it never run."""


def _get_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks, across architectures (looked up once per model)."""
    if model in _FOUND:
        return _FOUND[model]
    found = None
    for path in DECODER_LAYER_PATHS:
        candidate = _get_path(model, path)
        if isinstance(candidate, nn.ModuleList) and len(candidate) > 0:
            found = candidate
            break
    if found is None:
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
        if not lists:
            raise UsageError(f"cannot find decoder layers in {type(model).__name__}")
        found = max(lists, key=len)
    _FOUND[model] = found
    return found


def check_layer(model: nn.Module, layer: int) -> int:
    """Return `layer` if the model has it, else raise a UsageError naming the valid range."""
    n_layers = len(find_decoder_layers(model))
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n_layers:
        raise UsageError(f"layer {layer} is out of range: this model has layers 0..{n_layers - 1}")
    return layer


def output_hidden(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a decoder layer's output (a tensor or a tuple, by version)."""
    return output[0] if isinstance(output, tuple | list) else output


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """A layer output of the same structure carrying `hidden` instead."""
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


# ---------------------------------------------------------------- adding deltas (steering)


class RowDeltaHook:
    """Forward hook adding `delta` ([hidden] or one row per batch element, [batch, hidden]) to a layer's output."""

    def __init__(self, delta: torch.Tensor, positions: str = "all") -> None:
        if positions not in STEER_POSITIONS:
            raise ValueError(f"positions must be one of {STEER_POSITIONS}, got {positions!r}")
        self.delta = delta
        self.positions = positions
        self._cast: torch.Tensor | None = None

    def __call__(self, _module: nn.Module, _args: Any, output: Any) -> Any:
        hidden = output_hidden(output)
        if self._cast is None or self._cast.device != hidden.device or self._cast.dtype != hidden.dtype:
            self._cast = self.delta.to(device=hidden.device, dtype=hidden.dtype)
        delta = self._cast
        if delta.dim() == 2:
            if delta.shape[0] != hidden.shape[0]:
                raise ValueError(f"steering has {delta.shape[0]} rows but the batch has {hidden.shape[0]}")
            delta = delta[:, None, :]
        if self.positions == "generated" and hidden.shape[1] != 1:  # a prompt pass: only its last token
            steered = hidden.clone()
            steered[:, -1:] += delta
        else:
            steered = hidden + delta
        return with_hidden(output, steered)


@contextmanager
def add_deltas(model: nn.Module, deltas: Mapping[int, torch.Tensor], positions: str = "all") -> Iterator[None]:
    """Add a delta to each listed layer's output while the block runs; the hooks always come off."""
    layers = find_decoder_layers(model)
    for layer in deltas:
        check_layer(model, layer)
    handles = [layers[layer].register_forward_hook(RowDeltaHook(delta, positions)) for layer, delta in deltas.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def observer(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function` as a hook marked as an observer: it only watches (progress, stop), so the GPU decode loop,
    which runs no hooks, may run without it when it is told the same things another way."""

    def hook(*args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    hook.chunky_observer = True  # type: ignore[attr-defined]
    return hook


@contextmanager
def observers_suspended(model: nn.Module) -> Iterator[None]:
    """`observer` hooks taken off every module of `model` for the block, then put back: code that compiles
    or captures the model (the GPU decode loop) must not trace them, and tells observers its steps itself."""
    removed: list[tuple[dict[int, Any], int, Any]] = []
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key, hook in list(hooks.items()):
                if getattr(hook, "chunky_observer", False):
                    removed.append((hooks, key, hook))
                    del hooks[key]
    try:
        yield
    finally:
        for hooks, key, hook in removed:
            hooks[key] = hook


def user_hooks(module: nn.Module) -> list[Any]:
    """Forward and pre-forward hooks on `module` that change what it computes: without transformers' own
    output-capturing hooks (installed for good by the first `output_hidden_states=True` call, inert
    otherwise) and without `observer` hooks."""
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return [hook for hook in hooks if not _transformers_hook(hook) and not getattr(hook, "chunky_observer", False)]


def _transformers_hook(hook: Any) -> bool:
    return getattr(hook, "__module__", "").startswith("transformers.")


def active_hook_count(model: nn.Module) -> int:
    """Steering hooks currently on the decoder layers (0 when nothing is steering)."""
    layers = find_decoder_layers(model)
    return sum(isinstance(hook, RowDeltaHook) for layer in layers for hook in layer._forward_hooks.values())


# ---------------------------------------------------------------- reading layers


@contextmanager
def read_layers(
    model: nn.Module,
    layers: Sequence[int],
    stop_after: bool = False,
    keep: Callable[[Any], Any] = output_hidden,
) -> Iterator[dict[int, Any]]:
    """Capture `keep(output)` of each listed layer into the yielded dict on every forward; with `stop_after`,
    the deepest listed layer raises StopForward (catch it around the forward call: `run_until_stop`)."""
    decoder_layers = find_decoder_layers(model)
    captured: dict[int, Any] = {}
    deepest = max(layers) if layers else None

    def hook_for(layer: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            captured[layer] = keep(output)
            if stop_after and layer == deepest:
                raise StopForward

        return hook

    handles = [decoder_layers[layer].register_forward_hook(hook_for(layer)) for layer in sorted(set(layers))]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def run_until_stop(forward: Callable[[], Any]) -> Any:
    """Call a forward that a `read_layers(stop_after=True)` hook may cut short; None when it was."""
    try:
        return forward()
    except StopForward:
        return None


# ---------------------------------------------------------------- skipping layers (a shared trunk)


def same_structure(output: Any, hidden: torch.Tensor) -> Any | None:
    """`hidden` shaped like a layer output (a tensor, or a tuple whose other items are None), else None."""
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple | list) and all(item is None for item in output[1:]):
        return type(output)([hidden, *output[1:]])
    return None


@contextmanager
def skipped_layers(layers: Sequence[nn.Module], last_output: Any) -> Iterator[None]:
    """Layers 0..k pass their input through and layer k returns `last_output`: a trunk already ran them."""

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return same_structure(last_output, hidden)

    def replay(*_args: Any, **_kwargs: Any) -> Any:
        return last_output

    originals = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers[:-1]:
        layer.forward = passthrough
    layers[-1].forward = replay
    try:
        yield
    finally:
        for layer, original in zip(layers, originals, strict=True):
            if original is None:
                del layer.forward
            else:
                layer.forward = original
