"""Row buckets: pad a variable number of rows to a few fixed shapes, so jitted forwards
compile once per bucket instead of once per row count."""


def bucket(k: int) -> int:
    """Rows a request of `k` rows is padded to: the next power of two (>= 1)."""
    if k < 1:
        raise ValueError(f"a request needs at least one row, got {k}")
    return 1 << (k - 1).bit_length()
