"""fastslow: continual LLM post-training with Fast-Slow Training (FST)."""

__version__ = "0.1.0"
