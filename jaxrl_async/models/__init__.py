"""Model families: the NNX decoder-only transformer with KV-cache decoding and inference numerics."""
