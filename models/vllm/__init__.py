"""vLLM side of lockstep: the general plugin (plugin.py) that registers our Qwen3 (qwen3.py)
and our paged-attention backend (attention_backend.py). Imported by vLLM, never by the trainer."""
