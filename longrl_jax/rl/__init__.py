"""RL: advantage estimators, losses and KL penalties (algorithms.py), rewards (rewards.py)."""
