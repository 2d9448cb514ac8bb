"""Multi-environment RL (Nemotron 3 RLVR): GRPO with masked importance sampling, environments with verifiable
rewards, a sandbox for model-written code, the pass-rate curriculum, and rollouts (sync or async). The public API:

    from nemotron3.rl import group_advantages, grpo_loss, Environment, Task
    from nemotron3.rl import rollout, RolloutConfig, SyncRollouts, AsyncRollouts, batch_tensors, policy_weights
    from nemotron3.rl.sandbox import run_python
    from nemotron3.rl import GRPOConfig, train_rl, demo_phase      # the training loop (train.py), the demo's RL phase
"""

from nemotron3.rl.environment import Environment, Task, load_environment, reward_of
from nemotron3.rl.grpo import group_advantages, grpo_loss
from nemotron3.rl.rollout import RolloutConfig, SyncRollouts, Trajectory, batch_tensors, policy_weights, rollout
from nemotron3.rl.workers import AsyncRollouts


def __getattr__(name):
    # the training loop pulls in the trainer; imported on first use so `import nemotron3.rl` stays light
    if name in ("GRPOConfig", "train_rl"):
        from nemotron3.rl import train
        return getattr(train, name)
    if name == "demo_phase":
        from nemotron3.rl.demo import demo_phase
        return demo_phase
    raise AttributeError(f"module 'nemotron3.rl' has no attribute {name!r}")

__all__ = ["group_advantages", "grpo_loss", "Environment", "Task", "load_environment", "reward_of", "rollout",
           "RolloutConfig", "SyncRollouts", "AsyncRollouts", "Trajectory", "batch_tensors", "policy_weights",
           "GRPOConfig", "train_rl", "demo_phase"]
