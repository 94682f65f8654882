"""The math: the decomposed-ratio policy loss, advantages, and the proximal routes' pure pieces (no I/O, no processes)."""
