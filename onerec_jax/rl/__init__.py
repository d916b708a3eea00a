"""Alignment after pre-training: reward model, policy-optimisation losses, rollouts."""
