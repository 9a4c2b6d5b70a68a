"""Pure loss functions: `preference` (reward models, DPO family, SPIN) and `policy_gradient` (PPO, GRPO, RLOO)."""
