// Follows one job live through its stream (GET /v1/finetune/llm/{id}/stream, the contract in
// notes/stream_contract.md): from no cursor it replays every row the job wrote, then goes on
// live until `end`. A dropped connection or a network error is resumed with Last-Event-ID,
// the id of the last event received, so that nothing is missed or repeated.
import { ApiError, authHeaders, errorOf } from "./api.js";
import { readEventStream } from "./sse.js";

// Waits before each reconnection in a row; the last one repeats, so a long outage costs one
// request every 10 s.
const RETRY_MS = [500, 1000, 2000, 5000, 10000];
export const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELLED"]);

// handlers: job(job), metric(row), log(row), status(row), end(status),
// state("connecting" | "live" | "reconnecting" | "finished"), error(error): the API refused the
// stream (an ApiError), or the page failed; either way following has stopped.
export function followJob(jobId, handlers) {
  const controller = new AbortController();
  streamJob(jobId, handlers, controller.signal).catch((error) => {
    if (controller.signal.aborted) return;
    handlers.error?.(error);
    // Anything but the API's answer is a fault of the page: left unhandled, so it is reported.
    if (!(error instanceof ApiError)) throw error;
  });
  return () => controller.abort();
}

async function streamJob(jobId, handlers, signal) {
  const path = `/v1/finetune/llm/${encodeURIComponent(jobId)}/stream`;
  let cursor = null;
  let failures = 0;
  handlers.state?.("connecting");
  while (!signal.aborted) {
    let ended = false;
    let broken = null;
    try {
      const headers = authHeaders(undefined, { Accept: "text/event-stream" });
      if (cursor) headers["Last-Event-ID"] = cursor;
      const response = await fetch(path, { headers, signal, cache: "no-store" });
      if (!response.ok) {
        const error = await errorOf(response);
        // A refusal (the job gone, the key revoked, a cursor refused) stays one on retry.
        if (response.status < 500 && response.status !== 429) throw error;
        throw Object.assign(error, { retry: true });
      }
      handlers.state?.("live");
      await readEventStream(response, (event) => {
        try {
          const data = JSON.parse(event.data);
          if (event.type === "end") {
            ended = true;
            handlers.end?.(data.status);
          } else {
            handlers[event.type]?.(data);
          }
        } catch (error) {
          broken = error;
          throw error;
        }
        // Moved only once the event is shown: a reconnection resends one that was not.
        if (event.id) cursor = event.id;
        // An event received: the connection works, so the next drop waits the shortest time.
        failures = 0;
      }, signal);
    } catch (error) {
      if (signal.aborted) return;
      if (broken) throw broken;
      // fetch() and the body's reader reject with a TypeError when the network fails.
      if (!(error instanceof TypeError) && !error.retry) throw error;
    }
    if (ended) {
      handlers.state?.("finished");
      return;
    }
    if (signal.aborted) return;
    handlers.state?.("reconnecting");
    await sleep(RETRY_MS[Math.min(failures, RETRY_MS.length - 1)], signal);
    failures += 1;
  }
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    }, { once: true });
  });
}
