export function renderDatasets() { return null; }
