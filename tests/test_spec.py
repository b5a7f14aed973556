"""Part specs (``"f"``, ``"b 0-5"``, ``"75-80 e"`` ...): what each valid form selects, and a
``SpecError`` naming the bad token and the layer count for every bad one."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

import sepstore
from sepstore import PartSpec, PartStateDict
from sepstore.demo import llama_decider, tiny_llama_state_dict

N_LAYERS = 6


# (spec, n_layers, begin, layers, end, main_range)
VALID_SPECS: list[tuple[str, int, bool, list[int], bool, range | None]] = [
    ("f", 100, True, list(range(100)), True, range(100)),
    ("f", 0, True, [], True, None),
    ("b", 100, True, [], False, None),
    ("e", 100, False, [], True, None),
    ("0-5", 100, False, [0, 1, 2, 3, 4], False, range(0, 5)),
    ("b 0-5", 100, True, [0, 1, 2, 3, 4], False, range(0, 5)),
    ("5-10 15-20", 100, False, [*range(5, 10), *range(15, 20)], False, range(5, 10)),
    ("15-20 5-10", 100, False, [*range(15, 20), *range(5, 10)], False, range(15, 20)),
    ("75-80 e", 100, False, [75, 76, 77, 78, 79], True, range(75, 80)),
    ("b 0-5 e", 100, True, [0, 1, 2, 3, 4], True, range(0, 5)),
    ("e b", 100, True, [], True, None),
    ("0-100", 100, False, list(range(100)), False, range(0, 100)),
    ("99-100", 100, False, [99], False, range(99, 100)),
    ("  b\t0-5   e\n", 100, True, [0, 1, 2, 3, 4], True, range(0, 5)),
    ("0-3 3-6", 6, False, [0, 1, 2, 3, 4, 5], False, range(0, 3)),
]


@pytest.mark.parametrize(
    ("spec", "n_layers", "begin", "layers", "end", "main_range"),
    VALID_SPECS,
    ids=[f"{s.strip()!r}/{n}" for s, n, *_ in VALID_SPECS],
)
def test_valid_spec_selects_begin_layers_and_end(
    spec: str, n_layers: int, begin: bool, layers: list[int], end: bool, main_range: range | None
) -> None:
    parsed = PartSpec.parse(spec, n_layers)
    assert parsed.begin is begin
    assert parsed.end is end
    assert parsed.layers == layers
    assert parsed.main_range == main_range
    assert parsed.full is (spec == "f")


@pytest.mark.parametrize(
    ("spec", "labels"),
    [
        ("f", ["begin", "mid.0", "mid.1", "end"]),
        ("b 0-1", ["begin", "mid.0"]),
        ("1-2 e", ["mid.1", "end"]),
        ("e 1-2 b", ["begin", "mid.1", "end"]),
    ],
)
def test_spec_labels_are_in_load_order(spec: str, labels: list[str]) -> None:
    assert PartSpec.parse(spec, 2).labels() == labels


@pytest.mark.parametrize("spec", ["f", "b", "e", "0-5", "b 0-5", "5-10 15-20", "75-80 e", "b 0-5 e"])
def test_spec_prints_back_as_it_was_written(spec: str) -> None:
    parsed = PartSpec.parse(spec, 100)
    assert str(parsed) == spec
    assert PartSpec.parse(str(parsed), 100) == parsed


LAYER_COUNT = re.compile(rf"\b{N_LAYERS} layers\b|0\.\.{N_LAYERS}\b")

# (spec, token the message must name, whether the message must name the layer count)
BAD_SPECS: dict[str, tuple[str, str, bool]] = {
    "range_past_the_end": ("0-7", "0-7", True),
    "range_wholly_past_the_end": ("6-7", "6-7", True),
    "far_out_of_range": ("b 90-100", "90-100", True),
    "empty_range": ("3-3", "3-3", True),
    "reversed_range": ("5-3", "5-3", True),
    "unknown_letter": ("x", "x", True),
    "unknown_word": ("b full", "full", True),
    "open_ended_range": ("0-", "0-", True),
    "range_without_start": ("-5", "-5", True),
    "range_of_letters": ("a-b", "a-b", True),
    "range_with_spaces_inside": ("0 - 5", "0", True),
    "three_part_range": ("0-2-4", "0-2-4", True),
    "uppercase_token": ("B", "B", True),
    "comma_separated": ("b,0-5", "b,0-5", True),
    "overlapping_ranges": ("0-3 2-4", "2-4", False),
    "contained_range": ("0-6 2-3", "2-3", False),
    "same_range_twice": ("1-2 1-2", "1-2", False),
    "full_with_begin": ("f b", "f", False),
    "full_with_range": ("0-5 f", "f", False),
    "full_twice": ("f f", "f", False),
    "begin_twice": ("b 0-1 b", "b", False),
    "end_twice": ("e e", "e", False),
}


@pytest.mark.parametrize(("spec", "token", "names_count"), BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_bad_spec_is_a_spec_error_naming_the_token(spec: str, token: str, names_count: bool) -> None:
    with pytest.raises(sepstore.SpecError) as info:
        PartSpec.parse(spec, N_LAYERS)
    message = str(info.value)
    assert repr(token) in message, f"{token!r} not named in {message!r}"
    if names_count:
        assert LAYER_COUNT.search(message), f"layer count {N_LAYERS} not named in {message!r}"


@pytest.mark.parametrize("spec", ["", " ", "\t\n"])
def test_empty_spec_is_a_spec_error_suggesting_valid_ones(spec: str) -> None:
    with pytest.raises(sepstore.SpecError, match=r"empty part spec.*'f'"):
        PartSpec.parse(spec, N_LAYERS)


@pytest.mark.parametrize("spec", [None, 5, 0.5, ["b", "0-5"], b"b 0-5", range(0, 5)])
def test_non_string_spec_is_a_spec_error_naming_its_type(spec: Any) -> None:
    with pytest.raises(sepstore.SpecError, match=type(spec).__name__):
        PartSpec.parse(spec, N_LAYERS)


def test_ranges_of_a_model_without_layers_are_out_of_range() -> None:
    with pytest.raises(sepstore.SpecError, match=r"0-1.*0 layers"):
        PartSpec.parse("0-1", 0)
    assert PartSpec.parse("b e", 0).layers == []


def test_spec_error_is_a_sepstore_error_and_a_value_error() -> None:
    with pytest.raises(sepstore.SepstoreError):
        PartSpec.parse("x", N_LAYERS)
    with pytest.raises(ValueError):
        PartSpec.parse("x", N_LAYERS)


# --- through load and PartStateDict ---------------------------------------------------------------


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return tiny_llama_state_dict(layers=N_LAYERS, hidden=8, intermediate=16, vocab=16, seed=2)


@pytest.fixture(scope="module")
def spec_store(tmp_path_factory: pytest.TempPathFactory, state: dict[str, torch.Tensor]) -> Path:
    root = tmp_path_factory.mktemp("spec") / "store"
    sepstore.dump(llama_decider, state, root)
    return root


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.mark.parametrize(
    "spec",
    ["0-7", "3-3", "5-3", "x", "0-", "-5", "a-b", "0-3 2-4", "f e", "", "b b", None, 3],
    ids=repr,
)
def test_load_with_a_bad_spec_raises_spec_error(spec_store: Path, cache: Path, spec: Any) -> None:
    with pytest.raises(sepstore.SpecError):
        sepstore.load(spec_store, spec, cache_dir=cache)


def test_load_error_for_an_out_of_range_spec_names_the_models_layer_count(spec_store: Path, cache: Path) -> None:
    with pytest.raises(sepstore.SpecError, match=rf"'4-9'.*\b{N_LAYERS} layers"):
        sepstore.load(spec_store, "b 4-9", cache_dir=cache)


def test_load_with_a_valid_spec_loads_just_those_parts(
    spec_store: Path, cache: Path, state: dict[str, torch.Tensor]
) -> None:
    psd = sepstore.load(spec_store, "b 1-3 5-6", cache_dir=cache)
    assert psd.begin is not None and psd.end is None
    assert sorted(psd.mid) == [1, 2, 5]
    assert psd.main_range == range(1, 3)
    want = state["model.layers.5.mlp.down_proj.weight"]
    assert torch.equal(psd.mid[5]["mlp.down_proj.weight"], want)


def test_to_dict_numbers_target_layers_as_the_main_range(
    spec_store: Path, cache: Path, state: dict[str, torch.Tensor]
) -> None:
    psd = sepstore.load(spec_store, "0-2 4-6 e", cache_dir=cache)
    default = psd.to_dict()
    assert {k.split(".")[1] for k in default if k.startswith("mid.")} == {"0", "1"}
    assert any(k.startswith("end.") for k in default)
    moved = psd.to_dict(range(4, 6))
    assert sorted(moved) == sorted(default)
    key = "mid.1.self_attn.q_proj.weight"
    assert torch.equal(moved[key], state["model.layers.5.self_attn.q_proj.weight"])
    assert torch.equal(default[key], state["model.layers.1.self_attn.q_proj.weight"])


@pytest.mark.parametrize("target", [range(0, 3), range(4, 5), range(0, 0)], ids=repr)
def test_to_dict_target_range_of_another_length_is_a_spec_error(spec_store: Path, cache: Path, target: range) -> None:
    psd = sepstore.load(spec_store, "0-2 4-6", cache_dir=cache)
    with pytest.raises(sepstore.SpecError, match=rf"{target.start}-{target.stop}.*{len(target)} layers"):
        psd.to_dict(target)


@pytest.mark.parametrize("target", [range(2, 4), range(3, 5), range(5, 7)], ids=repr)
def test_to_dict_target_range_with_layers_not_loaded_is_a_spec_error(
    spec_store: Path, cache: Path, target: range
) -> None:
    psd = sepstore.load(spec_store, "0-2 4-6", cache_dir=cache)
    with pytest.raises(sepstore.SpecError, match="not loaded"):
        psd.to_dict(target)


def test_to_dict_target_range_without_a_main_range_needs_loaded_layers(spec_store: Path, cache: Path) -> None:
    psd = sepstore.load(spec_store, "b e", cache_dir=cache)
    assert psd.main_range is None
    assert not any(k.startswith("mid.") for k in psd.to_dict())
    with pytest.raises(sepstore.SpecError, match=r"layer 0 .*not loaded"):
        psd.to_dict(range(0, 2))


def test_to_dict_on_a_hand_built_part_state_dict_refuses_missing_layers() -> None:
    t = torch.zeros(1)
    psd = PartStateDict(mid={0: {"w": t}, 1: {"w": t}}, main_range=range(0, 2))
    assert sorted(psd.to_dict()) == ["mid.0.w", "mid.1.w"]
    with pytest.raises(sepstore.SpecError):
        psd.to_dict(range(1, 3))
    with pytest.raises(sepstore.SpecError):
        psd.to_dict(range(0, 1))
