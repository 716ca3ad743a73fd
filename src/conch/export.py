"""Stage 6b: the merged model as GGUF for Ollama and llama.cpp, verified before it is kept.

``export(ExportConfig)`` converts the merged folder with llama.cpp's own converter
(``convert_hf_to_gguf.py``, taken from the pinned ``llama-cpp-python`` sdist on PyPI; nothing
is compiled) into one GGUF per ``outtypes`` (f16 and q8_0 by default) and writes an Ollama
``Modelfile`` whose ``FROM`` is the f16 GGUF by default (``modelfile_outtype``: f16 answers as the
merged model does, in llama.cpp too; q8_0 is half the size, see `Q8_0_NOTE`): the model's real
chat template translated to Ollama's Go template (earlier answers without their ``<think>``
reasoning, as R1's own template sends them: `R1_ANSWER`), its stop
token and sampling that follows the model (R1's recommendation for a reasoning model, else its
generation_config's values, else none: `sampling_parameters`). Then it checks, and keeps the
export only if every check passes:

- the template: for several conversations (one question, a system prompt, earlier turns) the
  Modelfile's TEMPLATE, rendered as Ollama renders it (``conch.gotemplate``), plus the BOS that
  llama.cpp adds, is exactly the prompt the tokenizer's chat template builds;
- the GGUF's tokenizer: the same vocabulary, the same BOS/EOS ids, the stop token is the EOS
  llama.cpp stops at, and the Jinja template embedded for ``llama-server --jinja`` is the
  tokenizer's own;
- the weights: every GGUF loaded back with transformers answers the held-out questions greedily
  (the share of whole answers identical to the merged model's is reported); teacher-forced on
  the merged model's answers, its top token must agree at ``MIN_TOP1`` of the positions and its
  largest logit difference stay under ``MAX_DRIFT`` for its type. This runs the GGUF's weights,
  dequantized, in transformers: for q8_0 it measures the rounding of the weights, not llama.cpp's
  q8_0 kernels, and does not predict llama.cpp's answers (`Q8_0_NOTE`).

Everything is written to ``<output_dir>.tmp`` and renamed when complete: a failed check or a
crash leaves no half export. q4_k_m needs llama.cpp's compiled ``llama-quantize``; it is used
when it is on PATH and refused with one sentence when it is not (it is not on this project's CI).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ConchError
from .paths import repo_root, staged

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist that carries llama.cpp's converter and its gguf-py
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CONVERTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # what convert_hf_to_gguf.py writes itself
QUANTIZER_OUTTYPES = {"q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q4_0": "Q4_0"}  # need llama-quantize

# What each GGUF type must reach, teacher-forced on the merged model's greedy answers: the share
# of answer positions where its top token is the merged model's (MIN_TOP1), and the largest logit
# difference relative to the largest logit (MAX_DRIFT). f16 rounds every weight to 11 mantissa
# bits, q8_0 to 8-bit integers in blocks of 32 with one f16 scale: small drifts, but enough to
# tip a near-tie between two tokens, after which a free-running answer takes another path. So the
# share of whole answers identical is reported, not required: on the untuned demo model q8_0
# kept 38% of 40 answers identical (48 tokens) with a relative drift of 0.054. A broken
# conversion (wrong tensors, vocabulary or norms) misses both limits by far.
MIN_TOP1 = {"f32": 0.999, "f16": 0.99, "bf16": 0.97, "q8_0": 0.95, "q4_k_m": 0.85, "q5_k_m": 0.9, "q4_0": 0.8}
MAX_DRIFT = {"f32": 1e-4, "f16": 0.02, "bf16": 0.05, "q8_0": 0.1, "q4_k_m": 0.3, "q5_k_m": 0.25, "q4_0": 0.4}

# What the q8_0 answer check does and does not tell, printed with the check and written in the Modelfile
# when it uses q8_0. Measured outside this project with llama.cpp itself (greedy, the held-out questions
# of the tuned model): its q8_0 answers differed from the merged model's on more than half of the
# questions, while f16's matched; transformers' q8_0 check had reported far higher agreement.
Q8_0_NOTE = ("the q8_0 check runs q8_0-rounded weights in transformers (dequantized to float32): it measures "
             "the rounding of the weights, not llama.cpp's q8_0 kernels (8-bit activations and dot products), "
             "and does not predict the answers llama.cpp gives: measured with llama.cpp, q8_0 answers differed "
             "from the merged model's on more than half of the questions, f16 matched. f16 is the Modelfile's "
             "default; choose q8_0 (half the size) knowingly with modelfile_outtype q8_0 "
             "(--modelfile_outtype q8_0) and compare its answers in Ollama or llama.cpp itself.")

R1_SAMPLING = {"temperature": 0.6, "top_p": 0.95}  # DeepSeek-R1's recommended defaults, for reasoning models only


@dataclass
class ExportConfig:
    merged_dir: str = "outputs/magic_conch_merged"
    output_dir: str = "outputs/magic_conch_gguf"
    format: str = "gguf"
    outtypes: list[str] = field(default_factory=lambda: ["f16", "q8_0"])
    # the GGUF the Modelfile's FROM names: f16, the one that answers as the merged model does in llama.cpp;
    # q8_0 is half the size, but its check here does not predict llama.cpp's answers (Q8_0_NOTE)
    modelfile_outtype: str = "f16"
    model_name: str = "magic-conch"
    eval_dataset: str = "magic_conch_eval"  # held-out questions for the answer check
    dataset_dir: str = "data"
    max_questions: int | None = None  # None: all of them
    max_new_tokens: int = 48
    batch_size: int = 8


@dataclass
class TypeCheck:
    outtype: str
    file: str
    size_bytes: int
    convert_seconds: float
    identical: float  # share of greedy answers identical to the merged model's (reported)
    top1: float  # teacher-forced: share of answer positions with the merged model's top token (checked)
    max_drift: float  # largest |logit difference| / largest |logit|
    max_abs_drift: float
    different: list  # (question, merged answer, GGUF answer) where they differ


@dataclass
class ExportResult:
    output_dir: Path
    modelfile: Path
    files: dict  # file name -> bytes
    template_family: str
    stop: list
    parameters: dict
    checks: list  # TypeCheck per outtype
    template_cases: int
    seconds: float
    modelfile_outtype: str = "f16"

    def table(self) -> str:
        rows = ["| GGUF | size | converted in | top token as merged | whole answers identical "
                "| worst logit drift (relative) |",
                "|---|---:|---:|---:|---:|---:|"]
        for c in self.checks:
            rows.append(f"| {c.file} | {c.size_bytes / 2**20:,.0f} MiB | {c.convert_seconds:.0f} s | {c.top1:.1%} | "
                        f"{c.identical:.0%} | {c.max_abs_drift:.3g} ({c.max_drift:.1e}) |")
        modelfile = next((name for name in self.files if name.endswith(f"-{self.modelfile_outtype}.gguf")),
                         self.modelfile_outtype)
        rows.append(f"\nthe Modelfile's FROM: {modelfile}")
        if any(c.outtype == "q8_0" for c in self.checks):
            rows.append("note: " + Q8_0_NOTE)
        return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# llama.cpp's converter, fetched once from PyPI


def converter_dir() -> Path:
    """Where the converter lives: ``$CONCH_LLAMA_CPP`` or ``<repo>/.cache/llama.cpp-<version>`` (git-ignored)."""
    return Path(os.environ.get("CONCH_LLAMA_CPP") or repo_root() / ".cache" / f"llama.cpp-{LLAMA_CPP_PYTHON}")


def _has_converter(folder: Path) -> bool:
    return (folder / "convert_hf_to_gguf.py").is_file() and (folder / "gguf-py" / "gguf").is_dir() \
        and (folder / "conversion").is_dir()


def ensure_converter(folder: str | Path | None = None) -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py`` with its ``conversion/`` and ``gguf-py/``, fetched once.

    ``pip download`` takes the pinned ``llama-cpp-python`` sdist (77 MB) from PyPI, its sha256 is
    checked, and only the converter (about 2 MB of Python) is extracted; llama.cpp itself is not
    compiled. Written to a temporary folder and renamed, like every other output.
    """
    folder = Path(folder or converter_dir())
    if _has_converter(folder):
        return folder
    if os.environ.get("CONCH_LLAMA_CPP"):
        raise ConchError(f"CONCH_LLAMA_CPP={folder} holds no convert_hf_to_gguf.py with conversion/ and gguf-py/; "
                         "point it at a llama.cpp checkout or unset it to fetch the converter from PyPI.")
    print(f"fetching llama.cpp's converter once: llama-cpp-python=={LLAMA_CPP_PYTHON} sdist from PyPI ...")
    started = time.time()
    with tempfile.TemporaryDirectory() as download:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", download]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(download).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode or not sdists:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
            raise ConchError(f"could not download llama-cpp-python=={LLAMA_CPP_PYTHON} from PyPI ({last}); check the "
                             "connection to PyPI (or PIP_INDEX_URL) and run `make gguf-converter` again.")
        digest = hashlib.sha256(sdists[0].read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise ConchError(f"{sdists[0].name} has sha256 {digest}, not the pinned {SDIST_SHA256}; the index "
                             "served a different file: use PyPI itself (unset PIP_INDEX_URL) and try again.")
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        keep = ("convert_hf_to_gguf.py", "LICENSE", "conversion/", "gguf-py/gguf/", "gguf-py/LICENSE")
        with staged(folder) as tmp, tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(keep)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(tmp, members=members, filter="data")
    print(f"converter ready in {folder} ({time.time() - started:.0f} s)")
    return folder


def converter_env(converter: Path) -> dict:
    """The converter needs its own, newer gguf-py (the PyPI gguf lacks the constants it writes): first on the path."""
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    env["PYTHONPATH"] = os.pathsep.join([str(converter / "gguf-py"), str(converter)] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _quantizer(outtype: str) -> str:
    quantizer = shutil.which("llama-quantize")
    if quantizer is None:
        raise ConchError(f"outtype {outtype} needs llama.cpp's compiled llama-quantize on PATH, which this machine "
                         f"does not have; export f16 here and run `llama-quantize model-f16.gguf "
                         f"model-{outtype}.gguf {QUANTIZER_OUTTYPES[outtype]}` where llama.cpp is installed, "
                         "or drop it from outtypes.")
    return quantizer


def convert(merged_dir: Path, outfile: Path, outtype: str, converter: Path) -> float:
    """Run ``convert_hf_to_gguf.py`` (or ``llama-quantize`` for k-quants) and return the seconds it took."""
    started = time.time()
    if outtype in QUANTIZER_OUTTYPES:
        quantizer = _quantizer(outtype)
        source = outfile.with_name(outfile.name.replace(outtype, "f16"))
        if not source.exists():
            convert(merged_dir, source, "f16", converter)
        cmd = [quantizer, str(source), str(outfile), QUANTIZER_OUTTYPES[outtype]]
        env = None
    else:
        cmd = [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(merged_dir), "--outtype", outtype,
               "--outfile", str(outfile)]
        env = converter_env(converter)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode or not outfile.exists():
        lines = [ln for ln in (proc.stderr + proc.stdout).strip().splitlines() if ln.strip()]
        raise ConchError(f"converting {merged_dir} to {outtype} failed: {(lines or ['no output'])[-1][:300]}; "
                         "check that the folder is a complete merged model (python -m conch merge).")
    return time.time() - started


# ---------------------------------------------------------------------------------------------
# the chat template, translated to Ollama's Go template


@dataclass
class Translation:
    family: str  # "chatml" or "deepseek-r1"
    template: str  # the Go template for the Modelfile
    bos: str  # the text the Jinja template starts with that llama.cpp adds as a token ("" if none)
    stop: list  # stop strings for the Modelfile


def _hf(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# DeepSeek-R1's chat template keeps of an earlier answer only the text after its last </think>
# (content.split('</think>')[-1]), in both its January and February 2025 revisions. Ollama's template
# functions are Go's text/template builtins (and `json`): no split, no strings.Index, and on the
# Go before 1.22 that the tests build with no range over an integer either. A template that calls
# itself can do it: "answer" is given the answer and, one byte shorter each call, its prefixes; it
# stops at the prefix that ends with </think> (or at the empty one) and, on the way back, writes the
# byte each call took off, that is the text after the last </think>, or all of it where there is
# none. Byte by byte, as Go slices strings; Go's limit of 100000 nested template calls bounds it at
# 100000 bytes after the last </think> of one earlier answer (all of it where there is none; about
# 30000 Chinese characters): a longer one makes Ollama refuse the request rather than cut it short.
# (Ollama strips earlier reasoning itself only for models named deepseek-r1 or of the qwen3 family.)
R1_ANSWER = ('{{- define "answer" }}{{ if and (ge (len .) 8) (eq (slice . (len (slice . 8))) "</think>") }}'
             '{{ else if . }}{{ template "answer" (slice . 0 (len (slice . 1))) }}{{ slice . (len (slice . 1)) }}'
             '{{ end }}{{ end }}\n')


def translate_template(tokenizer) -> Translation:
    """Recognise the tokenizer's chat template and write its Ollama equivalent.

    The pieces (a default system prompt, the generation prompt, the end of an answer) are read
    from what the Jinja template renders for probe messages, not assumed; ``check_template``
    then compares whole conversations.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConchError("the merged model's tokenizer has no chat template; export from an instruct/chat model "
                         "(its tokenizer_config.json or chat_template.jinja must define one).")
    one = _hf(tokenizer, [{"role": "user", "content": "Q1"}])
    two = _hf(tokenizer, [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                          {"role": "user", "content": "Q2"}])
    if "<|im_start|>user\nQ1<|im_end|>" in one:
        head = one[:one.index("<|im_start|>user\nQ1")]
        default = re.fullmatch(r"<\|im_start\|>system\n(.*)<\|im_end\|>\n", head, re.S)
        if head and not default:
            raise ConchError(f"the ChatML template puts {head!r} before the first question, which conch cannot "
                             "translate; write the Modelfile's TEMPLATE by hand.")
        first = ("{{- if and (eq $i 0) (ne .Role \"system\") }}<|im_start|>system\n" + default.group(1) +
                 "<|im_end|>\n{{ end }}") if default else ""
        template = ("{{- range $i, $_ := .Messages }}\n" + first +
                    "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n")
        return Translation("chatml", template, "", ["<|im_end|>"])
    user, assistant = "<｜User｜>", "<｜Assistant｜>"
    if user + "Q1" in one and assistant in one:
        bos = one[:one.index(user)]
        generation = one[one.index("Q1") + 2:]
        turn_end = two[two.index("A1") + 2:two.index(user + "Q2")]
        if not generation.startswith(assistant) or not turn_end:
            raise ConchError("the DeepSeek-R1 template has an unexpected generation prompt; write the Modelfile's "
                             "TEMPLATE by hand.")
        template = (R1_ANSWER + "{{- if .System }}{{ .System }}{{ end }}\n{{- range .Messages }}\n"
                    "{{- if eq .Role \"user\" }}" + user + "{{ .Content }}\n"
                    "{{- else if eq .Role \"assistant\" }}" + assistant + "{{ template \"answer\" .Content }}" +
                    turn_end + "\n{{- end }}\n{{- end }}" + generation)
        return Translation("deepseek-r1", template, bos, [turn_end.strip()])
    raise ConchError("the merged model's chat template is neither ChatML nor DeepSeek-R1's; conch translates only "
                     "these two to Ollama: write the Modelfile's TEMPLATE by hand.")


def template_cases(questions: list[str], answers: list[str]) -> list[list[dict]]:
    """Conversations the template check renders both ways: plain, with a system prompt, multi-turn."""
    q = (questions + ["你是谁？", "Who are you?", "美味蟹堡怎么做？"])[:3]
    a = (answers + ["我是神奇海螺。", "I am the Magic Conch."])[:2]
    system = "你是神奇海螺，蟹堡王的智能助手。"
    return [
        [{"role": "user", "content": q[0]}],
        [{"role": "user", "content": "Who are you?\nAnswer in one line."}],
        [{"role": "system", "content": system}, {"role": "user", "content": q[1]}],
        [{"role": "user", "content": q[0]}, {"role": "assistant", "content": a[0]}, {"role": "user", "content": q[1]}],
        [{"role": "system", "content": system}, {"role": "user", "content": q[0]},
         {"role": "assistant", "content": a[0]}, {"role": "user", "content": q[1]},
         {"role": "assistant", "content": a[1]}, {"role": "user", "content": q[2]}],
    ]


def check_template(tokenizer, modelfile: Path, cases: list[list[dict]], add_bos: bool, bos_text: str) -> int:
    """Render every case with the Modelfile's TEMPLATE (as Ollama does) and with the tokenizer; raise if any differ."""
    from . import gotemplate

    parsed = parse_modelfile(modelfile)
    for messages in cases:
        expected = _hf(tokenizer, messages)
        got = (bos_text if add_bos else "") + gotemplate.render_ollama(parsed["template"], messages,
                                                                      parsed.get("system"))
        if got != expected:
            at = next((i for i, (x, y) in enumerate(zip(got, expected)) if x != y), min(len(got), len(expected)))
            raise ConchError(f"the Modelfile's template renders {got[max(0, at - 20):at + 30]!r} where the tokenizer's "
                             f"chat template renders {expected[max(0, at - 20):at + 30]!r} (character {at}, "
                             f"{len(messages)} messages); nothing was exported.")
    return len(cases)


def write_modelfile(path: Path, gguf_name: str, translation: Translation, parameters: dict, source: str,
                    model_name: str = "magic-conch", outtype: str | None = None) -> None:
    if '"""' in translation.template:
        raise ConchError('the translated template contains """, which a Modelfile cannot quote.')
    lines = [f"# Ollama Modelfile written by `python -m conch export` from {source}",
             f"# ollama create {model_name} -f Modelfile && ollama run {model_name}"]
    if outtype == "q8_0":
        lines += ["# q8_0, chosen over f16 (modelfile_outtype): half the size, but note that " + Q8_0_NOTE]
    elif outtype:
        lines += [f"# {outtype}: f16 answers as the merged model does, in llama.cpp too; q8_0 is half the size "
                  "(modelfile_outtype q8_0), but conch's q8_0 check does not predict llama.cpp's q8_0 answers "
                  "(see export.json and the export's printed note)"]
    lines += [f"FROM ./{gguf_name}",
             f"# the tokenizer's chat template ({translation.family}) as Ollama's Go template, checked by conch" +
             (": earlier answers are sent without their <think> reasoning (only the text after the last </think>), "
              "as the tokenizer's template does" if translation.family == "deepseek-r1" else ""),
             f'TEMPLATE """{translation.template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in translation.stop]
    lines += [f"# {parameters['why']}"] + [f"PARAMETER {k} {v}" for k, v in parameters.items() if k != "why"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def parse_modelfile(path: Path) -> dict:
    """FROM, TEMPLATE, SYSTEM and PARAMETERs as Ollama's parser reads them (triple quotes kept verbatim)."""
    text = path.read_text(encoding="utf-8")
    out: dict = {"parameters": {}, "stop": []}
    for m in re.finditer(r'^(\w+) ("""(.*?)"""|"([^"\n]*)"|([^\n]*))$', text, re.M | re.S):
        name, value = m.group(1).lower(), next(g for g in m.groups()[2:] if g is not None)
        if name == "parameter":
            key, _, raw = value.partition(" ")
            raw = raw.strip()
            raw = raw[1:-1] if raw.startswith('"') and raw.endswith('"') else raw
            (out["stop"].append(raw) if key == "stop" else out["parameters"].__setitem__(key, raw))
        elif name in ("from", "template", "system"):
            out[name] = value
    return out


SAMPLING_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "repetition_penalty": "repeat_penalty"}  # generation_config.json name -> Ollama PARAMETER


def sampling_parameters(merged_dir: Path, tokenizer=None) -> dict:
    """The Modelfile's sampling PARAMETERs, following the model, with ``why`` (the comment above them).

    A reasoning model (told from its chat template, `conch.reasoning.is_reasoning_model`): DeepSeek-R1's
    recommendation, temperature 0.6 and top_p 0.95 (lower and it repeats itself, higher and it rambles).
    Any other model: the sampling values in its own generation_config.json; without any, no sampling
    lines at all, so Ollama's defaults apply.
    """
    from .reasoning import is_reasoning_model

    if tokenizer is None:
        from .hub import load_tokenizer

        tokenizer = load_tokenizer(merged_dir)
    if is_reasoning_model(tokenizer):
        return {"why": "sampling: DeepSeek-R1's recommendation for a reasoning model (its chat template thinks in "
                       "<think>...</think>)", **R1_SAMPLING}
    file = Path(merged_dir) / "generation_config.json"
    gen = json.loads(file.read_text(encoding="utf-8")) if file.exists() else {}
    own = {ollama: gen[key] for key, ollama in SAMPLING_KEYS.items() if gen.get(key) is not None}
    if own:
        return {"why": f"sampling: the model's own, from its {file.name}", **own}
    return {"why": f"no sampling parameters: not a reasoning model and its {file.name} sets none, so Ollama's "
                   "defaults apply"}


def ollama_commands(output_dir: str | Path, model_name: str) -> str:
    """The shell line that loads the export into Ollama under ``model_name`` and starts a chat."""
    return f"cd {output_dir} && ollama create {model_name} -f Modelfile && ollama run {model_name}"


# ---------------------------------------------------------------------------------------------
# what the GGUF says about its tokenizer


def gguf_metadata(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def value(key, default=None):
        f = reader.fields.get(key)
        return f.contents() if f is not None else default

    return {"tokens": value("tokenizer.ggml.tokens", []), "bos": value("tokenizer.ggml.bos_token_id"),
            "eos": value("tokenizer.ggml.eos_token_id"), "add_bos": bool(value("tokenizer.ggml.add_bos_token", False)),
            "chat_template": value("tokenizer.chat_template"), "architecture": value("general.architecture"),
            "tensors": len(reader.tensors)}


def check_gguf_tokenizer(meta: dict, tokenizer, translation: Translation, name: str) -> None:
    """Vocabulary, BOS/EOS, stop token and embedded template of the GGUF against the HF tokenizer."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    tokens = meta["tokens"]
    bad = next((i for i, t in enumerate(vocab) if i >= len(tokens) or tokens[i] != t), None)
    if bad is not None:
        raise ConchError(f"{name}: token {bad} is {tokens[bad] if bad < len(tokens) else 'missing'!r} in the GGUF but "
                         f"{vocab[bad]!r} in the tokenizer; nothing was exported.")
    stop_ids = [tokenizer.convert_tokens_to_ids(s) for s in translation.stop]
    if meta["eos"] not in stop_ids:
        raise ConchError(f"{name}: llama.cpp would stop at token {meta['eos']} ({tokens[meta['eos']]!r}) "
                         f"but answers end with {translation.stop}; the model would not stop. Fix eos_token in the "
                         "merged tokenizer_config.json and export again.")
    if translation.bos and (not meta["add_bos"] or tokens[meta["bos"]] != translation.bos):
        raise ConchError(f"{name}: the chat template starts with {translation.bos!r} but the GGUF does not add it "
                         "as BOS; nothing was exported.")
    if not translation.bos and meta["add_bos"]:
        raise ConchError(f"{name}: the GGUF adds a BOS token ({tokens[meta['bos']]!r}) that the chat template does "
                         "not have; nothing was exported.")
    if meta["chat_template"] != tokenizer.chat_template:
        raise ConchError(f"{name}: the Jinja template embedded for llama-server --jinja differs from the tokenizer's; "
                         "nothing was exported.")


# ---------------------------------------------------------------------------------------------
# answers and logits: merged model vs each GGUF


def _answers_and_logits(model, tokenizer, prompts, answers_text, gen, batch_size):
    """Greedy answers to ``prompts`` and, teacher-forced, the logits over prompt + ``answers_text``
    (with the number of prompt tokens, so the answer positions can be told apart)."""
    import torch

    from . import chat

    replies = []
    for i in range(0, len(prompts), batch_size):
        replies += chat.generate(model, tokenizer, prompts[i:i + batch_size], gen)
    texts = [r.text for r in replies]
    logits = []
    with torch.inference_mode():
        for messages, answer in zip(prompts, answers_text or texts):
            prompt = chat.render_prompt(tokenizer, messages)
            ids = tokenizer(prompt + answer, return_tensors="pt", add_special_tokens=False).to(model.device)
            n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            logits.append((model(**ids).logits.float().cpu()[0], n_prompt))
    return texts, logits


def load_gguf(folder: Path, name: str):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # transformers' GGUF loader shows a bar per file through tqdm directly
    try:
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before


def export(cfg: ExportConfig) -> ExportResult:
    """Convert ``cfg.merged_dir`` to GGUF + Modelfile in ``cfg.output_dir``, verified; nothing half on failure."""
    import torch

    from . import chat, data, hub
    from .device import Device, pick_device

    started = time.time()
    if cfg.format != "gguf":
        raise ConchError(f"export format '{cfg.format}' is unknown; the only format is gguf.")
    outtypes = list(dict.fromkeys(t.lower() for t in cfg.outtypes))
    unknown = [t for t in outtypes if t not in CONVERTER_OUTTYPES and t not in QUANTIZER_OUTTYPES]
    if not outtypes or unknown:
        raise ConchError(f"outtypes {unknown or outtypes} must be among "
                         f"{', '.join(CONVERTER_OUTTYPES + tuple(QUANTIZER_OUTTYPES))}.")
    if cfg.modelfile_outtype not in outtypes:
        raise ConchError(f"modelfile_outtype '{cfg.modelfile_outtype}' is not among outtypes {outtypes}; add it or "
                         "pick one of them.")
    merged = Path(cfg.merged_dir)
    if not (merged / "config.json").exists() or not any(merged.glob("*.safetensors")):
        raise ConchError(f"{merged} is not a merged model folder (config.json and *.safetensors); run "
                         "`python -m conch merge` (notebook 06) first.")
    for t in outtypes:  # refuse early what cannot be made here, before minutes of work
        if t in QUANTIZER_OUTTYPES:
            _quantizer(t)
    converter = ensure_converter()
    tokenizer = hub.load_tokenizer(merged)
    translation = translate_template(tokenizer)
    records = data.load_records(cfg.eval_dataset, cfg.dataset_dir, max_samples=cfg.max_questions)
    prompts = [m[:-1] for m in records]
    parameters = sampling_parameters(merged, tokenizer)

    out = Path(cfg.output_dir)
    with staged(out) as tmp:
        files, seconds = {}, {}
        for t in outtypes:
            files[t] = f"{cfg.model_name}-{t}.gguf"
            print(f"converting {merged} to {t} ...", flush=True)
            seconds[t] = convert(merged, tmp / files[t], t, converter)
        modelfile = tmp / "Modelfile"
        write_modelfile(modelfile, files[cfg.modelfile_outtype], translation, parameters, str(merged),
                        cfg.model_name, cfg.modelfile_outtype)
        # one parse of each GGUF's header serves its metadata, config and weights (hub.gguf_parsed_once)
        with hub.gguf_parsed_once():
            metas = {t: gguf_metadata(tmp / files[t]) for t in outtypes}
            for t in outtypes:
                check_gguf_tokenizer(metas[t], tokenizer, translation, files[t])
            meta = metas[cfg.modelfile_outtype]
            cases = template_cases([m[-1]["content"] for m in prompts], [m[-1]["content"] for m in records])
            n_cases = check_template(tokenizer, modelfile, cases, meta["add_bos"],
                                     meta["tokens"][meta["bos"]] if meta["bos"] is not None else "")

            print(f"template checked on {n_cases} conversations; answering {len(prompts)} held-out questions with the "
                  f"merged model and each GGUF ...", flush=True)
            gen = chat.GenConfig(max_new_tokens=cfg.max_new_tokens, temperature=0)
            # both sides in float32 (transformers dequantizes a GGUF to it), so the drift is the GGUF's alone
            device = pick_device().device
            model, _ = hub.load_model(merged, Device(device, torch.float32, "the GGUF check"))
            reference, ref_logits = _answers_and_logits(model, tokenizer, prompts, None, gen, cfg.batch_size)
            del model
            checks = []
            for t in outtypes:
                model = load_gguf(tmp, files[t]).to(device)
                texts, logits = _answers_and_logits(model, tokenizer, prompts, reference, gen, cfg.batch_size)
                del model
                abs_drift = max((a - b).abs().max().item() for (a, _), (b, _) in zip(ref_logits, logits))
                scale = max(a.abs().max().item() for a, _ in ref_logits)
                same = sum(a == b for a, b in zip(reference, texts)) / len(reference)
                agree = [(a[n - 1:-1].argmax(-1) == b[n - 1:-1].argmax(-1))
                         for (a, n), (b, _) in zip(ref_logits, logits)]
                top1 = sum(x.sum().item() for x in agree) / max(sum(len(x) for x in agree), 1)
                checks.append(TypeCheck(t, files[t], (tmp / files[t]).stat().st_size, seconds[t], same, top1,
                                        abs_drift / max(scale, 1.0), abs_drift,
                                        [(p[-1]["content"], a, b)
                                         for p, a, b in zip(prompts, reference, texts) if a != b]))
        for c in checks:
            if c.top1 < MIN_TOP1[c.outtype] or not c.max_drift <= MAX_DRIFT[c.outtype]:
                raise ConchError(f"{c.file} picks the merged model's top token at {c.top1:.1%} of the answer positions "
                                 f"(at least {MIN_TOP1[c.outtype]:.0%} expected) with a relative logit drift of "
                                 f"{c.max_drift:.2g} (at most {MAX_DRIFT[c.outtype]:g}); nothing was written to {out}. "
                                 "Export f16 to see whether quantization is the cause.")
        report = {"merged_dir": str(merged), "llama_cpp_python": LLAMA_CPP_PYTHON,
                  "template_family": translation.family, "template_cases": n_cases, "stop": translation.stop,
                  "parameters": parameters, "modelfile": files[cfg.modelfile_outtype],
                  "checks": [asdict(c) for c in checks], "questions": len(prompts)}
        if "q8_0" in outtypes:
            report["q8_0_note"] = Q8_0_NOTE
        (tmp / "export.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    return ExportResult(out, out / "Modelfile", sizes, translation.family, translation.stop, parameters, checks,
                        n_cases, time.time() - started, cfg.modelfile_outtype)
