"""The flows (one per pipeline), the `patchdrill` command and the demo."""

import os

# The ephemeral API that CLI and demo runs start has no business phoning home (and on a closed
# network would log a failure each time); set before Prefect reads its settings.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
