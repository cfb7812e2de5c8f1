"""llmpack runtime: loads a built artifact (manifest + ONNX + tokenizer) and generates text, without torch.

Three wings: the engine core (this folder), `backends/` (inference and KV caches) and `serve/` (HTTP).
"""

from importlib import metadata

try:  # the version is defined once, in pyproject.toml
    __version__ = metadata.version("llmpack")
except metadata.PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"
