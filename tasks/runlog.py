"""The logger of the flow run this code runs in, with or without Prefect's flow engine."""

from __future__ import annotations

import logging
import os
from uuid import UUID

from prefect import get_run_logger
from prefect.exceptions import MissingContextError
from prefect.logging.loggers import flow_run_logger
from prefect.runtime import flow_run

#: The run's name, where a stage worker runs the flow's function (for the console's lines).
RUN_NAME = "EDGETUNE_FLOW_RUN_NAME"


def run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The flow engine's run logger; where a stage worker runs the flow's function alone
    (``edgetune worker``), one that still sends to the API under the run's id
    (``PREFECT__FLOW_RUN_ID``); outside any run, this module's logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        run_id = flow_run.id
        if run_id is None:
            return logging.getLogger(__name__)
        name = os.environ.get(RUN_NAME, "<unknown>")
        return flow_run_logger(flow_run_id=UUID(run_id), flow_run_name=name)
