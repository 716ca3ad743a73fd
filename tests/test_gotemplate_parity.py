"""conch.gotemplate against Go's own text/template (issue 26).

``conch.gotemplate`` renders Ollama's Modelfile templates by hand, and the export's template check
trusts it. Here tests/gotemplate_render/main.go (standard library only, built once per session with
GO111MODULE=off, nothing downloaded) renders the same template with the same data through Go's
``text/template``, parsed as Ollama parses a TEMPLATE (``missingkey=zero``), with ``.Messages``
decoded into a struct shaped like Ollama's ``api.Message``. Every Modelfile template the exporter
writes (the demo model's ChatML, DeepSeek-R1's under both template revisions) is rendered over
several conversations, and Go's bytes, conch's bytes and, where the exporter claims it, the
tokenizer's ``apply_chat_template`` must be identical: for R1 that includes earlier answers with
their ``<think>`` reasoning, which both templates leave out (only the text after ``</think>`` is
sent). A handful of templates beyond the exporter's exercise the rest of the subset conch supports.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conch import export, gotemplate, hub

GO = shutil.which("go")
if GO is None:
    message = "needs Go to build the reference renderer (Debian: apt-get install golang-go)"
    if os.environ.get("CI"):
        pytest.fail("CI must run the Go template parity test: " + message, pytrace=False)
    pytest.skip(message, allow_module_level=True)

SOURCE = Path(__file__).resolve().parent / "gotemplate_render" / "main.go"


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """render(template, data) -> bytes, by Go's text/template; the binary is built once."""
    work = tmp_path_factory.mktemp("gotemplate_render")
    env = {**os.environ, "GO111MODULE": "off", "GOFLAGS": "", "GOPROXY": "off", "GOTOOLCHAIN": "local",
           "CGO_ENABLED": "0", "GOCACHE": str(work / "gocache"), "GOPATH": str(work / "gopath")}
    binary = work / "gotemplate_render"
    built = subprocess.run([GO, "build", "-o", str(binary), str(SOURCE)], env=env, capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr + built.stdout
    count = iter(range(10**6))

    def render(template: str, data: dict) -> bytes:
        n = next(count)
        (work / f"t{n}").write_text(template, encoding="utf-8")
        (work / f"d{n}.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        done = subprocess.run([str(binary), str(work / f"t{n}"), str(work / f"d{n}.json")], capture_output=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr.decode("utf-8", "replace")
        return done.stdout

    return render


# ---------------------------------------------------------------------------------------------
# the exporter's templates


SYSTEM = "你是神奇海螺，蟹堡王的智能助手。"
THINK = "<think>\n用户问我是谁。我应该说我是神奇海螺。\n</think>\n\n我是神奇海螺，蟹堡王的智能助手。"
EXTRA = {
    "chinese": [{"role": "user", "content": "美味蟹堡的秘方是什么？请用一句话回答，谢谢！✨"}],
    "think-in-history": [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": THINK},
                         {"role": "user", "content": "What can you do?"}],
    "system-think-multi-turn": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "你是谁？"},
                                {"role": "assistant", "content": THINK}, {"role": "user", "content": "  spaces \n"}],
    # several earlier answers with reasoning; two </think> (the text after the last one is kept); an answer
    # that is only reasoning; one without any; and a long answer (Go recurses once per byte of it)
    "think-in-every-answer": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "你是谁？"},
                              {"role": "assistant", "content": THINK}, {"role": "user", "content": "Who are you?"},
                              {"role": "assistant", "content": "<think>\nEnglish.\n</think>\n\nI am the Magic Conch."},
                              {"role": "user", "content": "再说一遍"},
                              {"role": "assistant", "content": "<think>a</think>b</think>\n\n还是我。"},
                              {"role": "user", "content": "?"}, {"role": "assistant", "content": "<think>嗯</think>"},
                              {"role": "user", "content": "!"}, {"role": "assistant", "content": "no reasoning 无"},
                              {"role": "user", "content": "最后一个问题"}],
    "long-answer-after-think": [{"role": "user", "content": "长"},
                                {"role": "assistant", "content": "<think>\n想一想。\n</think>\n\n" + "蟹堡王。" * 1500},
                                {"role": "user", "content": "好"}],
}
# the exporter's own check conversations: one question, two lines, a system prompt, earlier turns
CASES = dict(zip(["single", "two-lines", "system", "multi-turn", "system-multi-turn"],
                 export.template_cases(["你是谁？", "Who are you?", "美味蟹堡怎么做？"],
                                       ["我是神奇海螺。", "I am the Magic Conch."]))) | EXTRA
# Ollama joins consecutive messages of one role (collate); the tokenizers' templates do not, so
# the exporter claims nothing for these: Go and conch must still agree
GO_ONLY = {
    "two-user-messages": [{"role": "user", "content": "你好"}, {"role": "user", "content": "你是谁？"}],
    "two-system-messages": [{"role": "system", "content": SYSTEM}, {"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Who are you?"}],
}


@pytest.fixture(scope="module", params=["demo-chatml", "r1-january", "r1-february"])
def written(request, tmp_path_factory):
    """(tokenizer, Translation, the TEMPLATE as read back from the Modelfile the exporter writes)."""
    if request.param == "demo-chatml":
        tokenizer = hub.load_tokenizer(request.getfixturevalue("demo_path"))
    else:
        tokenizer = request.getfixturevalue("r1_real_tokenizers")[request.param.split("-")[1]]
    translation = export.translate_template(tokenizer)
    path = tmp_path_factory.mktemp("modelfile") / "Modelfile"
    export.write_modelfile(path, "m.gguf", translation, export.R1_SAMPLING | {"why": "test"}, "test")
    return tokenizer, translation, export.parse_modelfile(path)["template"]


@pytest.mark.parametrize("case", list(CASES) + list(GO_ONLY))
def test_exported_template_renders_as_go_and_the_tokenizer_do(written, case, go_render):
    tokenizer, translation, template = written
    messages = CASES.get(case) or GO_ONLY[case]
    ours = gotemplate.render_ollama(template, messages).encode("utf-8")
    assert go_render(template, gotemplate.ollama_data(messages)) == ours
    if case in GO_ONLY:
        return
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if translation.family == "deepseek-r1" and any(m["content"] == THINK for m in messages):
        # R1's Jinja template sends only the text after the last </think> of an earlier answer, and so does
        # the Modelfile's template (its "answer" template): the earlier reasoning is not in the prompt
        assert "用户问我是谁" not in expected and "用户问我是谁" not in ours.decode("utf-8")
    # llama.cpp adds the BOS token (translation.bos) itself; the template starts after it
    assert translation.bos + ours.decode("utf-8") == expected


def test_modelfile_system_is_rendered_alike(written, go_render):
    """A Modelfile SYSTEM (or one a user sets with /set system) becomes the first message."""
    _, _, template = written
    messages = CASES["multi-turn"]
    ours = gotemplate.render_ollama(template, messages, system=SYSTEM)
    assert go_render(template, gotemplate.ollama_data(messages, system=SYSTEM)) == ours.encode("utf-8")
    assert SYSTEM in ours


# ---------------------------------------------------------------------------------------------
# the rest of the subset conch supports


MSGS = [{"Role": "user", "Content": "你好"}, {"Role": "assistant", "Content": "我是神奇海螺。"},
        {"Role": "user", "Content": "x"}]
SUBSET = [
    ("a  {{- if .X }} x {{- else if .Y }} y {{ else }} z {{ end -}}  b", {"X": True}),
    ("a  {{- if .X }} x {{- else if .Y }} y {{ else }} z {{ end -}}  b", {"Y": "yes"}),
    ("a  {{- if .X }} x {{- else if .Y }} y {{ else }} z {{ end -}}  b", {}),
    ('{{- range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
     '{{ $i }}:{{ .Role }}{{ if and $last (ne .Role "assistant") }}!{{ end }}{{ if not $last }},{{ end }}{{ end }}',
     {"Messages": MSGS}),
    ('{{ "a\\nb\\t\\"q\\"" }}{{ `raw\\n` }}{{ or .A "dflt" }}{{ index .L 1 }}', {"L": [5, 6]}),
    ("x \n\t{{- .A -}}\n\n y{{ .B }}  {{- .C }}", {"A": "a", "B": "b", "C": "c"}),
    ("{{ $n := 0 }}{{ range .L }}{{ $n = . }}{{ end }}{{ $n }}", {"L": [1, 2, 3]}),
    ("{{ $n := 0 }}{{ if .T }}{{ $n = 7 }}{{ $m := 8 }}{{ $m }}{{ end }}{{ $n }}", {"T": True}),
    ("{{ if $x := .A }}[{{ $x }}]{{ end }}{{ if $y := .Missing }}no{{ else }}else{{ end }}", {"A": "a"}),
    ("{{ range $k, $v := .M }}{{ $k }}={{ $v }};{{ end }}", {"M": {"b": 1, "a": 2, "c": 3}}),
    ("{{ range .L }}{{ . }}{{ else }}none{{ end }}|{{ range .Missing }}x{{ end }}", {"L": []}),
    ("{{ and 1 0 }} {{ and 1 2 }} {{ or 0 \"\" \"z\" }} {{ or 0 \"\" }}. {{ not .Missing }} {{ .T }} {{ .F }}",
     {"T": True, "F": False}),
    ('{{ eq .R "system" "user" }} {{ ne .R "user" }} {{ lt 1 2 }} {{ le 2 2 }} {{ gt 1 2 }} {{ ge 3 2 }}',
     {"R": "user"}),
    ("{{ len .S }} {{ len .Messages }} {{ len .M }}", {"S": "你好 Conch", "Messages": MSGS, "M": {"a": 1}}),
    ("{{ .A.B }} {{ $.A.B }} {{ $a := .A }}{{ $a.B }} {{ index .A \"B\" }} {{ (index .L 0) }}",
     {"A": {"B": "deep"}, "L": ["first"]}),
    ("{{ len (slice .L 1) }} {{ len (slice .L 1 2) }} {{ slice .S 0 3 }} {{ slice .Z 3 }} {{ index .S 0 }}",
     {"L": [1, 2, 3], "S": "Conch", "Z": "你好"}),
    ('{{- range $i, $_ := .Messages }}{{ if eq $i 0 }}[{{ $.System }}]{{ end }}{{ .Role }}{{ end }}',
     {"Messages": MSGS, "System": "S"}),
    ("{{ if .Messages }}{{ range .Messages }}{{ if .Thinking }}T{{ end }}{{ .Content }}{{ end }}{{ end }}",
     {"Messages": [{"Role": "assistant", "Content": "c", "Thinking": ""}]}),
    # define / template, recursion, and strings sliced through a character (Go's bytes, joined in the output)
    ('{{ define "t" }}<{{ . }}>{{ end }}{{ template "t" .A }}{{ template "t" `x` }}{{ define "u" }}{{ $ }}{{ end }}'
     '{{ template "u" (slice .A 1) }}', {"A": "abc"}),
    ('{{- define "rev" }}{{ if . }}{{ slice . (len (slice . 1)) }}{{ template "rev" (slice . 0 (len (slice . 1))) }}'
     '{{ end }}{{ end }}{{ template "rev" .S }}|{{ index .S 0 }}', {"S": "ab"}),
    ('{{ $a := slice .S 0 1 }}{{ $b := slice .S 1 }}{{ len $a }} {{ eq (slice .S 0 3) "你" }} '
     '{{ lt (slice .S 0 1) "z" }} {{ gt $a "z" }}{{ $a }}{{ $b }}', {"S": "你好"}),
]


@pytest.mark.parametrize("template, data", SUBSET, ids=[f"subset{i}" for i in range(len(SUBSET))])
def test_subset_renders_as_go_does(template, data, go_render):
    assert go_render(template, data) == gotemplate.render(template, data).encode("utf-8")
