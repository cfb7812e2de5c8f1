"""The shipped stories260K model: `make demo`'s and the Quick start's model answers readable English from a clone.

The folder ships in the package (export/models/stories260k); ../shared holds the reference copy it was taken from.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path


from llmpack.export.build import SHIPPED_MODELS, resolve_source

SHIPPED = resolve_source("stories260k")
LLM_EXPORT, LLM_SERVE = (str(Path(sys.executable).with_name(name)) for name in ("llm-export", "llm-serve"))
# llama2.c's greedy story for this prompt (its doc/stories260K.md), which the model must continue as is.
GREEDY_STORY = ", there was a little girl named Lily. She loved to play outside in the park."


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_shipped_model_is_the_reference_model_byte_for_byte(stories_dir):
    shipped = {p.name for p in SHIPPED.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "generation_config.json", "LICENSE"} <= shipped
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.model"):
        assert sha256(SHIPPED / name) == sha256(stories_dir / name), name


def test_the_license_and_provenance_ship_with_it():
    assert "MIT License" in (SHIPPED / "LICENSE").read_text()
    readme = (SHIPPED / "README.md").read_text()
    assert "Provenance" in readme and "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696" in readme


def test_the_package_declares_it_as_data():
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert f'"{SHIPPED_MODELS["stories260k"]}/*"' in pyproject


def test_a_folder_named_like_it_in_the_working_directory_wins(tmp_path, monkeypatch):
    (tmp_path / "stories260k").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_source("stories260k") == tmp_path / "stories260k"


def test_make_demo_commands_tell_a_story(tmp_path):
    """What `make demo` runs, by name: build, verify, and a greedy story that reads as llama2.c's."""
    out = tmp_path / "stories260k"
    subprocess.run([LLM_EXPORT, "build", "--model", "stories260k", "--out", str(out)], check=True,
                   capture_output=True, text=True)
    verify = subprocess.run([LLM_EXPORT, "verify", str(out)], capture_output=True, text=True, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    request = {"prompt": "Once upon a time", "raw": True, "max_tokens": 64, "temperature": 0}
    answer = subprocess.run([LLM_SERVE, "infer", str(out), json.dumps(request)], check=True,
                            capture_output=True, text=True)
    assert json.loads(answer.stdout)["response"].startswith(GREEDY_STORY), answer.stdout


def test_make_demo_uses_the_shipped_model():
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    demo = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "--model stories260k" in demo and '"raw": true' in demo
