// The topology: services in columns by dependency depth (the ingress first), each
// service@version a node coloured by success rate, edges from live traffic.
(function () {
"use strict";
window.M = window.M || {};

const BOX_W = 250, HEAD_H = 30, VER_H = 40, VER_GAP = 6, PAD = 24, COL_GAP = 120, ROW_GAP = 26, LANE = 12;

// Every caller -> callee pair: declared (ingress routes, upstreams) and seen (live edges).
M.topologyLinks = function (state) {
  const links = new Map();
  const add = function (source, destination) {
    if (source === destination) return null;
    const key = source + ">" + destination;
    if (!links.has(key)) links.set(key, {source, destination, edge: null});
    return links.get(key);
  };
  if (state.ingress) for (const route of state.ingress.routes) add("ingress", route.service);
  for (const svc of state.services) for (const up of svc.upstreams) add(svc.name, up);
  for (const edge of state.edges) {
    const link = add(edge.source, edge.destination);
    if (link) link.edge = edge;
  }
  return [...links.values()];
};

// Depth of each node: the longest chain of calls from the ingress (cycles are cut at N rounds).
M.depths = function (nodes, links) {
  const depth = {};
  for (const node of nodes) depth[node] = node === "ingress" ? 0 : 1;
  for (let round = 0; round < nodes.length; round++) {
    let changed = false;
    for (const link of links) {
      if (!(link.source in depth) || !(link.destination in depth)) continue;
      const d = depth[link.source] + 1;
      if (d > depth[link.destination] && d <= nodes.length) { depth[link.destination] = d; changed = true; }
    }
    if (!changed) break;
  }
  return depth;
};

function boxHeight(node) {
  return HEAD_H + Math.max(1, node.rows) * (VER_H + VER_GAP) + 4;
}

// Positions: columns by depth; inside a column, ordered by where their callers sit.
M.layout = function (state) {
  const links = M.topologyLinks(state);
  const known = new Set(state.services.map((s) => s.name));
  const nodes = [];
  if (state.ingress) nodes.push({id: "ingress", kind: "ingress", rows: 1});
  for (const svc of state.services) nodes.push({id: svc.name, kind: "service", svc, rows: svc.versions.length});
  for (const link of links) {  // callees outside the mesh (egress hosts) get a node of their own
    if (!known.has(link.destination) && link.destination !== "ingress" && !nodes.some((n) => n.id === link.destination)) {
      nodes.push({id: link.destination, kind: "external", rows: 1});
    }
  }
  const ids = nodes.map((n) => n.id);
  const depth = M.depths(ids, links.filter((l) => ids.includes(l.source)));
  const columns = [];
  for (const node of nodes) (columns[depth[node.id]] = columns[depth[node.id]] || []).push(node);
  const placed = {};
  let tallest = 0;
  const dense = columns.filter(Boolean);
  dense.forEach(function (column, index) {
    if (index > 0) {
      const rank = (node) => {
        const ys = links.filter((l) => l.destination === node.id && placed[l.source]).map((l) => placed[l.source].cy);
        return ys.length ? ys.reduce((a, b) => a + b, 0) / ys.length : Infinity;
      };
      column.sort((a, b) => rank(a) - rank(b));
    }
    let y = 0;
    for (const node of column) {
      node.x = PAD + index * (BOX_W + COL_GAP);
      node.y = y;
      node.h = boxHeight(node);
      node.cy = y + node.h / 2;
      placed[node.id] = node;
      y += node.h + ROW_GAP;
    }
    column.height = y - ROW_GAP;
    tallest = Math.max(tallest, column.height);
  });
  for (const column of dense) {  // centre each column on the tallest
    const shift = PAD + 20 + (tallest - column.height) / 2;
    for (const node of column) { node.y += shift; node.cy += shift; }
  }
  for (const node of nodes) node.column = dense.findIndex((column) => column.includes(node));
  return {nodes, links: links.filter((l) => placed[l.source] && placed[l.destination]), placed, columns: dense,
          width: PAD * 2 + dense.length * BOX_W + (dense.length - 1) * COL_GAP, height: tallest + PAD * 2 + 40};
};

function versionNode(svc, version, x, y) {
  const stats = version.stats;
  const cls = M.health(stats ? stats.success_rate : null);
  const weight = svc.split && svc.versions.length > 1 ? " · " + (svc.split[version.name] || 0) + "%" : "";
  const states = version.instances.map((i) => i.state);
  const ready = states.filter((s) => s === "ready").length;
  const line1 = version.name + weight;
  const line2 = stats && stats.requests
    ? `${M.fmtRps(stats.rps)} rps · ${M.fmtPct(stats.success_rate)} · p99 ${M.fmtMs(stats.p99_ms)}`
    : "no traffic";
  return M.s("g", {class: "version", "data-node": svc.name + "@" + version.name},
    M.s("rect", {class: "ver " + cls, x, y, width: BOX_W - 20, height: VER_H, rx: 7}),
    M.s("circle", {class: "ver-dot " + cls, cx: x + 13, cy: y + 13, r: 4.5}),
    M.s("text", {class: "ver-name", x: x + 24, y: y + 17, text: line1}),
    M.s("text", {class: "svc-meta", x: x + BOX_W - 30, y: y + 17, "text-anchor": "end",
                 text: `${ready}/${states.length} ready`}),
    M.s("text", {class: "ver-stats", x: x + 10, y: y + 33, text: line2}));
}

function nodeBox(node) {
  const g = M.s("g", {class: "svc-group", "data-service": node.id});
  const x = node.x, y = node.y;
  g.append(M.s("rect", {class: "svc-box" + (node.kind === "service" ? "" : " ingress"), x, y, width: BOX_W, height: node.h, rx: 10}));
  if (node.kind === "ingress") {
    g.append(M.s("text", {class: "svc-name", x: x + 12, y: y + 20, text: "ingress"}));
    return g;
  }
  if (node.kind === "external") {
    g.append(M.s("text", {class: "svc-name", x: x + 12, y: y + 20, text: node.id}));
    g.append(M.s("text", {class: "svc-meta", x: x + 12, y: y + 48, text: "outside the mesh"}));
    return g;
  }
  const svc = node.svc;
  g.append(M.s("text", {class: "svc-name", x: x + 12, y: y + 20, text: svc.name}));
  const meta = [svc.protocol !== "http" ? svc.protocol : null, svc.promotion && svc.promotion.running ? "promoting" : null,
                svc.overridden ? "live override" : null].filter(Boolean).join(" · ");
  g.append(M.s("text", {class: "svc-meta", x: x + BOX_W - 12, y: y + 20, "text-anchor": "end", text: meta}));
  svc.versions.forEach((version, i) => g.append(versionNode(svc, version, x + 10, y + HEAD_H + i * (VER_H + VER_GAP))));
  g.addEventListener("click", () => { location.hash = "#/service/" + encodeURIComponent(svc.name); });
  return g;
}

function ingressSummary(state, node, svg) {
  const ing = state.ingress;
  svg.append(M.s("text", {class: "svc-meta", x: node.x + BOX_W - 12, y: node.y + 20, "text-anchor": "end",
                          text: `${ing.host || "127.0.0.1"}:${ing.port || "?"} · ${ing.ready ? "ready" : "starting"}`}));
  ing.routes.slice(0, 2).forEach((r, i) => svg.append(M.s("text", {class: "ver-stats", x: node.x + 12, y: node.y + 46 + i * 16,
                                                                   text: `${r.path} → ${r.service}`})));
}

// Ports spread along a box's side, so several edges don't start at one point.
function ports(layout) {
  const out = {}, inn = {};
  for (const link of layout.links) {
    (out[link.source] = out[link.source] || []).push(link);
    (inn[link.destination] = inn[link.destination] || []).push(link);
  }
  const spread = function (groups, side, other) {
    for (const [id, group] of Object.entries(groups)) {
      const node = layout.placed[id];
      group.sort((a, b) => layout.placed[a[other]].cy - layout.placed[b[other]].cy);
      group.forEach((link, i) => { link[side] = node.y + HEAD_H / 2 + ((node.h - HEAD_H / 2) * (i + 1)) / (group.length + 1); });
    }
  };
  spread(out, "y1", "destination");
  spread(inn, "y2", "source");
}

function edgeShape(link, layout, layer, labels, lanes) {
  const a = layout.placed[link.source], b = layout.placed[link.destination];
  const edge = link.edge;
  const rps = edge ? edge.rps : 0;
  const live = edge && rps > 0;
  const cls = "edge" + (live ? (M.health(edge.success_rate) === "bad" ? " bad" : "") : " idle");
  const x1 = a.x + BOX_W, x2 = b.x - 6;
  let d, lx = (x1 + x2) / 2, ly = (link.y1 + link.y2) / 2;
  if (b.column > a.column + 1) {  // over (or under) the columns in between, never through their boxes
    const between = layout.columns.slice(a.column + 1, b.column).flat();
    const top = Math.min(...between.map((n) => n.y)) - 16, bottom = Math.max(...between.map((n) => n.y + n.h)) + 16;
    const above = Math.abs((link.y1 + link.y2) / 2 - top) <= Math.abs((link.y1 + link.y2) / 2 - bottom);
    const lane = (lanes[above ? "above" : "below"] = (lanes[above ? "above" : "below"] || 0) + 1) - 1;
    const way = above ? top - lane * LANE : bottom + lane * LANE;  // one lane each: no two long edges on one line
    lanes.top = Math.min(lanes.top, way - 14);
    lanes.bottom = Math.max(lanes.bottom, way + 14);
    const xa = between[0].x - 20, xb = between[0].x + BOX_W + (b.column - a.column - 2) * (BOX_W + COL_GAP) + 20;
    const m1 = (x1 + xa) / 2, m2 = (xb + x2) / 2;
    d = `M${x1} ${link.y1} C${m1} ${link.y1} ${m1} ${way} ${xa} ${way} L${xb} ${way} C${m2} ${way} ${m2} ${link.y2} ${x2} ${link.y2}`;
    lx = xa + ((xb - xa) * ((lane % 4) + 1)) / 5;  // neighbouring lanes' labels side by side, not stacked
    ly = way;
  } else if (x2 > x1) {
    const mid = (x1 + x2) / 2;
    d = `M${x1} ${link.y1} C${mid} ${link.y1} ${mid} ${link.y2} ${x2} ${link.y2}`;
  } else {  // a call back to an earlier column: around underneath
    const low = Math.max(a.y + a.h, b.y + b.h) + 24;
    d = `M${a.x + BOX_W / 2} ${a.y + a.h} C${a.x + BOX_W / 2} ${low} ${b.x + BOX_W / 2} ${low} ${b.x + BOX_W / 2} ${b.y + b.h + 6}`;
  }
  const width = live ? 1.4 + Math.min(4.5, Math.log10(1 + rps) * 2) : 1.2;
  const path = M.s("path", {class: cls, d, "stroke-width": width.toFixed(2), "marker-end": "url(#arrow)",
                            "data-edge": link.source + ">" + link.destination});
  path.append(M.s("title", {text: `${link.source} → ${link.destination}` + (edge ? `: ${M.fmtRps(rps)} rps, ${M.fmtPct(edge.success_rate)} ok, ` +
                   (edge.mtls ? `mTLS ${edge.client_identity} → ${edge.server_identity}` : "no mTLS") : ": declared, no traffic seen")}));
  layer.append(path);
  if (!edge || x2 <= x1) return;
  const text = `${M.fmtRps(rps)} rps` + (edge.success_rate !== null && edge.success_rate < 0.99 ? " · " + M.fmtPct(edge.success_rate) : "");
  const w = text.length * 6.3 + (edge.mtls ? 16 : 0) + 10;
  const g = M.s("g", {class: "edge-label-group", "data-edge": link.source + ">" + link.destination});
  g.append(M.s("rect", {class: "edge-label-bg", x: lx - w / 2, y: ly - 9, width: w, height: 18, rx: 9}));
  let tx = lx - w / 2 + 6;
  if (edge.mtls) { g.append(M.lock(tx, ly - 8)); tx += 14; }
  g.append(M.s("text", {class: "edge-label", x: tx, y: ly + 4, text}));
  labels.append(g);
}

// Hovering a service keeps its own edges and labels and fades the rest: readable at 30 services.
function focusOnHover(svg) {
  for (const group of svg.querySelectorAll(".svc-group")) {
    const id = group.dataset.service;
    group.addEventListener("mouseenter", function () {
      svg.classList.add("focus");
      for (const el of svg.querySelectorAll("[data-edge]")) {
        const [source, destination] = el.dataset.edge.split(">");
        el.classList.toggle("hot", source === id || destination === id);
      }
    });
    group.addEventListener("mouseleave", () => svg.classList.remove("focus"));
  }
}

M.renderTopology = function (state) {
  const layout = M.layout(state);
  ports(layout);
  const svg = M.s("svg", {class: "topology", width: layout.width, height: layout.height,
                          viewBox: `0 0 ${layout.width} ${layout.height}`, role: "img", "aria-label": "mesh topology"});
  svg.append(M.s("defs", {}, M.s("marker", {id: "arrow", viewBox: "0 0 10 10", refX: 8, refY: 5, markerWidth: 9, markerHeight: 9, markerUnits: "userSpaceOnUse",
                                            orient: "auto-start-reverse"}, M.s("path", {class: "arrow", d: "M0 1 L9 5 L0 9 z"}))));
  const edges = M.s("g", {class: "edges"}), boxes = M.s("g", {class: "boxes"}), labels = M.s("g", {class: "labels"});
  svg.append(edges, boxes, labels);
  const lanes = {top: 0, bottom: layout.height};
  for (const link of layout.links) edgeShape(link, layout, edges, labels, lanes);
  const height = lanes.bottom - lanes.top;  // grown by the lanes of long edges, if any
  M.setAttrs(svg, {height, viewBox: `0 ${lanes.top} ${layout.width} ${height}`});
  focusOnHover(svg);
  for (const node of layout.nodes) {
    boxes.append(nodeBox(node));
    if (node.kind === "ingress") ingressSummary(state, node, boxes);
  }
  return svg;
};
})();
