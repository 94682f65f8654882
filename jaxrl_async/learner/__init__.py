"""The learner: train state and jitted updates, the proximal route, the device mesh, checkpoints, warm start."""
