"""Learning benchmark: FST against RL-only and GEPA-only on the same seeds, data and steps."""
