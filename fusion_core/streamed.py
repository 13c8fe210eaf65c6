"""A transformers model whose weights stay in the checkpoint until a module runs.

Activation-based alignment needs each parent's forward pass on the calibration data. Loaded
whole, an 8B parent alone fills a 24 GiB machine. Built here instead, the model's parameters
live on the meta device (nothing allocated) and its buffers are real (rotary frequencies and
position ids come from the config); each module's own parameters are read from the checkpoint
just before it runs and dropped right after, once more than `cache_bytes` are held. A
forward pass then holds about one module's weights beyond the cache, whatever the depth.
Small models stay resident after their first batch (under the cache), so they are read once.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .errors import InputError
from .families import canonical_name
from .limits import build_architecture
from .models import ParentModel

CACHE_BYTES = 256 << 20  # weights kept resident between batches (small models: read once)

_building = threading.Lock()  # one build at a time while register_parameter is patched


@contextmanager
def _meta_parameters() -> Iterator[None]:
    """Modules built in this thread inside the block get their parameters on the meta device
    (allocated uninitialized and released at once: never touched). Buffers stay real. The
    patch is undone on leaving; other threads building modules meanwhile are not affected."""
    with _building:
        original = torch.nn.Module.register_parameter
        owner = threading.get_ident()

        def register(module, name, param):
            if threading.get_ident() == owner and param is not None and not param.is_meta:
                param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            original(module, name, param)

        torch.nn.Module.register_parameter = register
        try:
            yield
        finally:
            torch.nn.Module.register_parameter = original


@dataclass
class StreamedModel:
    """`model` runs like the parent's live model; `peak_bytes` is the most parameter bytes
    it ever held at once."""

    model: torch.nn.Module
    cache_bytes: int
    held_bytes: int = 0
    peak_bytes: int = 0
    _placeholders: list[tuple[torch.nn.Module, dict]] = field(default_factory=list)
    _hooks: list = field(default_factory=list)

    def close(self) -> None:
        """Drop every parameter read and the hooks now: the hooks and the model refer to
        each other, so without this the weights would wait for the garbage collector (while
        the next parent's pass runs)."""
        for module, own in self._placeholders:
            module._parameters.update(own)
        for hook in self._hooks:
            hook.remove()
        self._placeholders.clear()
        self._hooks.clear()
        self.held_bytes = 0


def streamed_model(
    parent: ParentModel, device: str = "cpu", cache_bytes: int = CACHE_BYTES
) -> StreamedModel:
    """The parent's architecture in eval mode, its weights read module by module as it runs
    (in the dtype most of them are stored in, as `from_pretrained` would load them)."""
    model = build_architecture(parent, _meta_parameters())
    model.eval()
    keys = _checkpoint_keys(model, parent)
    dtype = _stored_dtype(parent)
    streamed = StreamedModel(model, cache_bytes)
    for prefix, module in model.named_modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is None:
                continue
            key = keys.get(_join(prefix, name))
            value = parent.checkpoint.tensor(key) if key is not None else buffer
            module._buffers[name] = value.to(device)
        own = {n: p for n, p in module._parameters.items() if p is not None}
        if not own:
            continue
        for name, param in own.items():  # placeholders in the dtype the weights will have:
            if param.is_floating_point():  # some forwards read a weight's dtype up front
                own[name] = module._parameters[name] = torch.nn.Parameter(
                    param.to(dtype), requires_grad=False
                )
        missing = [_join(prefix, n) for n in own if _join(prefix, n) not in keys]
        streamed._placeholders.append((module, own))
        load = _loader(streamed, parent, keys, prefix, own, missing, dtype, device)
        streamed._hooks.append(module.register_forward_pre_hook(load))
        streamed._hooks.append(module.register_forward_hook(_dropper(streamed, own)))
    return streamed


def _loader(streamed, parent, keys, prefix, own, missing, dtype, device):
    def load(module, _args):
        if module._parameters[next(iter(own))].is_meta:
            if missing:
                raise InputError(f"{parent.label}: the checkpoint has no tensor for {missing[0]}")
            for name in own:
                value = parent.checkpoint.tensor(keys[_join(prefix, name)])
                if value.is_floating_point():
                    value = value.to(dtype)
                module._parameters[name] = torch.nn.Parameter(value.to(device), requires_grad=False)
                streamed.held_bytes += value.numel() * value.element_size()
            streamed.peak_bytes = max(streamed.peak_bytes, streamed.held_bytes)

    return load


def _dropper(streamed, own):
    def drop(module, _args, _output):
        if streamed.held_bytes <= streamed.cache_bytes:
            return
        for name, placeholder in own.items():
            value = module._parameters[name]
            if not value.is_meta:
                streamed.held_bytes -= value.numel() * value.element_size()
                module._parameters[name] = placeholder

    return drop


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _checkpoint_keys(model: torch.nn.Module, parent: ParentModel) -> dict[str, str]:
    """Live parameter and buffer name -> the checkpoint's key. A tied parameter (an LM head
    sharing the embeddings) takes the key of whichever of its names the checkpoint stores."""
    keys: dict[str, str] = {}
    by_tensor: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    for names in by_tensor.values():
        found = next(
            (parent.keys[canonical_name(parent.family, n)] for n in names if _stored(parent, n)),
            None,
        )
        if found is not None:
            keys.update(dict.fromkeys(names, found))
    for name, _buffer in model.named_buffers(remove_duplicate=False):
        if _stored(parent, name):
            keys[name] = parent.keys[canonical_name(parent.family, name)]
    return keys


def _stored(parent: ParentModel, live_name: str) -> bool:
    return canonical_name(parent.family, live_name) in parent.keys


def _stored_dtype(parent: ParentModel) -> torch.dtype:
    """The floating dtype most of the checkpoint's elements are stored in."""
    sizes: dict[torch.dtype, int] = {}
    for key in parent.keys.values():
        dtype = parent.checkpoint.dtype(key)
        if dtype.is_floating_point:
            sizes[dtype] = sizes.get(dtype, 0) + math.prod(parent.checkpoint.shape(key))
    return max(sizes, key=sizes.get) if sizes else torch.float32
