// The API key of the person signed in. sessionStorage only: it ends with the tab, is never
// sent as a cookie and never appears in a URL.
const KEY_NAME = "tunery.api_key";

export function storedKey() {
  return sessionStorage.getItem(KEY_NAME);
}

export function storeKey(key) {
  sessionStorage.setItem(KEY_NAME, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_NAME);
}
