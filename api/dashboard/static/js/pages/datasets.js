// Upload a dataset (with the upload's progress), see its columns and first rows, and preview
// a prompt template on it, prompt and completion apart, before any job is submitted.
import { authHeaders, call, errorOf } from "../api.js";
import { el, notice, replaceChildren } from "../elements.js";
import { age, bytes } from "../format.js";

const DEFAULT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}";

export function renderDatasets(main) {
  const file = el("input", { id: "dataset-file", name: "file", type: "file", required: true,
    accept: ".json,.jsonl,.csv,.parquet", "aria-describedby": "dataset-file-help" });
  const progress = el("progress", { id: "upload-progress", max: 100, value: 0,
    "aria-label": "Upload progress", hidden: true });
  const progressText = el("span", { id: "upload-progress-text", "aria-live": "polite" });
  const uploadStatus = el("div", { "aria-live": "assertive" });
  const button = el("button", { type: "submit", class: "button" }, "Upload");
  const form = el("form", { class: "card upload", "aria-labelledby": "upload-title" },
    el("h2", { id: "upload-title" }, "Upload a dataset"),
    el("div", {}, el("label", { for: "dataset-file" }, "File"), file,
      el("p", { class: "help", id: "dataset-file-help" }, "json, jsonl, csv or parquet.")),
    el("div", { class: "progress" }, progress, progressText),
    uploadStatus, el("div", {}, button));
  const detail = el("div", { id: "dataset-detail" });
  const list = el("div", { id: "dataset-list" });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!file.files.length) {
      replaceChildren(uploadStatus, notice("error", "Choose a file first."));
      return;
    }
    button.disabled = true;
    progress.hidden = false;
    replaceChildren(uploadStatus);
    upload(file.files[0], (fraction) => {
      progress.value = Math.round(fraction * 100);
      progressText.textContent = `${Math.round(fraction * 100)} %`;
    }).then((dataset) => {
      replaceChildren(uploadStatus, notice("success", `Uploaded ${dataset.name}: ${dataset.rows} rows.`));
      showDataset(detail, dataset);
      loadList(list, detail);
    }).catch((error) => {
      replaceChildren(uploadStatus, notice("error", error.message));
    }).finally(() => {
      button.disabled = false;
    });
  });
  replaceChildren(main, el("div", { class: "page-head" }, el("h1", {}, "Datasets")), form, detail, list);
  loadList(list, detail);
  return null;
}

// XMLHttpRequest, not fetch: only it reports the progress of what it sends.
function upload(blob, onProgress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", "/v1/datasets");
    for (const [name, value] of Object.entries(authHeaders())) request.setRequestHeader(name, value);
    request.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    });
    request.addEventListener("load", async () => {
      const response = new Response(request.responseText, { status: request.status,
        statusText: request.statusText });
      if (request.status >= 200 && request.status < 300) {
        onProgress(1);
        resolve(await response.json());
      } else reject(await errorOf(response));
    });
    request.addEventListener("error", () => reject(new Error("The upload failed: the API cannot be reached.")));
    const body = new FormData();
    body.append("file", blob);
    request.send(body);
  });
}

async function loadList(list, detail) {
  try {
    const found = await call("/v1/datasets?limit=50");
    if (!found.items.length) {
      replaceChildren(list);
      return;
    }
    replaceChildren(list, el("section", { class: "card table-card", "aria-labelledby": "datasets-title" },
      el("h2", { id: "datasets-title", class: "pad" }, "Your datasets"),
      el("table", { class: "responsive" },
        el("thead", {}, el("tr", {}, ["Name", "Rows", "Size", "Uploaded", ""].map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, found.items.map((d) => el("tr", {},
          el("td", { "data-label": "Name" }, d.name),
          el("td", { "data-label": "Rows" }, d.rows ?? d.status),
          el("td", { "data-label": "Size" }, bytes(d.size_bytes)),
          el("td", { "data-label": "Uploaded" }, age(d.created_at)),
          el("td", {}, el("button", { type: "button", class: "button secondary small",
            onclick: () => showDataset(detail, d) }, "Open"))))))));
  } catch (error) {
    replaceChildren(list, notice("error", error.message));
  }
}

function showDataset(detail, dataset) {
  const columns = dataset.columns ?? [];
  const template = el("textarea", { id: "preview-template", rows: 6, "aria-describedby": "preview-template-help" });
  template.value = DEFAULT_TEMPLATE;
  const result = el("div", { id: "preview-result", "aria-live": "polite" });
  const previewForm = el("form", { "aria-labelledby": "preview-title" },
    el("h3", { id: "preview-title" }, "Template preview"),
    el("label", { for: "preview-template" }, "Prompt template"),
    template,
    el("p", { class: "help", id: "preview-template-help" },
      "Placeholders in braces name columns; the last one and the text after it are the completion."),
    el("button", { type: "submit", class: "button" }, "Preview"),
    result);
  previewForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    replaceChildren(result, el("p", { class: "muted" }, "Rendering…"));
    try {
      const preview = await call(`/v1/datasets/${dataset.id}/preview`, {
        method: "POST", body: { prompt_template: template.value, n: 3 } });
      replaceChildren(result, showPreview(preview));
    } catch (error) {
      replaceChildren(result, notice("error", error.message));
    }
  });
  const trainHref = `#/new?${new URLSearchParams({ "data_config.data_path": dataset.id })}`;
  replaceChildren(detail, el("section", { class: "card", "aria-labelledby": "dataset-title" },
    el("div", { class: "section-head" },
      el("h2", { id: "dataset-title" }, dataset.name),
      el("a", { href: trainHref, class: "button secondary small" }, "Train on this dataset")),
    dataset.error ? notice("error", dataset.error) : null,
    el("p", { class: "muted" }, `${dataset.id} · ${dataset.format ?? "?"} · ${dataset.rows ?? "?"} rows · `,
      `${bytes(dataset.size_bytes)}`),
    el("h3", {}, "Columns"),
    el("ul", { class: "chips", id: "dataset-columns" }, columns.map((c) => el("li", { class: "chip" }, c))),
    el("h3", {}, "First rows"),
    el("div", { class: "rows-table" }, el("table", { id: "first-rows" },
      el("thead", {}, el("tr", {}, columns.map((c) => el("th", { scope: "col" }, c)))),
      el("tbody", {}, dataset.first_rows.map((row) => el("tr", {},
        columns.map((c) => el("td", {}, typeof row[c] === "string" ? row[c] : JSON.stringify(row[c])))))))),
    previewForm));
  detail.scrollIntoView({ block: "start" });
}

function showPreview(preview) {
  return el("div", {},
    preview.missing_columns.length
      ? el("p", { class: "notice error", role: "alert", id: "missing-columns" }, "Missing columns: ",
        preview.missing_columns.map((c) => el("code", { class: "missing" }, `{${c}}`)).flatMap((c, i) => (i ? [", ", c] : [c])))
      : null,
    el("p", { class: "muted" }, preview.message),
    preview.examples.map((example, i) => el("div", { class: "example" },
      el("h4", {}, `Example ${i + 1}`),
      example.problem ? notice("error", example.problem) : null,
      el("div", { class: "preview-grid" },
        el("div", {}, el("p", { class: "help" }, "Prompt (not trained)"),
          el("pre", { class: "preview-part prompt" }, example.prompt)),
        el("div", {}, el("p", { class: "help" }, "Completion (trained)"),
          el("pre", { class: "preview-part completion" }, example.completion))))));
}
