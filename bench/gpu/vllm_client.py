"""The checks and the throughput run of `bench/gpu/vllm_serve.sh`, against a running `vllm serve`
with Tunery's resolver plugin. Standard library only: it runs in vLLM's Python.

Exit status 1 on the first failed check, with what was expected and what came.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

PROMPT = "### Instruction:\nGive three tips for staying healthy.\n\n### Input:\n\n\n### Response:\n"
THROUGHPUT_MAX_TOKENS = 256
REQUESTS_PER_STREAM = 2


class CheckFailed(Exception):
    pass


class Engine:
    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.token = token

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             token: str | None = "") -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token or self.token}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers=headers,
                                         method=method)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace")

    def chat(self, model: str, **options: Any) -> tuple[int, Any]:
        body = {"model": model, "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": 32, "temperature": 0, **options}
        return self.call("POST", "/v1/chat/completions", body)

    def stream(self, model: str) -> tuple[int, float]:
        """(completion tokens, seconds to the first token) of one streamed request."""
        body = {"model": model, "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": THROUGHPUT_MAX_TOKENS, "temperature": 0.8, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        request = urllib.request.Request(
            self.url + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
        )
        start, first, tokens = time.perf_counter(), None, 0
        with urllib.request.urlopen(request, timeout=300) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if first is None and any(c["delta"].get("content") for c in event["choices"]):
                    first = time.perf_counter() - start
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
        if tokens != THROUGHPUT_MAX_TOKENS or first is None:
            raise CheckFailed(f"a streamed request of {model} gave {tokens} tokens "
                              f"(asked {THROUGHPUT_MAX_TOKENS}, ignore_eos)")
        return tokens, first


def expect(what: str, condition: bool, got: Any) -> None:
    if not condition:
        raise CheckFailed(f"{what}; got: {str(got)[:600]}")
    print(f"ok: {what}")


def top_logprobs(engine: Engine, model: str) -> dict[str, float]:
    status, body = engine.chat(model, max_tokens=1, logprobs=True, top_logprobs=5)
    expect(f"{model} answers with logprobs", status == 200, body)
    first = body["choices"][0]["logprobs"]["content"][0]
    return {entry["token"]: entry["logprob"] for entry in first["top_logprobs"]}


def check(engine: Engine, adapter: str, base: str) -> None:
    status, body = engine.call("GET", "/v1/models", token=None)
    expect("a request without the API key is refused (401)", status == 401, (status, body))

    status, body = engine.chat(adapter)
    expect(f"{adapter} is resolved from storage and answers (200)", status == 200,
           (status, body))
    expect("the answer names the adapter and has text",
           body["model"] == adapter and bool(body["choices"][0]["message"]["content"]), body)
    status, body = engine.call("GET", "/v1/models")
    expect("/v1/models lists the resolved adapter",
           status == 200 and adapter in [m["id"] for m in body["data"]], body)

    status, body = engine.chat(base)
    expect(f"the base {base} answers (200)", status == 200, (status, body))

    with_adapter, without = top_logprobs(engine, adapter), top_logprobs(engine, base)
    shared_tokens = set(with_adapter) & set(without)
    shift = max((abs(with_adapter[t] - without[t]) for t in shared_tokens), default=1.0)
    expect(f"the adapter changes the base's next-token logprobs (largest shift {shift:.4f})",
           shift > 1e-3 or set(with_adapter) != set(without), (with_adapter, without))

    for name in (f"tunery-job-{uuid.uuid4()}", "tunery-job-../../etc", "../" + adapter):
        status, body = engine.chat(name)
        expect(f"{name!r}, no adapter in storage, is 404", status == 404, (status, body))


def throughput(engine: Engine, model: str, streams: int) -> dict[str, Any]:
    results: list[tuple[int, float]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(REQUESTS_PER_STREAM):
                results.append(engine.stream(model))
        except BaseException as error:  # reported below, in the main thread
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(streams)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if errors:
        raise CheckFailed(f"{streams} streams of {model}: {errors[0]!r}")
    tokens = sum(count for count, _ in results)
    return {"model": model, "streams": streams, "requests": len(results), "tokens": tokens,
            "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "tokens_per_s_per_stream": round(tokens / seconds / streams, 1),
            "ttft_median_s": round(statistics.median(first for _, first in results), 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--adapter", required=True, help="tunery-job-<job id>")
    parser.add_argument("--base", required=True, help="the base's served model name")
    parser.add_argument("--out", type=Path, required=True, help="results JSON to write")
    args = parser.parse_args()
    engine = Engine(args.url, args.token)
    try:
        check(engine, args.adapter, args.base)
        rows = [throughput(engine, model, streams)
                for model in (args.adapter, args.base) for streams in (1, 8)]
    except (CheckFailed, OSError, KeyError, ValueError) as error:
        print(f"FAILED: {error!r}", file=sys.stderr)
        return 1
    print(f"\n{THROUGHPUT_MAX_TOKENS} tokens per request, {REQUESTS_PER_STREAM} per stream\n")
    print("| model | streams | requests | tokens | s | tokens/s | tokens/s per stream "
          "| TTFT median s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        name = "adapter" if row["model"] == args.adapter else "base"
        print(f"| {name} | {row['streams']} | {row['requests']} | {row['tokens']} | "
              f"{row['seconds']} | {row['tokens_per_s']} | {row['tokens_per_s_per_stream']} | "
              f"{row['ttft_median_s']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"throughput": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
