"""dump then load: round trips, the seed's documented examples, combining dumps, the Part module."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import llm_sepweight
import pytest
import safetensors.torch
import torch
from conftest import N_LAYERS, same_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import sepstore
from sepstore.demo import llama_decider
from sepstore.tensors import DTYPES


def expected_parts(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The state dict as llama_decider splits it: {"begin": ..., "mid.<i>": ..., "end": ...}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        placed = llama_decider(key)
        if placed is None:
            continue
        label = placed[0] if len(placed) == 2 else f"mid.{placed[1]}"
        out.setdefault(label, {})[placed[-1]] = value
    return out


def assert_state_dict_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert same_bytes(got[key], want[key]), key


# -- the seed's documented examples -----------------------------------------------------------


def test_begin_and_first_layers_load_as_in_llm_sepweight(store: Path, state_dict: dict[str, torch.Tensor]) -> None:
    psd = sepstore.load(store, "b 0-5")
    parts = expected_parts(state_dict)
    assert_state_dict_equal(psd.begin or {}, parts["begin"])
    assert sorted(psd.mid) == [0, 1, 2, 3, 4]
    assert psd.end is None
    flat = psd.to_dict()
    assert "begin.embed_tokens.weight" in flat
    assert same_bytes(flat["mid.4.mlp.down_proj.weight"], state_dict["model.layers.4.mlp.down_proj.weight"])
    assert not any(k.startswith("end.") for k in flat)


def test_target_range_is_renumbered_onto_the_first_range(tmp_path: Path) -> None:
    sd = sepstore.demo.tiny_llama_state_dict(layers=40, hidden=8, intermediate=8, vocab=16, seed=3)
    sepstore.dump(llama_decider, sd, tmp_path)
    psd = sepstore.load(tmp_path, "0-5 30-35")
    flat = psd.to_dict(range(30, 35))
    assert {k.split(".")[1] for k in flat if k.startswith("mid.")} == {"0", "1", "2", "3", "4"}
    for i in range(5):
        key = f"model.layers.{30 + i}.self_attn.q_proj.weight"
        assert same_bytes(flat[f"mid.{i}.self_attn.q_proj.weight"], sd[key])
    default = psd.to_dict()
    assert same_bytes(default["mid.0.self_attn.q_proj.weight"], sd["model.layers.0.self_attn.q_proj.weight"])


def test_full_spec_loads_every_tensor_bit_exactly(store: Path, state_dict: dict[str, torch.Tensor]) -> None:
    flat = sepstore.load(store, "f").to_dict()
    want = {}
    for label, tensors in expected_parts(state_dict).items():
        for key, value in tensors.items():
            want[f"{label}.{key}"] = value
    assert_state_dict_equal(flat, want)


def test_same_keys_as_llm_sepweight_for_the_same_spec(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """The same tensors under the same keys, except that llm_sepweight 0.10.0 leaves its internal
    ``h.<layer>.`` prefix inside every layer's keys (``mid.0.h.0.x``), which sepstore does not."""

    def old_decider(key: str) -> list[str]:
        placed = llama_decider(key)
        assert placed is not None
        return ["start" if placed[0] == "begin" else placed[0], *map(str, placed[1:])]

    sepstore.dump(old_decider, state_dict, tmp_path / "new")
    llm_sepweight.dump(old_decider, state_dict, tmp_path / "old")
    for spec, target in (("b 0-5", None), ("2-4 e", None), ("0-2 4-6", range(4, 6)), ("f", None)):
        new = sepstore.load(tmp_path / "new", spec).to_dict(target)
        old = llm_sepweight.load(tmp_path / "old", spec).to_dict(target)
        assert_state_dict_equal(new, {re.sub(r"^(mid\.\d+\.)h\.\d+\.", r"\1", k): v for k, v in old.items()})


def test_lazy_load_fills_a_part_module(store: Path, state_dict: dict[str, torch.Tensor]) -> None:
    hidden, vocab = 16, 64

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            ref = {k.split(".", 3)[3]: v for k, v in state_dict.items() if k.startswith("model.layers.0.")}
            for name, value in ref.items():
                module_name, param = name.rsplit(".", 1)
                holder = self
                for piece in module_name.split("."):
                    if not hasattr(holder, piece):
                        holder.add_module(piece, nn.Module())
                    holder = getattr(holder, piece)
                holder.register_parameter(param, nn.Parameter(torch.zeros_like(value), requires_grad=False))

    model = sepstore.Part(
        begin=lambda: nn.ModuleDict({"embed_tokens": nn.Embedding(vocab, hidden, dtype=torch.bfloat16)}),
        mid=Layer,
        end=lambda: nn.ModuleDict(
            {"norm": nn.LayerNorm(hidden, bias=False, dtype=torch.bfloat16)}
            | {"lm_head": nn.Linear(hidden, vocab, bias=False, dtype=torch.bfloat16)}
        ),
        mid_range=range(2, 4),
    )
    result = sepstore.lazy_load(model, store, "2-4 e", strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys == ["begin.embed_tokens.weight"]
    assert same_bytes(model.mid["3"].mlp.up_proj.weight.data, state_dict["model.layers.3.mlp.up_proj.weight"])
    assert same_bytes(model.end["lm_head"].weight.data, state_dict["lm_head.weight"])
    with pytest.raises(sepstore.ModuleMismatchError, match=r"begin\.embed_tokens\.weight"):
        sepstore.lazy_load(model, store, "2-4 e")
    with pytest.raises(sepstore.ModuleMismatchError, match=r"mid\.0"):
        sepstore.lazy_load(model, store, "0-1")


def test_part_module_runs_begin_layers_end_in_order() -> None:
    part = sepstore.Part(begin=lambda: nn.Linear(2, 3), mid=lambda: nn.Linear(3, 3), end=lambda: nn.Linear(3, 1),
                         mid_range=range(4, 6))  # fmt: skip
    assert sorted(part.state_dict()) == sorted(
        [f"{p}.{w}" for p in ("begin", "mid.4", "mid.5", "end") for w in ("weight", "bias")]
    )
    assert part(torch.zeros(5, 2)).shape == (5, 1)
    with pytest.raises(sepstore.SpecError):
        sepstore.Part(mid=lambda: nn.Linear(1, 1), mid_range=[0, 1])  # type: ignore[arg-type]


# -- dump ------------------------------------------------------------------------------------


def test_str_and_path_out_paths_give_the_same_store(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    a = sepstore.dump(llama_decider, state_dict, str(tmp_path / "a"))
    b = sepstore.dump(llama_decider, state_dict, tmp_path / "b")
    assert a == b
    assert (tmp_path / "a/manifests/model/latest.json").read_bytes() == (
        tmp_path / "b/manifests/model/latest.json"
    ).read_bytes()


def test_several_dumps_combine_into_one_manifest(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    keys = list(state_dict)
    shards = [dict(list(state_dict.items())[i::3]) for i in range(3)]  # layers split across shards
    assert sum(len(s) for s in shards) == len(keys)
    for shard in shards:
        sepstore.dump(llama_decider, shard, tmp_path / "sharded")
    whole = sepstore.dump(llama_decider, state_dict, tmp_path / "whole")
    combined = sepstore.read_manifest(tmp_path / "sharded")
    assert combined.begin == whole.begin and combined.mid == whole.mid and combined.end == whole.end
    assert_state_dict_equal(sepstore.load(tmp_path / "sharded").to_dict(), sepstore.load(tmp_path / "whole").to_dict())
    assert sepstore.verify(tmp_path / "sharded").ok


def test_layers_dumped_out_of_order_leave_a_gap_until_filled(
    tmp_path: Path, state_dict: dict[str, torch.Tensor]
) -> None:
    late = {k: v for k, v in state_dict.items() if k.startswith("model.layers.5.")}
    manifest = sepstore.dump(llama_decider, late, tmp_path)
    assert manifest.mid[:5] == [None] * 5 and manifest.mid[5] is not None
    assert sorted(sepstore.load(tmp_path, "5-6").mid) == [5]
    with pytest.raises(sepstore.NotFoundError, match="layer 0"):
        sepstore.load(tmp_path, "0-1")
    sepstore.dump(llama_decider, state_dict, tmp_path)
    assert None not in sepstore.read_manifest(tmp_path).mid


def test_dumping_the_same_state_dict_twice_changes_nothing(store: Path, state_dict: dict[str, torch.Tensor]) -> None:
    before = (store / "manifests/model/latest.json").read_bytes()
    files = sorted(p.name for p in (store / "parts/blake3").iterdir())
    sepstore.dump(llama_decider, state_dict, store)
    assert (store / "manifests/model/latest.json").read_bytes() == before
    assert sorted(p.name for p in (store / "parts/blake3").iterdir()) == files


def test_same_key_with_other_content_is_refused(store: Path, state_dict: dict[str, torch.Tensor]) -> None:
    before = (store / "manifests/model/latest.json").read_bytes()
    changed = {"model.layers.2.mlp.up_proj.weight": state_dict["model.layers.2.mlp.up_proj.weight"] + 1}
    with pytest.raises(sepstore.DeciderError, match=r"mid\.2\.mlp\.up_proj\.weight"):
        sepstore.dump(llama_decider, changed, store)
    assert (store / "manifests/model/latest.json").read_bytes() == before


def test_unchanged_layers_are_shared_between_versions(store: Path, state_dict: dict[str, torch.Tensor]) -> None:
    v2 = dict(state_dict)
    v2["model.layers.1.self_attn.o_proj.weight"] = v2["model.layers.1.self_attn.o_proj.weight"] * 2
    count = len(list((store / "parts/blake3").iterdir()))
    sepstore.dump(llama_decider, v2, store, tag="v2")
    assert len(list((store / "parts/blake3").iterdir())) == count + 1


def test_part_files_are_plain_deterministic_safetensors(store: Path, state_dict: dict[str, torch.Tensor]) -> None:
    manifest = sepstore.read_manifest(store)
    assert manifest.mid[3] is not None
    path = store / "parts/blake3" / (manifest.mid[3].digest.split(":")[1] + ".safetensors")
    loaded = safetensors.torch.load_file(path)
    assert same_bytes(loaded["mlp.gate_proj.weight"], state_dict["model.layers.3.mlp.gate_proj.weight"])
    assert sepstore.hashing.digest_file(path) == manifest.mid[3].digest


def test_non_contiguous_and_storage_sharing_tensors_round_trip(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {
        "a.t": base.t(),  # non-contiguous
        "a.slice": base[:, 1:4],  # non-contiguous view
        "a.tied": base,  # shares storage with the two above
        "a.scalar": torch.tensor(7, dtype=torch.int64),
        "a.empty": torch.empty(0, 3, dtype=torch.float16),
    }
    sepstore.dump(lambda k: ("begin", k), sd, tmp_path)
    got = sepstore.load(tmp_path, "b").begin or {}
    assert_state_dict_equal(got, sd)


def test_loaded_tensors_are_private_copies_on_write(store: Path) -> None:
    first = sepstore.load(store, "0-1").mid[0]["mlp.up_proj.weight"]
    original = first.clone()
    first.add_(1)
    again = sepstore.load(store, "0-1").mid[0]["mlp.up_proj.weight"]
    assert torch.equal(again, original)
    assert sepstore.verify(store).ok


# -- deciders --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("placement", "label", "key"),
    [
        (("begin", "x"), "begin", "x"),
        (["start", "x"], "begin", "x"),
        (("mid", 3, "x.y"), "mid.3", "x.y"),
        (["mid", "3", "x.y"], "mid.3", "x.y"),
        (("end", "x"), "end", "x"),
    ],
)
def test_decider_placements_of_every_accepted_form(
    tmp_path: Path, placement: tuple[object, ...], label: str, key: str
) -> None:
    sepstore.dump(lambda _k: placement, {"k": torch.ones(2)}, tmp_path)  # type: ignore[arg-type, return-value]
    manifest = sepstore.read_manifest(tmp_path)
    assert dict(manifest.labelled_parts())[label].tensors.keys() == {key}


def test_decider_none_drops_the_key(tmp_path: Path) -> None:
    sd = {"keep": torch.ones(1), "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(1)}
    sepstore.dump(lambda k: None if k.endswith("inv_freq") else ("end", k), sd, tmp_path)
    assert list((sepstore.load(tmp_path, "e").end or {}).keys()) == ["keep"]


@pytest.mark.parametrize(
    "placement",
    [
        "begin",
        (),
        ("middle", "x"),
        ("begin",),
        ("begin", ""),
        ("begin", 3),
        ("mid", "x"),
        ("mid", -1, "x"),
        ("mid", "1a", "x"),
        ("mid", True, "x"),
        ("mid", 1.0, "x"),
        ("end", "a", "b"),
        ("begin", "__metadata__"),
    ],
)
def test_bad_decider_results_are_decider_errors_naming_the_key(tmp_path: Path, placement: object) -> None:
    with pytest.raises(sepstore.DeciderError, match="the_key"):
        sepstore.dump(lambda _k: placement, {"the_key": torch.ones(1)}, tmp_path)  # type: ignore[arg-type, return-value]
    assert not (tmp_path / "manifests").exists()


def test_decider_that_raises_is_a_decider_error(tmp_path: Path) -> None:
    def decider(key: str) -> tuple[str, str]:
        raise KeyError(key)

    with pytest.raises(sepstore.DeciderError, match=r"weird\.key"):
        sepstore.dump(decider, {"weird.key": torch.ones(1)}, tmp_path)


def test_two_keys_placed_at_the_same_name_are_refused(tmp_path: Path) -> None:
    with pytest.raises(sepstore.DeciderError, match=r"'a'.*'b'"):
        sepstore.dump(lambda _k: ("end", "same"), {"a": torch.ones(1), "b": torch.ones(1)}, tmp_path)


@pytest.mark.parametrize("value", [3, "text", [torch.ones(1)], torch.ones(2, dtype=torch.complex128)])
def test_values_that_cannot_be_stored_are_tensor_errors(tmp_path: Path, value: object) -> None:
    with pytest.raises(sepstore.TensorError, match="bad_value"):
        sepstore.dump(lambda k: ("begin", k), {"bad_value": value}, tmp_path)  # type: ignore[dict-item]


@pytest.mark.parametrize(("name", "tag"), [("../x", "v1"), ("a//b", "v1"), ("ok", "a/b"), ("ok", ""), ("", "v1")])
def test_bad_names_and_tags_are_store_errors(tmp_path: Path, name: str, tag: str) -> None:
    with pytest.raises(sepstore.StoreError):
        sepstore.dump(lambda k: ("begin", k), {"k": torch.ones(1)}, tmp_path, name=name, tag=tag)


# -- property: any tensors, any placement, bit-exact round trip --------------------------------

dtypes = st.sampled_from(sorted(DTYPES))
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = DTYPES[draw(dtypes)]
    shape = draw(shapes)
    numel = 1
    for d in shape:
        numel *= d
    raw = draw(st.binary(min_size=numel * dtype.itemsize, max_size=numel * dtype.itemsize))
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    if dtype == torch.bool:
        flat = flat % 2
    return flat.view(dtype).reshape(shape)


placements = st.one_of(
    st.tuples(st.sampled_from(["begin", "start", "end"])),
    st.tuples(st.just("mid"), st.integers(0, 4) | st.sampled_from(["0", "2", "4"])),
    st.none(),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.text("abcdefghij._", min_size=1, max_size=8).filter(lambda k: k != "__metadata__"),
        st.tuples(tensors(), placements),
        min_size=1,
        max_size=8,
    )
)
def test_any_tensors_round_trip_bit_exactly(entries: dict[str, tuple[torch.Tensor, tuple[object, ...] | None]]) -> None:
    sd = {key: tensor for key, (tensor, _) in entries.items()}

    def decider(key: str) -> tuple[object, ...] | None:
        where = entries[key][1]
        return None if where is None else (*where, key)

    with tempfile.TemporaryDirectory() as tmp:
        sepstore.dump(decider, sd, tmp)  # type: ignore[arg-type]
        manifest = sepstore.read_manifest(tmp)
        present = [f"{i}-{i + 1}" for i, part in enumerate(manifest.mid) if part is not None]
        spec = " ".join(["b"] * (manifest.begin is not None) + present + ["e"] * (manifest.end is not None))
        psd = sepstore.load(tmp, spec) if spec else sepstore.PartStateDict()
        for key, (tensor, where) in entries.items():
            if where is None:
                continue
            section = where[0]
            if section == "mid":
                got = psd.mid[int(where[1])][key]  # type: ignore[call-overload]
            else:
                got = (psd.end if section == "end" else psd.begin or {})[key]  # type: ignore[index]
            assert same_bytes(got, tensor), key
        assert manifest.n_layers == (
            1 + max((int(w[1]) for _, w in entries.values() if w and w[0] == "mid"), default=-1)  # type: ignore[call-overload]
        )
        assert sepstore.verify(tmp).ok


def test_layer_count_follows_the_highest_layer(tmp_path: Path) -> None:
    manifest = sepstore.dump(lambda k: ("mid", int(k), "w"), {str(i): torch.ones(1) for i in range(N_LAYERS)}, tmp_path)
    assert manifest.n_layers == N_LAYERS


def test_a_memory_store_round_trips_through_the_cache(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    url = f"memory://sepstore-test-{tmp_path.name}"
    sepstore.dump(llama_decider, state_dict, url, name="mem/model", tag="v1")
    cache = tmp_path / "cache"
    psd = sepstore.load(url, "b 0-2", cache_dir=cache)
    assert same_bytes(psd.mid[1]["mlp.up_proj.weight"], state_dict["model.layers.1.mlp.up_proj.weight"])
    assert len(list((cache / "parts/blake3").iterdir())) == 3
    assert sepstore.verify(f"{url}/manifests/mem/model/v1.json", cache_dir=cache).ok
