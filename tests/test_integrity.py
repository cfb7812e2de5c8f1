"""Artifacts that cannot be trusted are refused at load, in one line that says what and how to fix it.

Through the two commands that load artifacts, as a user runs them: `llm-serve infer` (exit code and
stderr) and `llm-serve run` (non-zero exit, the line in its log). Also: manifest-supplied paths
never leave the artifact folder, and no route serves a file from disk.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from serving import AUTH, LLM_SERVE, free_port

REQUEST = '{"prompt": "hi", "max_tokens": 1}'

def says_how_to_fix(line: str) -> bool:
    return "rebuild" in line or "llm-export build" in line


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the middle: the size stays, only the hash can tell
    path.write_bytes(bytes(data))


def edit_manifest(change):
    def damage(folder: Path) -> None:
        manifest = json.loads((folder / "manifest.json").read_text())
        change(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return damage


def name_file(entry: int, path: str):
    def change(manifest: dict) -> None:
        manifest["files"][entry]["path"] = path
    return edit_manifest(change)


def link_tokenizer_outside(folder: Path) -> None:
    outside = folder.parent / "elsewhere.model"
    shutil.copyfile(folder / "tokenizer.model", outside)  # the same bytes: only where it lives is wrong
    (folder / "tokenizer.model").unlink()
    (folder / "tokenizer.model").symlink_to(outside)


DAMAGES = {
    # id: (damage, words the one line must hold)
    "flipped-weights-byte": (lambda f: flip_byte(f / "model.onnx.data"),
                             "artifact file model.onnx.data does not match its SHA-256"),
    "flipped-tokenizer-byte": (lambda f: flip_byte(f / "tokenizer.model"),
                               "artifact file tokenizer.model does not match its SHA-256"),
    "flipped-graph-byte": (lambda f: flip_byte(f / "model.onnx"), "artifact file model.onnx does not match"),
    "truncated-weights": (lambda f: os.truncate(f / "model.onnx.data", 1000),
                          "model.onnx.data is 1000 bytes, the manifest says"),
    "missing-weights": (lambda f: (f / "model.onnx.data").unlink(), "artifact file model.onnx.data is missing"),
    "missing-tokenizer": (lambda f: (f / "tokenizer.model").unlink(), "artifact file tokenizer.model is missing"),
    "missing-manifest": (lambda f: (f / "manifest.json").unlink(), "is not an llmpack artifact (no manifest.json)"),
    "manifest-not-json": (lambda f: (f / "manifest.json").write_text("{"), "manifest.json is not valid JSON"),
    "unknown-manifest-version": (edit_manifest(lambda m: m.update(manifest_version=99)),
                                 "manifest version 99 is not supported (this llmpack reads versions 1, 2)"),
    "no-manifest-version": (edit_manifest(lambda m: m.pop("manifest_version")), "manifest version None"),
    "unknown-graph-flavour": (edit_manifest(lambda m: m.update(graph_flavour="tensorrt-llm")),
                              "graph flavour 'tensorrt-llm' is unknown to this llmpack"),
    "manifest-missing-a-field": (edit_manifest(lambda m: m.pop("config")), "does not match schema version 2"),
    "unknown-tokenizer-kind": (edit_manifest(lambda m: m.update(tokenizer="tiktoken")),
                               "tokenizer 'tiktoken' / chat template 'llama-2-chat' are unknown to this llmpack"),
    "path-up-and-out": (name_file(0, "../model.onnx"), "manifest names '../model.onnx', which is outside"),
    "absolute-path": (name_file(2, "/etc/hostname"), "manifest names '/etc/hostname', which is outside"),
    "symlink-out": (link_tokenizer_outside, "manifest names 'tokenizer.model', which is outside"),
}


@pytest.fixture
def damaged(demo_artifact, tmp_path, request) -> tuple[Path, str]:
    damage, words = DAMAGES[request.param]
    folder = tmp_path / "demo"
    shutil.copytree(demo_artifact, folder)
    damage(folder)
    return folder, words


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize("damaged", list(DAMAGES), indirect=True)
def test_llm_serve_infer_refuses_the_artifact_in_one_line(damaged):
    folder, words = damaged
    run = subprocess.run([LLM_SERVE, "infer", str(folder), REQUEST], capture_output=True, text=True, timeout=60)
    assert run.returncode == 3 and run.stdout == ""
    line = one_error_line(run.stderr)
    assert words in line and says_how_to_fix(line), line


@pytest.mark.parametrize("damaged", ["flipped-weights-byte", "unknown-manifest-version", "missing-tokenizer",
                                     "path-up-and-out"], indirect=True)
def test_llm_serve_run_exits_non_zero_with_the_line_in_its_log(damaged):
    folder, words = damaged
    run = subprocess.run([LLM_SERVE, "run", str(folder), "--port", str(free_port())], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 3
    line = one_error_line(run.stderr)  # nothing was served, so nothing else was logged
    assert words in line and says_how_to_fix(line), line


def test_skipping_the_hashes_is_never_silent_and_sizes_are_still_checked(demo_artifact, tmp_path):
    folder = tmp_path / "demo"
    shutil.copytree(demo_artifact, folder)
    run = subprocess.run([LLM_SERVE, "infer", str(folder), REQUEST, "--no-verify-checksums"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0 and "checksum verification of" in run.stderr and "skipped on request" in run.stderr
    os.truncate(folder / "tokenizer.model", 100)
    run = subprocess.run([LLM_SERVE, "infer", str(folder), REQUEST, "--no-verify-checksums"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 3 and "tokenizer.model is 100 bytes, the manifest says" in run.stderr


def test_the_next_build_replaces_a_damaged_artifact_instead_of_calling_it_up_to_date(demo_artifact, tmp_path):
    from llmpack.runtime.artifact import open_artifact

    folder = tmp_path / "demo"
    shutil.copytree(demo_artifact, folder)
    flip_byte(folder / "model.onnx.data")  # what the runtime answers with "rebuild it"
    build = subprocess.run([str(Path(LLM_SERVE).with_name("llm-export")), "build", "--model", "demo", "--out",
                            str(folder), "--graph", "standard"], capture_output=True, text=True, timeout=120)
    assert build.returncode == 0 and "built; standard graph, fp32 weights" in build.stdout, build.stderr
    assert "does not match its SHA-256 in the manifest; the artifact is damaged" in build.stderr
    open_artifact(folder, verify_checksums=True)


def test_an_artifact_without_an_engine_is_refused_for_tensorrt_with_the_command_that_builds_one(demo_artifact):
    run = subprocess.run([LLM_SERVE, "infer", str(demo_artifact), REQUEST, "--backend", "tensorrt"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 3
    line = one_error_line(run.stderr)
    assert line.startswith("error: --backend tensorrt cannot run demo:") and "--engine trt" in line, line


# --- no route serves a file from disk ---------------------------------------------------------------

TRAVERSALS = ["/../manifest.json", "/%2e%2e/%2e%2e/etc/passwd", "/..%2f..%2fetc%2fpasswd", "/model.onnx",
              "/tokenizer.model", "/manifest.json", "/static/model.onnx", "/docs/../../etc/passwd",
              "/openapi.json/..%2fmanifest.json", "/ai/run/..%2f..%2fmanifest.json", "//etc/passwd",
              "/v1/models/../../../etc/passwd", "/health/%00/../etc/passwd"]


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_path_traversal_urls_get_a_json_4xx_and_no_file(demo_server, demo_artifact, method):
    secrets = [b"root:x:0:0", (demo_artifact / "manifest.json").read_bytes()[:60],
               (demo_artifact / "tokenizer.model").read_bytes()[:60]]
    for path in TRAVERSALS:
        connection = http.client.HTTPConnection("127.0.0.1", demo_server.port, timeout=10)
        connection.request(method, path, body=REQUEST if method == "POST" else None, headers=AUTH)  # sent as is
        response = connection.getresponse()
        body = response.read()
        connection.close()
        # 405 where a POST route matches the normalised path; never a 200, never a file's bytes.
        assert response.status in (404, 405), (path, response.status, body[:200])
        assert response.getheader("content-type") == "application/json", path
        assert not any(secret in body for secret in secrets), path


def test_a_version_1_manifest_still_loads_as_sentencepiece_and_llama_2_chat(demo_artifact, tmp_path):
    """Artifacts built before the manifest recorded the tokenizer and template keep working unchanged."""
    from llmpack.runtime.manifest import LLAMA2_CHAT, SENTENCEPIECE, read_manifest

    folder = tmp_path / "demo"
    shutil.copytree(demo_artifact, folder)
    data = json.loads((folder / "manifest.json").read_text())
    for key in ("tokenizer", "chat_template", "special_tokens"):
        data.pop(key)
    for key in ("architecture", "rope_scaling", "attention_bias", "sliding_window"):
        data["config"].pop(key)
    (folder / "manifest.json").write_text(json.dumps({**data, "manifest_version": 1}))
    manifest = read_manifest(folder)
    assert (manifest.manifest_version, manifest.tokenizer, manifest.chat_template) == (1, SENTENCEPIECE, LLAMA2_CHAT)
    assert manifest.tokenizer_file == "tokenizer.model" and manifest.config.rope_scaling is None
    run = subprocess.run([LLM_SERVE, "infer", str(folder), REQUEST], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
