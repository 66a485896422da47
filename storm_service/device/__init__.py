"""The device tier: spare GPU memory lent to training jobs (NOTE [Device tier] in tier.py)."""
