"""nanorlhf: a minimal from-scratch InstructGPT (SFT -> RM -> PPO) in PyTorch."""
