"""rlhf: a config-driven framework for aligning language models, stage by stage."""

__version__ = "0.1.0"
