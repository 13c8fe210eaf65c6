"""Fuzzing the checkpoint readers: whatever bytes a safetensors file, a shard index or a
config.json holds, opening and checking a checkpoint either works or raises InputError (a
one-line message the CLI and the service report), never anything else."""

import json
import shutil
from pathlib import Path

import pytest
from factories import save, tiny_vit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusion_core import InputError
from fusion_core.limits import Limits, address_space_cap
from fusion_core.models import open_parent

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return save(tiny_vit(seed=1), tmp_path_factory.mktemp("fuzz") / "model")


def _open_and_check(folder: Path) -> None:
    try:
        with address_space_cap():
            parent = open_parent(0, folder)
            Limits().check(parent)
            for name in list(parent.keys)[:3]:
                parent.tensor(name)
    except InputError as error:
        assert str(error) and "\n" not in str(error)
        assert "MemoryError" not in str(error), error


def _copy(template: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "m"
    if folder.exists():
        shutil.rmtree(folder)
    return Path(shutil.copytree(template, folder))


@FUZZ
@given(position=st.integers(0, 4096), replacement=st.binary(min_size=1, max_size=32))
def test_bytes_overwritten_anywhere_in_the_header(template, tmp_path, position, replacement):
    folder = _copy(template, tmp_path)
    file = folder / "model.safetensors"
    raw = bytearray(file.read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    position = position % header_end
    raw[position : position + len(replacement)] = replacement
    file.write_bytes(bytes(raw))
    _open_and_check(folder)


@FUZZ
@given(cut=st.integers(0, 10_000))
def test_truncated_anywhere(template, tmp_path, cut):
    folder = _copy(template, tmp_path)
    file = folder / "model.safetensors"
    raw = file.read_bytes()
    file.write_bytes(raw[: cut % len(raw)])
    _open_and_check(folder)


@FUZZ
@given(entries=st.dictionaries(st.text(max_size=20), json_values, max_size=5))
def test_arbitrary_header_entries(template, tmp_path, entries):
    folder = _copy(template, tmp_path)
    raw = json.dumps(entries).encode()
    (folder / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 64)
    _open_and_check(folder)


@FUZZ
@given(
    key=st.sampled_from(
        [
            "num_hidden_layers",
            "hidden_size",
            "num_attention_heads",
            "intermediate_size",
            "image_size",
            "patch_size",
            "num_channels",
            "model_type",
            "architectures",
            "num_labels",
            "id2label",
            "layer_norm_eps",
            "hidden_act",
        ]
    ),
    value=json_values,
)
def test_config_values(template, tmp_path, key, value):
    folder = _copy(template, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    _open_and_check(folder)


@FUZZ
@given(document=json_values)
def test_shard_index_documents(template, tmp_path, document):
    folder = _copy(template, tmp_path)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(document))
    _open_and_check(folder)
