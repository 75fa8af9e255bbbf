// Follows one job live: its stream (GET /v1/finetune/llm/{id}/stream, the contract in
// notes/stream_contract.md), reconnecting with Last-Event-ID so that nothing is missed or
// repeated; or, where the API has no stream route (it answers 404 for a job that exists),
// the JSON routes polled every 2 s.
import { authHeaders, call, errorOf } from "./api.js";
import { readEventStream } from "./sse.js";

const POLL_MS = 2000;
const RETRY_MS = [1000, 2000, 5000, 10000];
export const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELLED"]);

// handlers: job(job), metric(row), log(row), status(row), end(status), mode("stream" | "polling")
export function followJob(jobId, handlers) {
  const controller = new AbortController();
  const state = { stopped: false };
  streamJob(jobId, handlers, controller.signal, state).catch(() => {});
  return () => {
    state.stopped = true;
    controller.abort();
  };
}

async function streamJob(jobId, handlers, signal, state) {
  const path = `/v1/finetune/llm/${encodeURIComponent(jobId)}/stream`;
  let cursor = null;
  let failures = 0;
  while (!state.stopped) {
    let ended = false;
    try {
      const headers = authHeaders(undefined, { Accept: "text/event-stream" });
      if (cursor) headers["Last-Event-ID"] = cursor;
      const response = await fetch(path, { headers, signal, cache: "no-store" });
      if (response.status === 404) {
        // The job was read just before: a 404 here means this API has no stream route.
        handlers.mode?.("polling");
        return pollJob(jobId, handlers, signal, state);
      }
      if (!response.ok) throw await errorOf(response);
      handlers.mode?.("stream");
      failures = 0;
      await readEventStream(response, (event) => {
        if (event.id) cursor = event.id;
        const data = JSON.parse(event.data);
        if (event.type === "end") {
          ended = true;
          handlers.end?.(data.status);
        } else {
          handlers[event.type]?.(data);
        }
      }, signal);
    } catch (error) {
      if (state.stopped || error.name === "AbortError") return;
      if (error.status && error.status < 500 && error.status !== 429) {
        handlers.error?.(error);
        return;
      }
    }
    if (ended || state.stopped) return;
    handlers.mode?.("reconnecting");
    await sleep(RETRY_MS[Math.min(failures, RETRY_MS.length - 1)], signal);
    failures += 1;
  }
}

async function pollJob(jobId, handlers, signal, state) {
  const id = encodeURIComponent(jobId);
  let metricsSeen = 0;
  let logsAfter = 0;
  const eventsSeen = new Set();
  while (!state.stopped) {
    try {
      const job = await call(`/v1/finetune/llm/${id}`, { signal });
      handlers.job?.(job);
      const { metrics } = await call(`/v1/finetune/llm/${id}/metrics`, { signal });
      for (const row of metrics.slice(metricsSeen)) handlers.metric?.(row);
      metricsSeen = metrics.length;
      for (;;) {
        const logs = await call(`/v1/finetune/llm/${id}/logs?n_lines=1000&after=${logsAfter}`,
          { signal });
        for (const line of logs.lines) handlers.log?.(line);
        const more = logs.lines.length === 1000;
        logsAfter = logs.next_after;
        if (!more) break;
      }
      await pollStatusEvents(id, handlers, eventsSeen, signal);
      if (TERMINAL.has(job.status)) {
        handlers.end?.(job.status);
        return;
      }
    } catch (error) {
      if (state.stopped || error.name === "AbortError") return;
      if (error.status && error.status < 500 && error.status !== 429) {
        handlers.error?.(error);
        return;
      }
    }
    await sleep(POLL_MS, signal);
  }
}

// The status changes, from the OpenAI dialect's event list: its ids name the table an event
// was read from (`ftevent-s…` for job_events, api/openai/ids.py).
async function pollStatusEvents(id, handlers, seen, signal) {
  const { data } = await call(`/v1/fine_tuning/jobs/${id}/events?limit=100`, { signal });
  const fresh = data.filter((e) => e.id.startsWith("ftevent-s") && !seen.has(e.id)).reverse();
  for (const event of fresh) {
    seen.add(event.id);
    handlers.status?.({ message: event.message, at: new Date(event.created_at * 1000).toISOString() });
  }
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    }, { once: true });
  });
}
