"""Edge cases found in review: each once crashed, lost data or said the wrong thing."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import sepstore
import sepstore.cli
from sepstore.demo import llama_decider, tiny_llama_state_dict


def small() -> dict[str, torch.Tensor]:
    return tiny_llama_state_dict(layers=2, hidden=16, intermediate=16, vocab=32, seed=9)


def test_a_part_published_again_restarts_its_gc_grace_period(tmp_path: Path) -> None:
    sepstore.dump(llama_decider, small(), tmp_path, tag="old")
    (tmp_path / "manifests/model/old.json").unlink()
    old = time.time() - 7200
    for path in (tmp_path / "parts/blake3").iterdir():
        os.utime(path, (old, old))
    sepstore.dump(llama_decider, small(), tmp_path, tag="new")  # the same parts, reused
    assert sepstore.gc(tmp_path).removed == []
    assert sepstore.verify(tmp_path, name="model", tag="new").ok


def test_a_model_named_like_the_manifests_folder_loads(tmp_path: Path) -> None:
    sepstore.dump(llama_decider, small(), tmp_path, name="acme/manifests", tag="v1")
    assert sepstore.load(tmp_path / "manifests/acme/manifests/v1.json", "b").begin


def test_one_model_with_several_tags_defaults_to_latest(tmp_path: Path) -> None:
    for tag in ("v1", "latest", "v2"):
        sepstore.dump(llama_decider, small(), tmp_path, tag=tag)
    assert sepstore.resolve(tmp_path).url.endswith("/manifests/model/latest.json")
    (tmp_path / "manifests/model/latest.json").unlink()
    for name in (None, "model"):
        with pytest.raises(sepstore.NotFoundError, match=r"'model' .*no 'latest' tag.*model:v1, model:v2.*tag="):
            sepstore.resolve(tmp_path, name=name)


def test_a_corrupted_cached_part_is_fetched_again(tmp_path: Path) -> None:
    url = f"memory://edge-{tmp_path.name}"
    sd = small()
    sepstore.dump(llama_decider, sd, url)
    cache = tmp_path / "cache"
    sepstore.pull(url, "b", cache_dir=cache, quiet=True)
    (cached,) = (cache / "parts/blake3").iterdir()
    cached.write_bytes(cached.read_bytes()[:-1] + b"\xff")
    psd = sepstore.load(url, "b", cache_dir=cache)
    assert torch.equal(psd.begin["embed_tokens.weight"], sd["model.embed_tokens.weight"])  # type: ignore[index]
    assert sepstore.hashing.digest_file(cached) == f"blake3:{cached.stem}"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"metadata": {"a": 5}}, "metadata"),
        ({"metadata": {"a": object()}}, "metadata= cannot be stored as JSON"),
        ({"config": {"a": object()}}, "config= cannot be stored as JSON"),
    ],
)
def test_metadata_and_config_the_manifest_cannot_hold_are_refused_before_writing(
    tmp_path: Path, kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(sepstore.ManifestError, match=match):
        sepstore.dump(llama_decider, small(), tmp_path, **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "parts").exists()


def test_lazy_load_into_a_module_of_other_shapes_is_a_module_mismatch(tmp_path: Path) -> None:
    sepstore.dump(lambda k: ("end", k), {"w.weight": torch.ones(3, 3)}, tmp_path)
    module = nn.Module()
    module.end = nn.ModuleDict({"w": nn.Linear(2, 2, bias=False)})
    with pytest.raises(sepstore.ModuleMismatchError, match="does not fit"):
        sepstore.lazy_load(module, tmp_path, "e")


def test_pushing_a_store_with_a_missing_part_is_not_found(tmp_path: Path) -> None:
    manifest = sepstore.dump(llama_decider, small(), tmp_path / "src")
    (tmp_path / "src/parts/blake3" / f"{manifest.end.digest[7:]}.safetensors").unlink()  # type: ignore[union-attr]
    with pytest.raises(sepstore.NotFoundError):
        sepstore.push(tmp_path / "src", tmp_path / "dest", quiet=True)
    assert not (tmp_path / "dest/manifests").exists()


@pytest.mark.parametrize("ref", [5, None, ["a"]])
def test_references_of_the_wrong_type_are_sepstore_errors(ref: object) -> None:
    with pytest.raises(sepstore.SepstoreError):
        sepstore.load(ref)  # type: ignore[arg-type]
    with pytest.raises(sepstore.SepstoreError):
        sepstore.gc(ref)  # type: ignore[arg-type]


def test_a_cache_that_cannot_be_made_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"memory://edge-cli-{tmp_path.name}"
    sepstore.dump(llama_decider, small(), url)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(sepstore.StoreError, match="a-file"):
        sepstore.pull(url, cache_dir=blocker, quiet=True)
    assert sepstore.cli.main(["pull", url, "--cache-dir", str(blocker), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sepstore: error:") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("value", "kind"), [(torch.ones(2, 2).to_sparse(), "sparse_coo"), (torch.empty(2, device="meta"), "meta")]
)
def test_tensors_without_dense_data_are_tensor_errors(tmp_path: Path, value: torch.Tensor, kind: str) -> None:
    with pytest.raises(sepstore.TensorError, match=kind):
        sepstore.dump(lambda k: ("begin", k), {"x": value}, tmp_path)


@pytest.mark.parametrize("kwargs", [{"budgets": "24GiB"}, {"budgets": [None]}, {"nodes": 2.5}, {"nodes": True}])
def test_plan_arguments_of_the_wrong_type_are_spec_errors(tmp_path: Path, kwargs: dict[str, object]) -> None:
    sepstore.dump(llama_decider, small(), tmp_path)
    with pytest.raises(sepstore.SpecError):
        sepstore.plan(tmp_path, **kwargs)  # type: ignore[arg-type]


def test_a_negative_gc_grace_is_refused(tmp_path: Path) -> None:
    sepstore.dump(llama_decider, small(), tmp_path)
    with pytest.raises(sepstore.StoreError, match="grace"):
        sepstore.gc(tmp_path, grace=-5)


def test_a_bad_device_is_refused_before_anything_is_fetched(tmp_path: Path) -> None:
    store = f"memory://edge-device-{tmp_path.name}/store"  # remote: parts go through the cache
    sepstore.dump(llama_decider, small(), store, name="m", quiet=True)
    cache = tmp_path / "cache"
    with pytest.raises(sepstore.TensorError, match="bogus"):
        sepstore.load(store, "f", name="m", device="bogus", cache_dir=cache)
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))
    assert sepstore.load(store, "b", name="m", cache_dir=cache).begin is not None
    assert any(cache.rglob("*.safetensors")), "the same load with a real device does fill the cache"


@pytest.mark.parametrize("workers", [0, -1, 2.5, "8"])
def test_workers_must_be_a_positive_whole_number(tmp_path: Path, workers: object) -> None:
    sepstore.dump(llama_decider, small(), tmp_path / "store", name="m", quiet=True)
    with pytest.raises(sepstore.StoreError, match="workers="):
        sepstore.pull(tmp_path / "store", "f", name="m", workers=workers, cache_dir=tmp_path / "cache")  # type: ignore[arg-type]


def test_parts_url_must_be_a_path_or_url(tmp_path: Path) -> None:
    sepstore.dump(llama_decider, small(), tmp_path / "store", name="m", quiet=True)
    with pytest.raises(sepstore.StoreError, match="parts_url="):
        sepstore.load(tmp_path / "store", "f", name="m", parts_url=5)  # type: ignore[arg-type]
    mirror = sepstore.load(tmp_path / "store", "f", name="m", parts_url=tmp_path / "store" / "parts" / "blake3")
    assert mirror.begin is not None


@pytest.mark.parametrize("tag", [".tmp-0123456789abcdef", ".hidden"])
def test_tags_starting_with_a_dot_are_refused(tmp_path: Path, tag: str) -> None:
    """They would be hidden from listings, and gc could take one for a temporary file."""
    with pytest.raises(sepstore.StoreError, match=r"not starting with '\.'"):
        sepstore.dump(llama_decider, small(), tmp_path / "store", tag=tag, quiet=True)
    assert not (tmp_path / "store" / "parts").exists()


def test_a_device_this_torch_cannot_use_is_a_tensor_error(tmp_path: Path) -> None:
    sepstore.dump(llama_decider, small(), tmp_path / "store", name="m", quiet=True)
    unusable = "meta:0" if torch.cuda.is_available() else "cuda"
    with pytest.raises(sepstore.TensorError, match="cannot load onto device"):
        sepstore.load(tmp_path / "store", "b", device=unusable)


def test_a_store_that_is_not_there_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(sepstore.NotFoundError, match="no store there"):
        sepstore.gc(tmp_path / "nope")
    with pytest.raises(sepstore.NotFoundError, match="no store there"):
        sepstore.read_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(sepstore.NotFoundError, match="no models"):
        sepstore.read_manifest(tmp_path / "empty")


def test_dump_takes_a_built_in_deciders_name(tmp_path: Path) -> None:
    by_name = sepstore.dump("llama", small(), tmp_path / "a", quiet=True)
    by_function = sepstore.dump(llama_decider, small(), tmp_path / "b", quiet=True)
    assert list(by_name.labelled_parts()) == list(by_function.labelled_parts())
    with pytest.raises(sepstore.DeciderError, match="lama"):
        sepstore.dump("lama", small(), tmp_path / "c", quiet=True)


def test_a_part_state_dict_shows_what_it_holds_not_its_values(tmp_path: Path) -> None:
    sepstore.dump(llama_decider, small(), tmp_path, quiet=True)
    shown = repr(sepstore.load(tmp_path, "b 0-1 e"))
    assert shown == "PartStateDict(begin: 1 tensor, mid 0-1: 9 tensors, end: 2 tensors, main_range 0-1)"
    assert "tensor(" not in shown


def test_a_plan_for_no_nodes_says_so(tmp_path: Path) -> None:
    sepstore.dump(llama_decider, small(), tmp_path, quiet=True)
    with pytest.raises(sepstore.SpecError, match="at least one node, got 0"):
        sepstore.plan(tmp_path, nodes=0)


def test_no_lock_files_are_left_behind(tmp_path: Path) -> None:
    sd = small()
    sepstore.dump(llama_decider, sd, tmp_path / "store", name="acme/m", tag="v1", quiet=True)
    sepstore.dump(llama_decider, sd, tmp_path / "store", name="acme/m", tag="v1", quiet=True)  # combines
    store = f"memory://edge-locks-{tmp_path.name}/store"
    sepstore.push(tmp_path / "store", store, quiet=True)
    sepstore.pull(store, "f", cache_dir=tmp_path / "cache", quiet=True)
    left = [p for p in tmp_path.rglob("*.lock")]
    assert left == [], "a lock file lives only while it is held"


def test_a_transformers_config_with_int_keys_is_stored_as_json_reads_it(tmp_path: Path) -> None:
    config = {"model_type": "llama", "id2label": {0: "LABEL_0", 1: "LABEL_1"}, "shape": (2, 3)}
    manifest = sepstore.dump(llama_decider, small(), tmp_path, config=config, quiet=True)
    assert manifest.config == {"model_type": "llama", "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "shape": [2, 3]}
    assert sepstore.read_manifest(tmp_path).config == manifest.config


def test_every_error_class_is_exported_at_the_top_level() -> None:
    import sepstore.errors

    errors = {n for n, v in vars(sepstore.errors).items() if isinstance(v, type) and issubclass(v, Exception)}
    assert errors - set(sepstore.__all__) == set()
    assert all(getattr(sepstore, n) is getattr(sepstore.errors, n) for n in errors)
