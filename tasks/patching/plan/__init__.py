"""The patch planner: calendar, maintenance windows, update selection, rollout and each host's
plan, and the reports built from the records. Pure: importing it loads no orchestrator and no
SDK, so it can be read, tested and reused without Prefect."""
