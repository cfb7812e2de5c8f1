"""`llm-serve bench`: one JSON line with TTFT, decode speed spreads, RSS, size, bandwidth, machine, versions."""

from __future__ import annotations

import json
import sys

from click.testing import CliRunner

from llmpack.cli import bench_workload
from llmpack.cli.bench_cmd import bench
from llmpack.cli.serve_cli import main as llm_serve
from llmpack.runtime.artifact import open_artifact
from llmpack.runtime.backends.mlas_layout import linear_weight_bytes
from llmpack.runtime.manifest import ModelConfig, QuantInfo


def test_bench_prints_and_appends_one_json_line(demo_artifact, tmp_path, monkeypatch):
    monkeypatch.setattr(bench_workload, "PROBE_BYTES", 8 * 2**20)
    out = tmp_path / "bench.jsonl"
    args = [str(demo_artifact), "--prompt-tokens", "8", "--new-tokens", "4", "--runs", "2", "--threads", "1",
            "--out", str(out)]
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip().splitlines()[-1])
    assert line == json.loads(out.read_text())
    assert line["name"] == "llmpack standard fp32" and line["threads"] == 1 and line["new_tokens"] == 4
    assert len(line["decode_tps"]["runs"]) == 2 and line["decode_tps"]["min"] <= line["decode_tps"]["median"]
    assert line["ttft_ms"]["median"] > 0 and line["peak_rss_mib"] > 0 and line["read_bandwidth_gbps"] > 0
    assert line["artifact_bytes"] == sum(f.size for f in open_artifact(demo_artifact).manifest.files)
    assert {"cpu", "cores"} <= set(line["machine"]) and "onnxruntime" in line["versions"]
    assert 0 < line["roofline_fraction"]
    CliRunner().invoke(bench, args)
    assert len(out.read_text().splitlines()) == 2  # appended, never overwritten


def test_bench_times_a_prompt_file_through_the_engine_with_speculation(fused_stories, tmp_path, monkeypatch):
    """--prompt-file: a real text in the artifact's tokenizer; --speculate ngram: the engine's own loop, with
    how many tokens were proposed and accepted in the record."""
    from llmpack.runtime.chat_format import load_tokenizer

    monkeypatch.setattr(bench_workload, "PROBE_BYTES", 8 * 2**20)
    text = "Lily had a red ball. Lily liked the red ball. One day Lily lost the red ball. Lily"
    (tmp_path / "prompt.txt").write_text(text)
    result = CliRunner().invoke(bench, [str(fused_stories), "--prompt-file", str(tmp_path / "prompt.txt"),
                                        "--speculate", "ngram", "--speculate-max", "2", "--new-tokens", "60",
                                        "--runs", "2", "--threads", "1",
                                        "--out", str(tmp_path / "b.jsonl")])
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip().splitlines()[-1])
    ids = load_tokenizer(open_artifact(fused_stories)).raw_prompt_ids(text)
    assert line["prompt_tokens"] == len(ids) and line["speculate"] == "ngram" and line["new_tokens"] == 60
    assert line["speculate_max"] == 2
    assert line["speculated"] >= line["speculated_accepted"] >= 0 and line["decode_tps"]["median"] > 0


def test_bench_refuses_a_workload_beyond_the_context(demo_artifact, tmp_path):
    result = CliRunner().invoke(llm_serve, ["bench", str(demo_artifact), "--prompt-tokens", "3000",
                                            "--new-tokens", "100", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "exceed the artifact's context" in result.output


def test_prompt_is_fixed_and_weight_bytes_match_the_110m_shape():
    assert bench_workload.prompt_ids(5, 32000) == [1, 100, 107, 114, 121]
    shape = ModelConfig(32000, 768, 2048, 12, 12, 12, 64, 1e-5, 10000.0, 4096, False)
    fp32 = type("M", (), {"config": shape, "quant": None, "dtype": "fp32"})
    assert abs(linear_weight_bytes(fp32) / 1e6 - 438) < 1  # the 438 MB/token
    int4 = type("M", (), {"config": shape, "quant": QuantInfo("int4", 4, 32, 4, True), "dtype": "fp32"})
    # accuracy level 4: MLAS holds an fp32 scale, an fp32 block sum and a byte per block (block 32: 6.25 bits, not
    # the file's 5; bench/packed_bits.py measured 6.24)
    assert abs(linear_weight_bytes(int4) / linear_weight_bytes(fp32) - 6.25 / 32) < 1e-3
    int4_128 = type("M", (), {"config": shape, "quant": QuantInfo("int4", 4, 128, 4, True), "dtype": "fp32"})
    assert abs(linear_weight_bytes(int4_128) / linear_weight_bytes(fp32) - 4.5625 / 32) < 1e-3


def test_the_int4_kernel_bench_runs_the_linears_one_step_reads():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "int4_kernel.py"
    spec = importlib.util.spec_from_file_location("int4_kernel", path)
    kernel_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernel_bench)
    for heads, kv_heads in ((12, 12), (12, 4)):  # the 110M shape, and grouped-query attention
        config = ModelConfig(32000, 768, 2048, 3, heads, kv_heads, 64, 1e-5, 10000.0, 4096, False)
        fp32 = type("M", (), {"config": config, "quant": None, "dtype": "fp32"})
        shape = dict(hidden_size=768, intermediate_size=2048, num_attention_heads=heads,
                     num_key_value_heads=kv_heads, vocab_size=32000)
        linears = kernel_bench.linear_shapes(shape, layers=3)
        assert 4 * sum(n * k for _, n, k, _ in linears) == linear_weight_bytes(fp32)
        assert [source for name, _, _, source in linears if name.endswith("down")] == ["h"] * 3


def load_bench(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_soak_judges_idle_readings_of_the_second_half_and_fits_its_samples():
    """The verdict compares idle readings at the middle and the end; a flat curve with early growth fits ~0."""
    soak = load_bench("soak")
    grew, level = soak.quiescent_growth(middle=(150.0, 30.0), end=(175.0, 45.0))  # (RSS, prefix cache) MiB
    assert (grew, level) == (10.0, 120.0) and soak.verdicts(soak.Tally(), (grew, level), 0, 0) == []
    assert soak.verdicts(soak.Tally(), soak.quiescent_growth((150.0, 30.0), (190.0, 45.0)), 0, 0) != []  # +20.8 %
    for duration in (150, 300):
        settled = [(t, 0.0, 160 + 24 * min(t, 60) / 60) for t in range(0, duration + 1, 2)]
        fitted, at = soak.second_half_growth(settled, 0, duration)
        assert abs(fitted) < 0.5 and at > 180
        leak = [(t, 0.0, 160 + 0.5 * t) for t in range(0, duration + 1, 2)]
        fitted, at = soak.second_half_growth(leak, 0, duration)
        assert abs(fitted - 0.5 * duration / 2) < 1


def test_bench_7b_counts_the_7b_linears_and_pairs_each_round(tmp_path):
    """`make bench-7b`'s arithmetic: bits per weight over the real Linear count; ratios taken round by round."""
    bench_7b = load_bench("bench_7b")
    from llmpack.export.random_checkpoint import SHAPES

    shape = SHAPES["llama2-7b"]
    config = ModelConfig(shape["vocab_size"], shape["hidden_size"], shape["intermediate_size"],
                         shape["num_hidden_layers"], 32, 32, 128, 1e-5, 1e4, 4096, False)
    assert bench_7b.PARAMS_7B == config.linear_parameters
    results = {"llmpack int4": [{"decode_tps": 6.0, "ttft_ms": 9000}, {"decode_tps": 5.0, "ttft_ms": 11000}],
               "llama.cpp q4_0": [{"decode_tps": 5.0, "ttft_ms": 10000}, {"decode_tps": 5.0, "ttft_ms": 10000}],
               "llmpack int8": [{"decode_tps": 3.0, "ttft_ms": 9000}] * 2,
               "llama.cpp q8_0": [{"decode_tps": 3.0, "ttft_ms": 9000}] * 2}
    lines = bench_7b.pair_lines([], results)
    assert "| int4 vs q4_0 | 1.20 1.00 | **1.10×** | 1.00× |" in lines
    assert "| int8 vs q8_0 | 1.00 1.00 | **1.00×** | 1.00× |" in lines
    builds = bench_7b.BuildLog(tmp_path)
    builds.records = {"llama.cpp convert f16": {"seconds": 47.0, "peak_rss_gib": 0.6},
                      "llama.cpp quantize q4_0": {"seconds": 26.0, "peak_rss_gib": 0.9}}
    gguf = bench_7b.Contender("llama.cpp q4_0", "llama.cpp", "int4", tmp_path / "m.gguf",
                              ("llama.cpp convert f16", "llama.cpp quantize q4_0"))
    assert bench_7b.build_cells(gguf, builds) == "1:13 | 0.90"
    ours = bench_7b.Contender("llmpack int4", "llmpack", "int4", tmp_path, ("llmpack int4",))
    assert bench_7b.build_cells(ours, builds).startswith("not recorded")
