"""The `structured` environment: reply with JSON that validates against a given JSON schema (NeMo-Gym
structured_outputs for Nemotron 3: reward 1 iff the output validates; no reward for the content's meaning).

    Reply with a JSON object that matches this JSON schema: {"type": "object", "properties": {"age": ...}, ...}
    -> {"age": 31, "name": "Ann"}

Schemas are drawn from a few property kinds (bounded integers, strings with length limits or an enum, booleans,
bounded integer arrays), 1-4 properties, some required, no extra properties. Validation: `jsonschema` (Draft
2020-12). The JSON is the last ```json block of the reply, or the whole reply.
Left out: nested objects, $ref, formats; real schema datasets (pass your own Environment).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

from nemotron3.rl.environment import Environment, Task, check_split, last_fenced_block, split_of

_NAMES = ["name", "age", "city", "score", "active", "tags", "color", "count", "level", "title", "ids", "verified"]


def _property(rng: random.Random) -> dict:
    kind = rng.randrange(5)
    if kind == 0:
        lo = rng.randint(0, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(1, 50)}
    if kind == 1:
        return {"type": "string", "minLength": rng.randint(1, 4), "maxLength": rng.randint(5, 12)}
    if kind == 2:
        return {"type": "string", "enum": rng.sample(["red", "green", "blue", "low", "high", "on", "off"], 3)}
    if kind == 3:
        return {"type": "boolean"}
    return {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
            "minItems": rng.randint(1, 3), "maxItems": rng.randint(3, 5)}


def validator_for(schema: dict):
    try:
        import jsonschema
    except ImportError:
        raise ImportError("the structured environment needs jsonschema: pip install 'nemotron3[rl]' "
                          "(or pip install jsonschema)") from None
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


class StructuredEnv(Environment):
    name = "structured"

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        check_split(split)
        rng = random.Random(seed)
        while True:
            names = rng.sample(_NAMES, rng.randint(1, 4))
            schema = {"type": "object", "properties": {n: _property(rng) for n in names},
                      "required": sorted(rng.sample(names, rng.randint(1, len(names)))),
                      "additionalProperties": False}
            text = json.dumps(schema, sort_keys=True)
            if split_of(text) != split:
                continue
            prompt = f"Reply with a JSON object that matches this JSON schema, and nothing else:\n{text}"
            yield Task([{"role": "user", "content": prompt}], {"schema": schema})

    def score(self, task: Task, completion: str) -> float:
        try:
            value = json.loads(last_fenced_block(completion, ("json",)))
        except json.JSONDecodeError:
            return 0.0
        return float(validator_for(task.data["schema"]).is_valid(value))
