export function renderPlayground() { return null; }
