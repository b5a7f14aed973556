"""sepstore.hf: a node holding some parts of a transformers model gives, chained with the others,
bit for bit the full model's logits and greedy generations, and allocates only its parts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hf_models import ATTENTION_MASK, INPUT_IDS, RUNNABLE, Built, built, full_model

import sepstore
from sepstore.hf import NodeModel, UnsupportedModelError, greedy, load_model

MiB = 2**20


@pytest.fixture(scope="session")
def hf_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "hf"


def chain(nodes: list[NodeModel], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits of the nodes run one after the other, hidden states passed along."""
    out = nodes[0](input_ids=input_ids, attention_mask=attention_mask)
    for node in nodes[1:]:
        out = node(hidden_states=out.hidden_states, attention_mask=attention_mask)
    assert out.logits is not None
    return out.logits


@pytest.mark.parametrize("name", RUNNABLE)
def test_splits_into_two_and_three_nodes_give_the_full_models_logits(name: str, hf_root: Path) -> None:
    model = built(name, hf_root)
    with torch.no_grad():
        expected = full_model(model.checkpoint)(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK).logits
    for count in (2, 3):
        specs = [p.spec for p in sepstore.plan(model.manifest, nodes=count)]
        nodes = [load_model(model.manifest, spec) for spec in specs]
        assert torch.equal(chain(nodes, INPUT_IDS, ATTENTION_MASK), expected), specs


@pytest.mark.parametrize("name", RUNNABLE)
def test_greedy_generation_over_two_nodes_with_caches_equals_generate(name: str, hf_root: Path) -> None:
    model = built(name, hf_root)
    full = full_model(model.checkpoint)
    expected = full.generate(
        input_ids=INPUT_IDS,
        attention_mask=ATTENTION_MASK,
        do_sample=False,
        max_new_tokens=8,
        min_new_tokens=8,
        eos_token_id=None,
        pad_token_id=0,
    )[:, INPUT_IDS.shape[1] :]
    first, last = (load_model(model.store, p.spec) for p in sepstore.plan(model.manifest, nodes=2))
    caches = [first.new_cache(), last.new_cache()]

    def step(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        run = {"attention_mask": mask, "position_ids": positions, "use_cache": True}
        hidden = first(input_ids=ids, past_key_values=caches[0], **run).hidden_states
        logits = last(hidden_states=hidden, past_key_values=caches[1], **run).logits
        assert logits is not None
        return logits[:, -1]

    assert torch.equal(greedy(step, INPUT_IDS, ATTENTION_MASK, 8), expected)
    assert caches[0].get_seq_length() == INPUT_IDS.shape[1] + 7  # the last token is generated, not run


def test_a_node_takes_what_its_slice_starts_with(hf_root: Path) -> None:
    model = built("llama", hf_root)
    first, middle = load_model(model.manifest, "b 0-1"), load_model(model.manifest, "1-2")
    with pytest.raises(sepstore.SpecError, match="'b 0-1' holds begin: give it input_ids"):
        first(hidden_states=torch.zeros(1, 2, 32))
    with pytest.raises(sepstore.SpecError, match="'1-2' does not hold begin: give it hidden_states"):
        middle(input_ids=INPUT_IDS)
    hidden = first(input_ids=INPUT_IDS).hidden_states
    out = middle(hidden_states=hidden)
    assert out.logits is None and out.hidden_states is not None and out.hidden_states.shape == hidden.shape


def test_a_family_that_cannot_run_is_a_clear_error(tmp_path: Path) -> None:
    from test_convert_families import build

    build("bert", seed=0).save_pretrained(tmp_path / "bert")
    sepstore.convert(tmp_path / "bert", tmp_path / "store", name="bert", quiet=True)
    with pytest.raises(UnsupportedModelError, match=r"'bert' model, which sepstore.hf cannot run.*llama"):
        load_model(tmp_path / "store", "b 0-1")


def test_a_model_without_a_config_is_a_clear_error(tmp_path: Path) -> None:
    sepstore.dump("llama", {"model.embed_tokens.weight": torch.zeros(4, 2)}, tmp_path / "store", quiet=True)
    with pytest.raises(UnsupportedModelError, match="no transformers config"):
        load_model(tmp_path / "store", "b")


TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 64,
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_hidden_layers": 4}, "num_hidden_layers is 4 but the manifest has 2 layers"),  # 2-3 would pass through
        ({"num_hidden_layers": 1}, "num_hidden_layers is 1 but the manifest has 2 layers"),
        ({"num_hidden_layers": 20_000}, "num_hidden_layers is 20000 but"),  # refused before building any layer
        ({"hidden_size": "abc"}, "hidden_size is 'abc', not a positive integer"),
        ({"num_attention_heads": 0}, "num_attention_heads is 0, not a positive integer"),
        ({"rope_parameters": "abc"}, r"not a valid 'llama' config"),
    ],
)
def test_a_config_that_does_not_describe_the_parts_is_refused_naming_its_field(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    from sepstore.demo import tiny_llama_state_dict

    tensors = tiny_llama_state_dict(layers=2, hidden=32, intermediate=64, vocab=64)
    sepstore.dump("llama", tensors, tmp_path / "store", config=TINY_LLAMA | change, quiet=True)
    with pytest.raises(sepstore.ManifestError, match=message):
        load_model(tmp_path / "store", "f")


def test_an_unknown_device_is_a_tensor_error_as_in_load(hf_root: Path) -> None:
    model = built("llama", hf_root)
    for run in (sepstore.load, load_model):
        with pytest.raises(sepstore.TensorError, match="cannot load onto device 'gpu'"):
            run(model.manifest, "b", device="gpu")


def test_without_transformers_loading_a_model_says_what_to_install(
    hf_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = built("llama", hf_root)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(UnsupportedModelError, match=r"pip install 'sepstore\[hf\]'"):
        load_model(model.manifest, "b 0-1")


def test_load_model_refuses_an_unsigned_model_under_a_trust_policy_as_load_does(hf_root: Path, tmp_path: Path) -> None:
    model = built("llama", hf_root)
    sepstore.keygen(tmp_path / "publisher.key")
    with pytest.raises(sepstore.TrustError):
        load_model(model.manifest, "b 0-1", trust=tmp_path / "publisher.key.pub")  # the store is not signed


def store_with(tmp_path: Path, model: Built, extra: dict[str, torch.Tensor], drop: str = "") -> Path:
    """The model's checkpoint with ``extra`` tensors in layer 0 (less the key ``drop``), dumped
    keeping every key in its part, as a convert that keeps buffers does."""
    from sepstore.deciders import get

    tensors = safetensors.torch.load_file(model.checkpoint / "model.safetensors")
    tensors |= {f"model.layers.0.{key}": value for key, value in extra.items()}
    tensors.pop(drop, None)
    decide = get("llama").decider

    def keep_all(key: str) -> object:
        return decide(key) or ("mid", 0, key.removeprefix("model.layers.0."))

    config = json.loads((model.checkpoint / "config.json").read_text())
    sepstore.dump(keep_all, tensors, tmp_path / "store", name="m", config=config, quiet=True)
    return tmp_path / "store"


def test_buffers_a_part_keeps_are_ignored_but_an_extra_or_missing_weight_is_refused(
    tmp_path: Path, hf_root: Path
) -> None:
    model = built("llama", hf_root)
    buffers = {
        "self_attn.rotary_emb.inv_freq": torch.ones(4),
        "self_attn.masked_bias": torch.tensor(-1e4),
        "self_attn.bias": torch.tril(torch.ones(1, 1, 8, 8, dtype=torch.bool)),  # a causal mask
    }
    kept = store_with(tmp_path / "kept", model, buffers)
    assert set(buffers) <= set(sepstore.read_manifest(kept).mid[0].tensors)
    nodes = [load_model(kept, "b 0-2"), load_model(kept, "2-3 e")]
    with torch.no_grad():
        expected = full_model(model.checkpoint)(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK).logits
    assert torch.equal(chain(nodes, INPUT_IDS, ATTENTION_MASK), expected)

    extra = store_with(tmp_path / "extra", model, {"mlp.surprise.weight": torch.ones(4)})
    with pytest.raises(sepstore.ModuleMismatchError, match=r"part mid\.0 has weights .*mlp\.surprise\.weight"):
        load_model(extra, "0-1")
    load_model(extra, "1-2")  # other layers are fine

    missing = store_with(tmp_path / "missing", model, {}, drop="model.layers.0.mlp.up_proj.weight")
    with pytest.raises(sepstore.ModuleMismatchError, match=r"model\.layers\.0\.mlp\.up_proj\.weight"):
        load_model(missing, "0-1")


CHILD = textwrap.dedent("""
    import json, sys
    import torch, transformers, sepstore.hf
    transformers.LlamaForCausalLM  # import the modeling code before the baseline
    def rss(field):
        status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
        return int(status[field].split()[0]) * 1024
    base = rss("VmRSS")
    node = sepstore.hf.load_model(sys.argv[1], sys.argv[2])
    hidden = torch.zeros(1, 4, node.config.hidden_size, dtype=torch.bfloat16)
    node(hidden_states=hidden)
    print(json.dumps({"base": base, "peak": rss("VmHWM")}))
""")


def test_a_node_allocates_its_parts_and_never_the_other_layers(tmp_path: Path) -> None:
    """A bf16 Llama of 8 layers of 24 MiB: a node holding one layer peaks at that layer plus a
    fixed allowance, far below what building the whole model (even briefly) would take."""
    hidden, intermediate, layers = 1024, 4096, 8
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": 8,
        "vocab_size": 64,
        "tie_word_embeddings": False,
    }

    def w(value: int, *shape: int) -> torch.Tensor:  # a different constant per layer: no two parts alike
        return torch.full(shape, value / 64, dtype=torch.bfloat16)

    tensors = {"model.embed_tokens.weight": w(1, 64, hidden), "model.norm.weight": w(1, hidden)}
    tensors["lm_head.weight"] = w(1, 64, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {p + f"self_attn.{x}_proj.weight": w(i, hidden, hidden) for x in "qkvo"}
        tensors |= {p + f"mlp.{x}_proj.weight": w(i, intermediate, hidden) for x in ("gate", "up")}
        tensors |= {p + "mlp.down_proj.weight": w(i, hidden, intermediate)}
        tensors |= {p + "input_layernorm.weight": w(i, hidden), p + "post_attention_layernorm.weight": w(i, hidden)}
    manifest = sepstore.dump("llama", tensors, tmp_path / "store", name="big", config=config, quiet=True)
    del tensors
    part = manifest.mid[3]
    assert part is not None
    allowance = 64 * MiB
    everything = sum(p.size for p in manifest.mid if p is not None)
    assert everything > part.size + allowance + 100 * MiB  # allocating the other layers would show
    url = tmp_path / "store" / "manifests" / "big" / "latest.json"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(url), "3-4"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    outcome = json.loads(proc.stdout.splitlines()[-1])
    grown = outcome["peak"] - outcome["base"]
    assert grown < part.size + allowance, (grown / MiB, part.size / MiB)
