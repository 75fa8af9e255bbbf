// The key's webhook endpoints (/v1/webhook_endpoints): add one (its signing secret is shown
// once, in the answer that creates it), send it a test event, see the attempts of its
// deliveries, delete it.
import { call } from "../api.js";
import { el, notice, replaceChildren } from "../elements.js";
import { dateTime } from "../format.js";
import { statusBadge } from "./jobs.js";

export async function renderWebhooks(main) {
  let eventTypes = [];
  try {
    eventTypes = (await call("/v1/webhook_event_types")).data;
  } catch (error) {
    replaceChildren(main, el("div", { class: "page-head" }, el("h1", {}, "Webhooks")),
      notice("error", error.message));
    return null;
  }
  const page = new WebhooksPage(main, eventTypes);
  page.loadEndpoints();
  return null;
}

class WebhooksPage {
  constructor(main, eventTypes) {
    this.eventTypes = eventTypes;
    this.status = el("div", { "aria-live": "assertive" });
    this.secret = el("div", { "aria-live": "polite" });
    this.list = el("div", { id: "webhook-list" });
    replaceChildren(main, el("div", { class: "page-head" }, el("h1", {}, "Webhooks")),
      this.createForm(eventTypes), this.secret, this.status, this.list);
  }

  createForm(eventTypes) {
    const url = el("input", { id: "webhook-url", type: "url", required: true,
      placeholder: "https://example.com/tunery-hooks" });
    const name = el("input", { id: "webhook-name", type: "text", maxlength: 200 });
    const boxes = eventTypes.map((type) => el("input", { type: "checkbox", value: type }));
    const button = el("button", { type: "submit", class: "button" }, "Add endpoint");
    const form = el("form", { class: "card webhook-form", "aria-labelledby": "webhook-form-title" },
      el("h2", { id: "webhook-form-title" }, "Add an endpoint"),
      el("div", { class: "field" }, el("label", { for: "webhook-url" }, "URL"), url),
      el("div", { class: "field" }, el("label", { for: "webhook-name" }, "Name (optional)"), name),
      el("fieldset", {}, el("legend", {}, "Event types (none chosen: every type)"),
        el("div", { class: "chips" }, boxes.map((box) => el("label", { class: "chip" }, box,
          " ", box.value)))),
      el("div", {}, button));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      button.disabled = true;
      replaceChildren(this.status);
      const chosen = boxes.filter((box) => box.checked).map((box) => box.value);
      try {
        const created = await call("/v1/webhook_endpoints", { method: "POST", body: {
          url: url.value, ...(name.value ? { name: name.value } : {}),
          ...(chosen.length ? { event_types: chosen } : {}) } });
        this.showSecret(created);
        form.reset();
        await this.loadEndpoints();
      } catch (error) {
        replaceChildren(this.status, notice("error", error.message));
      } finally {
        button.disabled = false;
      }
    });
    return form;
  }

  // The API shows a secret only in the answer that made it: it is kept nowhere in the page.
  showSecret(created) {
    replaceChildren(this.secret, el("section", { class: "card secret", "aria-labelledby": "secret-title" },
      el("h2", { id: "secret-title" }, `Signing secret of ${created.name}`),
      el("p", {}, "Copy it now: it is not shown again. Deliveries are signed with it."),
      el("code", { id: "new-secret", class: "mono" }, created.signing_secret),
      el("p", {}, el("button", { type: "button", class: "button secondary small",
        onclick: () => replaceChildren(this.secret) }, "Done"))));
  }

  async loadEndpoints() {
    try {
      const { data } = await call("/v1/webhook_endpoints?limit=100");
      if (!data.length) {
        replaceChildren(this.list, el("div", { class: "card empty" },
          el("p", {}, "No webhook endpoints yet.")));
        return;
      }
      replaceChildren(this.list, el("div", { class: "card table-card" },
        el("table", { class: "responsive" },
          el("thead", {}, el("tr", {}, ["Name", "URL", "Events", "Secret", "State", ""].map(
            (h) => el("th", { scope: "col" }, h)))),
          el("tbody", {}, data.map((endpoint) => this.rows(endpoint))))));
    } catch (error) {
      replaceChildren(this.list, notice("error", error.message));
    }
  }

  // The endpoint's row, and a full-width row under it for its attempts.
  rows(endpoint) {
    const attempts = el("div", { class: "attempts" });
    const attemptsRow = el("tr", { class: "attempts-row", hidden: true },
      el("td", { colspan: 6 }, attempts));
    const showAttempts = el("button", { type: "button", class: "button secondary small" }, "Attempts");
    showAttempts.addEventListener("click", () => {
      attemptsRow.hidden = !attemptsRow.hidden;
      if (!attemptsRow.hidden) this.loadAttempts(endpoint, attempts);
    });
    const test = el("button", { type: "button", class: "button secondary small" }, "Send test");
    test.addEventListener("click", async () => {
      test.disabled = true;
      replaceChildren(this.status);
      try {
        const result = await call(`/v1/webhook_endpoints/${endpoint.id}/test`, { method: "POST" });
        // Only a 2xx counts as delivered: any other answer would have a delivery retried.
        replaceChildren(this.status, notice(result.delivered ? "success" : "error",
          `${endpoint.name} answered the test event with ${result.status_code}.` +
          (result.delivered ? "" : " Only a 2xx counts as delivered.")));
      } catch (error) {
        replaceChildren(this.status, notice("error", error.message));
      } finally {
        test.disabled = false;
        attemptsRow.hidden = false;
        this.loadAttempts(endpoint, attempts);
      }
    });
    // Two clicks: a deleted endpoint and its pending deliveries cannot be brought back.
    const remove = el("button", { type: "button", class: "button danger small" }, "Delete");
    remove.addEventListener("click", async () => {
      if (remove.dataset.confirm !== "yes") {
        remove.dataset.confirm = "yes";
        remove.textContent = "Confirm delete";
        return;
      }
      remove.disabled = true;
      try {
        await call(`/v1/webhook_endpoints/${endpoint.id}`, { method: "DELETE" });
        replaceChildren(this.status, notice("success", `Deleted ${endpoint.name}.`));
        await this.loadEndpoints();
      } catch (error) {
        replaceChildren(this.status, notice("error", error.message));
        remove.disabled = false;
      }
    });
    const everyType = this.eventTypes.every((type) => endpoint.event_types.includes(type));
    return [el("tr", { "data-endpoint-id": endpoint.id },
      el("td", { "data-label": "Name" }, el("span", { class: "cell" }, endpoint.name)),
      el("td", { "data-label": "URL", class: "mono" }, el("span", { class: "cell" }, endpoint.url)),
      el("td", { "data-label": "Events" }, el("span", { class: "cell" },
        everyType ? "every type" : endpoint.event_types.join(", "))),
      el("td", { "data-label": "Secret", class: "mono" }, endpoint.signing_secret_hint ?? "–"),
      el("td", { "data-label": "State" }, endpoint.enabled ? "enabled"
        : `disabled${endpoint.disabled_reason ? `: ${endpoint.disabled_reason}` : ""}`),
      el("td", {}, el("div", { class: "row-actions" }, showAttempts, test, remove))),
    attemptsRow];
  }

  async loadAttempts(endpoint, box) {
    try {
      const { data } = await call(`/v1/webhook_endpoints/${endpoint.id}/attempts?limit=20`);
      if (!data.length) {
        replaceChildren(box, el("p", { class: "muted" }, "No deliveries yet."));
        return;
      }
      replaceChildren(box, el("table", { class: "compact attempts-table" },
        el("thead", {}, el("tr", {}, ["Event", "Try", "Answer", "Delivery", "Started"].map(
          (h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, data.map((a) => el("tr", { "data-attempt-id": a.id },
          el("td", {}, a.event_type, a.test ? " (test)" : ""),
          el("td", {}, a.attempt),
          el("td", {}, a.status_code ?? a.error ?? "–"),
          el("td", {}, statusBadge(a.delivery_status)),
          el("td", {}, dateTime(new Date(a.started_at * 1000).toISOString())))))));
    } catch (error) {
      replaceChildren(box, notice("error", error.message));
    }
  }
}
