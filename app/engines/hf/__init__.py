"""The transformers engine: the engine (`engine`), the model runner (`runner`), the engine process, the
continuous batcher (`batching`, `ragged`), sampling, CPU threads and the per-sequence grammar/logprobs hooks.
DeepSpeed TP runs the same decode loop (`batching`, `runner`) in its rank processes."""
