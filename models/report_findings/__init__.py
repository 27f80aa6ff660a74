"""Reference note model: findings with negation and uncertainty from report text."""
