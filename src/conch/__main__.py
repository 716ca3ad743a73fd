"""The command line: ``python -m conch <stage> [--key value ...]``.

Stages: ``run`` (the whole pipeline), ``download``, ``settings``, ``chat``, ``train``, ``dpo``, ``eval``,
``merge``, ``export``, ``serve``. Every stage that has a config dataclass reads it from
``--config file.yaml`` and takes any of its fields as ``--key value``.

One dialect: options are spelled with underscores (``--max_new_tokens``); the dashed spelling
(``--max-new-tokens``) is accepted everywhere as an alias. The stages are one table, `STAGES`
(as litgpt's CLI lists its commands): each `Stage` names its handler, its config dataclass, its
own options and its help. A mistake the user can fix ends in one sentence on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

from .config import field_names
from .errors import ConchError

# ---------------------------------------------------------------------------------------------
# the handlers: each gets the parsed options (a Namespace) and the config, when the stage has one


def _cmd_run(args, cfg):
    from .pipeline import run

    run(cfg)


def _cmd_download(args, cfg):
    from . import hub, settings

    resolved = hub.fetch(args.model, source=args.source, cache_dir=args.cache_dir)
    print(resolved)
    print(f"settings ({settings.settings_path()}; every notebook and command reads them):\n{settings.load()}")


def _cmd_settings(args, cfg):
    from . import settings

    print(settings.load())


def _cmd_chat(args, cfg):
    from . import chat
    from .device import pick_device

    model, tokenizer = chat.load(args.model, args.adapter)
    print(f"model: {args.model}" + (f" + adapter {args.adapter}" if args.adapter else "") +
          f" on {pick_device()}")
    gen = chat.GenConfig(max_new_tokens=args.max_new_tokens, answer_tokens=512, temperature=args.temperature)
    if args.question:
        reply = chat.generate(model, tokenizer, args.question, gen, system=args.system)
        if reply.reasoning:
            print(f"[reasoning] {reply.reasoning}")
        print(reply.answer)
    else:
        chat.chat_loop(model, tokenizer, gen, system=args.system)


def _cmd_train(args, cfg):
    from .train import train

    train(cfg)


def _cmd_dpo(args, cfg):
    from .dpo import dpo

    dpo(cfg)


def _cmd_eval(args, cfg):
    from .evaluate import evaluate

    report = evaluate(cfg)
    print(report.table())
    print(f"report: {report.md_path} (side by side) and {report.json_path}")


def _cmd_merge(args, cfg):
    from .merge import merge

    result = merge(cfg)
    print(f"merged in fp32: max logit difference vs base+adapter {result.max_logit_diff:.2e} "
          f"({result.relative_diff:.1e} relative, tolerance {result.tolerance:g})\n"
          f"saved in {result.dtype} to {result.output_dir}: {result.size_bytes / 2**20:,.0f} MiB; reloaded, its logits "
          f"drift {result.saved_drift:.1e} (relative) from base+adapter in fp32, same top token at "
          f"{result.saved_top1:.1%} of the check positions")


def _cmd_export(args, cfg):
    from .export import export, ollama_commands

    result = export(cfg)
    print(result.table())
    print(f"template ({result.template_family}) checked on {result.template_cases} conversations; stop {result.stop}")
    print(f"Ollama:    {ollama_commands(result.output_dir, cfg.model_name)}")


def _cmd_serve(args, cfg):
    from .serve import serve

    serve(cfg)


# ---------------------------------------------------------------------------------------------
# the table of stages


@dataclass(frozen=True)
class Option:
    """An option of the stage itself (not a config field), spelled with underscores."""

    name: str
    help: str = ""
    type: Callable = str
    default: object = None
    append: bool = False


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    handler: Callable
    config: str | None = None  # "module:Class": the config dataclass; its fields are --key value options
    default_configs: tuple = ()  # YAML files read when --config is not given
    options: tuple = ()  # Option, for stages without a config dataclass (or besides it)
    multiple_configs: bool = False  # --config may be given more than once (later files override earlier ones)

    def config_class(self):
        module, _, name = self.config.partition(":")
        return getattr(importlib.import_module(f"conch.{module}"), name)

    def config_fields(self) -> list[str]:
        return field_names(self.config_class()) if self.config else []

    def option_names(self) -> list[str]:
        own = [o.name for o in self.options] + (["config"] if self.config else [])
        return own + self.config_fields()


STAGES = (
    Stage("run", "the whole pipeline, end to end (demo model on CPU); any RunConfig field as --key value",
          _cmd_run, config="pipeline:RunConfig"),
    Stage("download", "download the base model once and save the choice in conch_settings.yaml", _cmd_download,
          options=(Option("model", "auto | demo | hub id | local folder (default: auto, i.e. the saved choice, "
                                   "else the 1.5B model with a CUDA GPU and demo without)"),
                   Option("source", "huggingface | mirror (hf-mirror.com) | modelscope (default: the saved one; "
                                    "mirror on AutoDL, huggingface elsewhere)"),
                   Option("cache_dir", "where downloads go (default: the saved one; /root/autodl-tmp/model-cache "
                                       "on AutoDL, the library's ~/.cache elsewhere)"))),
    Stage("settings", "show the model source, cache folder and downloaded models, and where each comes from",
          _cmd_settings),
    Stage("chat", "chat with a model in the terminal (or answer one --question)", _cmd_chat,
          options=(Option("model", "auto | demo | hub id | local or merged folder", default="auto"),
                   Option("adapter", "a LoRA adapter folder to put on top"),
                   Option("question", "answer this one question and exit"),
                   Option("system", "a system prompt"),
                   Option("max_new_tokens", "new tokens at most (default: 512 for the answer, plus 1024 to "
                                            "think in for a reasoning model such as R1)", type=int),
                   Option("temperature", "0 = greedy; default: the model's", type=float))),
    Stage("train", "LoRA fine-tuning; any TrainConfig field as --key value", _cmd_train, config="train:TrainConfig",
          default_configs=("configs/magic_conch_lora.yaml",), multiple_configs=True),
    Stage("dpo", "preference tuning (DPO) on the merged SFT model; any DpoConfig field as --key value (on CPU: "
                 "--config configs/magic_conch_dpo.yaml --config configs/magic_conch_dpo_cpu.yaml)", _cmd_dpo,
          config="dpo:DpoConfig", default_configs=("configs/magic_conch_dpo.yaml",), multiple_configs=True),
    Stage("eval", "base vs fine-tuned on the held-out set; any EvalConfig field as --key value", _cmd_eval,
          config="evaluate:EvalConfig"),
    Stage("merge", "merge the LoRA adapter into the base model; --base_model --adapter --output_dir", _cmd_merge,
          config="merge:MergeConfig"),
    Stage("export", "the merged model as GGUF + Ollama Modelfile, verified; any ExportConfig field as --key value",
          _cmd_export, config="export:ExportConfig"),
    Stage("serve", "serve a model over HTTP (OpenAI-compatible); any ServeConfig field as --key value", _cmd_serve,
          config="serve:ServeConfig"),
)

_OPTION = re.compile(r"--[A-Za-z][A-Za-z0-9_-]*")


def normalize(argv: list[str]) -> list[str]:
    """The dashed spelling of every option as the underscore one: ``--max-new-tokens=5`` -> ``--max_new_tokens=5``."""
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        out.append(name[:2] + name[2:].replace("-", "_") + eq + value if _OPTION.fullmatch(name) else arg)
    return out


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one sentence on stderr (and exit code 2), like every other error."""

    def error(self, message):
        raise SystemExit(_usage_error(f"{message}; see `{self.prog} --help`."))


def _usage_error(sentence: str) -> int:
    print(f"error: {sentence}", file=sys.stderr)
    return 2


def build_parser(list_fields: bool = False) -> argparse.ArgumentParser:
    """The parser; ``list_fields``: name every config field in each stage's help (imports each stage's module)."""
    parser = _Parser(prog="python -m conch", description=__doc__.splitlines()[0], allow_abbrev=False,
                     epilog="Options are spelled with underscores (--max_new_tokens); dashes work too.")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="{" + ",".join(s.name for s in STAGES) + "}")
    for stage in STAGES:
        # no abbreviations: --max_new_token is a typo here as it is for a config field, not --max_new_tokens
        p = sub.add_parser(stage.name, help=stage.help, description=stage.help, allow_abbrev=False)
        for o in stage.options:
            p.add_argument(f"--{o.name}", type=o.type, default=o.default, help=o.help,
                           action="append" if o.append else "store")
        if stage.config:
            kind = stage.config.partition(":")[2]
            notes = (["may be given again: later files override earlier ones"] if stage.multiple_configs else []) + \
                ([f"default: {', '.join(stage.default_configs)}"] if stage.default_configs else [])
            p.add_argument("--config", action="append" if stage.multiple_configs else "store", default=None,
                           help=f"a YAML file with {kind} fields" + (f" ({'; '.join(notes)})" if notes else ""))
            fields = f": {', '.join('--' + n for n in stage.config_fields())}." if list_fields else "."
            p.epilog = f"Any {kind} field is an option: --field value (--flag alone means true){fields}"
        p.set_defaults(stage_entry=stage)
    return parser


def parse(argv: list[str] | None = None):
    """``argv`` -> (the `Stage`, its parsed options, its config or None); a usage mistake raises SystemExit(2)."""
    from .config import load_config, parse_cli_overrides

    argv = normalize(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser(list_fields=any(a in ("-h", "--help") for a in argv))
    args, extra = parser.parse_known_args(argv)
    stage: Stage = args.stage_entry
    fields = stage.config_fields()
    unknown = [a.partition("=")[0] for a in extra if a.startswith("--") and a[2:].partition("=")[0] not in fields]
    options = ", ".join("--" + n for n in stage.option_names()) or "none but --help"
    if extra and not extra[0].startswith("--"):
        raise SystemExit(_usage_error(f"`{parser.prog} {stage.name}` takes no argument {extra[0]!r}; options are "
                                      f"given as --key value (its options: {options})."))
    if extra and (unknown or not stage.config):
        raise SystemExit(_usage_error(f"`{parser.prog} {stage.name}` has no option {(unknown or extra)[0]}; its "
                                      f"options are: {options} (underscores or dashes, see --help)."))
    if not stage.config:
        return stage, args, None
    files = args.config if args.config is not None else list(stage.default_configs) or None
    return stage, args, load_config(stage.config_class(), files, parse_cli_overrides(extra))


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            stage, args, cfg = parse(argv)
        except SystemExit as e:  # argparse: --help (0) or a usage mistake (2), already printed
            return e.code if isinstance(e.code, int) else 2
        stage.handler(args, cfg)
    except ConchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
