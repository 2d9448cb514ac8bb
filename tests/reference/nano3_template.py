"""Oracle for the chat format: a Jinja transcription of NVIDIA's Nemotron 3 Nano chat template (the data-prep
template `nano3.jinja` of NVIDIA-NeMo/Nemotron), rendered by transformers / jinja2 in the tests.

Transcribed rule by rule, with two changes that the built-in renderer shares and documents: the template's kwargs are
read at top level (enable_thinking, truncate_history_thinking: how the released Hugging Face template and
transformers pass them; the data-prep copy reads them from a `chat_template_kwargs` dict), and the ~780-character
call-format reminder after "</tools>" is left out, as is the data-prep-only reasoning_budget hint."""

NANO3_TEMPLATE = r"""{%- macro extra_keys(d, handled) -%}
{%- if d is mapping -%}
{%- for k in d if k not in handled -%}
{%- if d[k] is mapping or (d[k] is sequence and d[k] is not string) -%}
{{- '\n<' ~ k ~ '>' ~ (d[k] | tojson | safe) ~ '</' ~ k ~ '>' -}}
{%- else -%}
{{- '\n<' ~ k ~ '>' ~ (d[k] | string) ~ '</' ~ k ~ '>' -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- set enable_thinking = enable_thinking if enable_thinking is defined else true -%}
{%- set truncate_history_thinking = truncate_history_thinking if truncate_history_thinking is defined else true -%}
{%- if messages[0]['role'] == 'system' -%}
{%- set system_message = messages[0]['content'] -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set system_message = '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- if tools is not defined or tools is none -%}{%- set tools = [] -%}{%- endif -%}
{%- set ns = namespace(last_user_idx=-1) -%}
{%- for m in loop_messages -%}
{%- if m['role'] == 'user' -%}{%- set ns.last_user_idx = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{{- '<|im_start|>system\n' + system_message -}}
{%- if tools | length > 0 -%}
{%- if system_message | length > 0 -%}{{- '\n\n' -}}{%- endif -%}
{{- '# Tools\n\nYou have access to the following functions:\n\n<tools>' -}}
{%- for tool in tools -%}
{%- if tool.function is defined -%}{%- set tool = tool.function -%}{%- endif -%}
{{- '\n<function>\n<name>' ~ tool.name ~ '</name>' -}}
{%- if tool.description is defined -%}{{- '\n<description>' ~ (tool.description | trim) ~ '</description>' -}}{%- endif -%}
{{- '\n<parameters>' -}}
{%- if tool.parameters is defined and tool.parameters is mapping and tool.parameters.properties is defined and tool.parameters.properties is mapping -%}
{%- for pname, pfields in tool.parameters.properties | items -%}
{{- '\n<parameter>\n<name>' ~ pname ~ '</name>' -}}
{%- if pfields.type is defined -%}{{- '\n<type>' ~ (pfields.type | string) ~ '</type>' -}}{%- endif -%}
{%- if pfields.description is defined -%}{{- '\n<description>' ~ (pfields.description | trim) ~ '</description>' -}}{%- endif -%}
{%- if pfields.enum is defined -%}{{- '\n<enum>' ~ (pfields.enum | tojson | safe) ~ '</enum>' -}}{%- endif -%}
{{- extra_keys(pfields, ['name', 'type', 'description', 'enum']) -}}
{{- '\n</parameter>' -}}
{%- endfor -%}
{%- endif -%}
{{- extra_keys(tool.parameters, ['type', 'properties', 'required']) -}}
{%- if tool.parameters is defined and tool.parameters.required is defined -%}
{{- '\n<required>' ~ (tool.parameters.required | tojson | safe) ~ '</required>' -}}
{%- endif -%}
{{- '\n</parameters>' -}}
{{- extra_keys(tool, ['type', 'name', 'description', 'parameters']) -}}
{{- '\n</function>' -}}
{%- endfor -%}
{{- '\n</tools>' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- for message in loop_messages -%}
{%- if message.role == 'assistant' -%}
{%- if message.reasoning_content is defined and message.reasoning_content is string and message.reasoning_content | trim | length > 0 -%}
{%- set content = '<think>\n' ~ message.reasoning_content ~ '\n</think>\n' ~ (message.content | default('', true)) -%}
{%- else -%}
{%- set content = message.content | default('', true) -%}
{%- if '<think>' not in content and '</think>' not in content -%}{%- set content = '<think></think>' ~ content -%}{%- endif -%}
{%- endif -%}
{%- set history = truncate_history_thinking and loop.index0 < ns.last_user_idx -%}
{%- if message.tool_calls is defined and message.tool_calls is iterable and message.tool_calls | length > 0 -%}
{{- '<|im_start|>assistant\n' -}}
{%- if not history -%}
{{- (content | trim) ~ '\n' -}}
{%- else -%}
{%- set c = content -%}
{%- if '</think>' in c -%}{%- set c = c.split('</think>')[-1] -%}{%- elif '<think>' in c -%}{%- set c = c.split('<think>')[0] -%}{%- endif -%}
{{- '<think></think>' ~ (c | trim) ~ '\n' -}}
{%- endif -%}
{%- for tool_call in message.tool_calls -%}
{%- if tool_call.function is defined -%}{%- set tool_call = tool_call.function -%}{%- endif -%}
{{- '<tool_call>\n<function=' ~ tool_call.name ~ '>\n' -}}
{%- for aname, avalue in tool_call.arguments | items -%}
{%- set avalue = avalue | tojson | safe if avalue is mapping or (avalue is sequence and avalue is not string) else avalue | string -%}
{{- '<parameter=' ~ aname ~ '>\n' ~ avalue ~ '\n</parameter>\n' -}}
{%- endfor -%}
{{- '</function>\n</tool_call>\n' -}}
{%- endfor -%}
{{- '<|im_end|>\n' -}}
{%- else -%}
{%- set c = content -%}
{%- if history and '<think>' in c and '</think>' in c -%}{%- set c = '<think></think>' ~ c.split('</think>')[-1] -%}{%- endif -%}
{{- '<|im_start|>assistant\n' ~ (c | trim) ~ '<|im_end|>\n' -}}
{%- endif -%}
{%- elif message.role == 'tool' -%}
{%- if loop.previtem and loop.previtem.role != 'tool' -%}{{- '<|im_start|>user\n' -}}{%- endif -%}
{{- '<tool_response>\n' ~ message.content ~ '\n</tool_response>\n' -}}
{%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
{%- else -%}
{{- '<|im_start|>' ~ message.role ~ '\n' ~ (message.content | string) ~ '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{%- if enable_thinking -%}{{- '<|im_start|>assistant\n<think>\n' -}}{%- else -%}{{- '<|im_start|>assistant\n<think></think>' -}}{%- endif -%}
{%- endif -%}"""
