"""Rollouts: trajectories and the typed batch, the batched multi-turn sampler, evaluation."""
