"""llmpack export: Hugging Face Llama checkpoint → verified ONNX artifact with KV cache (needs torch)."""
