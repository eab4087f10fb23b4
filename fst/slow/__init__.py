"""The slow channel: RL on the model's weights (losses, advantages, the optimizer step)."""
