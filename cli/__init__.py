"""The top layer: the `tunery` command line, the local stack it starts and the demo.

Nothing in `shared`, `api` or `worker` imports this package.
"""
