"""Multi-environment RL (Nemotron 3 RLVR): GRPO with masked importance sampling, environments with verifiable
rewards, a sandbox for model-written code and the pass-rate curriculum. The public API:

    from nemotron3.rl import group_advantages, grpo_loss, Environment, Task
    from nemotron3.rl.sandbox import run_python
"""

from nemotron3.rl.environment import Environment, Task, load_environment, reward_of
from nemotron3.rl.grpo import group_advantages, grpo_loss

__all__ = ["group_advantages", "grpo_loss", "Environment", "Task", "load_environment", "reward_of"]
