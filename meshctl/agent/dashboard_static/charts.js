// Small SVG line charts of the last five minutes, one per golden signal.
"use strict";
window.M = window.M || {};

M.CHART_SECONDS = 300;

// points: [[epoch, value], ...]; value may be null (no requests then): the line breaks there.
M.sparkline = function (points, opts) {
  const width = 300, height = 56, top = 4, bottom = 2;
  const now = opts.now;
  const x = (t) => ((t - (now - M.CHART_SECONDS)) / M.CHART_SECONDS) * width;
  const values = points.map((p) => p[1]).filter((v) => v !== null && v !== undefined);
  let max = opts.max !== undefined ? opts.max : Math.max(1e-9, ...values) * 1.15;
  let min = opts.min !== undefined ? opts.min : 0;
  if (max <= min) max = min + 1;
  const y = (v) => top + (1 - (v - min) / (max - min)) * (height - top - bottom);
  const svg = M.s("svg", {class: "spark", viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none",
                          role: "img", "aria-label": opts.label});
  let segment = [];
  const segments = [];
  for (const [t, v] of points) {
    if (v === null || v === undefined) { if (segment.length) segments.push(segment); segment = []; continue; }
    segment.push([x(t), y(v)]);
  }
  if (segment.length) segments.push(segment);
  for (const seg of segments) {
    const line = seg.map(([px, py], i) => (i ? "L" : "M") + px.toFixed(1) + " " + py.toFixed(1)).join(" ");
    if (seg.length > 1) {
      const area = line + ` L${seg[seg.length - 1][0].toFixed(1)} ${height - bottom} L${seg[0][0].toFixed(1)} ${height - bottom} Z`;
      svg.append(M.s("path", {class: "area", d: area}));
    }
    svg.append(M.s("path", {class: "line", d: seg.length > 1 ? line : line + " l0.5 0"}));
  }
  return svg;
};

M.chart = function (title, points, now, format, extra) {
  const last = points.length ? points[points.length - 1][1] : null;
  const values = points.map((p) => p[1]).filter((v) => v !== null && v !== undefined);
  const peak = values.length ? Math.max(...values) : null;
  return M.h("div", {class: "chart"},
    M.h("h3", {}, title),
    M.h("div", {class: "now"}, format(last)),
    M.sparkline(points, Object.assign({now, format, label: title}, extra || {})),
    M.h("div", {class: "chart-axis"}, M.h("span", {}, "−5 min"), M.h("span", {}, "peak " + format(peak)), M.h("span", {}, "now")));
};
