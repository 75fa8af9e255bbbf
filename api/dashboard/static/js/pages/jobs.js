// The job list (GET /v1/finetune/llm with its filters: status, base_model, limit, offset),
// refreshed every few seconds while the page is open. An admin key sees every tenant's jobs.
import { call } from "../api.js";
import { el, notice, replaceChildren } from "../elements.js";
import { age, percent } from "../format.js";

const STATUSES = ["QUEUED", "RUNNING", "PAUSED", "COMPLETED", "FAILED", "CANCELLED"];
const PAGE = 20;
const REFRESH_MS = 5000;

export function statusBadge(status) {
  return el("span", { class: `badge status-${status.toLowerCase()}` }, status);
}

export function progressBar(fraction, label) {
  const value = Math.round((fraction ?? 0) * 100);
  return el("div", { class: "progress" },
    el("progress", { max: 100, value, "aria-label": label }),
    el("span", { class: "progress-text" }, percent(fraction)));
}

export function renderJobs(main, { me }) {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const filters = {
    status: params.getAll("status").filter((s) => STATUSES.includes(s)),
    base_model: params.get("base_model") || "",
    offset: Math.max(0, Number(params.get("offset")) || 0),
  };
  const admin = me.role === "admin";
  const results = el("div", { id: "jobs-results", "aria-live": "polite" });
  const statusBoxes = STATUSES.map((status) => el("label", { class: "chip" },
    el("input", { type: "checkbox", name: "status", value: status,
      checked: filters.status.includes(status) }), status));
  const baseModel = el("input", { id: "filter-base-model", name: "base_model", type: "text",
    value: filters.base_model, placeholder: "exactly as submitted" });
  const form = el("form", { class: "filters card", role: "search", "aria-label": "Filter jobs" },
    el("fieldset", {}, el("legend", {}, "Status"), el("div", { class: "chips" }, statusBoxes)),
    el("div", { class: "field" }, el("label", { for: "filter-base-model" }, "Base model"), baseModel),
    el("div", { class: "filter-actions" },
      el("button", { type: "submit", class: "button" }, "Apply filters"),
      el("a", { href: "#/jobs", class: "button secondary" }, "Clear")));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const next = new URLSearchParams();
    for (const box of form.querySelectorAll("input[name=status]:checked")) next.append("status", box.value);
    if (baseModel.value.trim()) next.set("base_model", baseModel.value.trim());
    location.hash = `#/jobs${next.size ? `?${next}` : ""}`;
  });

  replaceChildren(main,
    el("div", { class: "page-head" },
      el("h1", {}, admin ? "Jobs (every tenant)" : "Jobs"),
      el("a", { href: "#/new", class: "button" }, "New job")),
    form, results);

  let timer = null;
  let stopped = false;
  async function load() {
    const query = new URLSearchParams({ limit: PAGE, offset: filters.offset });
    for (const status of filters.status) query.append("status", status);
    if (filters.base_model) query.set("base_model", filters.base_model);
    try {
      const list = await call(`/v1/finetune/llm?${query}`);
      if (!stopped) replaceChildren(results, jobTable(list, admin, filters));
    } catch (error) {
      if (!stopped) replaceChildren(results, notice("error", error.message));
    }
    if (!stopped) timer = setTimeout(load, REFRESH_MS);
  }
  load();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

function jobTable(list, admin, filters) {
  if (!list.items.length) {
    return el("div", { class: "card empty" }, el("p", {}, "No jobs match. "),
      el("a", { href: "#/new" }, "Submit a job"));
  }
  const now = Date.now();
  const headers = ["Job", ...(admin ? ["Tenant"] : []), "Status", "Base model", "Progress", "Age"];
  const rows = list.items.map((job) => el("tr", { "data-job-id": job.job_id },
    el("td", { "data-label": "Job" },
      el("a", { href: `#/jobs/${job.job_id}`, class: "mono" }, job.job_id.slice(0, 8))),
    admin ? el("td", { "data-label": "Tenant", class: "mono tenant" },
      el("span", { class: "cell" }, job.tenant_id)) : null,
    el("td", { "data-label": "Status" }, statusBadge(job.status),
      job.phase ? el("span", { class: "phase" }, job.phase) : null),
    el("td", { "data-label": "Base model", class: "model" },
      el("span", { class: "cell" }, job.base_model)),
    el("td", { "data-label": "Progress" }, progressBar(job.progress, `Progress of ${job.job_id}`)),
    el("td", { "data-label": "Age" },
      el("time", { datetime: job.created_at, title: job.created_at }, age(job.created_at, now)))));
  const last = Math.min(list.offset + list.items.length, list.total);
  const pageLink = (offset, label) => {
    const query = new URLSearchParams();
    for (const status of filters.status) query.append("status", status);
    if (filters.base_model) query.set("base_model", filters.base_model);
    query.set("offset", offset);
    return el("a", { href: `#/jobs?${query}`, class: "button secondary" }, label);
  };
  return el("div", { class: "card table-card" },
    el("table", { class: "jobs responsive" },
      el("caption", { class: "visually-hidden" }, "Jobs, newest first"),
      el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, rows)),
    el("div", { class: "pager" },
      el("span", {}, `${list.offset + 1}–${last} of ${list.total}`),
      list.offset > 0 ? pageLink(Math.max(0, list.offset - list.limit), "Newer") : null,
      last < list.total ? pageLink(list.offset + list.limit, "Older") : null));
}
