"""Activations from a model whose weights are read module by module (fusion_core/streamed.py):
the same function as the checkpoint loaded whole, at a fraction of its memory."""

from __future__ import annotations

import gc
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from factories import image_data, save, text_data, tiny, tiny_bert, tiny_decoder, tiny_vit
from safetensors.torch import load_file

import fusion_core.activations
from fusion_core import FusionSpec, fuse
from fusion_core.activations import SpilledTaps, load_live_model
from fusion_core.api import prepare
from fusion_core.models import open_parent
from fusion_core.streamed import streamed_model

FAMILIES = {
    "vit": lambda: tiny_vit(seed=1),
    "bert": lambda: tiny_bert(seed=1),
    "gpt2 (tied head)": lambda: tiny("GPT2LMHeadModel", layers=3, seed=1),
    "llama (rotary, tied head)": lambda: tiny_decoder(tie=True, layers=3, seed=1),
    "qwen2": lambda: tiny_decoder("Qwen2ForCausalLM", layers=3, seed=1),
    "llama bf16": lambda: tiny_decoder(layers=3, seed=1).to(torch.bfloat16),
}


def inputs_for(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if model.config.model_type == "vit":
        return {"pixel_values": torch.randn(3, 1, 8, 8, generator=gen)}
    return {"input_ids": torch.randint(1, 40, (3, 9), generator=gen)}


def own_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_forward_equals_the_loaded_model(family, tmp_path):
    """Streaming every module (no cache): the logits of the checkpoint loaded whole, bit for
    bit, in the stored dtype, while never holding more than the largest module's weights."""
    folder = save(FAMILIES[family](), tmp_path / "m")
    parent = open_parent(0, folder)
    loaded = load_live_model(folder, parent.architecture)
    streamed = streamed_model(parent, cache_bytes=0)
    inputs = inputs_for(loaded)
    with torch.no_grad():
        expected = loaded(**inputs).logits
        for _ in range(2):  # a second batch reads the weights again
            got = streamed.model(**inputs).logits
            assert got.dtype == expected.dtype
            assert torch.equal(got, expected)
    assert streamed.held_bytes == 0  # everything dropped after the pass
    largest = max(own_bytes(m) for m in loaded.modules())
    total = sum(own_bytes(m) for m in loaded.modules())
    assert streamed.peak_bytes <= largest < total / 2
    assert all(p.is_meta for p in streamed.model.parameters())


def test_under_the_cache_the_weights_stay_resident(tmp_path):
    """A model smaller than the cache is read once: the second batch reads nothing."""
    folder = save(tiny_vit(seed=1), tmp_path / "m")
    parent = open_parent(0, folder)
    streamed = streamed_model(parent)
    reads = []
    real_tensor = parent.checkpoint.tensor

    def counting(key):
        reads.append(key)
        return real_tensor(key)

    parent.checkpoint.tensor = counting
    inputs = {"pixel_values": torch.randn(2, 1, 8, 8)}
    with torch.no_grad():
        streamed.model(**inputs)
        first = len(reads)
        streamed.model(**inputs)
    assert first > 0 and len(reads) == first
    assert streamed.held_bytes == sum(
        t.numel() * t.element_size() for t in load_file(str(folder / "model.safetensors")).values()
    ) - _unused_bytes(streamed.model)
    streamed.close()  # what collection does after its pass: nothing waits for the collector
    assert streamed.held_bytes == 0 and all(p.is_meta for p in streamed.model.parameters())


def _unused_bytes(model: torch.nn.Module) -> int:
    """Parameters of modules the forward never runs (never read)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.is_meta)


@pytest.mark.parametrize("architecture", ["vit", "llama"])
def test_activation_alignment_streams_the_parents(architecture, tmp_path, monkeypatch):
    """A fusion by activations with the cache off: each parent's weights are read module by
    module, and the result is the one the whole-model path gave (bit for bit)."""
    if architecture == "vit":
        models = [tiny_vit(seed=s) for s in (1, 2)]
        data = image_data(tmp_path / "calib.safetensors")
    else:
        models = [tiny_decoder(layers=3, seed=s) for s in (1, 2)]
        data = text_data(tmp_path / "calib.safetensors", labels=False)
    folders = [save(m, tmp_path / f"m{i}") for i, m in enumerate(models)]
    spec = FusionSpec(alignment="activations", solver="emd")
    real = fusion_core.activations.streamed_model

    def whole(parent, device="cpu"):  # the parents loaded whole, as before streaming
        model = load_live_model(parent.path, parent.architecture, device)
        return SimpleNamespace(model=model, close=lambda: None)

    monkeypatch.setattr(fusion_core.activations, "streamed_model", whole)
    fuse(folders, tmp_path / "default", spec, data=data)

    peaks = []

    def uncached(parent, device="cpu"):
        streamed = real(parent, device, cache_bytes=0)
        peaks.append(streamed)
        return streamed

    monkeypatch.setattr(fusion_core.activations, "streamed_model", uncached)
    fuse(folders, tmp_path / "streamed", spec, data=data)
    assert len(peaks) == 2  # one pass per parent
    largest = max(own_bytes(m) for m in models[0].modules())
    assert all(0 < s.peak_bytes <= largest for s in peaks)
    a = load_file(str(tmp_path / "default" / "model.safetensors"))
    b = load_file(str(tmp_path / "streamed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_collection_stops_once_every_tap_is_stored(tmp_path, monkeypatch):
    """A causal LM's head (logits over the whole vocabulary: GBs for a 128k vocabulary at
    scale) is never computed to collect activations."""
    folders = [save(tiny_decoder(layers=3, seed=s), tmp_path / f"m{s}") for s in (1, 2)]
    data = text_data(tmp_path / "calib.safetensors", labels=False)
    heads_run, layers_run = [], []
    real = fusion_core.activations.streamed_model

    def watched(parent, device="cpu"):
        streamed = real(parent, device)
        streamed.model.lm_head.register_forward_hook(lambda *_: heads_run.append(1))
        last = streamed.model.model.layers[-1]
        last.register_forward_pre_hook(lambda *_: layers_run.append(1))
        return streamed

    monkeypatch.setattr(fusion_core.activations, "streamed_model", watched)
    fuse(folders, tmp_path / "out", FusionSpec(alignment="activations"), data=data)
    assert layers_run and not heads_run


def test_activations_are_spilled_and_read_tap_by_tap(tmp_path):
    """Collected activations live in a scratch folder, one file per tap; each access reads
    the tap afresh (nothing held between accesses), and the folder goes with the last
    reference to them."""
    folders = [save(tiny_decoder(layers=3, seed=s), tmp_path / f"m{s}") for s in (1, 2)]
    data = text_data(tmp_path / "calib.safetensors", labels=False)
    prepared = prepare(folders, FusionSpec(alignment="activations"), data)
    taps = prepared.activations[1]
    assert isinstance(taps, SpilledTaps) and len(taps) > 3
    folder = Path(taps._folder.name)
    assert len(list(folder.glob("*.f32"))) == len(taps)
    tap = next(iter(taps))
    first, again = taps[tap], taps[tap]
    assert torch.equal(first, again) and first.data_ptr() != again.data_ptr()
    assert first.dtype == torch.float32 and first.shape[0] > 0
    del prepared, taps
    gc.collect()
    assert not folder.exists()
