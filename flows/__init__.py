"""The flows, one per pipeline, and what they share: logging and the UI's run form."""

import os

# The ephemeral API that CLI and demo runs start has no business phoning home (and on a closed
# network would log a failure each time); set before Prefect reads its settings, which the cli
# package guarantees by importing flows (cli.common imports flows.logs) before any Prefect import.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
