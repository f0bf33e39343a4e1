"""`python -m bot ...`: every command the project has, each delegated to the module that owns it."""

from __future__ import annotations

import argparse
import importlib
import sys

from bot.errors import BotError

# command path -> "module:function"; each function takes (args, settings) and returns an exit code.
COMMANDS: dict[tuple[str, ...], str] = {
    ("run",): "bot.app:cmd_run",
    ("doctor",): "bot.doctor:cmd_doctor",
    ("chat",): "bot.adapters.terminal:cmd_chat",
    ("generate",): "bot.engines.generate:cmd_generate",
    ("models", "prepare"): "bot.models.prepare:cmd_prepare",
    ("models", "eval"): "bot.models.evaluate:cmd_eval",
    ("models", "list"): "bot.models.catalog:cmd_list",
    ("models", "download"): "bot.models.download:cmd_download",
    ("db", "upgrade"): "bot.storage.migrate:cmd_upgrade",
    ("db", "downgrade"): "bot.storage.migrate:cmd_downgrade",
    ("bench", "engines"): "bot.bench.engines:cmd_bench_engines",
    ("bench", "concurrency"): "bot.bench.concurrency:cmd_bench_concurrency",
    ("bench", "pipeline"): "bot.bench.pipeline:cmd_bench_pipeline",
    ("bench", "batching"): "bot.bench.batching:cmd_bench_batching",
    ("bench", "telegram"): "bot.bench.telegram:cmd_bench_telegram",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bot", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("run", help="run the configured adapters (terminal chat when no token is set)")
    sub.add_parser("chat", help="chat in the terminal")
    doctor = sub.add_parser("doctor", help="what this machine gives the bot (torch, GPU, kernels, models, database); "
                                           "exit 1 when the default model cannot run")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument("--load", action="store_true", help="also load each local model and report its kernels")

    gen = sub.add_parser("generate", help="stream one reply to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None)
    gen.add_argument("--max-new-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=None)

    models = sub.add_parser("models", help="prepare, list, evaluate and download models").add_subparsers(
        dest="models_command", required=True)
    prep = models.add_parser("prepare", help="build the embedded GPTQ, AWQ and GGUF models")
    prep.add_argument("--only", action="append", choices=["hf", "gptq", "awq", "gguf"],
                      help="build only these (repeatable)")
    prep.add_argument("--default", action="store_true",
                      help="build only what the default model (DEFAULT_MODEL) needs, if it is an embedded one")
    prep.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    prep.add_argument("--group-size", type=int, default=None, help="GPTQ/AWQ group size (default 32)")
    models.add_parser("eval", help="perplexity of each build on held-out text, as ratios to unquantized")
    models.add_parser("list", help="configured model profiles and whether their files exist")
    dl = models.add_parser("download", help="download a hub repo's quantized files and register a profile")
    dl.add_argument("repo_id")
    dl.add_argument("--include", action="append", default=None)
    dl.add_argument("--revision", default=None)
    dl.add_argument("--name", default=None)

    db = sub.add_parser("db", help="database migrations").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="apply all migrations")
    down = db.add_parser("downgrade", help="revert migrations")
    down.add_argument("revision", nargs="?", default="-1")

    bench = sub.add_parser("bench", help="benchmarks (print a table, write JSON)").add_subparsers(
        dest="bench_command", required=True)
    for name in ("engines", "concurrency", "pipeline", "telegram", "batching"):
        b = bench.add_parser(name)
        b.add_argument("--out", default=None, help="JSON output path")
        b.add_argument("--quick", action="store_true", help="fewer prompts and tokens")
        if name in ("engines", "concurrency", "batching"):
            b.add_argument("--models", default=None, help="comma-separated model names (default: every local build; "
                                                          "concurrency: the GPTQ and AWQ builds)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = tuple(p for p in (args.command, getattr(args, "models_command", None),
                             getattr(args, "db_command", None), getattr(args, "bench_command", None)) if p)
    from bot.config import Settings
    from bot.logs import setup_logging

    try:
        settings = Settings()
        setup_logging(settings, verbose=args.verbose)
        module, func = COMMANDS[path].split(":")
        return int(getattr(importlib.import_module(module), func)(args, settings) or 0)
    except BotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
