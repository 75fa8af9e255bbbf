"""Signed webhooks: job events reach tenants' endpoints through a durable outbox.

`events` names the events and builds their bodies; `outbox` writes one delivery per matching
endpoint in the transaction of the change it reports; `endpoints` keeps the endpoints and
their `signing_secrets`; `deliveries` claims due deliveries under a lease and records what
each attempt brought; `send` signs (`signing`) and posts one attempt; `sender` is the loop
every worker runs.
"""
