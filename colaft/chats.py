"""The chat format's messages, as OpenAI's fine-tuning data has them, and how a chat template
renders them (colaft.formats reads chat files with `messages`; colaft.tasks.clm renders them).

    {"messages": [{"role": "system" | "developer" | "user" | "assistant" | "tool" | "function",
                   "content": text, or a list of {"type": "text", "text": ...} parts,
                   "weight": 0 | 1 (assistant turns only; absent: 1)}, ...],
     "tools": [{"type": "function", "function": {...}}, ...] or the legacy "functions": [{...}]}

An assistant turn may call tools instead of (or besides) its content: "tool_calls": [{"id",
"type": "function", "function": {"name", "arguments": JSON text}}], or the legacy
"function_call": {"name", "arguments"}. A "tool" turn answers a call ("tool_call_id", and
"name" if given); a "function" turn answers a function ("name").

Rendering. A template that knows tools (its source mentions "tool_calls") gets Hugging Face's
form: calls in "tool_calls" with the arguments as an object, tool and function turns as role
"tool" with their "tool_call_id" / "name", the tools as `tools=`. Any other template, and a
tokenizer without one, gets the PLAIN form, in text the model reads like any other:

    a call        its turn's content, then a line `<tool_call>{"id": ..., "name": ..., "arguments": {...}}</tool_call>`
                  per call (JSON; "id" when given, the arguments as an object when they are one)
    a tool turn   a user turn `<tool_response id="..." name="...">the content</tool_response>`
                  (the attributes it has)
    the tools     a first system turn `<tools>[the tools as JSON]</tools>`

Errors are ValueErrors naming the message (colaft.formats adds the line).
"""
from __future__ import annotations

import json
from collections.abc import Mapping

ROLES = ("system", "developer", "user", "assistant", "tool", "function")


# ------------------------------------------------------------------ checking
def messages(value) -> list[dict]:
    """Checked messages: {"role", "content": text}, their tool fields, and for assistant turns
    "weight" 0 or 1; at least one learnt assistant turn, after a user turn."""
    if not isinstance(value, list) or not value:
        raise ValueError("\"messages\" must be a non-empty list")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"message {i} must be {{\"role\": one of {', '.join(ROLES)}, \"content\": text}}")
        message = {"role": m["role"], "content": _content(m, i), **_tool_fields(m, f"message {i}")}
        if m["role"] == "assistant":
            weight = m.get("weight", 1)
            if weight not in (0, 1) or isinstance(weight, bool):
                raise ValueError(f"message {i} \"weight\" must be 0 or 1")
            message["weight"] = int(weight)
        elif "weight" in m:
            raise ValueError(f"message {i} \"weight\": only assistant turns have one")
        out.append(message)
    learnt = [i for i, m in enumerate(out) if m.get("weight")]
    if not learnt:
        has = "every assistant turn has weight 0" if any(m["role"] == "assistant" for m in out) else "there is none"
        raise ValueError(f"the last message to learn must be an assistant turn, but {has}")
    if not any(m["role"] == "user" for m in out[:learnt[0]]):
        raise ValueError("no user message before the first answer to learn")
    return out


def tools(row: Mapping) -> list[dict] | None:
    """A chat record's tools in OpenAI's form (legacy "functions" become function tools), or None."""
    given = [k for k in ("tools", "functions") if row.get(k) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise ValueError("give \"tools\" or \"functions\", not both")
    value = row[given[0]]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ValueError(f"\"{given[0]}\" must be a list of objects")
    return value if given[0] == "tools" else [{"type": "function", "function": f} for f in value]


def calls(message: Mapping) -> list[dict]:
    """An assistant turn's tool calls in OpenAI's form (a legacy function_call is one)."""
    if message.get("tool_calls"):
        return list(message["tool_calls"])
    if message.get("function_call"):
        return [{"type": "function", "function": message["function_call"]}]
    return []


def _content(m: dict, i: int) -> str:
    """A message's text: a string, or its text parts joined ("" for a turn that only calls tools)."""
    content = m.get("content")
    if content is None and m["role"] == "assistant" and (m.get("tool_calls") or m.get("function_call")):
        return ""
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ValueError(f"message {i} \"content\" parts must be {{\"type\": \"text\", \"text\": text}}")
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ValueError(f"message {i} \"content\" must be text or a list of text parts")
    return content


def _text(value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be non-empty text")
    return value


def _call(call, what: str) -> dict:
    if not isinstance(call, dict):
        raise ValueError(f"{what} must be {{\"name\": text, \"arguments\": text}}")
    arguments = call.get("arguments", "{}")
    if not isinstance(arguments, str):
        raise ValueError(f"{what} \"arguments\" must be text (the arguments as JSON)")
    return {"name": _text(call.get("name"), f"{what} \"name\""), "arguments": arguments}


def _tool_fields(m: dict, what: str) -> dict:
    out, role = {}, m["role"]
    if role == "assistant" and m.get("tool_calls") is not None:
        if not isinstance(m["tool_calls"], list) or not m["tool_calls"]:
            raise ValueError(f"{what} \"tool_calls\" must be a non-empty list")
        out["tool_calls"] = []
        for j, c in enumerate(m["tool_calls"]):
            if not isinstance(c, dict) or c.get("type", "function") != "function":
                raise ValueError(f"{what} tool call {j} must be {{\"type\": \"function\", \"function\": {{...}}}}")
            call = {"type": "function", "function": _call(c.get("function"), f"{what} tool call {j}")}
            if c.get("id") is not None:
                call["id"] = _text(c["id"], f"{what} tool call {j} \"id\"")
            out["tool_calls"].append(call)
    if role == "assistant" and m.get("function_call") is not None:
        out["function_call"] = _call(m["function_call"], f"{what} \"function_call\"")
    if role == "tool" and m.get("tool_call_id") is not None:
        out["tool_call_id"] = _text(m["tool_call_id"], f"{what} \"tool_call_id\"")
    if role == "function" or (role == "tool" and m.get("name") is not None):
        out["name"] = _text(m.get("name"), f"{what} \"name\"")
    return out


# ------------------------------------------------------------------ rendering
def knows_tools(template) -> bool:
    """Whether a chat template renders tool calls itself (its source mentions "tool_calls")."""
    sources = template.values() if isinstance(template, dict) else [template or ""]
    return any("tool_calls" in source for source in sources)


def for_template(conversation: list[Mapping], tool_form: bool) -> list[dict]:
    """Messages as a chat template takes them (no "weight"): Hugging Face's tool form when
    `tool_form`, else the PLAIN form (module docstring)."""
    return [_rendered(m, tool_form) for m in conversation]


def tools_turn(tool_list: list[dict]) -> dict:
    """The PLAIN form's system turn that lists the tools."""
    return {"role": "system", "content": f"<tools>{json.dumps(tool_list, ensure_ascii=False)}</tools>"}


def _arguments(text: str):
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def _rendered(m: Mapping, tool_form: bool) -> dict:
    role, content, called = m["role"], m["content"], calls(m)
    if role in ("tool", "function"):
        if tool_form:
            return {"role": "tool", "content": content, **{k: m[k] for k in ("tool_call_id", "name") if k in m}}
        attrs = "".join(f" {a}={json.dumps(m[k], ensure_ascii=False)}"
                        for a, k in (("id", "tool_call_id"), ("name", "name")) if k in m)
        return {"role": "user", "content": f"<tool_response{attrs}>{content}</tool_response>"}
    if not called:
        return {"role": role, "content": content}
    if tool_form:
        return {"role": role, "content": content, "tool_calls": [
            {"type": "function", **({"id": c["id"]} if "id" in c else {}),
             "function": {"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}}
            for c in called]}
    lines = [content] if content else []
    for c in called:
        call = {**({"id": c["id"]} if "id" in c else {}), "name": c["function"]["name"],
                "arguments": _arguments(c["function"]["arguments"])}
        lines.append(f"<tool_call>{json.dumps(call, ensure_ascii=False)}</tool_call>")
    return {"role": role, "content": "\n".join(lines)}
