"""Task sources for the built-in envs: generators and file loaders."""
