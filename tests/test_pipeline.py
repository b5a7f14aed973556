"""examples/pipeline.py: a model split over two processes, each loading its slice over HTTP,
generates what the full model generates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_models import built, full_model
from servers import StaticServer

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pipeline.py"


@pytest.fixture(scope="session")
def hf_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "hf"


def test_pipeline_example_on_two_processes_generates_as_the_full_model(tmp_path: Path, hf_root: Path) -> None:
    model = built("llama", hf_root)
    prompt = [5, 17, 42, 99, 7]
    expected = full_model(model.checkpoint).generate(
        input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=8, min_new_tokens=8, eos_token_id=None
    )[0, len(prompt) :]
    options = ["--nodes", "2", "--tokens", ",".join(map(str, prompt)), "--max-new-tokens", "8"]
    server = StaticServer(model.store).start()
    try:
        url = f"{server.url}/manifests/llama/latest.json"
        proc = subprocess.run(
            [sys.executable, str(EXAMPLE), url, *options, "--cache-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            check=False,
        )
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["node 0: b 0-2", "node 1: 2-3 e"]
    assert json.loads(lines[-1]) == expected.tolist()
