"""What a run prints on the console, and how it ends on a bad config or bad data.

- *Quiet console* (``tools/train_net.py --quiet``): the console shows what a user reads (step
  headers and the scenario's progress, detectron2's iteration lines with their ETA, result tables,
  warnings and errors); everything else detectron2 logs (environment, the full config, the model,
  data and evaluator chatter) goes to ``OUTPUT_DIR/log.txt`` only.
- *Readable errors*: a config or data error ends the run with one line on stderr and exit code 2;
  its traceback goes to the log file (or to the console with ``--debug``).

Messages for the console go to the :data:`PROGRESS` logger (``comformer.progress``).
"""

import logging
import os
import sys
from typing import Callable

import yaml

from detectron2.utils import comm

__all__ = [
    "PROGRESS",
    "USER_ERRORS",
    "ConsoleFilter",
    "quiet_default_setup",
    "install_console_filter",
    "error_line",
    "run_with_readable_errors",
]

# Messages written for the user: shown on a quiet console.
PROGRESS = logging.getLogger("comformer.progress")

# Loggers whose INFO records a quiet console shows: comformer's progress lines (detectron2's
# iteration lines, every 20 iterations, go to the log file: the progress lines say the same ten
# times per run).
_QUIET_CONSOLE_LOGGERS = ("comformer.progress",)

# Errors that mean a bad config, bad data or files, or a diverged run: each has a message that
# names the fault. Anything else (RuntimeError, TypeError, ...) is a bug or a system fault and
# keeps its traceback.
USER_ERRORS = (ValueError, KeyError, OSError, FloatingPointError, yaml.YAMLError)

# The exit code of a run ended by one of USER_ERRORS.
USER_ERROR_EXIT_CODE = 2

# The log file of this process, once logging is set up (named in error lines).
_LOG_FILE = {"path": ""}

# Loggers with a console handler (detectron2's setup_logger, comformer's in setup_cfg).
_LOGGERS = ("detectron2", "fvcore", "comformer")


class ConsoleFilter(logging.Filter):
    """
    Filter of a console handler: drops records logged with ``extra={"console": False}`` (kept for
    the log file), and when ``quiet``, INFO and DEBUG records of loggers other than
    :data:`_QUIET_CONSOLE_LOGGERS`.
    """

    def __init__(self, quiet: bool = False):
        super().__init__()
        self.quiet = quiet

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "console", True) is False:
            return False
        if not self.quiet or record.levelno >= logging.WARNING:
            return True
        return record.name.startswith(_QUIET_CONSOLE_LOGGERS)


def _is_console(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    return stream is not None and stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)


def install_console_filter(quiet: bool) -> None:
    """Put a :class:`ConsoleFilter` on the console handlers of detectron2's, fvcore's and
    comformer's loggers (or set the one there to ``quiet``)."""
    for name in _LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if not _is_console(handler):
                continue
            existing = [f for f in handler.filters if isinstance(f, ConsoleFilter)]
            if existing:
                existing[0].quiet = quiet
            else:
                handler.addFilter(ConsoleFilter(quiet))


def quiet_default_setup(cfg, args, quiet: bool) -> None:
    """
    detectron2's ``default_setup`` (loggers, config.yaml in OUTPUT_DIR, seeds); with ``quiet`` the
    environment, command line and full config are written to the log file only.
    """
    from detectron2.engine import default_setup

    if cfg.OUTPUT_DIR:
        rank = comm.get_rank()
        path = os.path.join(cfg.OUTPUT_DIR, "log.txt")
        _LOG_FILE["path"] = path + (f".rank{rank}" if rank > 0 else "")
    if not quiet:
        default_setup(cfg, args)
        install_console_filter(quiet=False)
        return
    # default_setup logs its dumps at INFO as soon as it has made the handlers: silence them
    # (and the notice of torch's cpp_extension, imported by its environment report, that there
    # is no CUDA), filter the console handlers, and log the same to the file only.
    from detectron2.utils.collect_env import collect_env_info

    logging.disable(logging.WARNING)
    try:
        default_setup(cfg, args)
        env = collect_env_info()
    finally:
        logging.disable(logging.NOTSET)
    install_console_filter(quiet=True)
    logger = logging.getLogger("detectron2")
    file_only = {"console": False}
    logger.info(f"Rank {comm.get_rank()}, world size {comm.get_world_size()}", extra=file_only)
    logger.info("Environment info:\n" + env, extra=file_only)
    logger.info(f"Command line arguments: {args}", extra=file_only)
    logger.info(f"Running with full config:\n{cfg.dump()}", extra=file_only)


def error_line(exc: BaseException) -> str:
    """The message of an exception as one line (KeyError's without the quotes repr adds)."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        message = exc.args[0]
    else:
        message = str(exc) or type(exc).__name__
    return " ".join(message.split())


def run_with_readable_errors(fn: Callable[[], object], *, debug: bool = False):
    """
    Call ``fn()``; a :data:`USER_ERRORS` exception ends the process with one line on stderr (on
    the main process) and exit code 2, its traceback logged to the log file only (named in the
    line once :func:`quiet_default_setup` has set logging up).

    Args:
        fn: the job.
        debug: let the exception through (the traceback on the console).
    """
    if debug:
        return fn()
    try:
        return fn()
    except USER_ERRORS as e:
        logger = logging.getLogger("comformer")
        if logger.handlers:  # else logging is not set up yet: no log file, nothing to write
            logger.error("the run stopped on this error:", exc_info=True, extra={"console": False})
        where = _LOG_FILE["path"]
        hint = f"traceback in {where}; " if where and os.path.isfile(where) else ""
        if comm.is_main_process():
            print(
                f"error: {error_line(e)} ({hint}--debug shows the traceback)",
                file=sys.stderr,
                flush=True,
            )
        raise SystemExit(USER_ERROR_EXIT_CODE) from None
