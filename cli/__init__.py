"""llmpack command-line edges: `llm-export` and `llm-serve` (click), translating domain errors to exit codes."""
