"""The Prefect flows. Importing any of them sets Prefect up for a run without a server (no
telemetry, state under ./.prefect) and keeps gamma's input errors to the one line the command
line prints."""

import logging
import os
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", str(Path(".prefect").resolve()))


class _InputErrorSaidOnce(logging.Filter):
    """Prefect logs a failed flow or task with the whole traceback; gamma's input errors (ValueError
    subclasses whose message names the bad value) are said once, by the command line, instead. The
    run's state still records the failure and its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ValueError))


for _name in ("prefect.flow_runs", "prefect.task_runs"):
    logging.getLogger(_name).addFilter(_InputErrorSaidOnce())
