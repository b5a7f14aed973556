"""Tiny transformers causal LMs of every family sepstore.hf runs, each built, saved and converted
once per session (shared by test_hf_node.py and test_pipeline.py)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from test_convert_families import CASES

#: The families sepstore.hf runs (the causal LMs among those convert supports).
RUNNABLE = ["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"]
RUNNABLE += ["gpt2", "gpt_neox", "falcon", "bloom", "opt"]
LAYERS = 3
#: Two left-padded prompts: the first has three pad positions.
INPUT_IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
ATTENTION_MASK = torch.ones_like(INPUT_IDS)
ATTENTION_MASK[0, :3] = 0


@dataclass(frozen=True)
class Built:
    """A family's tiny model: its saved checkpoint, the store it was converted into, its manifest."""

    checkpoint: Path
    store: Path
    manifest: Path


def tiny_config(name: str, layers: int = LAYERS) -> transformers.PretrainedConfig:
    """The family's tiny config from test_convert_families, with ``layers`` layers (a sliding window
    of 4 tokens where the family has one, so sliding masks and caches are exercised)."""
    config = CASES[name].make_config()
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i % len(config.layer_types)] for i in range(layers)]
    if name in ("mistral", "gemma2"):
        config.sliding_window = 4
    return config


@functools.cache
def built(name: str, where: Path) -> Built:
    """Save a seeded tiny model of ``name`` under ``where`` and convert it (once per session: pass
    the same folder, e.g. ``tmp_path_factory.getbasetemp() / "hf"``)."""
    root = where / name
    torch.manual_seed(0)
    model = getattr(transformers, CASES[name].model_class)(tiny_config(name))
    model.save_pretrained(root / "checkpoint")
    import sepstore

    sepstore.convert(root / "checkpoint", root / "store", name=name, quiet=True)
    return Built(root / "checkpoint", root / "store", root / "store" / "manifests" / name / "latest.json")


@functools.cache
def full_model(checkpoint: Path) -> transformers.PreTrainedModel:
    """The source checkpoint as transformers loads it."""
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
