"""export: a converted store written back as a Hugging Face folder is the source checkpoint (same
keys, dtypes and bytes) and loads with ``from_pretrained`` into a model with equal logits, for every
converter family and both source formats, from local, S3 and HTTP stores; and the rename record
that makes it possible is refused when hostile."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
import safetensors.torch
import torch
import transformers
from conftest import same_bytes
from test_cli import corrupt, run
from test_convert_families import CASES, build, outputs, save_checkpoint
from test_remote import Backend, http_root, make_backend  # noqa: F401 - http_root is a fixture make_backend uses

import sepstore
from sepstore.deciders import get
from sepstore.demo import llama_decider, tiny_llama_state_dict
from sepstore.errors import DeciderError, IntegrityError, ManifestError, StoreError
from sepstore.manifest import LayerRename, Rename, Renames, decode_manifest, encode_manifest

EXTRA = {"tokenizer_config.json": b'{"model_max_length": 64}', "special_tokens_map.json": b"{}"}


def checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder's safetensors or ``.bin`` files."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors |= safetensors.torch.load_file(file)
    for file in sorted(folder.glob("*.bin")):
        tensors |= torch.load(file, weights_only=True)
    return tensors


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert same_bytes(got[key], tensor), key


def reloaded(name: str, folder: Path) -> transformers.PreTrainedModel:
    return getattr(transformers, CASES[name].model_class).from_pretrained(folder).eval()


def looks_complete(folder: Path) -> bool:
    return (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists()


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.Tensor]:
    """A tiny Llama checkpoint (safetensors shards and two tokenizer files), its store (``tiny:v1``)
    and the source model's logits."""
    root = tmp_path_factory.mktemp("llama")
    model = build("llama", seed=0)
    save_checkpoint(model, "llama", "safetensors", root / "hf")
    for path, data in EXTRA.items():
        (root / "hf" / path).write_bytes(data)
    sepstore.convert(root / "hf", root / "store", name="tiny", tag="v1", quiet=True)
    return root / "hf", root / "store", outputs(model)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("name", list(CASES))
def test_export_of_a_converted_checkpoint_is_that_checkpoint_and_gives_equal_logits(
    tmp_path: Path, name: str, fmt: str
) -> None:
    original = build(name, seed=0)
    save_checkpoint(original, name, fmt, tmp_path / "hf")  # .bin: with the legacy buffers of the family
    sepstore.convert(tmp_path / "hf", tmp_path / "store", name="m", quiet=True)
    report = sepstore.export(tmp_path / "store", tmp_path / "out", quiet=True)
    assert report.names == "renames" and report.shards == 1
    assert_same_tensors(checkpoint(tmp_path / "out"), checkpoint(tmp_path / "hf"))  # tied heads not duplicated
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads(
        (tmp_path / "hf" / "config.json").read_text()
    )
    assert torch.equal(outputs(reloaded(name, tmp_path / "out")), outputs(original))


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_a_checkpoint_of_the_base_model_exports_under_its_own_spelling(tmp_path: Path, name: str) -> None:
    model = build(name, seed=0).base_model
    model.save_pretrained(tmp_path / "hf")
    manifest = sepstore.convert(tmp_path / "hf", tmp_path / "store", name="m", quiet=True)
    assert manifest.renames.mid == (LayerRename("", f"{get(name).layers.removeprefix(get(name).base)}.{{i}}."),)
    sepstore.export(tmp_path / "store", tmp_path / "out", quiet=True)
    assert_same_tensors(checkpoint(tmp_path / "out"), checkpoint(tmp_path / "hf"))


def test_small_shards_get_an_index_that_from_pretrained_loads(
    llama: tuple[Path, Path, torch.Tensor], tmp_path: Path
) -> None:
    source, store, logits = llama
    report = sepstore.export(store, tmp_path / "out", max_shard_size="20KB", quiet=True)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "out").glob("model-*.safetensors"))
    assert report.shards == len(shards) > 1
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    tensors = checkpoint(tmp_path / "out")
    assert sorted(index["weight_map"]) == sorted(tensors) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for shard in shards:  # at most 20 kB, unless one tensor alone is larger
        held = safetensors.torch.load_file(tmp_path / "out" / shard)
        assert sum(t.nbytes for t in held.values()) <= 20_000 or len(held) == 1
    assert_same_tensors(tensors, checkpoint(source))
    assert {p: (tmp_path / "out" / p).read_bytes() for p in EXTRA} == EXTRA
    assert torch.equal(outputs(reloaded("llama", tmp_path / "out")), logits)


@pytest.fixture(params=["s3", "http"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return make_backend(request.param, request, tmp_path)


def test_export_from_a_remote_store_goes_through_the_cache_and_repairs_it(
    llama: tuple[Path, Path, torch.Tensor], served: Backend, tmp_path: Path
) -> None:
    source, store, logits = llama
    sepstore.push(store, served.dest, quiet=True)
    cache = tmp_path / "cache"
    report = sepstore.export(served.manifest_url(), tmp_path / "out", cache_dir=cache, quiet=True)
    assert report.manifest_url == served.manifest_url()
    assert_same_tensors(checkpoint(tmp_path / "out"), checkpoint(source))
    assert {p: (tmp_path / "out" / p).read_bytes() for p in EXTRA} == EXTRA
    assert torch.equal(outputs(reloaded("llama", tmp_path / "out")), logits)
    # A damaged cached part (same size) is fetched again and streamed again into its places.
    cached = cache / "parts" / "blake3" / sepstore.read_manifest(store).mid[1].file_name
    cached.write_bytes(bytes(cached.stat().st_size))
    sepstore.export(served.manifest_url(), tmp_path / "again", cache_dir=cache, quiet=True)
    assert_same_tensors(checkpoint(tmp_path / "again"), checkpoint(source))


def test_a_corrupted_part_is_refused_and_leaves_no_complete_looking_folder(
    llama: tuple[Path, Path, torch.Tensor], tmp_path: Path
) -> None:
    _, store, _ = llama
    broken = tmp_path / "store"
    sepstore.push(store, broken, quiet=True)
    corrupt(broken, "mid.2")
    (tmp_path / "out").mkdir()
    with pytest.raises(IntegrityError, match=r"mid\.2"):
        sepstore.export(broken, tmp_path / "out", max_shard_size="20KB", quiet=True)
    assert list((tmp_path / "out").iterdir()) == []  # no shard, no index, no temporary file
    with pytest.raises(IntegrityError, match=r"mid\.2"):
        sepstore.export(broken, tmp_path / "new", quiet=True)
    assert not (tmp_path / "new").exists()


def test_a_folder_that_is_not_empty_is_refused_unless_forced_and_force_replaces_the_weights(
    llama: tuple[Path, Path, torch.Tensor], tmp_path: Path
) -> None:
    source, store, _ = llama
    out = tmp_path / "out"
    sepstore.export(store, out, max_shard_size="20KB", quiet=True)
    with pytest.raises(StoreError, match="not empty"):
        sepstore.export(store, out, quiet=True)
    (out / "notes.txt").write_text("mine")
    report = sepstore.export(store, out, force=True, quiet=True)
    assert report.shards == 1
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]  # old shards and index gone
    assert (out / "notes.txt").read_text() == "mine"
    assert_same_tensors(checkpoint(out), checkpoint(source))


def test_a_dump_without_renames_exports_part_labels_unless_given_a_rename_function(tmp_path: Path) -> None:
    state = tiny_llama_state_dict(layers=2, hidden=16, intermediate=32, vocab=64)
    sepstore.dump(llama_decider, state, tmp_path / "store")
    report = sepstore.export(tmp_path / "store", tmp_path / "labels", quiet=True)
    assert report.names == "labels" and not (tmp_path / "labels" / "config.json").exists()
    expected = sepstore.load(tmp_path / "store").to_dict()
    assert_same_tensors(checkpoint(tmp_path / "labels"), expected)

    def rename(label_name: str) -> str | None:
        section, _, rest = label_name.partition(".")
        if section == "mid":
            layer, _, rest = rest.partition(".")
            return f"model.layers.{layer}.{rest}"
        return (
            None
            if rest == "lm_head.weight"
            else rest
            if section == "end" and rest.startswith("lm")
            else "model." + rest
        )

    report = sepstore.export(tmp_path / "store", tmp_path / "named", rename=rename, quiet=True)
    assert report.names == "rename" and report.left_out == ["end.lm_head.weight"]
    assert_same_tensors(checkpoint(tmp_path / "named"), {k: v for k, v in state.items() if k != "lm_head.weight"})
    with pytest.raises(DeciderError, match="would both be written as 'same'"):
        sepstore.export(tmp_path / "store", tmp_path / "twice", rename=lambda _: "same", quiet=True)
    assert not (tmp_path / "twice").exists()


def test_an_asset_with_the_name_of_a_weight_file_is_refused(tmp_path: Path) -> None:
    state = tiny_llama_state_dict(layers=1, hidden=16, intermediate=32, vocab=64)
    sepstore.dump(llama_decider, state, tmp_path / "store", assets={"model.safetensors": b"not weights"})
    with pytest.raises(ManifestError, match=r"asset 'model\.safetensors'"):
        sepstore.export(tmp_path / "store", tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_two_tensors_a_hostile_record_names_alike_are_refused(
    llama: tuple[Path, Path, torch.Tensor], tmp_path: Path
) -> None:
    _, store, _ = llama
    manifest = sepstore.read_manifest(store)
    hostile = msgspec.structs.replace(
        manifest, renames=msgspec.structs.replace(manifest.renames, end=(Rename("norm.", "lm_head."), Rename("", "")))
    )
    path = store / "manifests" / "tiny" / "hostile.json"
    path.write_bytes(encode_manifest(hostile))
    try:
        with pytest.raises(ManifestError, match=r"would both be written as 'lm_head\.weight'"):
            sepstore.export(path, tmp_path / "out", quiet=True)
    finally:
        path.unlink()
    assert not (tmp_path / "out").exists()


def manifest_with(renames: Any, version: int = 2) -> bytes:
    data = {"format": "sepweight", "format_version": version, "name": "m", "parts": "../../parts/blake3"}
    return json.dumps({**data, "begin": None, "mid": [], "end": None, "renames": renames}).encode()


@pytest.mark.parametrize(
    ("renames", "version", "why"),
    [
        ({"mid": [{"stored": "", "original": "model.layers."}]}, 2, r"\$\.renames\.mid\[0\]\.original"),
        ({"begin": [{"stored": "", "original": "x.{i}."}]}, 2, r"\$\.renames\.begin\[0\]\.original"),
        ({"end": [{"stored": "", "original": "../../etc/"}]}, 2, r"\$\.renames\.end\[0\]\.original"),
        ({"end": [{"stored": "", "original": "a\nb."}]}, 2, r"\$\.renames\.end\[0\]\.original"),
        ({"end": [{"stored": "", "original": "a."}] * 65}, 2, r"\$\.renames\.end"),
        ({"added": ["__metadata__"]}, 2, r"\$\.renames\.added\[0\]"),
        ({"extra": []}, 2, "unknown field `extra`"),
        ({}, 1, "`renames` needs `format_version` 2"),
    ],
)
def test_a_hostile_rename_record_is_refused_when_decoded(renames: Any, version: int, why: str) -> None:
    with pytest.raises(ManifestError, match=why):
        decode_manifest(manifest_with(renames, version), source="test")


def test_renames_name_every_key_back_and_refuse_a_checkpoint_of_two_spellings() -> None:
    family = get("llama")
    keys = ["model.embed_tokens.weight", "model.layers.3.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"]
    record = family.renames(keys)
    assert record is not None
    assert [record.original(label, name) for label, name in [("begin", "embed_tokens.weight"), ("mid.3", "x.w")]] == [
        "model.embed_tokens.weight",
        "model.layers.3.x.w",
    ]
    assert Renames(mid=(LayerRename("", "h.{i}."),)).original("end", "norm.weight") is None
    with pytest.raises(DeciderError, match=r"both with and without 'model\.'"):
        family.renames(["model.embed_tokens.weight", "layers.0.mlp.up_proj.weight"])


def test_converting_another_spelling_into_a_tag_that_records_one_is_refused(tmp_path: Path) -> None:
    model = build("llama", seed=0)
    model.save_pretrained(tmp_path / "full")
    model.base_model.save_pretrained(tmp_path / "base")
    sepstore.convert(tmp_path / "full", tmp_path / "store", name="m", quiet=True)
    with pytest.raises(ManifestError, match="records other renames"):
        sepstore.convert(tmp_path / "base", tmp_path / "store", name="m", quiet=True)
    sepstore.convert(tmp_path / "base", tmp_path / "store", name="m", force=True, quiet=True)
    assert sepstore.read_manifest(tmp_path / "store").renames.mid == (LayerRename("", "layers.{i}."),)


def test_a_users_prefix_decider_still_drops_what_it_is_told_and_its_record_skips_those_keys() -> None:
    from sepstore.deciders import Family, prefix_decider

    decider = prefix_decider(begin=("m.emb.",), layers="m.h", end=("head.",), drop=r"\.cache$", base="m.")
    assert decider("m.h.1.attn.cache") is None and decider("h.1.attn.w") == ("mid", 1, "attn.w")
    record = Family("mine", decider).renames(["m.emb.w", "m.h.0.attn.w", "m.h.0.attn.cache", "head.w"])
    assert record is not None and record.original("begin", "emb.w") == "m.emb.w"


def test_lazy_load_skips_the_buffers_a_converted_store_keeps_even_when_strict(tmp_path: Path) -> None:
    model = build("llama", seed=0)
    save_checkpoint(model, "llama", "bin", tmp_path / "hf")  # with rotary inv_freq buffers in every layer
    sepstore.convert(tmp_path / "hf", tmp_path / "store", name="m", quiet=True)
    layer = type(model.model.layers[0])
    module = sepstore.Part(mid=lambda: layer(model.config, 0), mid_range=range(3))
    result = sepstore.lazy_load(module, tmp_path / "store", "0-3", strict=True)
    assert result.missing_keys == []
    assert result.unexpected_keys == [f"mid.{i}.self_attn.rotary_emb.inv_freq" for i in range(3)]
    assert torch.equal(module.mid["1"].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)


def test_cli_export_writes_the_folder_and_refuses_a_full_one(
    llama: tuple[Path, Path, torch.Tensor], tmp_path: Path
) -> None:
    source, store, _ = llama
    done = run("export", store, tmp_path / "out", "--max-shard-size", "30KB", "--json", "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["names"] == "renames" and report["shards"] > 1
    assert "model.safetensors.index.json" in report["files"] and "tokenizer_config.json" in report["files"]
    assert_same_tensors(checkpoint(tmp_path / "out"), checkpoint(source))
    again = run("export", store, tmp_path / "out")
    assert again.returncode == 2 and "not empty" in again.stderr and "force=True (CLI: --force)" in again.stderr
    forced = run("export", store, tmp_path / "out", "--force", "--quiet")
    assert forced.returncode == 0 and "under the checkpoint's names" in forced.stdout
