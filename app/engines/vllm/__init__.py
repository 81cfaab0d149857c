"""The vLLM engine: the engine over vLLM's AsyncLLM (`engine`), engine-args translation and start-up checks
(`args`), root causes of vLLM's process failures (`forensics`), and the plugins vLLM loads in its own processes
(`plugins`). Importing this package imports nothing of vLLM: vLLM loads `plugins` in every process it starts."""
