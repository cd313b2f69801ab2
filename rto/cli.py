"""The `rto` command: one subcommand per stage, and `rto pipeline` for all of them.

Every subcommand takes `--config FILE.yaml` and a flag per setting; flags
override the file. Bad input ends with one line on stderr and exit code 2
(`--debug` shows the traceback). stdout carries only the command's result (JSON); logs,
progress and tables go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

# Quiet, offline-friendly defaults for the libraries underneath; a user's environment wins.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from rto import __version__  # noqa: E402
from rto.io.config import add_arguments, dashed_flags, from_sources, load_yaml  # noqa: E402
from rto.io.errors import UserError  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    from rto import COMMANDS

    parser = argparse.ArgumentParser(prog="rto", description="Reinforced Token Optimization (RTO) for RLHF.")
    parser.add_argument("--version", action="version", version=f"rto-rlhf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        summary, cls = command.summary, command.config_class()
        p = sub.add_parser(name, help=summary, description=summary)
        p.add_argument("--config", default=None, metavar="FILE.yaml", help="YAML file of settings (flags override it)")
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        p.add_argument(
            "--allow-bin-weights",
            action="store_true",
            help="also load pickle-format .bin weights (with torch.load(weights_only=True)); "
            "by default only safetensors files are loaded",
        )
        if name == "pipeline":
            p.add_argument(
                "--set",
                dest="set_values",
                action="append",
                default=[],
                metavar="SECTION.KEY=VALUE",
                help="override a stage setting, e.g. --set ppo.actor_lr=1e-5 (repeatable)",
            )
            add_arguments(
                p, cls, skip=("data", "sft", "pairs", "rm", "dpo", "ppo", "method_overrides", "eval", "tune_grid")
            )
        else:
            add_arguments(p, cls)
    return parser


def _pipeline_sets(values: list[str]) -> dict:
    """--set ppo.actor_lr=1e-5 -> {"ppo": {"actor_lr": 1e-5}} (values parsed as YAML scalars)."""
    import yaml

    out: dict = {}
    for item in values:
        key, sep, raw = item.partition("=")
        section, dot, field = key.partition(".")
        if not sep or not dot or not section or not field:
            raise UserError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        if section == "method_overrides":
            method, _, field = field.partition(".")
            out.setdefault(section, {}).setdefault(method, {})[field] = value
        else:
            out.setdefault(section, {})[field] = value
    return out


TRAINING_STACK = ("transformers", "trl", "accelerate", "peft", "datasets", "safetensors", "yaml", "tqdm")


def missing_training_stack() -> list[str]:
    """The packages of the [train] extra that cannot be imported here (a torch-only install)."""
    import importlib.util

    missing = []
    for name in TRAINING_STACK:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    from rto.runtime.distributed import exit_if_launched

    exit_if_launched(code)  # a process of a multi-process run ends here, at once
    return code


@contextlib.contextmanager
def stdout_to_stderr():
    """While a command runs, whatever it or a library writes to stdout goes to stderr instead:
    TRL's log dicts, tables, progress, a C library's own writes to file descriptor 1 and the
    output of child processes that inherit it. stdout then carries only the command's result
    (main prints it after), so a program can read it; a person sees both on a terminal."""
    sys.stdout.flush()
    try:
        out_fd, err_fd = sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stdout is not a file (a test's capture, a notebook)
        out_fd = err_fd = None
    saved = os.dup(out_fd) if out_fd is not None else None
    if saved is not None:
        os.dup2(err_fd, out_fd)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, out_fd)
            os.close(saved)


def _main(argv: list[str] | None) -> int:
    argv = dashed_flags(sys.argv[1:] if argv is None else argv)
    missing = missing_training_stack()
    if missing:
        print(
            f"rto: error: the commands need the training stack, not installed here ({', '.join(missing)}): "
            "pip install 'rto-rlhf[train]' (rto.core alone needs only torch)",
            file=sys.stderr,
        )
        return 2
    debug = "--debug" in argv
    try:
        parser = _parser()
        args = parser.parse_args(argv)
        values = {
            k: v
            for k, v in vars(args).items()
            if k not in ("command", "config", "debug", "set_values", "allow_bin_weights")
        }
        if args.allow_bin_weights:
            os.environ["RTO_ALLOW_BIN_WEIGHTS"] = "1"  # an environment variable reaches the pipeline's processes
        yaml_values = load_yaml(args.config) if args.config else {}
        from rto import STAGES
        from rto.api import command_parts

        cls, run = command_parts(args.command)
        if args.command == "pipeline":
            for section, fields in _pipeline_sets(args.set_values).items():
                merged = dict(yaml_values.get(section) or {})
                merged.update(fields)
                values[section] = merged
        cfg = from_sources(cls, yaml_values, str(args.config or ""), values)
        with stdout_to_stderr():
            result = run(cfg)
        if isinstance(result, dict) and os.environ.get("RANK", "0") == "0":  # one result per run, not per process
            import json

            # A stage's result is its summary's scalars (its curves are in OUT/metrics.json); the
            # pipeline's, tune's and reproduce's is their whole record (their tables went to stderr).
            if args.command in STAGES:
                result = {k: v for k, v in result.items() if not isinstance(v, (list, dict))}
            print(json.dumps(result, indent=2, default=str), flush=True)
        return 0
    except UserError as e:
        if debug:
            raise
        print(f"rto: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rto: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
