"""cla2: the Chinese-LLaMA-2 / Chinese-Alpaca-2 runtime. One sub-command per job; `cla2 JOB --help`
documents its flags."""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import types
import typing
from pathlib import Path

# sub-command -> module whose ``main`` runs it, in the order of the model's life cycle
COMMANDS = {
    "env": "cla2.env",
    "plan": "cla2.plan",
    "tiny": "cla2.tiny",
    "finetune": "cla2.finetune",
    "pretrain": "cla2.pretrain",
    "merge": "cla2.merge",
    "convert": "cla2.convert",
    "chat": "cla2.chat",
    "generate": "cla2.generate",
    "serve": "cla2.serve",
    "eval": "cla2.eval",
    "run": "cla2.run",
    "flags": "cla2.flags",
}


# Flags are built from each job function's signature and docstring (parsed by docstring_parser).
# jsonargparse does this too, but gives underscored flags and booleans that need a value
# (`--overwrite true`); operators and the seed's scripts use `--max-steps`, `--overwrite`.
def _unwrap(tp):
    """Optional[X] / X | None -> (X, True)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


class CommaList:
    """The type of a list flag: ``A,B,...`` -> [item(A), item(B), ...]; `cla2 flags` reports it as a list."""

    def __init__(self, item: type):
        self.item = item
        self.__name__ = f"comma-separated {getattr(item, '__name__', 'str')} list"

    def __call__(self, text: str) -> list:
        return [self.item(x) for x in text.split(",") if x]


def _add_argument(parser: argparse.ArgumentParser, name: str, tp, default, help: str, positional: bool) -> None:  # noqa: A002
    """One flag (or positional argument) of type ``tp``; ``default`` is ``inspect.Parameter.empty`` when required."""
    tp, _ = _unwrap(tp)
    kwargs: dict = {"help": help}
    required = default is inspect.Parameter.empty
    if positional:
        # def main(benchmark, /, *, ...): a positional argument, as in `cla2 eval ceval`
        flags = [name]
        if not required:
            kwargs["nargs"] = "?"
    else:
        flags = ["--" + name.replace("_", "-")]
        kwargs["dest"] = name
    if not required:
        kwargs["default"] = default
        if default not in (None, False, "") and tp is not bool:
            kwargs["help"] += f" (default: {default})"
    if tp is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(tp) is typing.Literal:
        kwargs["choices"] = list(typing.get_args(tp))
    elif typing.get_origin(tp) in (list, tuple):
        item = typing.get_args(tp)[0] if typing.get_args(tp) else str
        if positional:
            # def main(jobs: list[str], /): one or more words, as in `cla2 flags finetune eval`
            kwargs["nargs"] = "+" if required else "*"
            kwargs["type"] = item
        else:
            kwargs["type"] = CommaList(item)
            kwargs["metavar"] = "A,B,..."
    elif tp in (int, float, str, Path):
        kwargs["type"] = tp
    if not positional:
        kwargs["required"] = required
    parser.add_argument(*flags, **kwargs)


def add_function_arguments(parser: argparse.ArgumentParser, fn) -> None:
    """The flags of ``fn``: one per parameter, help from its docstring; a parameter that is a settings group
    (:mod:`cla2.settings`) gives one flag per field, help from the field, default from the parameter's default
    instance (so each job keeps its own defaults)."""
    import docstring_parser

    from cla2 import settings

    doc = docstring_parser.parse(fn.__doc__ or "")
    helps = {p.arg_name: p.description for p in doc.params}
    hints = typing.get_type_hints(inspect.unwrap(fn))
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind == param.VAR_POSITIONAL:
            # def main(*argv, ...): what follows `--` on the command line (see split_command)
            parser.epilog = f"-- {name.upper()} ...: {helps.get(name, '')}"
            continue
        if name.startswith("_") or param.kind == param.VAR_KEYWORD:
            continue
        tp = hints.get(name, str)
        if settings.is_group(tp):
            group = param.default if param.default is not inspect.Parameter.empty else tp()
            for field, ftp, fhelp in settings.fields_of(tp):
                _add_argument(parser, field, ftp, getattr(group, field), fhelp, positional=False)
            continue
        _add_argument(parser, name, tp, param.default, helps.get(name, ""),
                      positional=param.kind == param.POSITIONAL_ONLY)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: when it names a sub-command, only that job's module is imported (the
    others pull in heavy libraries such as gradio), else all of them, for the full ``--help``."""
    wanted = next((a for a in (argv or []) if not a.startswith("-")), None)
    names = [wanted] if wanted in COMMANDS else list(COMMANDS)
    parser = argparse.ArgumentParser(prog="cla2", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from cla2 import __version__

    parser.add_argument("--version", action="version", version=f"cla2 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in names:
        fn = importlib.import_module(COMMANDS[name]).main
        doc = inspect.getdoc(fn) or ""
        summary = doc.split("\n\n")[0].replace("\n", " ")
        description = doc.split("\nArgs:")[0]
        p = sub.add_parser(name, help=summary, description=description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_function_arguments(p, fn)
        p.set_defaults(_fn=fn)
    return parser


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """A job whose main takes ``*argv`` (`cla2 run ... -- CMD ARGS`) gets everything after the first ``--``
    as those arguments, untouched by argparse; for the other jobs ``--`` keeps its argparse meaning."""
    wanted = next((a for a in argv if not a.startswith("-")), None)
    if wanted not in COMMANDS or "--" not in argv[argv.index(wanted):]:
        return argv, []
    params = inspect.signature(importlib.import_module(COMMANDS[wanted]).main).parameters.values()
    if not any(p.kind == p.VAR_POSITIONAL for p in params):
        return argv, []
    i = argv.index("--", argv.index(wanted))
    return argv[:i], argv[i + 1:]


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    argv, rest = split_command(argv)
    args = vars(build_parser(argv).parse_args(argv))
    fn = args.pop("_fn")
    args_command = args.pop("command")
    positional = [args.pop(n) for n, p in inspect.signature(fn).parameters.items()
                  if p.kind == p.POSITIONAL_ONLY]
    from cla2 import settings

    try:
        fn(*positional, *rest, **settings.fold(fn, args))
    except KeyboardInterrupt:
        sys.exit(130)
    except (ValueError, OSError, RuntimeError) as exc:
        # Errors the jobs raise are written for the operator; the traceback is one variable away.
        if os.environ.get("CLA2_TRACEBACK"):
            raise
        print(f"cla2 {args_command}: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
