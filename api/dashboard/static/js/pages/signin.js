// Sign in with an API key: checked with GET /v1/me before it is kept.
import { call } from "../api.js";
import { el, notice, replaceChildren } from "../elements.js";
import { storeKey } from "../session.js";

export function renderSignIn(main, { message, signedIn }) {
  const error = el("div", { id: "signin-error", "aria-live": "assertive" },
    message ? notice("error", message) : null);
  const input = el("input", {
    id: "api-key", name: "api_key", type: "password", autocomplete: "off", required: true,
    spellcheck: "false", "aria-describedby": "api-key-help signin-error",
  });
  const button = el("button", { type: "submit", class: "button" }, "Sign in");
  const form = el("form", { class: "card signin", "aria-labelledby": "signin-title" },
    el("h1", { id: "signin-title" }, "Sign in to Tunery"),
    el("label", { for: "api-key" }, "API key"),
    input,
    el("p", { id: "api-key-help", class: "help" },
      "The key stays in this tab only (sessionStorage) and is sent as a Bearer token. ",
      "Create one with ", el("code", {}, "tunery keys create --name <you>"), "."),
    error,
    button);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    button.disabled = true;
    replaceChildren(error);
    try {
      const caller = await call("/v1/me", { key });
      storeKey(key);
      signedIn(caller);
    } catch (failure) {
      replaceChildren(error, notice("error", failure.message));
      input.focus();
      input.select();
    } finally {
      button.disabled = false;
    }
  });
  replaceChildren(main, el("div", { class: "signin-page" }, form));
  input.focus();
}
