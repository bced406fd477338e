// The dashboard's shell: one live stream of the agent's picture, a hash router, the pages.
"use strict";
window.M = window.M || {};

M.state = null;
M.history = {};  // "svc@ver" -> [[epoch, rps, success, p99], ...]
M.pages = M.pages || {};
let current = null;  // {name, param, page}

function appendHistory(state) {
  const now = Date.now() / 1000;
  for (const svc of state.services || []) {
    for (const version of svc.versions) {
      const s = version.stats;
      const key = svc.name + "@" + version.name;
      const series = (M.history[key] = M.history[key] || []);
      series.push([now, s ? s.rps : 0, s ? s.success_rate : null, s ? s.p99_ms : null]);
      while (series.length && series[0][0] < now - M.CHART_SECONDS) series.shift();
    }
  }
}

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  const name = M.pages[parts[0]] ? parts[0] : "topology";
  const param = parts[1] ? decodeURIComponent(parts[1]) : null;
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === name);
  if (current && current.name === name && current.param === param) return;
  if (current && current.page.unmount) current.page.unmount();
  const root = M.replace(document.getElementById("page"));
  current = {name, param, page: M.pages[name]};
  current.page.mount(root, param);
  if (M.state) current.page.update(M.state);
}

function connect() {
  const live = document.getElementById("live");
  const events = new EventSource("/api/events");
  events.addEventListener("history", (e) => {
    const history = JSON.parse(e.data);
    M.history = {};
    for (const [key, points] of Object.entries(history)) M.history[key] = points.map((p) => [p[0], p[1], p[2], p[3]]);
  });
  events.addEventListener("state", (e) => {
    M.state = JSON.parse(e.data);
    appendHistory(M.state);
    live.className = "live on";
    live.textContent = "live · config v" + (M.state.config_version ?? "–") + " · " + M.fmtTime(Date.now() / 1000);
    document.getElementById("mesh-name").textContent = M.state.mesh ? "· " + M.state.mesh : "";
    document.title = (M.state.mesh ? M.state.mesh + " · " : "") + "meshctl dashboard";
    if (current) current.page.update(M.state);
  });
  events.onerror = () => {
    live.className = "live off";
    live.textContent = "reconnecting… (is the agent running?)";
  };
}

// The empty page for a stopped mesh, shared by every page.
M.noMesh = (root) => M.replace(root, M.h("div", {class: "panel empty"}, "No mesh is running. Start one with ",
                                      M.h("code", {}, "meshctl up -f mesh.yaml"), "."));

document.addEventListener("DOMContentLoaded", () => {
  window.addEventListener("hashchange", route);
  route();
  connect();
});
