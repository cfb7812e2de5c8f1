"""Generation stage 1: open an artifact folder — read the manifest, check its files, pick a backend."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from llmpack.runtime import manifest as names
from llmpack.runtime.errors import ArtifactError
from llmpack.runtime.manifest import BuildManifest, check_artifact_files, read_manifest

log = logging.getLogger("llmpack.runtime")

BACKENDS = ("auto", "cpu")


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: BuildManifest

    @property
    def tokenizer_path(self) -> Path:
        return self.path / names.TOKENIZER_FILE


def open_artifact(path: Path | str, verify_checksums: bool = True) -> Artifact:
    """Load the manifest and refuse a damaged artifact; skipping the hashes is logged, never silent."""
    folder = Path(path).expanduser().resolve()
    manifest = read_manifest(folder)
    if not verify_checksums:
        log.warning("checksum verification of %s skipped on request (sizes are still checked)", folder)
    check_artifact_files(folder, manifest, verify_checksums=verify_checksums)
    return Artifact(folder, manifest)


def open_backend(artifact: Artifact, backend: str = "auto", threads: int | None = None, max_batch: int = 1):
    """The backend that will run this artifact; the decode loop sees only the Backend interface."""
    if backend not in BACKENDS:
        raise ArtifactError(f"backend {backend!r} is not available; choose one of {', '.join(BACKENDS)}")
    from llmpack.runtime.ort_backend import OrtBackend

    chosen = OrtBackend(artifact.path, artifact.manifest, threads=threads, max_batch=max_batch)
    log.info("backend %s for %s", chosen.name, artifact.path.name)
    return chosen
