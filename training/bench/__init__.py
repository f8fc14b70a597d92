"""FIRM-Bench evaluation: score a human-rated benchmark through a critic and report MAE like the paper."""
