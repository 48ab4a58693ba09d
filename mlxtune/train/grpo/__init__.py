"""GRPO's engine-independent parts: the objective (losses.py), rewards (rewards.py) and group rollouts (rollout.py).

The `grpo` command arrives with the one training engine, which uses these as an objective."""
