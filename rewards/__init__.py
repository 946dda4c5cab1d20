"""Verifiers that turn model output into rewards: math answers (more to come), run in a hard-timeout process pool."""
