"""llmpack runtime: loads a built artifact (manifest + ONNX + tokenizer) and generates text, without torch."""

__version__ = "0.1.0"
