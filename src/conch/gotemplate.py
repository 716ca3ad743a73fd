"""A small interpreter for the part of Go's text/template that Ollama chat templates use.

Ollama renders a model's prompt with Go's ``text/template``; Python cannot run Go, so to check
that an exported Modelfile builds the same prompt as the tokenizer's Jinja chat template we
render it here. Supported: text, ``{{ pipeline }}``, the trim markers ``{{-`` / ``-}}``,
``if`` / ``else if`` / ``else`` / ``end``, ``range`` (with ``$i, $e :=``), variables (``$``,
``$x :=``, ``$x =``), fields (``.A.B``, ``$x.A``), string, number and boolean literals,
parentheses, ``define`` / ``template`` (recursion included, to Go's depth limit of 100000) and the
functions ``eq ne lt le gt ge and or not len slice index``. Go's strings are bytes: ``len``,
``slice`` and ``index`` count UTF-8 bytes, a slice may cut a character in two (its bytes are kept,
as surrogate escapes, and join up again in the output) and comparisons compare bytes. Anything else raises
``ValueError`` instead of being guessed at; tests/test_gotemplate_parity.py compares the rest
with Go's own text/template. ``render_ollama`` adds what Ollama does before it
renders (its ``collate`` of messages and the data it passes to the template).
"""

from __future__ import annotations

import re
import sys

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<raw>`[^`]*`)|(?P<num>-?\d+)|(?P<decl>:=)'
                    r'|(?P<punct>[(),|=])|(?P<var>\$\w*(?:\.\w+)*)|(?P<field>(?:\.\w+)+|\.)|(?P<ident>\w+))')
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}


def _lex(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    expr = expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise ValueError(f"cannot parse {expr[pos:]!r} in a template action")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


class _Parser:
    """Turns the template into nested lists of nodes: str, ("out", expr), ("if", ...), ("range", ...)."""

    def __init__(self, template: str):
        self.defines: dict = {}  # {{ define "name" }} bodies, as Go's associated templates
        self.items = []  # text and actions, trim markers applied
        pos = 0
        for m in _ACTION.finditer(template):
            text = template[pos:m.start()]
            if m.group(1):
                text = text.rstrip(" \t\r\n")
            if self.items and self.items[-1][0] == "trim_next":
                self.items.pop()
                text = text.lstrip(" \t\r\n")
            self.items.append(("text", text))
            self.items.append(("action", m.group(2).strip()))
            if m.group(3):
                self.items.append(("trim_next", None))
            pos = m.end()
        text = template[pos:]
        if self.items and self.items[-1][0] == "trim_next":
            self.items.pop()
            text = text.lstrip(" \t\r\n")
        self.items.append(("text", text))
        self.i = 0

    def parse(self, stop=()):
        nodes = []
        while self.i < len(self.items):
            kind, value = self.items[self.i]
            self.i += 1
            if kind == "text":
                if value:
                    nodes.append(value)
                continue
            word = value.split(None, 1)[0] if value else ""
            if word in ("end", "else"):
                if word not in stop:
                    raise ValueError(f"unexpected {{{{ {value} }}}}")
                return nodes, value
            if word == "if":
                nodes.append(self._if(value[2:]))
            elif word == "range":
                nodes.append(self._range(value[5:]))
            elif word == "define":
                if stop:
                    raise ValueError(f"{{{{ {value} }}}} inside a block (Go allows define only at the top level)")
                name = _lex(value[6:])
                if len(name) != 1 or name[0][0] not in ("str", "raw"):
                    raise ValueError(f"{{{{ {value} }}}}: define takes one quoted name")
                self.defines[_literal(*name[0])], _ = self.parse(stop=("end",))
            elif word == "template":
                tokens = _lex(value[8:])
                if not tokens or tokens[0][0] not in ("str", "raw"):
                    raise ValueError(f"{{{{ {value} }}}}: template takes a quoted name")
                nodes.append(("template", _literal(*tokens[0]), _expr(tokens[1:]) if tokens[1:] else None))
            elif word in ("with", "block", "break", "continue") or value.startswith("/*"):
                raise ValueError(f"{{{{ {value} }}}} is outside the supported subset")
            else:
                nodes.append(("out", _expr(_lex(value))))
        if stop:
            raise ValueError("a block is missing its {{ end }}")
        return nodes, None

    def _if(self, cond):
        branches, otherwise = [], []
        while True:
            body, closer = self.parse(stop=("end", "else"))
            branches.append((_expr(_lex(cond)), body))
            if closer == "end":
                break
            rest = closer[4:].strip()
            if rest.startswith("if "):
                cond = rest[3:]
                continue
            if rest:
                raise ValueError(f"{{{{ {closer} }}}} is outside the supported subset")
            otherwise, closer = self.parse(stop=("end",))
            break
        return ("if", branches, otherwise)

    def _range(self, spec):
        tokens = _lex(spec)
        names = []
        if ("decl", ":=") in tokens:
            cut = tokens.index(("decl", ":="))
            names = [v for k, v in tokens[:cut] if k == "var"]
            tokens = tokens[cut + 1:]
        body, closer = self.parse(stop=("end", "else"))
        otherwise = []
        if closer != "end":
            otherwise, _ = self.parse(stop=("end",))
        return ("range", names, _expr(tokens), body, otherwise)


def _expr(tokens):
    """A pipeline without ``|``: a declaration ``$x := cmd`` or a command (function call or operand)."""
    if any(k == "punct" and v == "|" for k, v in tokens):
        raise ValueError("pipes (|) are outside the supported subset")
    if len(tokens) >= 2 and tokens[0][0] == "var" and tokens[1] in (("decl", ":="), ("punct", "=")):
        return ("set", tokens[0][1], _expr(tokens[2:]), tokens[1][1])
    args, rest = _command(tokens)
    if rest:
        raise ValueError(f"unexpected {rest[0][1]!r} in a template action")
    return args


def _literal(kind, value):
    if kind == "raw":
        return value[1:-1]
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), value[1:-1])


def _command(tokens):
    items = []
    while tokens and tokens[0] != ("punct", ")"):
        kind, value = tokens[0]
        if (kind, value) == ("punct", "("):
            inner, tokens = _command(tokens[1:])
            if not tokens or tokens[0] != ("punct", ")"):
                raise ValueError("unbalanced parentheses in a template action")
            items.append(inner)
            tokens = tokens[1:]
            continue
        if kind in ("str", "raw"):
            items.append(("lit", _literal(kind, value)))
        elif kind == "num":
            items.append(("lit", int(value)))
        elif kind == "ident" and value in ("true", "false"):
            items.append(("lit", value == "true"))
        elif kind in ("ident", "field", "var"):
            items.append((kind, value))
        else:
            raise ValueError(f"unexpected {value!r} in a template action")
        tokens = tokens[1:]
    if not items:
        raise ValueError("empty template action")
    if items[0][0] == "ident":
        return ("call", items[0][1], items[1:]), tokens
    if len(items) != 1:
        raise ValueError("only a function can take arguments")
    return items[0], tokens


def truth(value) -> bool:
    """Go's notion of true: not false, 0, nil, or empty."""
    return not (value is None or value is False or value == 0 or (hasattr(value, "__len__") and len(value) == 0))


def _get(obj, name):
    if isinstance(obj, dict):
        return obj.get(name)  # Ollama parses with missingkey=zero
    return getattr(obj, name, None)


_FUNCS = {
    "eq": lambda a, *b: any(_b(a) == _b(x) for x in b), "ne": lambda a, b: _b(a) != _b(b),
    "lt": lambda a, b: _b(a) < _b(b), "le": lambda a, b: _b(a) <= _b(b), "gt": lambda a, b: _b(a) > _b(b),
    "ge": lambda a, b: _b(a) >= _b(b),
    "not": lambda a: not truth(a), "len": lambda a: len(_b(a)),
    "index": lambda a, *k: _index(a, k), "slice": lambda a, *ij: _slice(a, ij),
}


# Go's strings are bytes: len, index and slice count UTF-8 bytes ("你好" has length 6), not characters.
# Here a string is a Python str whose bytes that are not UTF-8 (a character cut in two) are
# surrogate escapes, so every string has exactly the bytes Go's has.


def _b(a):
    return a.encode("utf-8", "surrogateescape") if isinstance(a, str) else a


def _index(a, keys):
    for k in keys:
        a = _b(a)[k] if isinstance(a, str) else a[k]
    return a


def _slice(a, ij):
    size = len(_b(a))
    i, j = (list(ij) + [0, size])[:2] if ij else (0, size)
    if len(ij) == 1:
        j = size
    if not 0 <= i <= j <= size:
        raise ValueError(f"slice {list(ij)} is out of range for a length of {size} (Go fails the template)")
    if not isinstance(a, str):
        return a[i:j]
    return _b(a)[i:j].decode("utf-8", "surrogateescape")


MAX_DEPTH = 100000  # Go's text/template fails a template that nests {{ template }} calls deeper


class _Scope:
    def __init__(self, root, defines=None, depth=0):
        self.vars = [{"$": root}]
        self.defines = defines or {}
        self.depth = depth

    def lookup(self, name):
        for frame in reversed(self.vars):
            if name in frame:
                return frame[name]
        raise ValueError(f"undefined variable {name}")


def _eval(node, dot, scope):
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "field":
        value = dot
        for part in node[1].split(".")[1:]:
            if part:
                value = _get(value, part)
        return value
    if kind == "var":
        name, *fields = node[1].split(".")
        value = scope.lookup(name)
        for part in fields:
            value = _get(value, part)
        return value
    if kind == "set":  # $x := declares in the innermost scope; $x = assigns where $x was declared, as Go does
        value = _eval(node[2], dot, scope)
        if node[3] == ":=":
            scope.vars[-1][node[1]] = value
        else:
            scope.lookup(node[1])
            next(frame for frame in reversed(scope.vars) if node[1] in frame)[node[1]] = value
        return value  # a declaration's value is what {{ if $x := ... }} tests
    if kind == "call":
        name, args = node[1], node[2]
        if name == "and":  # Go evaluates and/or lazily and returns the deciding argument
            value = None
            for a in args:
                value = _eval(a, dot, scope)
                if not truth(value):
                    return value
            return value
        if name == "or":
            value = None
            for a in args:
                value = _eval(a, dot, scope)
                if truth(value):
                    return value
            return value
        if name not in _FUNCS:
            raise ValueError(f"function {name!r} is outside the supported subset")
        return _FUNCS[name](*[_eval(a, dot, scope) for a in args])
    raise ValueError(f"cannot evaluate {node!r}")


def _show(value) -> str:
    if value is None:
        raise ValueError("the template prints a value that is not set")
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _run(nodes, dot, scope, out):
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "out":
            value = _eval(node[1], dot, scope)
            if node[1][0] != "set":
                out.append(_show(value))
        elif node[0] == "if":
            for cond, body in node[1]:
                scope.vars.append({})
                taken = truth(_eval(cond, dot, scope))
                if taken:
                    _run(body, dot, scope, out)
                scope.vars.pop()
                if taken:
                    break
            else:
                scope.vars.append({})
                _run(node[2], dot, scope, out)
                scope.vars.pop()
        elif node[0] == "template":  # Go: a fresh scope whose dot and $ are the argument
            if node[1] not in scope.defines:
                raise ValueError(f"template {node[1]!r} is not defined")
            if scope.depth == MAX_DEPTH:
                raise ValueError(f"exceeded maximum template depth ({MAX_DEPTH})")
            arg = _eval(node[2], dot, scope) if node[2] else None
            _run(scope.defines[node[1]], arg, _Scope(arg, scope.defines, scope.depth + 1), out)
        elif node[0] == "range":
            _, names, expr, body, otherwise = node
            items = _eval(expr, dot, scope) or []
            pairs = sorted(items.items()) if isinstance(items, dict) else list(enumerate(items))  # Go sorts keys
            if not pairs:
                scope.vars.append({})
                _run(otherwise, dot, scope, out)
                scope.vars.pop()
            for key, item in pairs:
                frame = {}
                if len(names) == 1:
                    frame[names[0]] = item
                elif len(names) == 2:
                    frame[names[0]], frame[names[1]] = key, item
                scope.vars.append(frame)
                _run(body, item, scope, out)
                scope.vars.pop()


def render(template: str, data: dict) -> str:
    """Render a Go template (the supported subset) with ``data`` as dot and ``$``."""
    parser = _Parser(template)
    nodes, _ = parser.parse()
    out: list[str] = []
    limit = sys.getrecursionlimit()
    if parser.defines:  # a recursive {{ template }} nests a few Python calls per level, up to Go's limit
        sys.setrecursionlimit(max(limit, 4 * MAX_DEPTH + 1000))
    try:
        _run(nodes, data, _Scope(data, parser.defines), out)
    finally:
        sys.setrecursionlimit(limit)
    try:  # the bytes of characters that slices cut in two join up again, as in Go's output
        return "".join(out).encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the template writes bytes that are not UTF-8 (a character cut in two)") from None


def render_ollama(template: str, messages: list[dict], system: str | None = None) -> str:
    """The prompt Ollama's chat endpoint builds from ``messages`` with this TEMPLATE.

    As Ollama does: a Modelfile SYSTEM is prepended when the request has no system message;
    consecutive messages of one role are joined with a blank line (``collate``); ``.System`` is
    every system message joined the same way; ``.Messages`` keeps them all; ``.Response`` is empty.
    """
    return render(template, ollama_data(messages, system))


def ollama_data(messages: list[dict], system: str | None = None) -> dict:
    """The data Ollama's chat endpoint passes to a TEMPLATE that uses ``.Messages`` (see ``render_ollama``).

    Keys as in Ollama's ``template.Execute``; each message has the fields of its ``api.Message``
    that a text chat sets (``Role``, ``Content``; the others are Go's zero values)."""
    messages = [dict(m) for m in messages]
    if system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    collated: list[dict] = []
    for m in messages:
        if collated and collated[-1]["Role"] == m["role"] and m["role"] != "tool":
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"], "Thinking": "", "ToolName": ""})
    return {"System": "\n\n".join(m["content"] for m in messages if m["role"] == "system"),
            "Messages": collated, "Tools": None, "Response": "", "Think": False, "IsThinkSet": False,
            "Query": "", "Document": "", "Instruction": ""}
