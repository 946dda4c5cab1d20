"""The GRPO-style trainer: losses, advantages, token-budget batches, weight publishing (not built yet)."""
