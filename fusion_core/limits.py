"""What a checkpoint may ask of the machine, checked before any tensor is read or allocated.

A config.json is as hostile as any other input: `num_hidden_layers: 1000000` would have the
engine unroll a million layers, and a `hidden_size` that contradicts the weights would be
published as a checkpoint nobody can load. So, from config.json and the safetensors headers
alone: the sizes stay under the maxima, and the config describes exactly the tensors the
files hold. The shapes a config implies come from the family description
(`compat.expected_shapes`, tested against transformers' own models for every family), so
the check needs no transformers import (~3 s of a BERT-base fusion); only a tensor whose
size the config leaves to a library default is settled by building transformers' model on
the meta device, which allocates nothing.
"""

from __future__ import annotations

import resource
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .compat import expected_shapes
from .errors import InputError
from .families import canonical_name

if TYPE_CHECKING:
    from .compat import ModelRoles
    from .models import ParentModel

# config.json keys that size a model, across the supported families' naming schemes.
LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers")
WIDTH_KEYS = (
    "hidden_size",
    "n_embd",
    "dim",
    "intermediate_size",
    "n_inner",
    "hidden_dim",
    "num_attention_heads",
    "n_head",
    "n_heads",
    "num_key_value_heads",
    "head_dim",
)
# Table sizes; transformers also builds a dict of num_labels entries from the config.
COUNT_KEYS = (
    "vocab_size",
    "num_labels",
    "max_position_embeddings",
    "n_positions",
    "type_vocab_size",
)
OPTIONAL_ROLES_KEYS = ("num_key_value_heads", "head_dim")


@dataclass(frozen=True)
class Limits:
    """Per-model maxima. The defaults admit every published model of the supported families
    (up to 70B-class shapes); a service sets its own from its settings."""

    max_layers: int = 512
    max_width: int = 131_072  # hidden and MLP widths
    max_vocab: int = 1_048_576
    max_parameters: int = 200_000_000_000

    def check(self, parent: ParentModel) -> None:
        """Sizes under the maxima, then the config against the tensors."""
        self.check_sizes(parent)
        check_config_matches_tensors(parent)

    def check_sizes(self, parent: ModelRoles) -> None:
        """The config's sizes and the parameter count under the maxima (no torch: the
        planner checks headers with it)."""
        config = parent.config
        bound = {key: self.max_layers for key in LAYER_KEYS}
        bound |= dict.fromkeys(WIDTH_KEYS, self.max_width)
        bound |= dict.fromkeys(COUNT_KEYS, self.max_vocab)
        required = set(parent.family.config_keys.values()) - set(OPTIONAL_ROLES_KEYS)
        for key in sorted(required | (set(bound) & set(config))):
            value = config.get(key)
            if value is None and key not in required:
                continue  # a documented "unset" (GPT-2's n_inner, Llama's head_dim)
            _bounded(parent, key, value, bound.get(key, self.max_width))
        count = parent.parameter_count
        if count > self.max_parameters:
            raise InputError(
                f"{parent.label}: {count:,} parameters, above this server's limit of "
                f"{self.max_parameters:,}"
            )


@contextmanager
def address_space_cap(headroom: int = 2 << 30):
    """Cap this process's address space at its current size plus `headroom` for the block
    (Linux; elsewhere a no-op). Allocations beyond it raise MemoryError instead of growing
    the worker until the kernel kills it."""
    try:
        status = Path("/proc/self/status").read_text()
        vm_kb = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmSize:"))
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    except (OSError, StopIteration, ValueError):
        yield
        return
    cap = vm_kb * 1024 + headroom
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _bounded(parent: ModelRoles, key: str, value, maximum: int) -> None:
    if type(value) is not int or not 0 < value <= maximum:
        raise InputError(
            f"{parent.label}: config.json {key}={value!r} must be an integer from 1 to {maximum}"
        )


def build_architecture(parent: ModelRoles, placement: AbstractContextManager):
    """transformers' model class for the parent, built from its config.json inside
    `placement` (which decides where the parameters go); a config transformers refuses is
    the caller's mistake (InputError)."""
    import transformers

    model_class = getattr(transformers, parent.architecture)
    try:
        with placement:
            config = model_class.config_class.from_dict(dict(parent.config))
            return model_class(config)
    except Exception as exc:  # transformers raises many kinds on a bad config
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(
            f"{parent.label}: config.json does not describe a valid {parent.architecture}: {reason}"
        ) from exc


def check_config_matches_tensors(parent: ModelRoles, settle_open: bool = True) -> None:
    """Every tensor in the files has the shape the config implies for it. Without
    `settle_open`, tensors whose size the config leaves to a library default are not
    checked (the planner: no transformers import; the fusion checks them)."""
    nodes = [
        node for _, node in parent.family.nodes(parent.architecture, parent.config_value("layers"))
    ]
    implied, open_names = expected_shapes(parent, nodes)
    if open_names and settle_open:
        implied |= _shapes_by_transformers(parent, open_names)
    for name, shape in implied.items():
        actual = tuple(parent.shape(name))
        if shape != actual:
            raise InputError(
                f"{parent.label}: tensor {parent.keys[name]!r} has shape {actual}, but "
                f"config.json implies {shape}"
            )


def _shapes_by_transformers(parent: ModelRoles, names: list[str]) -> dict[str, tuple]:
    """The shapes of `names` in transformers' model of the config, built on the meta device
    (in this process: importing transformers' modeling code costs seconds)."""
    import torch

    # Meta tensors allocate nothing, but a config can still make transformers build big
    # Python objects (num_labels -> id2label); the cap turns that into a MemoryError.
    with address_space_cap():
        skeleton = build_architecture(parent, torch.device("meta"))
    built = {
        canonical_name(parent.family, key): tuple(tensor.shape)
        for key, tensor in skeleton.state_dict().items()
    }
    return {name: built[name] for name in names if name in built}
