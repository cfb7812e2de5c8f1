"""CLI edge of the export stage: `llm-export build | verify | inspect` exit codes and messages."""

from __future__ import annotations

from click.testing import CliRunner

from llmpack.cli.export_cli import main


def test_build_verify_inspect_demo(tmp_path):
    runner = CliRunner()
    out = tmp_path / "demo"
    first = runner.invoke(main, ["build", "--model", "demo", "--out", str(out), "--dtype", "fp16"])
    assert first.exit_code == 0, first.output
    # fp16 is the GPU route: --graph auto builds the standard graph for it
    assert "built; standard graph, fp16 weights, fp16 activations, context 3072" in first.output
    again = runner.invoke(main, ["build", "--model", "demo", "--out", str(out), "--dtype", "fp16"])
    assert again.exit_code == 0 and "up to date" in again.output
    checked = runner.invoke(main, ["verify", str(out), "--backend", "cpu"])
    assert checked.exit_code == 0, checked.output
    assert "greedy 32 tokens vs transformers generate  identical" in checked.output
    assert "onnxruntime-cpu" in checked.output  # the report names the backend it checked
    no_engine = runner.invoke(main, ["verify", str(out), "--backend", "tensorrt"])
    assert no_engine.exit_code != 0 and "--backend tensorrt cannot run" in no_engine.output
    shown = runner.invoke(main, ["inspect", str(out)])
    assert shown.exit_code == 0 and "4 layers" in shown.output and "8 heads / 2 kv heads" in shown.output


def test_bad_source_is_one_error_line_and_nonzero_exit(tmp_path):
    result = CliRunner().invoke(main, ["build", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: checkpoint folder {tmp_path / 'nope'} does not exist; pass a Hugging Face Llama folder or `demo`"
    ]


def test_unknown_option_and_bad_dtype_are_usage_errors(tmp_path):
    runner = CliRunner()
    assert runner.invoke(main, ["build", "--model", "demo", "--out", "x", "--frobnicate"]).exit_code == 2
    bad = runner.invoke(main, ["build", "--model", "demo", "--out", "x", "--dtype", "int3"])
    assert bad.exit_code == 2 and "int3" in bad.output


def test_inspect_of_a_non_artifact_says_how_to_fix(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 3 and "llm-export build" in result.output


def test_graph_auto_is_fused_on_the_cpu_and_standard_for_tensorrt(tmp_path):
    from llmpack.export.options import BuildOptions, resolve_graph

    runner = CliRunner()
    built = runner.invoke(main, ["build", "--model", "demo", "--out", str(tmp_path / "q"), "--quant", "int4"])
    assert built.exit_code == 0, built.output
    assert "built; ort-fused graph, int4 weights (block 32), fp32 activations, context 3072" in built.output
    shown = runner.invoke(main, ["inspect", str(tmp_path / "q")])
    assert "graph ort-fused" in shown.output and "int4: 4-bit weights, block 32" in shown.output
    assert "6.25 bits per weight as ONNX Runtime holds them" in shown.output  # --block-size auto: small model
    again = runner.invoke(main, ["build", "--model", "demo", "--out", str(tmp_path / "q"), "--quant", "int4",
                                 "--block-size", "32"])
    assert "up to date" in again.output  # auto resolved to 32 is the same build as an explicit 32
    auto = BuildOptions(model="demo", out=tmp_path / "x")
    assert resolve_graph(auto).graph == "ort-fused"
    assert resolve_graph(auto, for_tensorrt=True).graph == "standard"
    assert resolve_graph(BuildOptions(model="demo", out=tmp_path, graph="standard")).graph == "standard"


def test_verify_finds_a_moved_source_with_source_and_refuses_other_weights(tmp_path):
    import shutil

    from llmpack.export.build import resolve_source

    runner = CliRunner()
    source, moved, out = tmp_path / "stories", tmp_path / "moved", tmp_path / "art"
    shutil.copytree(resolve_source("stories260k"), source)
    built = runner.invoke(main, ["build", "--model", str(source), "--out", str(out), "--graph", "standard"])
    assert built.exit_code == 0, built.output
    source.rename(moved)
    gone = runner.invoke(main, ["verify", str(out)])
    assert gone.exit_code == 2 and f"{source} is gone" in gone.output and "--source PATH" in gone.output
    found = runner.invoke(main, ["verify", str(out), "--source", str(moved)])
    assert found.exit_code == 0 and "identical" in found.output, found.output
    weights = moved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # another model's bytes, same name and size
    other = runner.invoke(main, ["verify", str(out), "--source", str(moved)])
    assert other.exit_code == 2 and "model.safetensors is not the file the artifact was built from" in other.output
