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
        if name.split('.')[0] in ('torch', 'transformers', 'onnx', 'safetensors', 'ray'):
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


# --- ONNX Runtime: the CPU and GPU builds are alternatives (issue 16, breaker 1) -----------------------


def _extras() -> dict[str, list[str]]:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _name(requirement: str) -> str:
    import re

    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pulled(names: set[str], installed) -> set[str]:
    """Names reachable from `names` through the installed packages' own (non-extra) requirements."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = installed(name) or []
        except Exception:  # noqa: BLE001 - not installed here (onnxruntime-gpu, tensorrt): its own name only
            continue
        todo += [_name(r) for r in requires if "extra ==" not in r.replace('"', "").replace("'", "")]
    return seen


def test_no_set_of_extras_with_gpu_pulls_the_cpu_onnxruntime():
    from importlib import metadata
    from itertools import combinations

    extras = _extras()
    assert {_name(r) for r in extras["cpu"]} == {"onnxruntime"}
    assert "onnxruntime-gpu" in {_name(r) for r in extras["gpu"]}
    others = sorted(set(extras) - {"gpu", "cpu"})  # `cpu` IS the CPU build: asking for both is refused (below)
    for size in range(len(others) + 1):
        for chosen in combinations(others, size):
            direct = {_name(r) for extra in ("gpu", *chosen) for r in extras[extra]}
            pulled = _pulled(direct, metadata.requires)
            assert "onnxruntime" not in pulled, f"[gpu,{','.join(chosen)}] pulls the CPU onnxruntime"


def test_cpu_and_gpu_are_declared_alternatives_and_the_commands_pick_one():
    import re
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert [{"extra": "cpu"}, {"extra": "gpu"}] in pyproject["tool"]["uv"]["conflicts"]
    gpu = {_name(r): r for r in _extras()["gpu"]}
    assert gpu["tensorrt-cu13"].endswith("==10.13.3.9") and "tensorrt" not in gpu  # the CUDA 13 wheel, by name
    assert "nvidia-cudnn-cu13" in gpu  # ONNX Runtime's CUDA provider needs cuDNN 9
    makefile = (REPO / "Makefile").read_text()
    assert '-e ".[export,serve,cpu,dev,cluster]"' in makefile and '-e ".[export,serve,gpu]"' in makefile
    rule = next(line for line in makefile.splitlines() if line.startswith("gpu-check:"))
    assert rule.split(":")[1].split() == ["gpu-install"]  # never `make install`'s CPU wheels
    for doc in ("README.md", "docs/gpu.md", "Makefile"):
        text = (REPO / doc).read_text()
        installs = [set(extras.split(",")) for line in text.splitlines() if "pip install" in line
                    for extras in re.findall(r"\[([a-z,]+)\]", line)]
        assert installs and not [x for x in installs if {"cpu", "gpu"} <= x], doc  # one ONNX Runtime per command
        assert {"export", "serve", "gpu"} in installs, doc


# --- the `cluster` extra (Ray Serve, issue 18) ------------------------------------------------------------


def test_ray_comes_only_with_the_cluster_extra_pinned_exactly():
    import tomllib
    from importlib import metadata

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = pyproject["optional-dependencies"]
    assert extras["cluster"] == ["ray[serve]==2.60.0"]  # the router is imported by ray.llm's module path
    for name, requirements in {"bare": pyproject["dependencies"], **extras}.items():
        if name in ("cluster", "dev"):
            continue
        pulled = _pulled({_name(r) for r in requirements}, metadata.requires)
        assert "ray" not in pulled, f"{name} pulls ray"
    assert "cluster" in (REPO / "Makefile").read_text().split("install -q -e")[1].split("]")[0]


def test_the_cluster_modules_alone_import_ray():
    import re

    for path in [*(REPO / "runtime").rglob("*.py"), *(REPO / "cli").glob("*.py")]:
        imports_ray = re.search(r"^\s*(from ray[. ]|import ray\b)", path.read_text(), re.MULTILINE)
        assert not imports_ray or path.parent.name == "cluster" or path.name == "cluster_cmd.py", path
