"""`llm-export build` killed with SIGKILL at seeded random points, and two builds racing for one output path.

The promise (export/build.py): the output path is at every instant absent, or a complete artifact
that passes every checksum; what a killed build leaves is cleaned by the next build of that path,
and a second concurrent build fails fast with a clear message instead of corrupting the first.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

LLM_EXPORT = str(Path(sys.executable).with_name("llm-export"))
FIRST_BUILD_SEEDS, REBUILD_SEEDS = (1, 2, 3), (4, 5, 6)


@pytest.fixture(scope="module", autouse=True)
def demo_checkpoint():
    """Written once up front, so every kill lands in the artifact build itself, not in the demo's cache."""
    from llmpack.export.demo import demo_cache_dir, write_demo_checkpoint

    return write_demo_checkpoint(demo_cache_dir())


def start_build(out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([LLM_EXPORT, "build", "--model", "demo", "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.build-*")) + sorted(out.parent.glob(f".{out.name}.old-*"))


def wait_for(condition, proc: subprocess.Popen, timeout: float = 60.0) -> bool:
    """Poll until condition() holds (True) or the process has exited (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the build neither progressed nor exited"
        time.sleep(0.005)
    return True


def assert_absent_or_complete(out: Path) -> str:
    """The output path after a kill: nothing at all, or an artifact that loads with every checksum checked."""
    from llmpack.runtime.artifact import open_artifact

    if not out.exists():
        return "absent"
    open_artifact(out, verify_checksums=True)  # raises ArtifactError on anything partial or damaged
    return "complete"


def kill_at_random_point(out: Path, seed: int) -> str:
    """Kill a build at a point drawn from `seed`: in its start-up, or while it writes its staging folder."""
    rng = random.Random(seed)
    rebuild = out.exists()  # then the kill may also land in the swap of the old artifact for the new
    proc = start_build(out, *(["--force"] if rebuild else []))
    if rng.random() < 0.2:
        time.sleep(rng.uniform(0.05, 0.5))  # start-up, checkpoint hashing, lock
    elif wait_for(lambda: bool(sorted(out.parent.glob(f".{out.name}.build-*"))), proc):
        # The staging folder lives ~3 s here: torch import, graph export, tokenizer, digests, manifest, rename.
        time.sleep(rng.uniform(0.0, 2.8))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    killed = "killed" if proc.returncode == -signal.SIGKILL else "finished first"
    return f"{killed} {'rebuild' if rebuild else 'build'}: {assert_absent_or_complete(out)}"


def build_without_cleanup(out: Path) -> None:
    """A plain build after killed ones: it succeeds and takes away what they left."""
    from llmpack.runtime.artifact import open_artifact

    result = start_build(out, "--force")
    _, stderr = result.communicate(timeout=120)
    assert result.returncode == 0, stderr
    assert leftovers(out) == []
    assert open_artifact(out, verify_checksums=True).manifest.name == "demo"


def test_a_build_killed_anywhere_leaves_no_partial_artifact_and_the_next_build_cleans_up(tmp_path):
    out = tmp_path / "artifacts" / "demo"
    out.parent.mkdir()
    first = [kill_at_random_point(out, seed) for seed in FIRST_BUILD_SEEDS]
    assert "killed build: absent" in first, first
    build_without_cleanup(out)
    # Over a complete artifact: it stays the old one (or, in the instant between two renames, is absent).
    rebuilds = [kill_at_random_point(out, seed) for seed in REBUILD_SEEDS]
    assert any(state.startswith("killed rebuild") for state in rebuilds), rebuilds
    build_without_cleanup(out)


def test_a_second_build_into_the_same_path_fails_fast_and_leaves_the_first_intact(tmp_path):
    from llmpack.runtime.artifact import open_artifact

    out = tmp_path / "demo"
    first = start_build(out, "--force")
    assert wait_for(lambda: bool(leftovers(out)), first), first.communicate()
    # Paused while it writes its staging folder, i.e. while it holds the lock (the folder exists only under
    # it): the second build meets the lock however fast this machine finishes a demo build.
    first.send_signal(signal.SIGSTOP)
    try:
        assert leftovers(out), "the first build finished before it could be paused"
        started = time.monotonic()
        second = start_build(out, "--force")
        _, second_err = second.communicate(timeout=60)
    finally:
        first.send_signal(signal.SIGCONT)
    _, first_err = first.communicate(timeout=120)
    assert first.returncode == 0, first_err
    assert second.returncode == 3 and time.monotonic() - started < 10
    assert second_err.strip().splitlines()[-1] == f"error: another llm-export build is writing {out}; " \
                                                  "wait for it to finish"
    assert "Traceback" not in second_err
    assert open_artifact(out, verify_checksums=True).manifest.name == "demo" and leftovers(out) == []


def test_two_builds_started_together_on_a_cold_cache_never_crash_or_corrupt(tmp_path):
    from llmpack.runtime.artifact import open_artifact

    out, cold = tmp_path / "demo", {"LLMPACK_CACHE": str(tmp_path / "cache")}
    # Both also write the demo checkpoint into the same empty cache at once: one rename loses.
    builds = [start_build(out, env=cold), start_build(out, env=cold)]
    results = [(build.communicate(timeout=180)[1], build.returncode)[::-1] for build in builds]
    for code, stderr in results:
        assert "Traceback" not in stderr, stderr
        assert code == 0 or (code == 3 and "another llm-export build is writing" in stderr), stderr
    assert any(code == 0 for code, _ in results)
    assert open_artifact(out, verify_checksums=True).manifest.name == "demo" and leftovers(out) == []
