"""`python -m inference [--host H] [--port P]`: the embedded inference engine."""

from __future__ import annotations

import argparse

from inference.server import default_address, serve


def main(argv: list[str] | None = None) -> None:
    host, port = default_address()
    parser = argparse.ArgumentParser(prog="python -m inference", description=__doc__)
    parser.add_argument("--host", default=host, help=f"address to bind (default {host})")
    parser.add_argument("--port", type=int, default=port, help=f"port (default {port})")
    parser.add_argument("--quiet", action="store_true",
                        help="no access log, only warnings and errors")
    args = parser.parse_args(argv)
    serve(args.host, args.port, quiet=args.quiet)


if __name__ == "__main__":
    main()
