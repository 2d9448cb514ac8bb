"""Nemotron 3's chat format: the tool-call parser (the XML tool calls of Nemotron 3's chat template).

    <tool_call>
    <function=set_quantity>
    <parameter=item>
    pears
    </parameter>
    <parameter=quantity>
    7
    </parameter>
    </function>
    </tool_call>

A parameter's value is read as JSON when it parses (7 -> 7, [1, 2] -> [1, 2], true -> True) and kept as the stripped
string otherwise ("pears"), as the template writes strings bare and everything else as JSON.
Left out here (written on another branch): rendering, the template itself, streaming parsing.
"""

from __future__ import annotations

import json
import re

_CALL = re.compile(r"<tool_call>\s*<function=([^>\n]+)>(.*?)</function>\s*</tool_call>", re.DOTALL)
_PARAM = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text.strip()


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(text without the tool-call blocks, stripped; [{"name": str, "arguments": dict}, ...] in order)."""
    calls = [{"name": name.strip(), "arguments": {k.strip(): _value(v) for k, v in _PARAM.findall(body)}}
             for name, body in _CALL.findall(text)]
    return _CALL.sub("", text).strip(), calls
