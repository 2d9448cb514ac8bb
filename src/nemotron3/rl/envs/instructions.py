"""The `instructions` environment: write a short text that obeys verifiable constraints (IFEval/IFBench style, as
NeMo-Gym instruction_following scores Nemotron 3: `all` = 1 iff every constraint holds, `fraction` = share held).

    Write a short note about the sea. Follow every rule: use at most 12 words; include the word "blue";
    write everything in lowercase.                                   -> "the sea is blue and calm today"

Each constraint is a dict {"kind": ..., params} stored in the task and checked by one function per kind (CHECKS);
a task draws 1-3 kinds that cannot contradict each other.
Words are whitespace-separated tokens; keyword checks ignore case and punctuation around words.
Left out: multi-turn instructions and LLM-judged rubrics (the second IF environment of Nemotron 3).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

from nemotron3.rl.environment import Environment, Task, check_split, split_of

_TOPICS = ["the sea", "a cat", "rain", "a city at night", "bread", "the moon", "a garden", "trains", "winter"]
_KEYWORDS = ["blue", "quiet", "light", "green", "old", "warm", "small", "fast", "bright", "soft"]


def _words(text: str) -> list[str]:
    return [w.strip(".,;:!?\"'()").lower() for w in text.split()]


def _bullets(text: str) -> int:
    return sum(1 for line in text.splitlines() if re.match(r"\s*[-*] \S", line))


CHECKS = {
    "min_words": (lambda t, c: len(t.split()) >= c["n"], "use at least {n} words"),
    "max_words": (lambda t, c: len(t.split()) <= c["n"], "use at most {n} words"),
    "include": (lambda t, c: c["word"] in _words(t), 'include the word "{word}"'),
    "exclude": (lambda t, c: c["word"] not in _words(t), 'do not use the word "{word}"'),
    "lowercase": (lambda t, c: t == t.lower() and any(ch.isalpha() for ch in t), "write everything in lowercase"),
    "uppercase": (lambda t, c: t == t.upper() and any(ch.isalpha() for ch in t), "write everything in uppercase"),
    "end_with": (lambda t, c: t.strip().endswith(c["phrase"]), 'end your reply with "{phrase}"'),
    "bullets": (lambda t, c: _bullets(t) == c["n"], "answer with exactly {n} bullet points starting with '- '"),
    "no_commas": (lambda t, c: "," not in t, "do not use any commas"),
    "quoted": (lambda t, c: len(t.strip()) > 1 and t.strip()[0] == t.strip()[-1] == '"',
               "wrap your whole reply in double quotes"),
}
_CONFLICTS = [{"lowercase", "uppercase"}, {"include", "exclude"}, {"min_words", "max_words"}, {"bullets", "quoted"},
              {"end_with", "quoted"}, {"uppercase", "include"}, {"uppercase", "end_with"}, {"lowercase", "end_with"}]


def _constraint(kind: str, rng: random.Random) -> dict:
    if kind in ("min_words", "max_words"):
        return {"kind": kind, "n": rng.randint(3, 8) if kind == "min_words" else rng.randint(8, 20)}
    if kind in ("include", "exclude"):
        return {"kind": kind, "word": rng.choice(_KEYWORDS)}
    if kind == "end_with":
        return {"kind": kind, "phrase": rng.choice(["The end.", "That is all.", "Thank you."])}
    if kind == "bullets":
        return {"kind": kind, "n": rng.randint(2, 4)}
    return {"kind": kind}


def describe(constraint: dict) -> str:
    return CHECKS[constraint["kind"]][1].format(**constraint)


def holds(constraint: dict, text: str) -> bool:
    if constraint.get("kind") not in CHECKS:
        raise ValueError(f"constraint {constraint} has an unknown kind; use one of {sorted(CHECKS)}.")
    return bool(CHECKS[constraint["kind"]][0](text, constraint))


class InstructionsEnv(Environment):
    name = "instructions"

    def __init__(self, reward: str = "all"):
        if reward not in ("all", "fraction"):
            raise ValueError(f"InstructionsEnv(reward={reward!r}): use 'all' (1 iff every constraint holds) or "
                             f"'fraction' (the share that holds).")
        self.reward = reward

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        check_split(split)
        rng = random.Random(seed)
        while True:
            kinds: list[str] = []
            wanted = rng.randint(1, 3)
            for kind in rng.sample(sorted(CHECKS), len(CHECKS)):
                if len(kinds) < wanted and not any({kind, k} in _CONFLICTS for k in kinds):
                    kinds.append(kind)
            constraints = [_constraint(k, rng) for k in kinds]
            prompt = (f"Write a short note about {rng.choice(_TOPICS)}. Follow every rule: "
                      + "; ".join(describe(c) for c in constraints) + ".")
            if split_of(prompt) != split:
                continue
            yield Task([{"role": "user", "content": prompt}], {"constraints": constraints})

    def score(self, task: Task, completion: str) -> dict[str, float]:
        held = [holds(c, completion) for c in task.data["constraints"]]
        fraction = sum(held) / len(held)
        return {"reward": fraction if self.reward == "fraction" else float(all(held)), "fraction": fraction}
