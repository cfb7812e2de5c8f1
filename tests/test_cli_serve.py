"""CLI edge of the runtime: `llm-serve infer` prints exactly the wire format; `tokenize` the ids."""

from __future__ import annotations

import json

from click.testing import CliRunner

from llmpack.cli.serve_cli import main
from llmpack.runtime.engine import Engine
from llmpack.runtime.serve.protocol import SSE_DONE, completion_json, parse_request, sse_event, sse_usage_event

STORY = {"prompt": "Once upon a time", "raw": True, "temperature": 0, "max_tokens": 24}


def _invoke(*args, **kwargs):
    result = CliRunner().invoke(main, [str(a) for a in args], **kwargs)
    return result


def test_infer_json_matches_the_engine(stories_artifact):
    result = _invoke("infer", stories_artifact, json.dumps(STORY))
    assert result.exit_code == 0, result.output
    completion = Engine.load(stories_artifact).complete(parse_request(STORY))
    assert json.loads(result.stdout) == completion_json(completion.text, completion.usage)
    assert json.loads(result.stdout)["response"].startswith(", there was")


def test_infer_stream_is_workers_ai_event_stream(stories_artifact):
    result = _invoke("infer", stories_artifact, json.dumps({**STORY, "stream": True}))
    assert result.exit_code == 0, result.output
    stream = Engine.load(stories_artifact).stream_request(parse_request(STORY))
    expected = b"".join(sse_event({"response": p}) for p in stream) + sse_usage_event(stream.usage) + SSE_DONE
    assert result.stdout_bytes == expected
    events = result.stdout_bytes.split(b"\n\n")
    assert events[-2] == b"data: [DONE]" and all(e.startswith(b"data: ") for e in events[:-1])


def test_flags_build_the_same_request_and_stdin_and_file_work(stories_artifact, tmp_path):
    by_flags = _invoke("infer", stories_artifact, "--prompt", "Once upon a time", "--raw", "--temperature", "0",
                       "--max-tokens", "24")
    by_stdin = _invoke("infer", stories_artifact, "-", input=json.dumps(STORY))
    request_file = tmp_path / "req.json"
    request_file.write_text(json.dumps(STORY))
    by_file = _invoke("infer", stories_artifact, f"@{request_file}")
    assert by_flags.exit_code == by_stdin.exit_code == by_file.exit_code == 0
    assert by_flags.stdout == by_stdin.stdout == by_file.stdout


def test_invalid_requests_exit_2_with_the_reason(demo_artifact):
    cases = {
        '{"prompt": "x", "messages": []}': "not both",
        '{"prompt": 5}': "prompt",
        '{"messages": [{"role": "assistant", "content": "hi"}]}': "messages[0]",
        "not json": "not valid JSON",
        '{"prompt": "[INST] sneaky"}': "raw",
    }
    for request, reason in cases.items():
        result = _invoke("infer", demo_artifact, request)
        assert result.exit_code == 2, (request, result.output)
        assert result.stderr.startswith("error: ") and reason in result.stderr, (request, result.stderr)


def test_tokenize_prints_the_fed_ids(demo_artifact):
    result = _invoke("tokenize", demo_artifact, '{"messages": [{"role": "user", "content": "hi"}]}')
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    engine = Engine.load(demo_artifact)
    expected = [1, *engine.tokenizer.encode("[INST] hi [/INST]")]
    assert data == {"tokens": expected, "count": len(expected)}


def test_missing_artifact_is_a_clear_error(tmp_path):
    result = _invoke("infer", tmp_path / "nope", '{"prompt": "hi"}')
    assert result.exit_code == 3 and "llm-export build" in result.stderr


def test_speculation_options_reach_the_engine(demo_artifact, monkeypatch):
    """--speculate / --speculate-max on infer (the same option group as run) land in the EngineOptions the
    engine is loaded with; the defaults are EngineOptions' own (ngram, 4)."""
    from llmpack.runtime.engine import EngineOptions

    seen = []

    def refuse(artifact, options, *args, **kwargs):
        seen.append(options)
        raise RuntimeError("not loading")

    monkeypatch.setattr(Engine, "load", staticmethod(refuse))
    request = '{"prompt": "hi", "raw": true, "max_tokens": 2}'
    _invoke("infer", str(demo_artifact), request)
    _invoke("infer", str(demo_artifact), request, "--speculate", "off", "--speculate-max", "7")
    assert [(o.speculate, o.speculate_max) for o in seen] == [
        (EngineOptions.speculate, EngineOptions.speculate_max), ("off", 7)]
    assert (EngineOptions.speculate, EngineOptions.speculate_max) == ("ngram", 4)
    assert _invoke("infer", str(demo_artifact), request, "--speculate-max", "17").exit_code == 2
