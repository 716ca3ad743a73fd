"""The command line: ``python -m conch <stage> [--key value ...]``.

Stages: ``run`` (the whole pipeline), ``download``, ``chat``, ``train``. Every stage reads its
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
    from . import hub

    resolved = hub.resolve(args.model, source=args.source, cache_dir=args.cache_dir)
    print(resolved)


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

    train(load_config(TrainConfig, args.config, parse_cli_overrides(extra)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m conch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)

    p = sub.add_parser("run", help="the whole pipeline, end to end (demo model on CPU)")
    p.add_argument("--config", default=None, help="YAML with RunConfig fields")
    p.set_defaults(func=_cmd_run, extra_ok=True)

    p = sub.add_parser("download", help="resolve/download a base model and print its local folder")
    p.add_argument("--model", default=None, help="auto | demo | hub id | local folder (default: auto)")
    p.add_argument("--source", default=None, help="huggingface (default) | modelscope")
    p.add_argument("--cache-dir", default=None, help="where downloads go (default: $HF_HOME)")
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser("chat", help="chat with a model in the terminal (or answer one --question)")
    p.add_argument("--model", default="auto", help="auto | demo | hub id | local or merged folder")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder to put on top")
    p.add_argument("--question", default=None, help="answer this one question and exit")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy; default: the model's")
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("train", help="LoRA fine-tuning; any TrainConfig field as --key value")
    p.add_argument("--config", default="configs/magic_conch_lora.yaml")
    p.set_defaults(func=_cmd_train, extra_ok=True)
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
