// One job, live: status, phase, progress, charts of its losses and learning rate, tokens/s,
// ETA, log tail, status events, checkpoints, artifacts and exports, and its actions.
import { call, download } from "../api.js";
import { StepChart } from "../charts.js";
import { el, notice, replaceChildren } from "../elements.js";
import { bytes, dateTime, duration, number, percent } from "../format.js";
import { TERMINAL, followJob } from "../job_feed.js";
import { progressBar, statusBadge } from "./jobs.js";

const LOG_LINES_KEPT = 400;
const CHECKPOINTS_REFRESH_MS = 10000;
const EXPORTS_REFRESH_MS = 3000;
// The exports POST /v1/finetune/llm/{id}/exports builds (shared/schema.py's ExportRequest).
const EXPORT_KINDS = [
  ["merged", "Merged model (safetensors)", { format: "merged" }],
  ["gguf-f16", "GGUF f16 + Ollama Modelfile", { format: "gguf", quantization: "f16" }],
  ["gguf-q8_0", "GGUF q8_0 + Ollama Modelfile", { format: "gguf", quantization: "q8_0" }],
];

export async function renderJob(main, { me }, jobId) {
  replaceChildren(main, el("p", { class: "loading", role: "status" }, "Loading job…"));
  let job;
  try {
    job = await call(`/v1/finetune/llm/${encodeURIComponent(jobId)}`);
  } catch (error) {
    replaceChildren(main, error.status === 404 ? notFound(jobId) : notice("error", error.message));
    return null;
  }
  const page = new JobPage(main, job, me);
  return () => page.leave();
}

function notFound(jobId) {
  return el("section", { class: "card not-found", "aria-labelledby": "not-found-title" },
    el("h1", { id: "not-found-title" }, "Job not found"),
    el("p", {}, "No job ", el("code", {}, jobId), " is visible to this API key. It may not exist, ",
      "or it may belong to another tenant."),
    el("a", { href: "#/jobs", class: "button" }, "Back to jobs"));
}

class JobPage {
  constructor(main, job, me) {
    this.job = job;
    this.me = me;
    this.latest = {};
    this.timers = [];
    // What the stream brought since the last frame: shown together, once per frame.
    this.pending = { logs: [], statuses: [], metrics: false };
    this.frame = null;
    this.build(main);
    this.showJob(job);
    this.stopFeed = followJob(job.job_id, {
      job: (j) => this.showJob(j),
      metric: (row) => this.addMetric(row),
      log: (row) => this.addLog(row),
      status: (row) => this.addStatus(row),
      end: () => this.finished(),
      state: (state) => this.showFeedState(state),
      error: (error) => {
        this.showFeedState("stopped");
        replaceChildren(this.problem, notice("error", error.message));
      },
    });
    this.loadCheckpoints();
    this.timers.push(setInterval(() => {
      if (!TERMINAL.has(this.job.status)) this.loadCheckpoints();
    }, CHECKPOINTS_REFRESH_MS));
    this.finishedAtOpen = TERMINAL.has(job.status);
    if (this.finishedAtOpen) this.loadDownloads();
  }

  build(main) {
    const id = this.job.job_id;
    this.title = el("h1", { class: "job-title" }, "Job ", el("span", { class: "mono" }, id));
    this.badges = el("div", { class: "badges" });
    this.actions = el("div", { class: "actions", role: "group", "aria-label": "Job actions" },
      this.button("Cancel", "cancel", "danger"),
      this.button("Pause", "pause", "secondary"),
      this.button("Resume", "resume", "secondary"));
    this.problem = el("div", { "aria-live": "assertive" });
    this.stats = el("dl", { class: "stats" });
    this.feedMode = el("span", { class: "feed-mode", role: "status", id: "feed-state" });
    const lossBox = el("div", { class: "chart", id: "loss-chart" });
    const lrBox = el("div", { class: "chart", id: "lr-chart" });
    this.logs = el("pre", { class: "log-tail", id: "log-tail", tabindex: 0,
      "aria-label": "Log tail" });
    this.events = el("ol", { class: "events", id: "events" });
    this.checkpoints = el("div", { id: "checkpoints" }, el("p", { class: "muted" }, "None yet."));
    this.downloads = el("div", { id: "downloads" },
      el("p", { class: "muted" }, "Artifacts can be downloaded once the job has completed."));
    this.exporter = this.exportForm();
    this.details = el("dl", { class: "details" });
    replaceChildren(main,
      el("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, el("a", { href: "#/jobs" }, "Jobs"),
        " / ", el("span", { "aria-current": "page" }, id.slice(0, 8))),
      el("div", { class: "page-head job-head" }, el("div", {}, this.title, this.badges), this.actions),
      this.problem,
      el("section", { class: "card", "aria-labelledby": "progress-title" },
        el("div", { class: "section-head" }, el("h2", { id: "progress-title" }, "Progress"), this.feedMode),
        this.stats),
      el("div", { class: "chart-grid" },
        el("section", { class: "card", "aria-labelledby": "loss-title" },
          el("h2", { id: "loss-title" }, "Loss"), lossBox),
        el("section", { class: "card", "aria-labelledby": "lr-title" },
          el("h2", { id: "lr-title" }, "Learning rate"), lrBox)),
      el("div", { class: "two-col" },
        el("section", { class: "card", "aria-labelledby": "logs-title" },
          el("h2", { id: "logs-title" }, "Log tail"), this.logs),
        el("section", { class: "card", "aria-labelledby": "events-title" },
          el("h2", { id: "events-title" }, "Events"), this.events)),
      el("section", { class: "card", "aria-labelledby": "checkpoints-title" },
        el("h2", { id: "checkpoints-title" }, "Checkpoints"), this.checkpoints),
      el("section", { class: "card", "aria-labelledby": "downloads-title" },
        el("h2", { id: "downloads-title" }, "Artifacts and exports"), this.downloads,
        this.exporter),
      el("section", { class: "card", "aria-labelledby": "details-title" },
        el("h2", { id: "details-title" }, "Details"), this.details));
    this.lossChart = new StepChart(lossBox, {
      series: [{ key: "loss", label: "training loss" },
        { key: "eval_loss", label: "eval loss", points: true }],
      valueFormat: (v) => number(v, 3),
    });
    this.lrChart = new StepChart(lrBox, {
      series: [{ key: "learning_rate", label: "learning rate" }],
      valueFormat: (v) => (v === 0 ? "0" : v.toExponential(1)),
    });
  }

  button(label, action, kind) {
    return el("button", { type: "button", class: `button ${kind}`, "data-action": action,
      onclick: (event) => this.act(action, event.currentTarget) }, label);
  }

  async act(action, button) {
    button.disabled = true;
    replaceChildren(this.problem);
    try {
      this.showJob(await call(`/v1/finetune/llm/${this.job.job_id}/${action}`, { method: "POST" }));
      replaceChildren(this.problem, notice("success", ACTION_DONE[action]));
    } catch (error) {
      replaceChildren(this.problem, notice("error", error.message));
      this.showJob(this.job);
    }
  }

  showJob(job) {
    this.job = job;
    replaceChildren(this.badges, statusBadge(job.status),
      job.phase ? el("span", { class: "badge phase-badge" }, job.phase) : null,
      job.cancel_requested && !TERMINAL.has(job.status) ? el("span", { class: "badge" }, "cancelling") : null,
      job.pause_requested ? el("span", { class: "badge" }, "pausing") : null);
    const active = !TERMINAL.has(job.status);
    const enable = {
      cancel: active && !job.cancel_requested,
      pause: ["QUEUED", "RUNNING"].includes(job.status) && !job.pause_requested && !job.cancel_requested,
      resume: job.status === "PAUSED" || job.pause_requested,
    };
    for (const button of this.actions.querySelectorAll("button")) {
      button.disabled = !enable[button.dataset.action];
    }
    this.exporter.hidden = job.status !== "COMPLETED";
    this.showStats();
    const rows = [
      ["Base model", job.base_model],
      ...(this.me.role === "admin" ? [["Tenant", job.tenant_id]] : []),
      ["Attempt", job.attempt],
      ["Created", dateTime(job.created_at)],
      ["Started", dateTime(job.started_at)],
      ["Finished", dateTime(job.finished_at)],
    ];
    replaceChildren(this.details, rows.map(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))]),
      job.error ? [el("dt", {}, "Error"), el("dd", { class: "error-text" }, job.error)] : null,
      job.warnings.length ? [el("dt", {}, "Warnings"),
        el("dd", {}, el("ul", {}, job.warnings.map((w) => el("li", {}, w))))] : null);
  }

  showStats() {
    const v = this.latest;
    const total = v.total_steps;
    const stats = [
      ["Status", this.job.status],
      ["Phase", this.job.phase ?? "–"],
      ["Step", v.step !== undefined ? `${v.step}${total ? ` / ${total}` : ""}` : "–"],
      ["Tokens/s", v.tokens_per_s === undefined ? "–" : Math.round(v.tokens_per_s).toLocaleString()],
      ["ETA", TERMINAL.has(this.job.status) ? "–" : duration(v.eta_s)],
      ["Training loss", number(v.loss)],
      ["Eval loss", number(v.eval_loss)],
      // Shares of the labelled tokens whose most likely next token is the right one.
      ["Token accuracy", v.mean_token_accuracy === undefined ? "–" : percent(v.mean_token_accuracy)],
      ["Eval token accuracy",
        v.eval_mean_token_accuracy === undefined ? "–" : percent(v.eval_mean_token_accuracy)],
      ["Learning rate", v.learning_rate === undefined ? "–" : v.learning_rate.toExponential(2)],
    ];
    replaceChildren(this.stats,
      el("div", { class: "stat wide" }, el("dt", {}, "Progress"),
        el("dd", {}, progressBar(this.job.progress, "Job progress"))),
      stats.map(([k, value]) => el("div", { class: "stat", "data-stat": k },
        el("dt", {}, k), el("dd", {}, value))));
  }

  addMetric(row) {
    const values = row.values;
    this.latest.step = row.step;
    for (const key of ["loss", "eval_loss", "learning_rate", "total_steps", "eta_s",
      "tokens_per_s", "mean_token_accuracy", "eval_mean_token_accuracy"]) {
      if (typeof values[key] === "number") this.latest[key] = values[key];
    }
    this.lossChart.add(row.step, values);
    this.lrChart.add(row.step, values);
    this.pending.metrics = true;
    this.showSoon();
  }

  addLog(row) {
    this.pending.logs.push(row.line);
    // A tab in the background draws no frames: only the lines the tail will keep wait.
    if (this.pending.logs.length > 2 * LOG_LINES_KEPT) {
      this.pending.logs.splice(0, this.pending.logs.length - LOG_LINES_KEPT);
    }
    this.showSoon();
  }

  addStatus(row) {
    this.pending.statuses.push(row);
    this.showSoon();
  }

  // A page opened on a long job receives its whole history at once: drawing per row would
  // hold the page for seconds, so rows are drawn once per animation frame.
  showSoon() {
    if (this.frame === null) this.frame = requestAnimationFrame(() => this.showPending());
  }

  showPending() {
    this.frame = null;
    const { logs, statuses, metrics } = this.pending;
    this.pending = { logs: [], statuses: [], metrics: false };
    if (metrics) {
      this.lossChart.draw();
      this.lrChart.draw();
      this.showStats();
    }
    if (logs.length) {
      const atBottom = this.logs.scrollTop + this.logs.clientHeight >= this.logs.scrollHeight - 8;
      this.logs.append(...logs.slice(-LOG_LINES_KEPT).map((line) => `${line}\n`));
      const extra = this.logs.childNodes.length - LOG_LINES_KEPT;
      for (let i = 0; i < extra; i += 1) this.logs.firstChild.remove();
      if (atBottom) this.logs.scrollTop = this.logs.scrollHeight;
    }
    this.events.append(...statuses.map((row) => el("li", {},
      el("time", { datetime: row.at }, new Date(row.at).toLocaleTimeString()), " ",
      `${row.from_status ?? "new"} → ${row.to_status}`, row.reason ? `: ${row.reason}` : "")));
  }

  showFeedState(state) {
    this.feedMode.dataset.state = state;
    this.feedMode.textContent = FEED_STATES[state];
  }

  // The stream sent the finished job just before its `end`.
  finished() {
    if (this.finishedAtOpen) return;
    this.loadCheckpoints();
    this.loadDownloads();
  }

  async loadCheckpoints() {
    try {
      const list = await call(`/v1/fine_tuning/jobs/${this.job.job_id}/checkpoints?limit=100`);
      if (!list.data.length) return;
      replaceChildren(this.checkpoints, el("table", { class: "responsive compact" },
        el("thead", {}, el("tr", {}, ["Step", "Training loss", "Eval loss", ""].map(
          (h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, list.data.map((c) => el("tr", {},
          el("td", { "data-label": "Step" }, c.step_number),
          el("td", { "data-label": "Training loss" }, number(c.metrics.train_loss)),
          el("td", { "data-label": "Eval loss" }, number(c.metrics.valid_loss)),
          el("td", {}, this.downloadButton(c.download_url, `step-${c.step_number}.tar.gz`,
            `Download step ${c.step_number}`)))))));
    } catch (error) {
      replaceChildren(this.checkpoints, notice("error", error.message));
    }
  }

  exportForm() {
    const kind = el("select", { id: "export-kind" },
      EXPORT_KINDS.map(([value, label]) => el("option", { value }, label)));
    const button = el("button", { type: "submit", class: "button secondary" }, "Export");
    const form = el("form", { class: "export-form", "aria-label": "Export" },
      el("label", { for: "export-kind" }, "Export as"), kind, button);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      button.disabled = true;
      replaceChildren(this.problem);
      const [, , body] = EXPORT_KINDS.find(([value]) => value === kind.value);
      try {
        await call(`/v1/finetune/llm/${this.job.job_id}/exports`, { method: "POST", body });
        await this.loadDownloads();
      } catch (error) {
        replaceChildren(this.problem, notice("error", error.message));
      } finally {
        button.disabled = false;
      }
    });
    return form;
  }

  async loadDownloads() {
    clearTimeout(this.exportsRefresh);
    const id = this.job.job_id;
    try {
      const [artifacts, exports] = await Promise.all([
        call(`/v1/finetune/llm/${id}/artifacts`), call(`/v1/finetune/llm/${id}/exports`)]);
      // A worker builds an export after the request: its status is followed until it is done.
      if (exports.exports.some((x) => x.status === "QUEUED" || x.status === "RUNNING")) {
        this.exportsRefresh = setTimeout(() => this.loadDownloads(), EXPORTS_REFRESH_MS);
      }
      if (!artifacts.artifacts.length) {
        replaceChildren(this.downloads, el("p", { class: "muted" },
          this.job.status === "COMPLETED" ? "No artifacts in storage." : "This job produced no artifacts."));
        return;
      }
      replaceChildren(this.downloads,
        artifacts.archive_url ? el("p", {}, this.downloadButton(artifacts.archive_url,
          `${id}-adapter.tar.gz`, "Download adapter (.tar.gz)", "button")) : null,
        el("ul", { class: "files", id: "artifacts" }, artifacts.artifacts.map((a) => el("li", {},
          this.downloadButton(a.download_url, a.name.split("/").pop(), a.name, "link-button"),
          el("span", { class: "muted" }, ` ${bytes(a.size)}`)))),
        exports.exports.length ? el("h3", {}, "Exports") : null,
        el("ul", { class: "files", id: "exports" }, exports.exports.map((x) => el("li", {
          "data-export": x.export_id },
          el("strong", {}, `${x.format}${x.quantization ? ` ${x.quantization}` : ""}`), " ",
          statusBadge(x.status), " ",
          x.error ? el("span", { class: "error-text" }, x.error, " ") : null,
          x.artifacts.map((name) => this.downloadButton(
            `/v1/finetune/llm/${id}/artifacts/${name}`, name.split("/").pop(), name, "link-button"))))));
    } catch (error) {
      replaceChildren(this.downloads, notice("error", error.message));
    }
  }

  downloadButton(url, filename, label, kind = "button secondary small") {
    // A presigned storage URL carries its own authorization: a plain link, no key sent.
    if (/^https?:\/\//.test(url)) {
      return el("a", { href: url, class: kind, rel: "noreferrer", download: filename }, label);
    }
    const button = el("button", { type: "button", class: kind, "data-download": filename }, label);
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        await download(url, filename);
      } catch (error) {
        replaceChildren(this.problem, notice("error", error.message));
      } finally {
        button.disabled = false;
      }
    });
    return button;
  }

  leave() {
    this.stopFeed();
    this.timers.forEach(clearInterval);
    clearTimeout(this.exportsRefresh);
    if (this.frame !== null) cancelAnimationFrame(this.frame);
    this.lossChart.destroy();
    this.lrChart.destroy();
  }
}

const FEED_STATES = {
  connecting: "connecting…",
  live: "live",
  reconnecting: "reconnecting…",
  finished: "finished",
  stopped: "not following",
};
const ACTION_DONE = {
  cancel: "Cancel requested.",
  pause: "Pause requested.",
  resume: "Resume requested.",
};
