"""Packaging: an installed wheel works on its own, the serving path imports no torch, the spec is verbatim."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

from conftest import REPO

SERVE_WITHOUT_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'onnx', 'safetensors'):
            raise ImportError(f'serving must not import {name}')
sys.meta_path.insert(0, Block())
from llmpack.runtime.engine import Engine
from llmpack.runtime.serve.protocol import parse_request
import llmpack.cli.serve_cli
engine = Engine.load(sys.argv[1])
print(engine.complete(parse_request({"prompt": "hello", "max_tokens": 5, "temperature": 0})).usage.completion_tokens)
"""


def test_serving_path_needs_no_torch(demo_artifact):
    result = subprocess.run([sys.executable, "-c", SERVE_WITHOUT_TORCH, str(demo_artifact)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "5"


def test_wheel_maps_the_folders_into_one_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    str(REPO), "-w", str(tmp_path)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("llmpack-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"llmpack", wheel.name.split("-py3")[0] + ".dist-info"}, top
    for required in ("llmpack/export/graph.py", "llmpack/runtime/engine.py", "llmpack/cli/serve_cli.py",
                     "llmpack/export/demo_corpus.txt", "llmpack/runtime/serve/spec_llama-2-7b-chat-fp16.json", "llmpack/runtime/backends/ort_fused.py"):
        assert required in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import llmpack.runtime.serve.protocol as p, llmpack.export.demo as d; "
             "assert p.__file__.startswith(sys.argv[1]), p.__file__; print(p.CONTEXT_LIMIT, p.INPUT_LIMIT, len(d.train_demo_tokenizer()) > 0)")
    result = subprocess.run([sys.executable, "-c", probe, str(site)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["3072", "2500", "True"]


def test_shipped_spec_is_the_published_one_verbatim(shared_dir):
    shipped = json.loads((REPO / "runtime" / "serve" / "spec_llama-2-7b-chat-fp16.json").read_text())
    assert shipped == json.loads((shared_dir / "spec" / "llama-2-7b-chat-fp16.json").read_text())
