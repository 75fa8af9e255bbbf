// Line charts of a job's metrics against its steps, drawn by the vendored uPlot
// (window.uPlot, loaded before the modules). A chart keeps its own columns so that points
// can be added one at a time as the stream brings them.

const COLORS = ["#2563eb", "#d97706", "#059669", "#7c3aed"];

export class StepChart {
  // series: [{ key: "loss", label: "training loss" }, ...]
  constructor(container, { title, series, valueFormat }) {
    this.series = series;
    this.steps = [];
    this.values = series.map(() => []);
    this.byStep = new Map();
    this.container = container;
    const options = {
      title,
      width: Math.max(280, container.clientWidth || 600),
      height: 220,
      scales: { x: { time: false } },
      legend: { live: true },
      axes: [
        { label: "step", stroke: "#334155", grid: { stroke: "#e2e8f0" } },
        { stroke: "#334155", grid: { stroke: "#e2e8f0" }, size: 64,
          values: (_, ticks) => ticks.map((v) => valueFormat(v)) },
      ],
      series: [
        { label: "step" },
        ...series.map((s, i) => ({
          label: s.label, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true,
          points: { show: s.points ?? false, size: 6 },
          value: (_, v) => (v === null || v === undefined ? "–" : valueFormat(v)),
        })),
      ],
    };
    this.plot = new window.uPlot(options, [[], ...series.map(() => [])], container);
    // What the browser tests read: the points uPlot itself holds.
    container.uplot = this.plot;
    this.resize = new ResizeObserver(() => {
      const width = container.clientWidth;
      if (width > 0 && Math.abs(width - this.plot.width) > 2) {
        this.plot.setSize({ width, height: this.plot.height });
      }
    });
    this.resize.observe(container);
  }

  // A metrics row: its values for this chart's series at its step. A later row for the same
  // step (a resumed attempt, or eval written beside train) fills in or replaces the values.
  add(step, values) {
    if (!this.series.some((s) => typeof values[s.key] === "number")) return false;
    let index = this.byStep.get(step);
    if (index === undefined) {
      index = this.steps.findIndex((s) => s > step);
      if (index === -1) index = this.steps.length;
      this.steps.splice(index, 0, step);
      this.values.forEach((column) => column.splice(index, 0, null));
      this.byStep = new Map(this.steps.map((s, i) => [s, i]));
    }
    this.series.forEach((s, i) => {
      if (typeof values[s.key] === "number") this.values[i][index] = values[s.key];
    });
    return true;
  }

  draw() {
    this.plot.setData([this.steps, ...this.values]);
  }

  get points() {
    return this.steps.length;
  }

  destroy() {
    this.resize.disconnect();
    this.plot.destroy();
  }
}
