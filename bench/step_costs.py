"""Benchmark / diagnosis: what one step of an `ort-fused` artifact costs, by prompt chunk, batch and cache size.

Three measurements behind the batching numbers in the README (continuous batching section):
prefill time per chunk size, decode-step time per batch size (the backend, as the scheduler calls
it), and ONNX Runtime's per-operator profile of one decode step at a batch size, cache length and
buffer capacity (bound in place, as the backend binds it). Prints a small report; medians of a few
runs, so read it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from llmpack.runtime import manifest as names
from llmpack.runtime.artifact import Artifact, open_artifact, open_backend
from llmpack.runtime.backends.ort_cpu import create_session


def median_ms(run, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def backend_costs(artifact: Artifact, threads: int) -> list[str]:
    backend = open_backend(artifact, "cpu", threads, max_batch=8)
    prompt = np.random.default_rng(0).integers(3, backend.vocab_size, 128).tolist()
    lines = []
    for n in (1, 8, 16, 32, 64, 128):
        def prefill(n=n):
            backend.reset(0)
            backend.prefill(0, prompt[:n])
        lines.append(f"prefill {n:4d} tokens: {median_ms(prefill):7.1f} ms")
    for rows in (1, 2, 4, 8):
        for slot in range(rows):
            backend.reset(slot)
            backend.prefill(slot, prompt[: 40 + slot])
        slots = list(range(rows))
        step = lambda: [backend.decode(slots, [5] * rows) for _ in range(10)]  # noqa: E731
        lines.append(f"decode step, batch {rows}: {median_ms(step, 3) / 10:7.2f} ms")
    return lines


def operator_profile(artifact: Artifact, threads: int, rows: int, length: int, capacity: int) -> str:
    """ms per decode step by operator type, from ONNX Runtime's profiler, cache bound in place."""
    from onnxruntime import OrtValue

    manifest = artifact.manifest
    with tempfile.TemporaryDirectory() as folder:
        session = create_session(artifact.path / names.MODEL_FILE, threads, profile_prefix=str(Path(folder) / "p"))
        binding, values = session.io_binding(), {}
        for spec in session.get_inputs():
            if spec.name == names.INPUT_IDS:
                array = np.full((rows, 1), 5, np.int64)
            elif spec.name == "seqlens_k":
                array = np.full(rows, length, np.int32)
            elif spec.name == "total_sequence_length":
                array = np.array(length + 1, np.int32)
            else:
                array = np.zeros((rows, manifest.config.num_kv_heads, capacity, spec.shape[3]), np.float32)
            values[spec.name] = OrtValue.ortvalue_from_numpy(array)
            binding.bind_ortvalue_input(spec.name, values[spec.name])
        for spec in session.get_outputs():
            if spec.name == names.LOGITS:
                binding.bind_output(spec.name)
            else:  # present.i.x shares past_key_values.i.x: GroupQueryAttention appends in place
                binding.bind_ortvalue_output(spec.name, values[spec.name.replace("present", "past_key_values")])
        steps = 30
        for _ in range(steps):
            session.run_with_iobinding(binding)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / steps / 1000
    top = ", ".join(f"{op} {ms:.2f}" for op, ms in per_op.most_common(3))
    return f"batch {rows}, {length} tokens, capacity {capacity}: {sum(per_op.values()):.1f} ms/step ({top})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("artifact", type=Path, help="an ort-fused artifact, e.g. artifacts/bench-110m-fused-fp32")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    artifact = open_artifact(args.artifact, verify_checksums=False)
    lines = backend_costs(artifact, args.threads)
    for rows, length, capacity in ((1, 50, 128), (8, 50, 128), (8, 50, 256), (8, 10, 256), (8, 10, 1024)):
        lines.append(operator_profile(artifact, args.threads, rows, length, capacity))
    print("\n".join(lines))  # noqa: T201 - a benchmark script's report


if __name__ == "__main__":
    main()
