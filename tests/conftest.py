import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import transformers

transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def digits_parents(tmp_path_factory):
    """Two small ViTs trained on digits from different seeds (trained once per session)."""
    from otfuse.digits import load_digits_splits, save_model, save_split, train_vit

    root = tmp_path_factory.mktemp("digits")
    splits = load_digits_splits()
    parents = [save_model(train_vit(seed, splits, epochs=25), root / f"p{seed}") for seed in (0, 1)]
    return {
        "parents": parents,
        "test": save_split(splits.test, root / "test.safetensors"),
        "calib": save_split(splits.calib, root / "calib.safetensors"),
        "root": root,
    }


@pytest.fixture(scope="session")
def char_lm_parents(tmp_path_factory):
    """Two small Llamas (4 query heads reading 2 key/value heads, rotary embeddings) trained
    on the same license texts from different seeds (trained once per session)."""
    from otfuse.charlm import char_splits, save_model, save_split, train_char_lm

    root = tmp_path_factory.mktemp("charlm")
    splits = char_splits()
    parents = [
        save_model(train_char_lm(seed, splits, steps=300), root / f"p{seed}") for seed in (0, 1)
    ]
    return {
        "parents": parents,
        "train": save_split(splits.train, root / "train.safetensors"),
        "calib": save_split(splits.calib, root / "calib.safetensors"),
        "test": save_split(splits.test, root / "test.safetensors"),
    }
