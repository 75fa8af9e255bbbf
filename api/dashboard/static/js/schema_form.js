// A form generated from a JSON schema of the API's own OpenAPI document, so that it shows
// every field the API accepts, with the API's descriptions and defaults, and cannot drift.
import { el } from "./elements.js";

const LONG_TEXT = 4096;
const SECRET = /(token|_key)$/;

export function resolve(schema, document) {
  let current = schema;
  while (current && current.$ref) {
    const path = current.$ref.replace(/^#\//, "").split("/");
    current = path.reduce((node, part) => node[part], document);
  }
  return current;
}

// anyOf [X, null] is X, optional.
function unwrap(schema, document) {
  const resolved = resolve(schema, document);
  if (resolved.anyOf) {
    const options = resolved.anyOf.map((s) => resolve(s, document)).filter((s) => s.type !== "null");
    if (options.length === 1) {
      return { ...options[0], description: resolved.description, default: resolved.default,
        title: resolved.title, nullable: true };
    }
  }
  return resolved;
}

function kindOf(schema, document) {
  if (schema.enum || schema.const !== undefined) return "choice";
  if (schema.type === "boolean") return "boolean";
  if (schema.type === "integer" || schema.type === "number") return "number";
  if (schema.type === "string") return (schema.maxLength ?? 0) > LONG_TEXT ? "text" : "string";
  if (schema.type === "array" && resolve(schema.items ?? {}, document).type === "string") return "lines";
  return "json";
}

export class SchemaForm {
  constructor(bodySchema, document, prefill = {}) {
    this.document = document;
    this.fields = new Map();
    const root = resolve(bodySchema, document);
    const loose = [];
    this.sections = [];
    for (const [name, property] of Object.entries(root.properties)) {
      const schema = resolve(property, document);
      if (schema.type === "object" && schema.properties) {
        this.sections.push(this.section(name, schema, (root.required ?? []).includes(name), prefill));
      } else {
        loose.push([name, property]);
      }
    }
    if (loose.length) {
      this.sections.push(this.section("", { title: "Other", properties: Object.fromEntries(loose) },
        false, prefill));
    }
  }

  section(name, schema, required, prefill) {
    const id = `section-${name || "other"}`;
    const fields = Object.entries(schema.properties).map(([field, property]) =>
      this.field(name ? `${name}.${field}` : field, field, unwrap(property, this.document), prefill));
    return el("details", { class: "card form-section", open: required, id },
      el("summary", {}, el("span", {}, schema.title || name),
        required ? null : el("span", { class: "muted" }, " (optional)")),
      schema.description ? el("p", { class: "help" }, schema.description) : null,
      el("div", { class: "form-grid" }, fields));
  }

  field(path, name, schema, prefill) {
    const id = `field-${path.replaceAll(".", "-")}`;
    const kind = kindOf(schema, this.document);
    const described = [];
    const help = schema.description
      ? el("p", { class: "help", id: `${id}-help` }, schema.description) : null;
    if (help) described.push(help.id);
    const hasDefault = schema.default !== undefined && schema.default !== null;
    const defaultText = hasDefault
      ? el("span", { class: "default", id: `${id}-default` }, `default: ${JSON.stringify(schema.default)}`)
      : null;
    if (defaultText) described.push(defaultText.id);
    const error = el("p", { class: "field-error", id: `${id}-error`, "aria-live": "polite",
      "data-error-for": path });
    described.push(error.id);
    const initial = prefill[path] ?? schema.default;
    const common = { id, name: path, "aria-describedby": described.join(" ") };
    let input;
    if (kind === "choice") {
      const options = schema.enum ?? [schema.const];
      input = el("select", common, schema.nullable ? el("option", { value: "" }, "—") : null,
        options.map((o) => el("option", { value: o, selected: o === initial }, String(o))));
    } else if (kind === "boolean") {
      input = el("input", { ...common, type: "checkbox", checked: initial === true });
    } else if (kind === "number") {
      input = el("input", { ...common, type: "number", step: "any", inputmode: "decimal",
        value: initial ?? "" });
    } else if (kind === "string") {
      input = el("input", { ...common, type: SECRET.test(name) ? "password" : "text",
        autocomplete: "off", value: initial ?? "" });
    } else if (kind === "text") {
      input = el("textarea", { ...common, rows: 5 });
      input.value = initial ?? "";
    } else if (kind === "lines") {
      input = el("textarea", { ...common, rows: 3, placeholder: "one per line" });
      input.value = (initial ?? []).join("\n");
    } else {
      input = el("textarea", { ...common, rows: 3, placeholder: "JSON" });
      input.value = initial === undefined ? "" : JSON.stringify(initial);
    }
    const label = el("label", { for: id }, name);
    const wrapper = kind === "boolean"
      ? el("div", { class: "form-field", "data-field": path },
        el("div", { class: "checkbox-row" }, input, label), help, defaultText, error)
      : el("div", { class: `form-field${kind === "text" || kind === "json" ? " full" : ""}`,
        "data-field": path }, label, input, help, defaultText, error);
    this.fields.set(path, { input, kind, schema, error, wrapper });
    return wrapper;
  }

  // The request body, or throws a list of [path, message] for values that are not even JSON.
  value() {
    const body = {};
    const problems = [];
    for (const [path, { input, kind, schema }] of this.fields) {
      let value;
      const raw = input.value;
      if (kind === "boolean") value = input.checked;
      else if (kind === "number") value = raw.trim() === "" ? undefined : Number(raw);
      else if (kind === "choice") value = raw === "" ? undefined : (schema.enum ?? [schema.const]).find((o) => String(o) === raw);
      else if (kind === "lines") {
        const lines = raw.split("\n").map((l) => l.trim()).filter(Boolean);
        value = lines.length ? lines : undefined;
      } else if (kind === "json") {
        if (raw.trim() === "") value = undefined;
        else {
          try {
            value = JSON.parse(raw);
          } catch {
            problems.push([path, "not valid JSON"]);
            continue;
          }
        }
      } else value = raw === "" && (schema.nullable || !schema.default) ? undefined : raw;
      if (kind === "number" && Number.isNaN(value)) value = raw;
      if (value === undefined) continue;
      const parts = path.split(".");
      let node = body;
      for (const part of parts.slice(0, -1)) node = node[part] ??= {};
      node[parts.at(-1)] = value;
    }
    if (problems.length) throw problems;
    return body;
  }

  clearErrors() {
    for (const { error, wrapper } of this.fields.values()) {
      error.textContent = "";
      wrapper.classList.remove("invalid");
    }
  }

  // The API's `fields`: each message next to the field its path names (or the nearest
  // field above it, for a path into a list or an object); the rest are returned.
  showErrors(fields) {
    const unplaced = [];
    let first = null;
    for (const { path, message } of fields) {
      const parts = path.split(".");
      let found = null;
      while (parts.length && !found) {
        found = this.fields.get(parts.join("."));
        parts.pop();
      }
      if (!found) {
        unplaced.push({ path, message });
        continue;
      }
      found.error.textContent = found.error.textContent ? `${found.error.textContent} ${message}` : message;
      found.wrapper.classList.add("invalid");
      found.input.setAttribute("aria-invalid", "true");
      const section = found.wrapper.closest("details");
      if (section) section.open = true;
      first ??= found.input;
    }
    first?.focus();
    return unplaced;
  }
}
