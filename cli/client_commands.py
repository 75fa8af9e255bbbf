"""`tunery jobs | submit | watch | download`: a Tunery API's jobs from any machine, over HTTP
only (`cli.api_client`): list them, submit a payload, follow one live, download what it
produced. The API's URL and key come from the environment, never from the server's settings.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from cli.api_client import (
    API_KEY_VARIABLE,
    API_URL_VARIABLE,
    DEFAULT_API_URL,
    ApiClient,
    ApiRefused,
    ApiUnreachable,
)
from cli.job_watch import watch_job
from cli.progress_line import ProgressLine, bar, format_bytes

EXIT_OK = 0
EXIT_JOB_DID_NOT_COMPLETE = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_UNREACHABLE = 4

EPILOG = f"""The API is at {API_URL_VARIABLE} (default {DEFAULT_API_URL}); the API key is read
from {API_KEY_VARIABLE}.

exit codes:
  {EXIT_OK}  done (watch: the job COMPLETED)
  {EXIT_JOB_DID_NOT_COMPLETE}  watch: the job ended FAILED or CANCELLED
  {EXIT_USAGE}  wrong arguments, a payload file that cannot be read as JSON, invalid settings
  {EXIT_REFUSED}  the API refused the request (an unknown job, a wrong key, an invalid
     payload): its message is printed
  {EXIT_UNREACHABLE}  the API could not be reached"""

ClientCommand = Callable[[ApiClient, argparse.Namespace], int]


def add_client_commands(sub: Any) -> None:
    """The client commands, on `sub` (the parser's subparsers)."""

    def command(name: str, summary: str, run: ClientCommand) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(
            name, help=summary, description=f"{summary}.", epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.set_defaults(func=_answered(name, run))
        return parser

    jobs = command("jobs", "list this API key's jobs, newest first", _jobs)
    jobs.add_argument("--limit", type=int, default=20, help="at most this many (1 to 100)")
    jobs.add_argument("--status", action="append", default=[],
                      help="only jobs in this status (QUEUED, RUNNING, PAUSED, COMPLETED, "
                           "FAILED, CANCELLED); repeatable")

    submit = command("submit", "submit a fine-tuning job and print its id", _submit)
    submit.add_argument("payload", help="the job's JSON payload (MonsterAPI's format), a file; "
                                        "- reads it from standard input")

    watch = command("watch", "follow a job live: its log lines under a progress bar (step, "
                             "loss, ETA, phase), until it ends", _watch)
    watch.add_argument("job_id", metavar="JOB")
    watch.add_argument("--give-up-after", type=float, default=120.0, metavar="SECONDS",
                       help="stop trying to reconnect after this long without an answer "
                            "(default 120)")

    download = command("download", "download a completed job's adapter and tokenizer as one "
                                   "tar.gz, or with --each every artifact as its own file",
                       _download)
    download.add_argument("job_id", metavar="JOB")
    download.add_argument("--to", type=Path, default=Path("."), metavar="DIR",
                          help="the directory to write to (default: the current one)")
    download.add_argument("--each", action="store_true",
                          help="every artifact, exports included, instead of the archive")


def _answered(name: str, run: ClientCommand) -> Callable[[argparse.Namespace], int]:
    """`run` with an API client, its failures told in one line and an exit code."""

    def answered(args: argparse.Namespace) -> int:
        try:
            with ApiClient() as api:
                return run(api, args)
        except ApiRefused as exc:
            print(f"tunery {name}: {exc.message}", file=sys.stderr)
            return EXIT_REFUSED
        except ApiUnreachable as exc:
            print(f"tunery {name}: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        except PayloadUnreadable as exc:
            print(f"tunery {name}: {exc}", file=sys.stderr)
            return EXIT_USAGE

    return answered


class PayloadUnreadable(Exception):
    pass


def _jobs(api: ApiClient, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": args.limit}
    if args.status:
        params["status"] = args.status
    listing = api.get_json("/v1/finetune/llm", params)
    now = datetime.now(UTC)
    rows = [(job["job_id"], job["status"], _shortened(job["base_model"], 40),
             f"{round(100 * job['progress'])}%", _age(job["created_at"], now))
            for job in listing["items"]]
    print_table(("ID", "STATUS", "BASE MODEL", "PROGRESS", "AGE"), rows)
    if listing["total"] > len(rows):
        print(f"({len(rows)} of {listing['total']} jobs; --limit shows more)")
    return EXIT_OK


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows,
                                                                        strict=False)]
    for row in (header, *rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths,
                                                                     strict=True)).rstrip())


def _shortened(text: str, width: int) -> str:
    # A local model path is long and says most at its end.
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _age(created_at: str, now: datetime) -> str:
    seconds = (now - datetime.fromisoformat(created_at)).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(0, int(seconds))}s"


def _submit(api: ApiClient, args: argparse.Namespace) -> int:
    source = "standard input" if args.payload == "-" else args.payload
    try:
        text = sys.stdin.read() if args.payload == "-" else Path(args.payload).read_text()
        payload = json.loads(text)
    except OSError as exc:
        raise PayloadUnreadable(f"cannot read {source}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise PayloadUnreadable(f"{source} is not JSON: {exc}") from None
    submitted = api.post_json("/v1/finetune/llm", payload)
    print(submitted["job_id"])
    return EXIT_OK


def _watch(api: ApiClient, args: argparse.Namespace) -> int:
    return watch_job(api, args.job_id, args.give_up_after)


def _download(api: ApiClient, args: argparse.Namespace) -> int:
    folder: Path = args.to
    folder.mkdir(parents=True, exist_ok=True)
    if not args.each:
        archive = f"/v1/finetune/llm/{args.job_id}/artifacts/archive"
        print(download_file(api, archive, folder, None))
        return EXIT_OK
    listing = api.get_json(f"/v1/finetune/llm/{args.job_id}/artifacts")
    if listing["status"] != "COMPLETED":
        raise ApiRefused(409, f"job {args.job_id} is {listing['status']}: its artifacts can "
                              "be downloaded once it has COMPLETED")
    for artifact in listing["artifacts"]:
        target = _inside(folder, artifact["name"])
        print(download_file(api, artifact["download_url"], target.parent, target.name,
                            artifact["size"]))
    return EXIT_OK


def download_file(api: ApiClient, url: str, folder: Path, name: str | None,
                  size: int | None = None) -> Path:
    """`url` written into `folder` as `name` (None: the name the server gives it), with a
    byte progress line; the file appears only once it is complete."""
    line = ProgressLine()
    with api.stream(url) as response:
        name = name or _attachment_name(response) or Path(url).name
        target = folder / name
        partial = target.with_name(f".{target.name}.part")
        total = size if size is not None else _length(response)
        written, shown_at = 0, 0.0
        try:
            with partial.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    written += len(chunk)
                    if time.monotonic() - shown_at >= (0.1 if line.live else 2.0):
                        line.update(_bytes_progress(name, written, total))
                        shown_at = time.monotonic()
        except BaseException:
            partial.unlink(missing_ok=True)
            line.close()
            raise
        partial.replace(target)
    line.update(_bytes_progress(name, written, written))
    line.close()
    return target


def _bytes_progress(name: str, done: int, total: int | None) -> str:
    if not total:
        return f"{name} {bar(None)} {format_bytes(done)}"
    return (f"{name} {bar(done / total)} {format_bytes(done)} / {format_bytes(total)} "
            f"{round(100 * done / total)}%")


def _attachment_name(response: httpx.Response) -> str | None:
    match = re.search(r'filename="([^"/\\]+)"', response.headers.get("content-disposition", ""))
    return match[1] if match and match[1] not in (".", "..") else None


def _length(response: httpx.Response) -> int | None:
    length = response.headers.get("content-length", "")
    return int(length) if length.isdigit() else None


def _inside(folder: Path, name: str) -> Path:
    """Where artifact `name` goes in `folder`; refused when it would lead outside."""
    target = (folder / name).resolve()
    if folder.resolve() not in target.parents:
        raise ApiRefused(0, f"the API named an artifact {name!r}, which would be written "
                            f"outside {folder}; nothing written")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target
