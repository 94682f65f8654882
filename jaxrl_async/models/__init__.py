"""Model families, each with a float32 learner path and KV-cache decoding in inference numerics.

- `transformer`: the library's own decoder-only transformer (and the `Numerics` every family uses).
- `llama`: the Llama-3 / Qwen2.5 / Qwen3 family, with the same module-level functions.
- `families`: the table of `model.family` values (module, config class, HF architecture, switches).
- `hf`: Hugging Face checkpoints and tokenizers read into (and written from) `llama`.
"""
