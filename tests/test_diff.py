"""diff: per-part status, per-tensor changes, and the bytes a node must fetch."""

from __future__ import annotations

from pathlib import Path

import torch

import sepstore
from sepstore.demo import llama_decider


def publish(store: Path, sd: dict[str, torch.Tensor], tag: str) -> Path:
    sepstore.dump(llama_decider, sd, store, tag=tag)
    return store / "manifests" / "model" / f"{tag}.json"


def test_one_changed_tensor_in_one_layer(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    v1 = publish(tmp_path, state_dict, "v1")
    changed = dict(state_dict)
    changed["model.layers.4.mlp.down_proj.weight"] = changed["model.layers.4.mlp.down_proj.weight"] + 1
    v2 = publish(tmp_path, changed, "v2")
    result = sepstore.diff(v1, v2)
    assert [(p.part, p.status) for p in result.changed] == [("mid.4", "changed")]
    part = sepstore.read_manifest(v2).mid[4]
    assert part is not None
    as_json = result.to_dict()
    assert as_json["bytes_to_fetch"] == part.size
    entry = next(p for p in as_json["parts"] if p["part"] == "mid.4")
    assert entry == {
        "part": "mid.4",
        "status": "changed",
        "tensors": {"changed": ["mlp.down_proj.weight"], "added": [], "removed": []},
        "bytes": part.size,
        # a part this small is not assembled from the tensors v1 has (pull fetches it whole)
        "tensor_bytes": part.size,
    }
    assert as_json["tensor_bytes_to_fetch"] == entry["tensor_bytes"]
    assert [p["part"] for p in as_json["parts"]] == ["begin", *[f"mid.{i}" for i in range(6)], "end"]
    assert all(p["status"] == "same" and p["bytes"] == 0 for p in as_json["parts"] if p["part"] != "mid.4")


def test_identical_versions_have_nothing_to_fetch(store: Path, manifest_path: Path) -> None:
    result = sepstore.diff(manifest_path, store)
    assert result.changed == [] and result.bytes_to_fetch == 0


def test_added_and_removed_layers_and_tensors(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    v1 = publish(tmp_path, state_dict, "v1")
    grown = {k: v for k, v in state_dict.items() if not k.startswith("model.layers.0.mlp.up_proj")}
    grown["model.layers.0.extra.weight"] = torch.ones(3)
    grown |= {k.replace("layers.5.", "layers.6."): v for k, v in state_dict.items() if "layers.5." in k}
    v2 = publish(tmp_path, grown, "v2")
    result = {p.part: p for p in sepstore.diff(v1, v2).parts}
    assert result["mid.0"].status == "changed"
    assert result["mid.0"].tensors.added == ["extra.weight"]
    assert result["mid.0"].tensors.removed == ["mlp.up_proj.weight"]
    assert result["mid.6"].status == "added"
    assert result["mid.6"].bytes == 0  # same bytes as layer 5, which the node already holds
    back = {p.part: p for p in sepstore.diff(v2, v1).parts}
    assert back["mid.6"].status == "removed" and back["mid.6"].bytes == 0


def test_dtype_or_shape_change_is_a_changed_tensor(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    v1 = publish(tmp_path, state_dict, "v1")
    recast = dict(state_dict)
    recast["model.norm.weight"] = recast["model.norm.weight"].float()
    v2 = publish(tmp_path, recast, "v2")
    result = sepstore.diff(sepstore.read_manifest(v1), sepstore.read_manifest(v2))
    assert [(p.part, p.tensors.changed) for p in result.changed] == [("end", ["norm.weight"])]
