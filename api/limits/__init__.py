"""Operator limits on what one client may send and start: body size (`body`), payload values
(`payload`), request rate (`rate`) and active jobs (`active_jobs`). `api.main`
wires the first and third into the app; the submit route calls the other two."""
