"""The `patchdrill` command, the demo and the lab server: the top floor, which starts the flows
and imports anything below it; nothing below imports it."""
