"""Every bad input: a one-line error naming the problem, non-zero exit, nothing at --out."""

import json
import time
from pathlib import Path

import pytest
import torch
from factories import rewrite_keys, save, text_data, tiny, tiny_bert, tiny_decoder, tiny_vit
from safetensors.torch import load_file, save_file

from otfuse.cli import main


@pytest.fixture
def vit_pair(tmp_path):
    return [save(tiny_vit(seed=1), tmp_path / "a"), save(tiny_vit(seed=2), tmp_path / "b")]


def run_fuse(capsys, models, out: Path, *flags) -> tuple[int, str]:
    code = main(["fuse", *map(str, models), "--out", str(out), "--quiet", *flags])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_rejected(code, err, out: Path, *words):
    assert code != 0
    assert len(err.splitlines()) == 1 and err.startswith("otfuse: error: "), err
    for word in words:
        assert word in err, err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "a partial output was left behind"


def test_mixed_families(tmp_path, capsys):
    models = [save(tiny_vit(seed=1), tmp_path / "v"), save(tiny_bert(seed=1), tmp_path / "b")]
    code, err = run_fuse(capsys, models, tmp_path / "out")
    assert_rejected(code, err, tmp_path / "out", "bert", "vit")


def test_different_depths(tmp_path, capsys):
    models = [save(tiny_vit(layers=2), tmp_path / "a"), save(tiny_vit(layers=3), tmp_path / "b")]
    code, err = run_fuse(capsys, models, tmp_path / "out")
    assert_rejected(code, err, tmp_path / "out", "3 layers", "2")


def test_different_head_counts(tmp_path, capsys):
    models = [save(tiny_vit(heads=2), tmp_path / "a"), save(tiny_vit(heads=4), tmp_path / "b")]
    code, err = run_fuse(capsys, models, tmp_path / "out")
    assert_rejected(code, err, tmp_path / "out", "attention heads")


def test_different_architectures_of_one_family(tmp_path, capsys):
    models = [save(tiny_bert("BertModel"), tmp_path / "a"), save(tiny_bert(), tmp_path / "b")]
    code, err = run_fuse(capsys, models, tmp_path / "out")
    assert_rejected(code, err, tmp_path / "out", "BertForSequenceClassification", "BertModel")


def test_truncated_safetensors(vit_pair, tmp_path, capsys):
    file = vit_pair[1] / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    code, err = run_fuse(capsys, vit_pair, tmp_path / "out")
    assert_rejected(code, err, tmp_path / "out", "truncated", str(file))


def test_corrupt_safetensors_header(vit_pair, tmp_path, capsys):
    file = vit_pair[1] / "model.safetensors"
    file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\x00" * 64)
    code, err = run_fuse(capsys, vit_pair, tmp_path / "out")
    assert_rejected(code, err, tmp_path / "out", "corrupt", str(file))


def test_missing_tensor(vit_pair, tmp_path, capsys):
    file = vit_pair[1] / "model.safetensors"
    state = load_file(str(file))
    missing = next(k for k in state if "layernorm_after.weight" in k)
    del state[missing]
    save_file(state, str(file))
    code, err = run_fuse(capsys, vit_pair, tmp_path / "out")
    assert_rejected(code, err, tmp_path / "out", "missing tensor", "layernorm_after.weight")


def test_nan_weights(vit_pair, tmp_path, capsys):
    file = vit_pair[1] / "model.safetensors"
    state = load_file(str(file))
    key = next(k for k in state if k.endswith("output.dense.weight"))
    state[key][0, 0] = float("nan")
    save_file(state, str(file))
    code, err = run_fuse(capsys, vit_pair, tmp_path / "out")
    assert_rejected(code, err, tmp_path / "out", "NaN", key)


@pytest.mark.parametrize(
    "config_change,supported",
    [
        ({"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}, "LlamaForCausalLM"),
        ({"architectures": ["BertForPreTraining"]}, "BertForMaskedLM"),
    ],
)
def test_unknown_architecture(tmp_path, capsys, config_change, supported):
    """The error names what is supported."""
    models = [save(tiny_bert(seed=1), tmp_path / "a"), save(tiny_bert(seed=2), tmp_path / "b")]
    config = json.loads((models[1] / "config.json").read_text())
    config.update(config_change)
    (models[1] / "config.json").write_text(json.dumps(config))
    code, err = run_fuse(capsys, models, tmp_path / "out")
    assert_rejected(code, err, tmp_path / "out", "not supported", supported)


@pytest.mark.parametrize(
    "second,words",
    [
        (lambda: tiny_decoder("MistralForCausalLM"), ["mistral", "llama"]),
        (lambda: tiny("GPT2LMHeadModel"), ["gpt2", "llama"]),
        (lambda: tiny_decoder(kv_heads=4), ["4 key/value heads", "has 2"]),
        (lambda: tiny_decoder(heads=2, kv_heads=2), ["2 attention heads", "has 4"]),
        (lambda: tiny_decoder(layers=3), ["3 layers"]),
        (lambda: tiny_decoder(head_dim=8), ["head_dim 8", "has 4", "rotary"]),
    ],
)
def test_decoders_that_cannot_be_fused(tmp_path, capsys, second, words):
    models = [save(tiny_decoder(seed=1), tmp_path / "a"), save(second(), tmp_path / "b")]
    code, err = run_fuse(capsys, models, tmp_path / "out")
    assert_rejected(code, err, tmp_path / "out", *words)


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--heads", "cross"], ["--heads:", "rotary", "cross-head"]),
        (["--qk", "free"], ["--qk:", "free Q/K"]),
    ],
)
def test_rotary_models_refuse_alignment_inside_query_key_heads(tmp_path, capsys, flags, words):
    models = [
        save(tiny_decoder(seed=1), tmp_path / "a"),
        save(tiny_decoder(seed=2), tmp_path / "b"),
    ]
    code, err = run_fuse(capsys, models, tmp_path / "out", *flags)
    assert_rejected(code, err, tmp_path / "out", *words)


def test_data_with_wrong_tensor_names(vit_pair, tmp_path, capsys):
    data = text_data(tmp_path / "text.safetensors")  # input_ids for a ViT
    code, err = run_fuse(
        capsys, vit_pair, tmp_path / "out", "--alignment", "activations", "--data", str(data)
    )
    assert_rejected(code, err, tmp_path / "out", "input_ids", "pixel_values")


def test_pickled_checkpoint_is_refused(vit_pair, tmp_path, capsys):
    state = load_file(str(vit_pair[1] / "model.safetensors"))
    (vit_pair[1] / "model.safetensors").unlink()
    torch.save(state, vit_pair[1] / "pytorch_model.bin")
    code, err = run_fuse(capsys, vit_pair, tmp_path / "out")
    assert_rejected(code, err, tmp_path / "out", "pickled", "pytorch_model.bin")


def test_pickled_checkpoint_with_explicit_weights_only_switch(vit_pair, tmp_path, capsys):
    state = load_file(str(vit_pair[1] / "model.safetensors"))
    (vit_pair[1] / "model.safetensors").unlink()
    torch.save(state, vit_pair[1] / "pytorch_model.bin")
    code, _ = run_fuse(capsys, vit_pair, tmp_path / "out", "--allow-weights-only-pickle")
    assert code == 0 and (tmp_path / "out" / "model.safetensors").is_file()


def test_output_folder_that_is_not_empty(vit_pair, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_fuse(capsys, vit_pair, out)
    assert code != 0 and "not an empty folder" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--solver", "sinkhorn", "--reg", "0"], ["--reg"]),
        (["--solver", "sinkhorn", "--reg", "nan"], ["--reg"]),
        (["--anchor", "5"], ["--anchor"]),
        (["--weights", "1"], ["--weights"]),
        (["--residual", "weighted-scalar"], ["--data"]),
        (["--alignment", "activations"], ["--data"]),
        (["--filter", "window-x"], ["--filter"]),
        (["--device", "tpu"], ["--device"]),
    ],
)
def test_bad_options(vit_pair, tmp_path, capsys, flags, words):
    code, err = run_fuse(capsys, vit_pair, tmp_path / "out", *flags)
    assert_rejected(code, err, tmp_path / "out", *words)


def test_a_single_model(vit_pair, tmp_path, capsys):
    code, err = run_fuse(capsys, vit_pair[:1], tmp_path / "out")
    assert_rejected(code, err, tmp_path / "out", "at least 2 models")


def test_not_a_checkpoint_folder(vit_pair, tmp_path, capsys):
    code, err = run_fuse(capsys, [vit_pair[0], tmp_path / "nope"], tmp_path / "out")
    assert_rejected(code, err, tmp_path / "out", "nope")


def test_vanilla_fusion_of_different_widths(tmp_path, capsys):
    models = [save(tiny_vit(hidden=16), tmp_path / "a"), save(tiny_vit(hidden=24), tmp_path / "b")]
    code, err = run_fuse(capsys, models, tmp_path / "out", "--method", "vanilla")
    assert_rejected(code, err, tmp_path / "out", "vanilla", "widths")


def test_eval_with_a_data_file_for_another_family(vit_pair, tmp_path, capsys):
    data = text_data(tmp_path / "text.safetensors")
    code = main(["eval", str(vit_pair[0]), "--data", str(data)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "input_ids" in err


def test_legacy_names_still_fuse(tmp_path, capsys):
    """Keys without the backbone prefix and with LayerNorm gamma/beta are read."""
    a, b = tiny_bert("BertModel", seed=1), tiny_bert("BertModel", seed=2)
    folders = [save(a, tmp_path / "a"), save(b, tmp_path / "b")]
    rewrite_keys(
        folders[1],
        lambda k: (
            "bert."
            + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
                "LayerNorm.bias", "LayerNorm.beta"
            )
        ),
    )
    code, err = run_fuse(capsys, folders, tmp_path / "out", "--method", "vanilla")
    assert code == 0, err
    fused = load_file(str(tmp_path / "out" / "model.safetensors"))
    key = "embeddings.LayerNorm.weight"
    expected = 0.5 * (a.state_dict()[key] + b.state_dict()[key])
    torch.testing.assert_close(fused[key], expected)


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"reg": -1.0}, "reg"),
        ({"anchor": 3}, "anchor"),
        ({"heads": "x"}, "heads"),
        ({"weights": (1.0,)}, "weights"),
        ({"filter": "w"}, "filter"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_recipe_errors_name_their_field(changes, field):
    from fusion_core import FusionSpec, InputError

    with pytest.raises(InputError) as error:
        FusionSpec(**changes).validate(2)
    assert error.value.field == field


def _write_raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize(
    "entry,words",
    [
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 0]}, ["data_offsets"]),
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}, ["does not fill"]),
        ({"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}, ["shape"]),
        ({"dtype": "F32", "shape": [1e9, 4], "data_offsets": [0, 16]}, ["shape"]),
        ({"dtype": "Q4", "shape": [2, 2], "data_offsets": [0, 16]}, ["dtype"]),
        ({"dtype": "F32", "shape": "2x2", "data_offsets": [0, 16]}, ["shape"]),
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, "16"]}, ["data_offsets"]),
        ({"dtype": "F32", "shape": [1 << 40, 1 << 30], "data_offsets": [0, 16]}, ["fill"]),
        ("F32", ["not an object"]),
    ],
)
def test_malformed_safetensors_entries(vit_pair, tmp_path, capsys, entry, words):
    """Offsets and shapes the data cannot back are input errors, not crashes."""
    file = vit_pair[1] / "model.safetensors"
    _write_raw_safetensors(file, {"x.weight": entry}, b"\x00" * 16)
    code, err = run_fuse(capsys, vit_pair, tmp_path / "out")
    assert_rejected(code, err, tmp_path / "out", str(file), *words)


def test_config_contradicting_the_weights(vit_pair, tmp_path, capsys):
    config = json.loads((vit_pair[1] / "config.json").read_text())
    config["intermediate_size"] = 48  # the tensors have 32
    (vit_pair[1] / "config.json").write_text(json.dumps(config))
    code, err = run_fuse(capsys, vit_pair, tmp_path / "out")
    assert_rejected(code, err, tmp_path / "out", "config.json implies", "intermediate.dense")


@pytest.mark.parametrize(
    "key,value", [("num_hidden_layers", 1_000_000), ("hidden_size", 0), ("num_hidden_layers", True)]
)
def test_config_sizes_beyond_the_limits_fail_before_any_work(
    vit_pair, tmp_path, capsys, key, value
):
    config = json.loads((vit_pair[1] / "config.json").read_text())
    config[key] = value
    (vit_pair[1] / "config.json").write_text(json.dumps(config))
    started = time.perf_counter()
    code, err = run_fuse(capsys, vit_pair, tmp_path / "out")
    assert_rejected(code, err, tmp_path / "out", key)
    assert time.perf_counter() - started < 30  # refused up front, not after unrolling


def test_parameter_limit(vit_pair, tmp_path):
    from fusion_core import InputError, fuse
    from fusion_core.limits import Limits

    with pytest.raises(InputError, match="parameters, above"):
        fuse(vit_pair, tmp_path / "out", limits=Limits(max_parameters=1000))
    assert not (tmp_path / "out").exists()


def test_weights_whose_sum_overflows(vit_pair, tmp_path, capsys):
    code, err = run_fuse(capsys, vit_pair, tmp_path / "out", "--weights", "1e308", "1e308")
    assert_rejected(code, err, tmp_path / "out", "--weights", "finite")


def test_a_cuda_device_this_machine_lacks(vit_pair, tmp_path, capsys):
    if torch.cuda.is_available():
        flags = ["--device", f"cuda:{torch.cuda.device_count() + 90}"]
    else:
        flags = ["--device", "cuda:0"]
    code, err = run_fuse(capsys, vit_pair, tmp_path / "out", *flags)
    assert_rejected(code, err, tmp_path / "out", "CUDA device")
    assert code == 3  # the caller's mistake, not a failed fusion


@pytest.mark.parametrize("shard", ["../a/model.safetensors", "/etc/passwd", "sub/x.safetensors"])
def test_shard_index_naming_files_outside_the_folder(vit_pair, tmp_path, capsys, shard):
    state = load_file(str(vit_pair[1] / "model.safetensors"))
    (vit_pair[1] / "model.safetensors").unlink()
    index = {"weight_map": dict.fromkeys(state, shard)}
    (vit_pair[1] / "model.safetensors.index.json").write_text(json.dumps(index))
    code, err = run_fuse(capsys, vit_pair, tmp_path / "out")
    assert_rejected(code, err, tmp_path / "out", "not a file in the checkpoint folder")
