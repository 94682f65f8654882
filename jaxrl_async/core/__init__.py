"""The math: the decomposed-ratio policy loss, advantages, and the proximal routes' pure pieces.

No I/O, no processes.
"""
