"""finpipe's console logger: every job's ``console`` logger, in place of Dagster's coloured one.

Dagster's prefix (date, time zone, "dagster", level, job name, run id, step: ~130 characters) came before every line
of a Quickstart; here a line is ``HH:MM:SS step: message`` (the level only from WARNING up), and errors keep their
stack traces. ``verbose: true`` (``finpipe run --verbose``) gives Dagster's full prefix back. The run's events and
logs in the UI are not affected: they come from the event log, not from this logger.
"""

from __future__ import annotations

import logging
import sys

import dagster as dg


class ShortFormatter(logging.Formatter):
    """``HH:MM:SS step: message`` from a Dagster log record (its ``dagster_meta``), the error's trace when it has one."""

    def __init__(self, verbose: bool = False):
        super().__init__()
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        meta = getattr(record, "dagster_meta", None)
        clock = self.formatTime(record, "%H:%M:%S")
        level = f"{record.levelname}: " if record.levelno >= logging.WARNING else ""
        if self.verbose or not meta:
            return f"{clock} {record.levelname} {record.getMessage()}"
        where = meta.get("step_key") or meta.get("job_name") or "dagster"
        text = f"{clock} {where}: {level}{meta.get('orig_message') or record.getMessage()}"
        event = meta.get("dagster_event")
        error = getattr(getattr(event, "event_specific_data", None), "error", None)
        if error is not None:
            text += "\n" + error.to_string()
        return text


@dg.logger(
    config_schema={
        "log_level": dg.Field(str, is_required=False, default_value="INFO", description="the logger's threshold"),
        "verbose": dg.Field(bool, is_required=False, default_value=False,
                            description="Dagster's full prefix (job, run id, step) on every line"),
    },
    description="finpipe's console: time, step and message on each line",
)
def console_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    config = init_context.logger_config
    # the logger class in force (finpipe's CLI sets one that filters interrupt stack traces), as Dagster's own does
    logger = logging.getLoggerClass()("finpipe", level=logging.getLevelName(config["log_level"].upper()))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ShortFormatter(verbose=config["verbose"]))
    logger.addHandler(handler)
    return logger


#: every finpipe job's loggers (the Definitions' default)
LOGGERS = {"console": console_logger}
