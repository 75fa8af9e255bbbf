// Every call to the Tunery API: the signed-in key as `Authorization: Bearer`, and the API's
// one error shape ({"error": {"code", "message", "fields"}}) turned into an ApiError.
import { storedKey } from "./session.js";

export class ApiError extends Error {
  constructor(status, message, code = null, fields = []) {
    super(message);
    this.status = status;
    this.code = code;
    this.fields = fields;
  }
}

export function authHeaders(key = storedKey(), extra = {}) {
  return { ...extra, Authorization: `Bearer ${key}` };
}

export async function errorOf(response) {
  let message = `${response.status} ${response.statusText || "error"}`;
  let code = null;
  let fields = [];
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
      fields = Array.isArray(body.error.fields) ? body.error.fields : [];
    }
  } catch {
    // Not JSON (a proxy's page): the status line is all there is to show.
  }
  return new ApiError(response.status, message, code, fields);
}

export async function call(path, { method = "GET", body, key, signal } = {}) {
  const headers = authHeaders(key);
  let payload;
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body: payload, signal, cache: "no-store" });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "The Tunery API cannot be reached; check the connection.");
  }
  if (!response.ok) throw await errorOf(response);
  if (response.status === 204) return null;
  return response.json();
}

// A download that needs the key: a plain link cannot send the header, so the bytes are
// fetched, held as a blob and saved through an object URL.
export async function download(path, filename) {
  const response = await fetch(path, { headers: authHeaders(), cache: "no-store" });
  if (!response.ok) throw await errorOf(response);
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  // After the click has handed the URL to the download.
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  return blob.size;
}
