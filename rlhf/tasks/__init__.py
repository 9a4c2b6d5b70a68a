"""Tasks: where prompts, training examples and verifiers come from."""
