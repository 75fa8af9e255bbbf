// The dashboard's entry: who is signed in (GET /v1/me) and which page the hash names.
import { ApiError, call } from "./api.js";
import { el, notice, replaceChildren } from "./elements.js";
import { forgetKey, storedKey } from "./session.js";
import { renderDatasets } from "./pages/datasets.js";
import { renderJob } from "./pages/job.js";
import { renderJobs } from "./pages/jobs.js";
import { renderNewJob } from "./pages/new_job.js";
import { renderPlayground } from "./pages/playground.js";
import { renderSignIn } from "./pages/signin.js";

const main = document.getElementById("main");
const topbar = document.getElementById("topbar");
let me = null;
let leavePage = null;

const ROUTES = [
  [/^#\/jobs\/([A-Za-z0-9-]+)$/, "jobs", (m, ctx) => renderJob(main, ctx, decodeURIComponent(m[1]))],
  [/^#\/new(?:\?.*)?$/, "new", (_, ctx) => renderNewJob(main, ctx)],
  [/^#\/datasets$/, "datasets", (_, ctx) => renderDatasets(main, ctx)],
  [/^#\/playground$/, "playground", (_, ctx) => renderPlayground(main, ctx)],
  [/^#\/jobs(?:\?.*)?$/, "jobs", (_, ctx) => renderJobs(main, ctx)],
];

async function route() {
  leavePage?.();
  leavePage = null;
  if (!storedKey()) return showSignIn();
  if (!me) {
    try {
      me = await call("/v1/me");
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) {
        forgetKey();
        return showSignIn(error.message);
      }
      replaceChildren(main, notice("error", error.message));
      return;
    }
  }
  showTopbar();
  const hash = location.hash || "#/jobs";
  const found = ROUTES.find(([pattern]) => pattern.test(hash));
  if (!found) {
    location.replace("#/jobs");
    return;
  }
  const [pattern, nav, render] = found;
  markNav(nav);
  const ctx = { me, signOut };
  leavePage = (await render(hash.match(pattern), ctx)) || null;
  main.focus({ preventScroll: true });
}

function showSignIn(message) {
  topbar.hidden = true;
  me = null;
  renderSignIn(main, {
    message,
    signedIn: (caller) => {
      me = caller;
      if (!location.hash || location.hash === "#/signin") location.hash = "#/jobs";
      else route();
    },
  });
}

function showTopbar() {
  topbar.hidden = false;
  const who = document.getElementById("who");
  replaceChildren(who, me.key_name, " ",
    el("span", { class: `role role-${me.role}` }, me.role === "admin" ? "admin" : "member"));
}

function markNav(name) {
  for (const link of topbar.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

function signOut(message) {
  forgetKey();
  me = null;
  leavePage?.();
  leavePage = null;
  showSignIn(message);
}

document.getElementById("sign-out").addEventListener("click", () => signOut());
window.addEventListener("hashchange", route);
route();
