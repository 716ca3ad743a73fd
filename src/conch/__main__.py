"""The command line: ``python -m conch <stage> [--key value ...]``.

Stages: ``run`` (the whole pipeline), ``download``, ``settings``, ``chat``, ``train``, ``dpo``, ``eval``,
``merge``, ``export``, ``serve``. Every stage reads its
config dataclass from ``--config file.yaml`` and takes any of its fields as ``--key value``.
A mistake the user can fix ends in one sentence on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from .errors import ConchError


def _cmd_run(args, extra):
    from .pipeline import RunConfig, run

    from .config import load_config, parse_cli_overrides

    run(load_config(RunConfig, args.config, parse_cli_overrides(extra)))


def _cmd_download(args, extra):
    from . import hub, settings

    resolved = hub.fetch(args.model, source=args.source, cache_dir=args.cache_dir)
    print(resolved)
    print(f"settings ({settings.settings_path()}; every notebook and command reads them):\n{settings.load()}")


def _cmd_settings(args, extra):
    from . import settings

    print(settings.load())


def _cmd_chat(args, extra):
    from . import chat, hub

    model, tokenizer = chat.load(args.model, args.adapter)
    print(f"model: {args.model}" + (f" + adapter {args.adapter}" if args.adapter else "") +
          f" on {hub.pick_device()}")
    gen = chat.GenConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    if args.question:
        reply = chat.generate(model, tokenizer, args.question, gen, system=args.system)
        if reply.reasoning:
            print(f"[reasoning] {reply.reasoning}")
        print(reply.answer)
    else:
        chat.chat_loop(model, tokenizer, gen, system=args.system)


def _cmd_train(args, extra):
    from .config import load_config, parse_cli_overrides
    from .train import TrainConfig, train

    train(load_config(TrainConfig, args.config or ["configs/magic_conch_lora.yaml"], parse_cli_overrides(extra)))


def _cmd_dpo(args, extra):
    from .config import load_config, parse_cli_overrides
    from .dpo import DpoConfig, dpo

    dpo(load_config(DpoConfig, args.config or ["configs/magic_conch_dpo.yaml"], parse_cli_overrides(extra)))


def _cmd_eval(args, extra):
    from .config import load_config, parse_cli_overrides
    from .evaluate import EvalConfig, evaluate

    report = evaluate(load_config(EvalConfig, args.config, parse_cli_overrides(extra)))
    print(report.table())
    print(f"report: {report.md_path} (side by side) and {report.json_path}")


def _cmd_merge(args, extra):
    from .config import load_config, parse_cli_overrides
    from .merge import MergeConfig, merge

    result = merge(load_config(MergeConfig, args.config, parse_cli_overrides(extra)))
    print(f"merged in fp32: max logit difference vs base+adapter {result.max_logit_diff:.2e} "
          f"({result.relative_diff:.1e} relative, tolerance {result.tolerance:g})\n"
          f"saved in {result.dtype} to {result.output_dir}: {result.size_bytes / 2**20:,.0f} MiB; reloaded, its logits "
          f"drift {result.saved_drift:.1e} (relative) from base+adapter in fp32, same top token at "
          f"{result.saved_top1:.1%} of the check positions")


def _cmd_export(args, extra):
    from .config import load_config, parse_cli_overrides
    from .export import ExportConfig, export

    result = export(load_config(ExportConfig, args.config, parse_cli_overrides(extra)))
    print(result.table())
    print(f"template ({result.template_family}) checked on {result.template_cases} conversations; stop {result.stop}")
    print(f"Ollama:    cd {result.output_dir} && ollama create magic-conch -f Modelfile && ollama run magic-conch")


def _cmd_serve(args, extra):
    from .config import load_config, parse_cli_overrides
    from .serve import ServeConfig, serve

    serve(load_config(ServeConfig, args.config, parse_cli_overrides(extra)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m conch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)

    p = sub.add_parser("run", help="the whole pipeline, end to end (demo model on CPU)")
    p.add_argument("--config", default=None, help="YAML with RunConfig fields")
    p.set_defaults(func=_cmd_run, extra_ok=True)

    p = sub.add_parser("download", help="download the base model once and save the choice in conch_settings.yaml")
    p.add_argument("--model", default=None, help="auto | demo | hub id | local folder (default: auto, i.e. the "
                   "saved choice, else the 1.5B model with a CUDA GPU and demo without)")
    p.add_argument("--source", default=None, help="huggingface | mirror (hf-mirror.com) | modelscope "
                   "(default: the saved one; mirror on AutoDL, huggingface elsewhere)")
    p.add_argument("--cache-dir", default=None, help="where downloads go (default: the saved one; "
                   "/root/autodl-tmp/model-cache on AutoDL, the library's ~/.cache elsewhere)")
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser("settings", help="show the model source, cache folder and downloaded models, and where each comes from")
    p.set_defaults(func=_cmd_settings)

    p = sub.add_parser("chat", help="chat with a model in the terminal (or answer one --question)")
    p.add_argument("--model", default="auto", help="auto | demo | hub id | local or merged folder")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder to put on top")
    p.add_argument("--question", default=None, help="answer this one question and exit")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy; default: the model's")
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("train", help="LoRA fine-tuning; any TrainConfig field as --key value")
    p.add_argument("--config", action="append", default=None, help="YAML file(s); later ones override "
                   "earlier ones (default: configs/magic_conch_lora.yaml)")
    p.set_defaults(func=_cmd_train, extra_ok=True)

    p = sub.add_parser("dpo", help="preference tuning (DPO) on the merged SFT model; any DpoConfig field")
    p.add_argument("--config", action="append", default=None, help="YAML file(s); later ones override "
                   "earlier ones (default: configs/magic_conch_dpo.yaml; on CPU add configs/magic_conch_dpo_cpu.yaml)")
    p.set_defaults(func=_cmd_dpo, extra_ok=True)

    p = sub.add_parser("eval", help="base vs fine-tuned on the held-out set; any EvalConfig field as --key value")
    p.add_argument("--config", default=None)
    p.set_defaults(func=_cmd_eval, extra_ok=True)

    p = sub.add_parser("merge", help="merge the LoRA adapter into the base model; --base_model --adapter --output_dir")
    p.add_argument("--config", default=None)
    p.set_defaults(func=_cmd_merge, extra_ok=True)

    p = sub.add_parser("export", help="the merged model as GGUF + Ollama Modelfile, verified; any ExportConfig field")
    p.add_argument("--config", default=None)
    p.set_defaults(func=_cmd_export, extra_ok=True)

    p = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible); any ServeConfig field")
    p.add_argument("--config", default=None)
    p.set_defaults(func=_cmd_serve, extra_ok=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "extra_ok", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args, extra)
    except ConchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
