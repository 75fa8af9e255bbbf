export function renderNewJob() { return null; }
