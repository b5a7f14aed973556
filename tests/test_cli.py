"""The command line, run as a user runs it: a subprocess, exit codes, JSON on stdout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import sepstore
from sepstore.demo import llama_decider


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sepstore", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def corrupt(store: Path, label: str) -> None:
    part = dict(sepstore.read_manifest(store).labelled_parts())[label]
    path = store / "parts/blake3" / f"{part.digest[7:]}.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(data)


@pytest.mark.parametrize(
    "command", ["convert", "push", "pull", "files", "info", "verify", "diff", "plan", "gc", "demo"]
)
def test_every_subcommand_has_help_with_an_example(command: str) -> None:
    result = run(command, "--help")
    assert result.returncode == 0
    assert "example:" in result.stdout and f"sepstore {command}" in result.stdout


def test_info_json_describes_the_model(store: Path, manifest_path: Path) -> None:
    result = run("info", store, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["name"] == "model" and info["layers"] == 6
    assert info["manifest"] == str(manifest_path)
    assert info["digest"] == sepstore.hashing.digest_file(manifest_path)
    assert [p["part"] for p in info["parts"]] == ["begin", *[f"mid.{i}" for i in range(6)], "end"]
    assert info["parts"][1]["dtypes"] == ["BF16"] and info["parts"][1]["tensors"] == 9
    assert info["total_bytes"] == sum(p["size"] for p in info["parts"])
    text = run("info", manifest_path)
    assert text.returncode == 0 and "layers:    6" in text.stdout


def test_verify_exits_0_when_intact_and_1_on_a_corrupt_part(store: Path) -> None:
    ok = run("verify", store)
    assert ok.returncode == 0, ok.stderr
    assert "verified" in ok.stdout
    corrupt(store, "mid.3")
    assert run("verify", store, "--spec", "b 0-3").returncode == 0
    bad = run("verify", store, "--json")
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["ok"] is False
    assert [p["part"] for p in report["parts"] if not p["ok"]] == ["mid.3"]


def test_diff_json_lists_changed_parts_and_bytes(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    sepstore.dump(llama_decider, state_dict, tmp_path, tag="v1")
    v2 = dict(state_dict)
    v2["model.layers.2.self_attn.q_proj.weight"] = v2["model.layers.2.self_attn.q_proj.weight"] * 3
    manifest = sepstore.dump(llama_decider, v2, tmp_path, tag="v2")
    a, b = (tmp_path / f"manifests/model/{t}.json" for t in ("v1", "v2"))
    result = run("diff", a, b, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [(p["part"], p["status"]) for p in data["parts"] if p["status"] != "same"] == [("mid.2", "changed")]
    assert data["bytes_to_fetch"] == manifest.mid[2].size  # type: ignore[union-attr]
    text = run("diff", a, b)
    assert "mid.2" in text.stdout and "1 part differs" in text.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("info", "/nonexistent/store"), "no store there"),
        (("verify", "STORE", "--spec", "0-99"), "0-99"),
        (("info", "/nonexistent/m.json"), "not found"),
    ],
)
def test_errors_are_one_line_with_exit_2(store: Path, args: tuple[str, ...], message: str) -> None:
    result = run(*(str(store) if a == "STORE" else a for a in args))
    assert result.returncode == 2
    assert result.stderr.startswith("sepstore: error:") and message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bad_usage_exits_2() -> None:
    assert run("frobnicate").returncode == 2
    assert run("info").returncode == 2


def test_demo_runs_to_the_end(tmp_path: Path) -> None:
    result = run("demo", tmp_path / "demo")
    assert result.returncode == 0, result.stderr
    assert "2 parts changed" in result.stdout and "all verified" in result.stdout
    assert "5a. Node A" in result.stdout and "5b. Node B" in result.stdout
    assert "7. Signed v2" in result.stdout
    assert "logits equal, bit for bit, to the full transformers model's" in result.stdout
    trusted = sepstore.load(
        tmp_path / "demo/store/manifests/demo/tiny-llama/v2.json", "e", trust=tmp_path / "demo/publisher.key.pub"
    )
    assert trusted.end is not None
    assert sepstore.verify(tmp_path / "demo/store", name="demo/tiny-llama", tag="v2").ok
    assert (
        sepstore.read_manifest(tmp_path / "demo/store", name="demo/tiny-llama", tag="v1").metadata["decider"] == "llama"
    )


def test_convert_push_pull_files_from_the_command_line(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    folder = tmp_path / "My-Model"
    folder.mkdir()
    safetensors.torch.save_file(state_dict, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    converted = run("convert", folder, tmp_path / "store", "--tag", "v1", "--json")
    assert converted.returncode == 0, converted.stderr
    out = json.loads(converted.stdout)
    assert out["name"] == "My-Model" and out["layers"] == 6
    manifest = Path(out["manifest"])
    pushed = run("push", manifest, tmp_path / "published", "--json")
    assert pushed.returncode == 0, pushed.stderr
    assert len(json.loads(pushed.stdout)["uploaded"]) == 8
    again = run("push", manifest, tmp_path / "published")
    assert again.returncode == 0 and "skipped 8" in again.stdout
    published = tmp_path / "published/manifests/My-Model/v1.json"
    pulled = run("pull", published, "--spec", "b 0-2", "--cache-dir", tmp_path / "cache", "--json")
    assert pulled.returncode == 0, pulled.stderr
    assert sorted(json.loads(pulled.stdout)["paths"]) == ["begin", "mid.0", "mid.1"]
    files = run("files", published, "--spec", "e", "--json")
    assert [row["part"] for row in json.loads(files.stdout)] == ["end"]
    unknown = run("convert", tmp_path / "nothing-here", tmp_path / "store")
    assert unknown.returncode == 2 and "no such checkpoint" in unknown.stderr


def test_convert_into_an_existing_tag_combines_unless_forced(
    tmp_path: Path, state_dict: dict[str, torch.Tensor]
) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    safetensors.torch.save_file(state_dict, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert run("convert", folder, tmp_path / "store", "--quiet").returncode == 0
    again = run("convert", folder, tmp_path / "store", "--quiet", "--dtype", "fp32")
    assert again.returncode == 2 and "already in this model with other content" in again.stderr
    assert "pass force=True (CLI: convert --force)" in again.stderr
    forced = run("convert", folder, tmp_path / "store", "--quiet", "--dtype", "fp32", "--force")
    assert forced.returncode == 0, forced.stderr
    manifest = sepstore.read_manifest(tmp_path / "store")
    assert manifest.metadata["dtype"] == "float32"
    assert {t.dtype for _, p in manifest.labelled_parts() for t in p.tensors.values()} == {"F32"}


def test_debug_shows_the_traceback_before_or_after_the_command(tmp_path: Path) -> None:
    for args in (("--debug", "info", tmp_path / "nope"), ("info", tmp_path / "nope", "--debug")):
        result = run(*args)
        assert result.returncode == 2 and "Traceback" in result.stderr and "NotFoundError" in result.stderr, args
    plain = run("info", tmp_path / "nope")
    assert plain.returncode == 2 and "Traceback" not in plain.stderr


def test_plan_and_gc_from_the_command_line(store: Path, manifest_path: Path) -> None:
    planned = run("plan", manifest_path, "--nodes", "3", "--json")
    assert planned.returncode == 0, planned.stderr
    nodes = json.loads(planned.stdout)
    assert nodes[0]["spec"].startswith("b ") and nodes[-1]["spec"].endswith(" e")
    assert sum(n["bytes"] for n in nodes) == sepstore.read_manifest(manifest_path).total_bytes
    assert run("plan", manifest_path).returncode == 2  # --nodes or --budget is required
    over = run("plan", manifest_path, "--budget", "1KiB,1KiB")
    assert over.returncode == 2 and "does not fit" in over.stderr
    swept = run("gc", store, "--grace", "0", "--json")
    assert swept.returncode == 0, swept.stderr
    assert json.loads(swept.stdout)["removed"] == [] and json.loads(swept.stdout)["kept"] == 8
