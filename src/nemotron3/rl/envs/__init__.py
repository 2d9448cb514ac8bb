"""Built-in environments, each with a deterministic task generator a tiny model can learn and a held-out split:
math (math-verify; math_short: the same in the built-in SFT set's forms), code (sandboxed unit tests), structured
(JSON schema), instructions (verifiable constraints), tools (multi-turn, in-memory database; tools_short: one call of the SFT set's calc / lookup tools).
`load_environment(name)` builds them by these names."""

BUILTIN = {
    "math": ("nemotron3.rl.envs.math", "MathEnv"),
    "math_short": ("nemotron3.rl.envs.math", "ShortMathEnv"),
    "code": ("nemotron3.rl.envs.code", "CodeEnv"),
    "structured": ("nemotron3.rl.envs.structured", "StructuredEnv"),
    "instructions": ("nemotron3.rl.envs.instructions", "InstructionsEnv"),
    "tools": ("nemotron3.rl.envs.tools", "ToolsEnv"),
    "tools_short": ("nemotron3.rl.envs.tools", "ShortToolsEnv"),
}
