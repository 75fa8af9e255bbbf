// Submit a job with a form generated from the API's OpenAPI schema (the request body of
// POST /v1/finetune/llm); the API's errors are shown next to the fields they name.
import { call } from "../api.js";
import { el, notice, replaceChildren } from "../elements.js";
import { SchemaForm } from "../schema_form.js";

export async function renderNewJob(main) {
  replaceChildren(main, el("p", { class: "loading", role: "status" }, "Loading the API schema…"));
  let document;
  try {
    const response = await fetch("/openapi.json", { cache: "no-store" });
    document = await response.json();
  } catch {
    replaceChildren(main, notice("error", "The API's schema (/openapi.json) could not be read."));
    return null;
  }
  const operation = document.paths["/v1/finetune/llm"].post;
  const bodySchema = operation.requestBody.content["application/json"].schema;
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const prefill = Object.fromEntries([...params].filter(([k]) => k.includes(".")));
  const form = new SchemaForm(bodySchema, document, prefill);
  const status = el("div", { id: "submit-status", "aria-live": "assertive" });
  const submit = el("button", { type: "submit", class: "button" }, "Submit job");
  const element = el("form", { class: "new-job", novalidate: true, "aria-labelledby": "new-job-title" },
    form.sections,
    status,
    el("div", { class: "sticky-actions" }, submit,
      el("span", { class: "muted" }, "Every field and default comes from the API's own schema.")));
  element.addEventListener("submit", async (event) => {
    event.preventDefault();
    form.clearErrors();
    replaceChildren(status);
    let body;
    try {
      body = form.value();
    } catch (problems) {
      form.showErrors(problems.map(([path, message]) => ({ path, message })));
      return;
    }
    submit.disabled = true;
    try {
      const submitted = await call("/v1/finetune/llm", { method: "POST", body });
      location.hash = `#/jobs/${submitted.job_id}`;
    } catch (error) {
      const unplaced = form.showErrors(error.fields ?? []);
      replaceChildren(status, notice("error", error.message),
        unplaced.length ? el("ul", { class: "error-text" },
          unplaced.map((f) => el("li", {}, el("code", {}, f.path), ": ", f.message))) : null);
      if (!error.fields?.length) status.focus();
    } finally {
      submit.disabled = false;
    }
  });
  replaceChildren(main,
    el("div", { class: "page-head" }, el("div", {},
      el("h1", { id: "new-job-title" }, "New fine-tuning job"),
      el("p", { class: "muted" }, operation.summary ?? ""))),
    element);
  return null;
}
