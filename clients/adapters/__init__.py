"""Reward functions in the shapes RL frameworks call, each backed by a RewardClient."""
