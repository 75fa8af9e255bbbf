"""Operator limits on what one client may send and start: body size (`body`), payload values
(`payload`), request rate (`rate`) and active jobs (`active_jobs`). `install.install_limits`
wires the first and third into an app; the submit route calls the other two."""
