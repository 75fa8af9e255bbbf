// Ask a fine-tuned model and its base the same thing, side by side, through
// POST /v1/chat/completions; the models are those of GET /v1/models.
import { call } from "../api.js";
import { el, notice, replaceChildren } from "../elements.js";

export async function renderPlayground(main) {
  replaceChildren(main, el("div", { class: "page-head" }, el("h1", {}, "Playground")),
    el("p", { class: "loading", role: "status" }, "Loading models…"));
  let models;
  try {
    models = (await call("/v1/models")).data.map((m) => m.id);
  } catch (error) {
    replaceChildren(main, el("div", { class: "page-head" }, el("h1", {}, "Playground")),
      notice("error", error.message));
    return null;
  }
  const tuned = models.filter((id) => id.startsWith("ft:"));
  const panels = [
    new ChatPanel("left", "Fine-tuned model", models, tuned[0] ?? models[0]),
    new ChatPanel("right", "Base model", models, models.find((id) => !id.startsWith("ft:")) ?? models[0]),
  ];
  const prompt = el("textarea", { id: "playground-prompt", rows: 3, required: true });
  const send = el("button", { type: "submit", class: "button" }, "Send to both");
  const form = el("form", { class: "card chat-form", "aria-label": "Message" },
    el("div", {}, el("label", { for: "playground-prompt" }, "Message"), prompt), send);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text) return;
    send.disabled = true;
    prompt.value = "";
    await Promise.all(panels.map((panel) => panel.ask(text)));
    send.disabled = false;
    prompt.focus();
  });
  replaceChildren(main,
    el("div", { class: "page-head" }, el("div", {}, el("h1", {}, "Playground"),
      el("p", { class: "muted" }, "Served by the inference engine (", el("code", {}, "tunery up"), ")."))),
    models.length ? null : notice("info", "No models are offered yet."),
    el("div", { class: "playground" }, panels.map((p) => p.element)),
    form);
  return null;
}

class ChatPanel {
  constructor(id, title, models, chosen) {
    this.messages = [];
    this.select = el("select", { id: `model-${id}` },
      models.map((m) => el("option", { value: m, selected: m === chosen }, m)));
    this.select.addEventListener("change", () => {
      this.messages = [];
      this.log.replaceChildren();
    });
    this.log = el("div", { class: "chat-log", role: "log", "aria-live": "polite",
      "aria-label": `${title} conversation` });
    this.element = el("section", { class: "card", "aria-labelledby": `${id}-title` },
      el("h2", { id: `${id}-title` }, title),
      el("label", { for: `model-${id}` }, "Model"), this.select, this.log);
  }

  async ask(text) {
    this.messages.push({ role: "user", content: text });
    this.log.append(el("div", { class: "bubble user" }, text));
    const waiting = el("div", { class: "bubble assistant muted" }, "…");
    this.log.append(waiting);
    try {
      const answer = await call("/v1/chat/completions", { method: "POST", body: {
        model: this.select.value, messages: this.messages, max_tokens: 256 } });
      const content = answer.choices[0].message.content ?? "";
      this.messages.push({ role: "assistant", content });
      waiting.replaceWith(el("div", { class: "bubble assistant" }, content));
    } catch (error) {
      this.messages.pop();
      waiting.replaceWith(notice("error", error.message));
    }
    this.log.scrollTop = this.log.scrollHeight;
  }
}
