"""Reading the key variants real checkpoints carry; writing a folder from_pretrained loads."""

import json

import pytest
import torch
import transformers
from factories import permuted_copy, rewrite_keys, save, text_data, tiny, tiny_bert, tiny_vit
from safetensors.torch import load_file, save_file

from fusion_core import FusionSpec, InputError, fuse
from fusion_core.checkpoint import open_checkpoint


def _shard(folder):
    """Split model.safetensors into two shards with an index, as large checkpoints are."""
    state = load_file(str(folder / "model.safetensors"))
    keys = sorted(state)
    halves = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    weight_map = {}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_sharded_checkpoints_are_read(tmp_path):
    model = tiny_vit(seed=1)
    folders = [save(model, tmp_path / "a"), save(permuted_copy(model, 2), tmp_path / "b")]
    _shard(folders[1])
    assert len(open_checkpoint(folders[1]).keys) == len(model.state_dict())
    fuse(folders, tmp_path / "out", FusionSpec(solver="emd"))
    fused = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "out"))
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(
        fused.eval()(pixel_values=x).logits, model(pixel_values=x).logits, atol=1e-4, rtol=1e-4
    )


def test_output_folder_carries_card_recipe_side_files_and_anchor_buffers(tmp_path):
    a, b = tiny_bert("BertForMaskedLM", seed=1), tiny_bert("BertForMaskedLM", seed=2)
    folders = [save(a, tmp_path / "a"), save(b, tmp_path / "b")]
    (folders[0] / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"tok{i}" for i in range(35)])
        + "\n"
    )
    (folders[0] / "tokenizer_config.json").write_text('{"do_lower_case": true}')
    position_ids = torch.arange(24)[None]
    rewrite_keys(folders[0], lambda k: k)  # keep names; then add the legacy buffer
    state = load_file(str(folders[0] / "model.safetensors"))
    state["bert.embeddings.position_ids"] = position_ids
    save_file(state, str(folders[0] / "model.safetensors"), metadata={"format": "pt"})

    data = text_data(tmp_path / "d.safetensors", labels=False)
    fuse(folders, tmp_path / "out", FusionSpec(), data=data, metrics={"fused": {"loss": 1.5}})
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "README.md",
        "fusion.json",
        "vocab.txt",
        "tokenizer_config.json",
    } <= names
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (folders[0] / "config.json").read_text()
    )
    saved = load_file(str(out / "model.safetensors"))
    assert torch.equal(saved["bert.embeddings.position_ids"], position_ids)

    record = json.loads((out / "fusion.json").read_text())
    assert record["spec"]["solver"] == "sinkhorn" and record["anchor"] == 0
    assert len(record["parents"]) == 2
    assert (
        record["parents"][1]["files"]["model.safetensors"]
        == __import__("hashlib").sha256((folders[1] / "model.safetensors").read_bytes()).hexdigest()
    )
    assert {"torch", "transformers", "pot"} <= set(record["versions"])
    assert record["plans"] and all(
        0 <= p["distance_from_permutation"] <= 1 for p in record["plans"]
    )
    card = (out / "README.md").read_text()
    assert "sinkhorn" in card and str(folders[1]) in card and "1.5000" in card

    fused = transformers.AutoModelForMaskedLM.from_pretrained(str(out)).eval()
    assert type(fused).__name__ == "BertForMaskedLM"
    # the decoder stays tied to the fused word embeddings
    assert torch.equal(
        fused.cls.predictions.decoder.weight, fused.bert.embeddings.word_embeddings.weight
    )


def test_no_partial_output_when_a_fusion_fails(tmp_path):
    folders = [save(tiny_vit(seed=1), tmp_path / "a"), save(tiny_vit(seed=2), tmp_path / "b")]
    state = load_file(str(folders[1] / "model.safetensors"))
    key = next(k for k in state if k.startswith("classifier.weight"))
    state[key][0, 0] = float("inf")  # read last: the fusion fails after most of the work
    save_file(state, str(folders[1] / "model.safetensors"))
    with pytest.raises(InputError, match="inf"):
        fuse(folders, tmp_path / "out", FusionSpec())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_gpt2_as_published_with_per_layer_causal_masks(tmp_path):
    """The hub's GPT-2 layout: no `transformer.` prefix, no stored (tied) LM head, a causal
    mask buffer per layer (`h.N.attn.bias`, bool; older files also `masked_bias`). The
    buffers are copied from the anchor and the fused folder loads as GPT2LMHeadModel."""
    model = tiny("GPT2LMHeadModel", seed=1)
    folders = [save(model, tmp_path / "a"), save(permuted_copy(model, 2), tmp_path / "b")]
    for folder in folders:
        file = folder / "model.safetensors"
        state = {k.removeprefix("transformer."): v for k, v in load_file(str(file)).items()}
        assert "lm_head.weight" not in state
        for i in range(2):
            state[f"h.{i}.attn.bias"] = torch.ones(1, 1, 32, 32, dtype=torch.bool).tril()
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        save_file(state, str(file), metadata={"format": "pt"})
    data = text_data(tmp_path / "d.safetensors", labels=False)
    fuse(folders, tmp_path / "out", FusionSpec(solver="emd", alignment="activations"), data=data)
    fused_state = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert fused_state["h.1.attn.bias"].dtype == torch.bool
    assert torch.equal(fused_state["h.1.attn.bias"], torch.ones(1, 1, 32, 32).tril().bool())
    assert float(fused_state["h.0.attn.masked_bias"]) == -1e4
    fused = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "out")).eval()
    batch = {k: v for k, v in load_file(str(data)).items()}
    torch.testing.assert_close(fused(**batch).logits, model(**batch).logits, atol=1e-4, rtol=1e-4)
