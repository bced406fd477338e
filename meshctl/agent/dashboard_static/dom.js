// Small DOM helpers shared by the dashboard's scripts (no framework, no build step).
"use strict";
window.M = window.M || {};

// h("div", {class: "x", onclick: fn}, child, "text", [more]) -> an HTML element.
M.h = function (tag, attrs, ...children) {
  const el = document.createElement(tag);
  M.setAttrs(el, attrs);
  M.append(el, children);
  return el;
};

// s("rect", {x: 1}) -> an SVG element.
M.s = function (tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  M.setAttrs(el, attrs);
  M.append(el, children);
  return el;
};

M.setAttrs = function (el, attrs) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "text") el.textContent = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
};

M.append = function (el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
};

M.replace = function (el, ...children) {
  el.replaceChildren();
  M.append(el, children);
  return el;
};

M.fmtRps = (v) => (v === null || v === undefined ? "–" : v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2));
M.fmtMs = (v) => (v === null || v === undefined ? "–" : v >= 100 ? v.toFixed(0) + " ms" : v.toFixed(1) + " ms");
M.fmtPct = (v) => (v === null || v === undefined ? "–" : (v * 100).toFixed(v >= 0.9995 || v === 0 ? 0 : 1) + "%");
M.fmtAgo = function (seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return seconds.toFixed(seconds < 10 ? 1 : 0) + " s";
  if (seconds < 3600) return (seconds / 60).toFixed(0) + " min";
  if (seconds < 172800) return (seconds / 3600).toFixed(1) + " h";
  return (seconds / 86400).toFixed(0) + " days";
};
M.fmtDate = (epoch) => new Date(epoch * 1000).toISOString().replace("T", " ").slice(0, 16) + " UTC";
M.fmtTime = (epoch) => new Date(epoch * 1000).toTimeString().slice(0, 8);

// The health class of a success rate: what colours nodes, badges and edges.
M.health = function (rate) {
  if (rate === null || rate === undefined) return "idle";
  if (rate >= 0.99) return "ok";
  if (rate >= 0.95) return "warn";
  return "bad";
};

// A padlock for mutual TLS (no emoji: the fonts on the machine may lack them).
M.lock = function (x, y, title) {
  return M.s("g", {class: "lock", transform: `translate(${x},${y})`},
    M.s("title", {text: title || "mutual TLS"}),
    M.s("rect", {x: 0, y: 4.5, width: 9, height: 7, rx: 1.5}),
    M.s("path", {d: "M2 4.5 V3 a2.5 2.5 0 0 1 5 0 V4.5", fill: "none", stroke: "currentColor", "stroke-width": 1.6}));
};
M.inlineLock = () => M.s("svg", {class: "inline-lock", width: 10, height: 12, viewBox: "0 0 9 12"}, M.lock(0, 0));

M.badge = (cls, text) => M.h("span", {class: "badge " + cls}, text);

// A change: POST /api/do/OP with a JSON body; resolves to {ok, result} or {ok: false, error}.
M.change = async function (op, body) {
  const resp = await fetch("/api/do/" + op, {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body), credentials: "same-origin",
  });
  return resp.json();
};

M.read = async function (op, params) {
  const resp = await fetch("/api/read/" + op + "?" + new URLSearchParams(params), {credentials: "same-origin"});
  return resp.json();
};

// "header x=1 & path prefix /a -> v2=100", as `meshctl route show` writes a rule.
M.formatSplit = (split) => Object.entries(split || {}).map(([v, w]) => v + "=" + w).join(" ") || "–";
M.formatRule = function (route) {
  const match = route.match || {};
  const conds = (match.headers || []).map((h) => h.name + (h.kind === "exact" ? "=" : "~") + h.value);
  if (match.path) conds.push("path " + match.path.kind + " " + match.path.value);
  if (match.methods) conds.push("method " + match.methods.join(","));
  for (const q of match.query || []) conds.push("?" + q.name + "=" + q.value);
  return (conds.join(" & ") || "any") + " → " + M.formatSplit(route.split);
};
