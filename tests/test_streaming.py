"""Streaming fusion: tensors reach the writer layer by layer, plans die with their last
reader, row-blocked tables equal whole ones, shards load in transformers and equal the
single file bit for bit, and dtypes are kept."""

import json

import pytest
import torch
import transformers
from factories import permuted_copy, save, tiny_bert, tiny_decoder
from safetensors.torch import load_file

from fusion_core import FusionSpec, fuse
from fusion_core import engine as engine_module
from fusion_core.api import prepare
from fusion_core.engine import Engine
from fusion_core.spec import parse_size


def _state(folder):
    """Every tensor of a checkpoint folder, single file or shards."""
    files = sorted(folder.glob("*.safetensors"))
    state = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def _decoder_pair(tmp_path, tie=False, dtype=torch.float32):
    models = [tiny_decoder(tie=tie, layers=3, seed=s) for s in (1, 2)]
    return [save(m.to(dtype), tmp_path / f"p{i}") for i, m in enumerate(models)]


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("method", ["ot", "vanilla"])
def test_sharded_output_has_an_index_loads_and_equals_one_file(tmp_path, tie, method):
    folders = _decoder_pair(tmp_path, tie=tie)
    spec = FusionSpec(method=method, solver="emd")
    fuse(folders, tmp_path / "one", spec)
    fuse(
        folders, tmp_path / "sharded", FusionSpec(method=method, solver="emd", max_shard_size=3000)
    )
    one = _state(tmp_path / "one")
    assert [f.name for f in (tmp_path / "one").glob("*.safetensors")] == ["model.safetensors"]
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()

    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    count = len(shards)
    assert count > 2
    assert [f.name for f in shards] == [
        f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)
    ]
    assert set(index["weight_map"]) == set(one)
    assert set(index["weight_map"].values()) == {f.name for f in shards}
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in one.values()
    )
    for shard in shards:  # each shard under the limit unless it holds one larger tensor
        tensors = load_file(str(shard))
        assert all(index["weight_map"][k] == shard.name for k in tensors)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 3000 or len(tensors) == 1

    sharded = _state(tmp_path / "sharded")
    assert sharded.keys() == one.keys()
    for key in one:
        assert sharded[key].dtype == one[key].dtype
        assert torch.equal(sharded[key].view(torch.uint8), one[key].view(torch.uint8)), key

    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "sharded"))
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "one"))
    ids = torch.randint(1, 40, (2, 7))
    assert torch.equal(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)
    if tie:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("method", ["ot", "vanilla"])
def test_bf16_parents_give_a_bf16_model(tmp_path, method):
    folders = _decoder_pair(tmp_path, tie=True, dtype=torch.bfloat16)
    out = tmp_path / "fused"
    fuse(folders, out, FusionSpec(method=method))
    state = _state(out)
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.bfloat16}
    assert json.loads((out / "fusion.json").read_text())["dtypes"]["written"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), torch_dtype="auto")
    assert model.dtype == torch.bfloat16
    assert torch.isfinite(model(input_ids=torch.randint(1, 40, (1, 5))).logits).all()


def _run(folders, spec, **engine_args):
    prepared = prepare(folders, spec)
    engine = Engine(prepared.parents, 0, prepared.nodes, spec, **engine_args)
    received: list[tuple[str, int, int]] = []  # name, first row, rows
    events = []

    def sink(name, tensor, row):
        received.append((name, row, tensor.shape[0] if tensor.dim() else 1))

    def progress(event):
        live = sum(len(plans) for plans in engine.plans.values())
        events.append((event, len(received), live))

    engine.progress = progress
    engine.run(sink)
    return engine, received, events


@pytest.mark.parametrize("method", ["ot", "vanilla"])
def test_the_sink_gets_each_layer_before_the_walk_goes_on(tmp_path, method):
    folders = _decoder_pair(tmp_path)
    engine, received, events = _run(folders, FusionSpec(method=method))
    names = [name for name, _, _ in received]
    assert set(names) == set(engine.output_names())
    # by the time layer 3 starts, layers 1 and 2 are written, layer 3 is not
    at_layer_3 = next(count for e, count, _ in events if e.detail.startswith("aligning layer 3/3"))
    written = names[:at_layer_3]
    assert any(n.startswith("layers.1.") for n in written)
    assert not any(n.startswith("layers.2.") for n in written)
    # structured bytes written: monotonic, complete at the end
    counts = [e.bytes_written for e, _, _ in events]
    assert counts == sorted(counts) and counts[-1] == events[-1][0].bytes_total > 0


def test_plans_live_only_while_a_later_node_reads_them(tmp_path):
    def most_live(layers):
        models = [tiny_decoder(layers=layers, seed=s) for s in (1, 2)]
        folders = [save(m, tmp_path / f"{layers}-{i}") for i, m in enumerate(models)]
        _, _, events = _run(folders, FusionSpec())
        return max(live for _, _, live in events)

    assert most_live(2) == most_live(5) <= 4


def test_vanilla_builds_no_plans(tmp_path):
    folders = _decoder_pair(tmp_path)
    engine, _, events = _run(folders, FusionSpec(method="vanilla"))
    assert engine.records == [] and all(live == 0 for _, _, live in events)
    spec = FusionSpec(method="vanilla")
    prepared = prepare(folders, spec)
    fused = Engine(prepared.parents, 0, prepared.nodes, spec).run()
    a, b = (load_file(str(folder / "model.safetensors")) for folder in folders)
    for name, tensor in fused.tensors.items():
        key = prepared.parents[0].keys[name]
        assert torch.equal(tensor, a[key] * 0.5 + b[key] * 0.5), name


@pytest.mark.parametrize("residual", ["average", "shared"])
def test_tables_fused_in_row_blocks_equal_whole_tables(tmp_path, monkeypatch, residual):
    """A permuted copy fuses back exactly when the vocabulary tables go in blocks of rows,
    and the sink sees them in several blocks."""
    model = tiny_bert("BertForMaskedLM", seed=1)
    folders = [save(model, tmp_path / "a"), save(permuted_copy(model, 3), tmp_path / "b")]
    spec = FusionSpec(solver="emd", residual=residual)
    whole = Engine(prepare(folders, spec).parents, 0, prepare(folders, spec).nodes, spec).run()
    monkeypatch.setattr(engine_module, "BLOCK_BYTES", 256)
    _, received, _ = _run(folders, spec)
    assert any(row > 0 for name, row, _ in received if "word_embeddings" in name)
    blocked = Engine(prepare(folders, spec).parents, 0, prepare(folders, spec).nodes, spec).run()
    assert blocked.tensors.keys() == whole.tensors.keys()
    original = load_file(str(folders[0] / "model.safetensors"))
    parent = prepare(folders, spec).parents[0]
    for name, tensor in blocked.tensors.items():
        torch.testing.assert_close(tensor, whole.tensors[name], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(tensor, original[parent.keys[name]], atol=1e-5, rtol=1e-5)


def test_sizes_parse_like_hugging_face():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(1234) == 1234
    with pytest.raises(Exception, match="size"):
        parse_size("lots")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_vanilla_refuses_a_non_finite_parent_by_name(tmp_path, bad):
    """Vanilla checks the mean once per block instead of each parent: a bad value in any
    parent still fails, naming the tensor, and nothing is published."""
    from safetensors.torch import save_file

    from fusion_core import InputError

    folders = _decoder_pair(tmp_path)
    file = folders[1] / "model.safetensors"
    state = load_file(str(file))
    key = next(k for k in state if k.endswith("mlp.down_proj.weight"))
    state[key][3, 1] = bad
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(InputError, match="NaN or inf") as caught:
        fuse(folders, tmp_path / "out", FusionSpec(method="vanilla"))
    assert key in str(caught.value) and str(folders[1]) in str(caught.value)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_a_failed_write_fails_the_fusion_and_leaves_nothing(tmp_path, monkeypatch):
    """Writes run on a thread of their own: a full disk there still fails the fusion (at the
    next write or at publishing), and the partial folder is removed."""
    import fusion_core.writer as writer_module

    parents = _decoder_pair(tmp_path)
    real, calls = writer_module.os.pwrite, []

    def full_disk(fd, data, offset):
        calls.append(offset)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(writer_module.os, "pwrite", full_disk)
    with pytest.raises(OSError, match="No space left"):
        fuse(parents, tmp_path / "out", FusionSpec())
    assert len(calls) > 3
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
