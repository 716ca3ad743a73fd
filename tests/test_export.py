"""GGUF export: the Go-template renderer, the template translation and the whole verified export.

The end-to-end tests convert a small model that has the demo model's real tokenizer and ChatML
template (llama architecture, 2 layers, trained for a few seconds to answer 8 held-out
questions, so its greedy answers do not hinge on near-ties); notebook 06 converts the real
merged demo model under nbval.
"""

import json
import shutil

import pytest

from conch import chat, data, export, gotemplate, hub, reasoning
from conch.__main__ import main
from conch.errors import ConchError

# ---------------------------------------------------------------------------------------------
# the Go template subset


def test_go_template_trim_markers_and_branches():
    t = "a  {{- if .X }} x {{- else if .Y }} y {{ else }} z {{ end -}}  b"
    assert gotemplate.render(t, {"X": True}) == "a xb"
    assert gotemplate.render(t, {"Y": "yes"}) == "a y b"
    assert gotemplate.render(t, {}) == "a z b"  # missing keys are the zero value, as Ollama parses them


def test_go_template_range_variables_and_functions():
    t = ('{{- range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
         '{{ $i }}:{{ .Role }}{{ if and $last (ne .Role "assistant") }}!{{ end }}{{ if not $last }},{{ end }}{{ end }}')
    msgs = [{"Role": "user"}, {"Role": "assistant"}, {"Role": "user"}]
    assert gotemplate.render(t, {"Messages": msgs}) == "0:user,1:assistant,2:user!"
    assert gotemplate.render('{{ "a\\nb" }}{{ or .A "dflt" }}{{ index .L 1 }}', {"L": [5, 6]}) == "a\nbdflt6"


@pytest.mark.parametrize("bad", ["{{ .A | printf }}", "{{ with .A }}x{{ end }}", "{{ if .A }}x", "{{ end }}",
                                 "{{ upper .A }}"])
def test_go_template_outside_the_subset_is_refused(bad):
    with pytest.raises(ValueError):
        gotemplate.render(bad, {"A": "x"})


def test_render_ollama_collates_like_ollama():
    t = "{{ .System }}|{{ range .Messages }}{{ .Role }}={{ .Content }};{{ end }}"
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert gotemplate.render_ollama(t, msgs) == "|user=a\n\nb;"
    assert gotemplate.render_ollama(t, msgs, system="S") == "S|system=S;user=a\n\nb;"


# ---------------------------------------------------------------------------------------------
# the template translation, checked against the tokenizer


def _modelfile(tmp_path, translation, template=None):
    translation = export.Translation(translation.family, template or translation.template, translation.bos,
                                     translation.stop)
    path = tmp_path / "Modelfile"
    export.write_modelfile(path, "m.gguf", translation, export.R1_SAMPLING | {"why": "test"}, "src")
    return path


def test_r1_template_translates_and_renders_like_the_tokenizer(tiny_r1, tmp_path):
    tok = hub.load_tokenizer(tiny_r1)
    tr = export.translate_template(tok)
    assert tr.family == "deepseek-r1" and tr.bos == tok.bos_token and tr.stop == [tok.eos_token]
    assert tr.template.endswith("<｜Assistant｜><think>\n")  # the February 2025 generation prompt
    cases = export.template_cases(["你是谁？", "Who are you?", "美味蟹堡怎么做？"],
                                  ["我是神奇海螺。", "I am the Magic Conch."])
    # earlier answers with their reasoning: R1's template and the Modelfile's send only what follows </think>
    cases.append([{"role": "user", "content": "你是谁？"},
                  {"role": "assistant", "content": "<think>\n嗯。\n</think>\n\n我是神奇海螺。"},
                  {"role": "user", "content": "Who are you?"},
                  {"role": "assistant", "content": "<think>a</think>b</think>I am the Magic Conch."},
                  {"role": "user", "content": "?"}])
    path = _modelfile(tmp_path, tr)
    assert export.check_template(tok, path, cases, add_bos=True, bos_text=tok.bos_token) == len(cases)
    parsed = export.parse_modelfile(path)
    assert parsed["from"] == "./m.gguf" and parsed["stop"] == [tok.eos_token] and parsed["template"] == tr.template
    assert parsed["parameters"] == {"temperature": "0.6", "top_p": "0.95"}
    # without the BOS llama.cpp adds, the prompt is not the one the model was trained on
    with pytest.raises(ConchError, match="renders"):
        export.check_template(tok, path, cases, add_bos=False, bos_text=tok.bos_token)


def test_r1_template_leaves_out_earlier_reasoning(tiny_r1):
    template = export.translate_template(hub.load_tokenizer(tiny_r1)).template
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nwhy\n</think>\n\nA"},
                {"role": "user", "content": "Q2"}]
    prompt = gotemplate.render_ollama(template, messages)
    assert prompt.startswith("<｜User｜>Q<｜Assistant｜>\n\nA<｜end▁of▁sentence｜>") and "why" not in prompt


def test_modelfile_says_what_its_gguf_is(tmp_path):
    tr = export.Translation("chatml", "{{ .Prompt }}", "", ["<|im_end|>"])
    assert export.ExportConfig().modelfile_outtype == "f16"
    for outtype in ("f16", "q8_0"):
        path = tmp_path / f"Modelfile-{outtype}"
        export.write_modelfile(path, f"m-{outtype}.gguf", tr, {"why": "none"}, "src", "m", outtype)
        text = path.read_text(encoding="utf-8")
        assert export.parse_modelfile(path)["from"] == f"./m-{outtype}.gguf"
        assert (export.Q8_0_NOTE in text) == (outtype == "q8_0")
        assert "does not predict" in text and "half the size" in text
    check = export.TypeCheck("q8_0", "m-q8_0.gguf", 1, 1.0, 0.5, 0.99, 0.01, 0.1, [])
    result = export.ExportResult(tmp_path, tmp_path / "Modelfile", {"m-f16.gguf": 2, "m-q8_0.gguf": 1}, "chatml",
                                 [], {}, [check], 5, 1.0)
    assert "the Modelfile's FROM: m-f16.gguf" in result.table() and export.Q8_0_NOTE in result.table()


def test_chatml_default_system_prompt_is_kept(demo_path, tmp_path):
    tok = hub.load_tokenizer(demo_path)
    tr = export.translate_template(tok)
    assert tr.family == "chatml" and tr.bos == "" and tr.stop == ["<|im_end|>"]
    assert "You are a helpful AI assistant named SmolLM" in tr.template
    cases = export.template_cases(["你是谁？"], ["我是神奇海螺。"])
    assert export.check_template(tok, _modelfile(tmp_path, tr), cases, add_bos=False, bos_text="") == len(cases)
    # the usual hand-written ChatML template forgets the default system prompt: the check catches it
    plain = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
             "<|im_start|>assistant\n")
    with pytest.raises(ConchError, match="nothing was exported"):
        export.check_template(tok, _modelfile(tmp_path, tr, plain), cases, add_bos=False, bos_text="")


def test_unknown_chat_template_is_refused(tiny_r1):
    tok = hub.load_tokenizer(tiny_r1)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ConchError, match="neither ChatML nor DeepSeek-R1"):
        export.translate_template(tok)


def _sampling_lines(tmp_path, parameters):
    """The Modelfile's sampling comment and PARAMETER lines (no GGUF needed: only the text is checked)."""
    tr = export.Translation("chatml", "{{ .Prompt }}", "", ["<|im_end|>"])
    path = tmp_path / "Modelfile"
    export.write_modelfile(path, "m.gguf", tr, parameters, "src", "sandy")
    lines = path.read_text(encoding="utf-8").splitlines()
    comment = lines.index(next(ln for ln in lines if ln.startswith("PARAMETER stop"))) + 1
    return lines[comment], lines[comment + 1:], export.parse_modelfile(path)["parameters"]


def test_sampling_of_a_reasoning_model_is_r1s_recommendation(tiny_r1, tmp_path):
    params = export.sampling_parameters(tiny_r1)
    assert params | {"why": ""} == export.R1_SAMPLING | {"why": ""}
    comment, lines, parsed = _sampling_lines(tmp_path, params)
    assert comment.startswith("# sampling: DeepSeek-R1's recommendation for a reasoning model")
    assert lines == ["PARAMETER temperature 0.6", "PARAMETER top_p 0.95"]
    assert parsed == {"temperature": "0.6", "top_p": "0.95"}


def test_sampling_of_the_real_r1_tokenizer_both_template_revisions(r1_real_paths, tmp_path):
    """January's template leaves <think> to the model, February's opens it: both are reasoning models."""
    for name, folder in r1_real_paths.items():
        tok = hub.load_tokenizer(folder)
        assert reasoning.is_reasoning_model(tok), name
        gen = tmp_path / name
        gen.mkdir()
        # even where the model's own generation_config says otherwise, a reasoning model gets R1's recommendation
        (gen / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 1.0}))
        assert export.sampling_parameters(gen, tok) | {"why": ""} == export.R1_SAMPLING | {"why": ""}


def test_sampling_of_a_chat_model_without_sampling_values_is_left_to_ollama(demo_path, tmp_path):
    """The demo's ChatML model: no R1 numbers, and its generation_config.json has no sampling values."""
    tok = hub.load_tokenizer(demo_path)
    assert not reasoning.is_reasoning_model(tok)
    params = export.sampling_parameters(demo_path)
    assert list(params) == ["why"]
    comment, lines, parsed = _sampling_lines(tmp_path, params)
    assert comment.startswith("# no sampling parameters: not a reasoning model") and "Ollama's defaults" in comment
    assert lines == [] and parsed == {}
    assert "DeepSeek-R1" not in (tmp_path / "Modelfile").read_text(encoding="utf-8")


def test_sampling_of_a_chat_model_follows_its_generation_config(demo_path, tmp_path):
    tok = hub.load_tokenizer(demo_path)
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.2, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1,
         "eos_token_id": 2}))
    params = export.sampling_parameters(folder, tok)
    assert params | {"why": ""} == {"why": "", "temperature": 0.2, "top_p": 0.9, "top_k": 50, "repeat_penalty": 1.1}
    comment, _, parsed = _sampling_lines(tmp_path, params)
    assert comment == "# sampling: the model's own, from its generation_config.json"
    assert parsed == {"temperature": "0.2", "top_p": "0.9", "top_k": "50", "repeat_penalty": "1.1"}


def test_the_closing_line_names_the_model_name(monkeypatch, tmp_path, capsys):
    """`conch export --model_name sandy` ends with `ollama create sandy`, not the default name."""
    class Result:
        output_dir, template_family, template_cases, stop = tmp_path / "gguf", "chatml", 5, ["<|im_end|>"]

        def table(self):
            return "| table |"

    seen = []
    monkeypatch.setattr(export, "export", lambda cfg: seen.append(cfg) or Result())
    assert main(["export", "--model-name", "sandy", "--output_dir", str(tmp_path / "gguf")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert seen[0].model_name == "sandy"
    assert last == f"Ollama:    cd {tmp_path / 'gguf'} && ollama create sandy -f Modelfile && ollama run sandy"
    assert "magic-conch" not in last


# ---------------------------------------------------------------------------------------------
# the whole export, on a small model with the demo's tokenizer


@pytest.fixture(scope="module")
def small_merged(demo_path, tmp_path_factory):
    """A 2-layer llama with SmolLM2's tokenizer and template, trained to answer 8 held-out questions."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = hub.load_tokenizer(demo_path)
    records = data.load_records("magic_conch_eval", "data", max_samples=8)
    texts = [chat.render_prompt(tok, m[:-1]) + m[-1]["content"][:24] + "<|im_end|>" for m in records]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.5, loss.item()
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    folder = tmp_path_factory.mktemp("small_merged")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_export_from_the_command_line(small_merged, tmp_path):
    out = tmp_path / "gguf"
    code = main(["export", "--format", "gguf", "--merged_dir", str(small_merged), "--output_dir", str(out),
                 "--max_questions", "8", "--max_new_tokens", "16"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "export.json", "magic-conch-f16.gguf",
                                                     "magic-conch-q8_0.gguf"]
    assert not (tmp_path / "gguf.tmp").exists()
    report = json.loads((out / "export.json").read_text())
    assert report["template_family"] == "chatml" and report["stop"] == ["<|im_end|>"] and report["questions"] == 8
    checks = {c["outtype"]: c for c in report["checks"]}
    assert checks["f16"]["identical"] == 1.0 and checks["f16"]["top1"] == 1.0 and checks["f16"]["max_drift"] < 1e-2
    assert checks["q8_0"]["top1"] >= export.MIN_TOP1["q8_0"]
    assert checks["f16"]["max_drift"] < checks["q8_0"]["max_drift"] <= export.MAX_DRIFT["q8_0"]
    assert checks["q8_0"]["size_bytes"] < checks["f16"]["size_bytes"]
    parsed = export.parse_modelfile(out / "Modelfile")
    # f16 by default: the GGUF that answers as the merged model does in llama.cpp too; q8_0 only when asked
    assert parsed["from"] == "./magic-conch-f16.gguf" and parsed["stop"] == ["<|im_end|>"]
    assert report["modelfile"] == "magic-conch-f16.gguf" and report["q8_0_note"] == export.Q8_0_NOTE
    meta = export.gguf_metadata(out / "magic-conch-q8_0.gguf")
    assert meta["architecture"] == "llama" and meta["tokens"][meta["eos"]] == "<|im_end|>"


def test_a_failed_answer_check_leaves_nothing_half(small_merged, tmp_path, monkeypatch):
    out = tmp_path / "gguf"
    out.mkdir()
    (out / "previous.txt").write_text("an earlier, complete export")
    monkeypatch.setitem(export.MIN_TOP1, "f16", 1.01)  # no model can reach this
    cfg = export.ExportConfig(merged_dir=str(small_merged), output_dir=str(out), outtypes=["f16"],
                              modelfile_outtype="f16", max_questions=2, max_new_tokens=4)
    with pytest.raises(ConchError, match="nothing was written"):
        export.export(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"] and not (tmp_path / "gguf.tmp").exists()


def test_a_wrong_stop_token_is_caught(small_merged, tmp_path):
    """The classic Ollama failure: the GGUF's EOS is not the token the answers end with."""
    broken = tmp_path / "broken"
    shutil.copytree(small_merged, broken)
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|endoftext|>"
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    cfg = export.ExportConfig(merged_dir=str(broken), output_dir=str(tmp_path / "gguf"), outtypes=["f16"],
                              modelfile_outtype="f16", max_questions=2)
    with pytest.raises(ConchError, match="would not stop"):
        export.export(cfg)
    assert not (tmp_path / "gguf").exists() and not (tmp_path / "gguf.tmp").exists()


def test_k_quants_need_llama_quantize(small_merged, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    cfg = export.ExportConfig(merged_dir=str(small_merged), output_dir=str(tmp_path / "g"), outtypes=["f16", "q4_k_m"],
                              modelfile_outtype="f16")
    with pytest.raises(ConchError, match="llama-quantize"):
        export.export(cfg)
    assert not (tmp_path / "g").exists() and not (tmp_path / "g.tmp").exists()


@pytest.mark.parametrize("overrides, match", [
    ({"merged_dir": "nowhere"}, "not a merged model folder"),
    ({"outtypes": ["q3"]}, "must be among"),
    ({"modelfile_outtype": "f32"}, "is not among outtypes"),
    ({"format": "onnx"}, "the only format is gguf"),
])
def test_bad_settings_say_what_is_wrong(overrides, match, tmp_path):
    cfg = export.ExportConfig(output_dir=str(tmp_path / "g"), **overrides)
    with pytest.raises(ConchError, match=match):
        export.export(cfg)


def test_converter_is_the_pinned_one():
    folder = export.ensure_converter()
    assert (folder / "convert_hf_to_gguf.py").is_file() and (folder / "gguf-py" / "gguf" / "constants.py").is_file()
    import subprocess
    import sys

    # the converter needs its own, newer gguf-py, not the gguf package installed from PyPI
    used = subprocess.run([sys.executable, "-c", "import gguf; print(gguf.__file__)"], env=export.converter_env(folder),
                          capture_output=True, text=True, check=True).stdout.strip()
    assert used.startswith(str(folder / "gguf-py")), used
