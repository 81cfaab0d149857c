"""Engine-neutral constrained decoding: grammar specs from JSON schemas and tool-call structures (`specs`), the
schema features constrained decoding can enforce (`json_schema`), and the per-sequence matcher our own decode loops
apply (`matcher`). The API builds specs; the transformers engine and DeepSpeed TP match them; vLLM receives the
same EBNF."""
