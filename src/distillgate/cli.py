"""`distillgate` command line: a thin dispatcher. Parsing and printing live here and in ``commands/``;
the work lives in the library. Each module in ``distillgate.commands`` exposes ``register(subparsers)``,
which adds its sub-command and sets ``func``; heavy imports (torch, transformers) happen inside ``func``
so that ``distillgate --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from . import commands
from .errors import DistillgateError
from .signals import Terminated  # re-exported: SIGTERM unwinds like Ctrl-C
from .version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distillgate",
        description="Distil a teacher LLM into a smaller student, iteration by iteration, behind acceptance gates.",
    )
    parser.add_argument("--version", action="version", version=f"distillgate {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def _quiet_libraries() -> None:
    """Our own progress bars say what is happening; silence the libraries' per-file ones."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # transformers missing or older: nothing to silence
        pass


def _error(text: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    # soft_wrap: one error is one line, whatever the terminal width (logs and scripts grep for it)
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(text)}", highlight=False)


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    from . import signals

    on_main = threading.current_thread() is threading.main_thread()
    signals.reset()
    previous = signal.signal(signal.SIGTERM, signals.handle_sigterm) if on_main else None
    try:
        rc = args.func(args)
        if signals.pending():  # a SIGTERM swallowed where nothing checked for it afterwards: still a stop
            raise Terminated()
    except DistillgateError as e:
        _error(str(e))
        return 2
    except KeyboardInterrupt as e:
        print("terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except Exception as e:  # an I/O failure no library call turned into a StorageError: still one line, exit 2
        from .io import io_cause

        cause = io_cause(e)
        if cause is None and not isinstance(e, OSError):
            raise
        where = getattr(e, "filename", None) or "a file"
        _error(f"{where}: {cause or (e.strerror or str(e))}")
        return 2
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)
        signals.reset()
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
