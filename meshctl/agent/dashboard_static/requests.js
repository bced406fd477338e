// Live requests: the sidecars' tap stream (as `meshctl tap`), filtered by service, path and
// status; a click shows the request and its trace as a waterfall.
(function () {
"use strict";
window.M = window.M || {};
M.pages = M.pages || {};
const {h} = M;
const MAX_ROWS = 200;

// The request's trace, root spans first, children under their parent (as `meshctl trace`).
function spanOrder(spans) {
  const ids = new Set(spans.map((s) => s.span_id));
  const children = {};
  for (const s of spans) {
    const parent = s.parent_id && ids.has(s.parent_id) ? s.parent_id : "";
    (children[parent] = children[parent] || []).push(s);
  }
  const out = [];
  const walk = (parent, depth) => {
    for (const s of (children[parent] || []).sort((a, b) => a.start - b.start)) { out.push([depth, s]); walk(s.span_id, depth + 1); }
  };
  walk("", 0);
  return out;
}

M.waterfall = function (trace) {
  const spans = trace.spans;
  const t0 = Math.min(...spans.map((s) => s.start));
  const total = Math.max(...spans.map((s) => s.start + s.duration)) - t0 || 1e-6;
  return h("div", {class: "waterfall", "data-trace": trace.trace_id}, spanOrder(spans).map(function ([depth, s]) {
    const bar = h("div", {class: "wf-bar" + (s.status >= 500 ? " failed" : "")});
    bar.style.left = (((s.start - t0) / total) * 100).toFixed(2) + "%";
    bar.style.width = ((s.duration / total) * 100).toFixed(2) + "%";
    const name = h("div", {class: "wf-name", title: `${s.instance} ${s.direction} ${s.name} → ${s.status}`},
                   "\u00a0\u00a0".repeat(depth), h("b", {}, s.service), " ", s.name);
    return h("div", {class: "wf-row"}, name, h("div", {class: "wf-track"}, bar), h("div", {class: "num"}, M.fmtMs(s.duration * 1000)));
  }));
};

// The hook for `meshctl why`: once the agent answers the `why` op, `state.features` lists it
// and the panel offers an explanation of the request. M.renderWhy draws the answer; the
// `why` work replaces it with its own rendering.
M.renderWhy = (result) => h("pre", {}, JSON.stringify(result, null, 2));

async function explain(event, box) {
  M.replace(box, h("span", {class: "note"}, "asking the agent why…"));
  const answer = await M.read("why", {request_id: event.request_id || "", trace_id: event.trace_id || "",
                                      service: event.destination, path: event.path, status: event.status});
  M.replace(box, answer.ok ? M.renderWhy(answer.result) : h("div", {class: "error"}, answer.error.message));
}

async function loadTrace(traceId, box) {
  // Spans reach the agent in batches: a trace seen in the tap may be a moment behind it.
  for (let attempt = 0; attempt < 10; attempt++) {
    const answer = await M.read("trace", {id: traceId});
    if (answer.ok && answer.result.spans.length) return M.replace(box, M.waterfall(answer.result));
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
  M.replace(box, h("div", {class: "note"}, "the trace has not reached the agent (or was evicted)"));
}

function detail(event, box) {
  const trace = h("div", {id: "trace-box"});
  const why = h("div", {id: "why-box"});
  M.replace(box, h("h2", {}, `${event.method} ${event.path}`),
    h("dl", {class: "kv"},
      h("dt", {}, "when"), h("dd", {}, new Date(event.ts * 1000).toISOString()),
      h("dt", {}, "seen by"), h("dd", {class: "mono"}, `${event.instance} (${event.direction})`),
      h("dt", {}, "from"), h("dd", {class: "mono"}, event.source_identity || event.source),
      h("dt", {}, "to"), h("dd", {class: "mono"}, (event.destination_identity || event.destination) + (event.version ? " @" + event.version : "")),
      h("dt", {}, "TLS"), h("dd", {}, event.tls ? "mutual TLS" : "plaintext"),
      h("dt", {}, "status"), h("dd", {}, String(event.status) + (event.mesh_error ? ` (mesh error: ${event.mesh_error})` : "")),
      h("dt", {}, "latency"), h("dd", {}, M.fmtMs(event.ms)),
      h("dt", {}, "request id"), h("dd", {class: "mono"}, event.request_id || "–"),
      h("dt", {}, "trace"), h("dd", {class: "mono"}, event.trace_id || "not sampled (observability.tracing.sampling)")),
    M.state && M.state.features.includes("why")
      ? h("div", {class: "row"}, h("button", {id: "why-button", onclick: () => explain(event, why)}, "Why this outcome?")) : null,
    why, h("h2", {}, "Trace"), trace);
  if (event.trace_id) loadTrace(event.trace_id, trace);
  else M.replace(trace, h("div", {class: "note"}, "this request was not sampled into a trace"));
}

M.pages.requests = {
  mount(root) {
    this.root = root;
    this.service = h("select", {id: "filter-service", onchange: () => this.listen()}, h("option", {value: ""}, "all services"));
    this.path = h("input", {id: "filter-path", placeholder: "path prefix, e.g. /api", size: 18, onchange: () => this.listen()});
    this.status = h("select", {id: "filter-status", onchange: () => this.listen()},
      ["", "2xx", "3xx", "4xx", "5xx"].map((s) => h("option", {value: s}, s || "any status")));
    this.pause = h("button", {onclick: () => { this.paused = !this.paused; this.pause.textContent = this.paused ? "Resume" : "Pause"; }}, "Pause");
    this.body = h("tbody", {id: "requests-body"});
    this.note = h("div", {class: "note"});
    this.detail = h("div", {class: "panel", id: "request-detail"}, h("div", {class: "note"}, "click a request to see it and its trace"));
    this.paused = false;
    M.append(root, [h("h1", {}, "Live requests"),
      h("div", {class: "sub"}, "every request the sidecars see, as ", h("code", {}, "meshctl tap"), " shows them (at most 20 a second per sidecar)"),
      h("div", {class: "row"}, this.service, this.path, this.status, this.pause, this.note),
      h("div", {class: "requests-layout"},
        h("div", {class: "panel req-table"}, h("table", {},
          h("thead", {}, h("tr", {}, ["Time", "", "From → to", "Request", "Status", "Latency", ""].map((x) => h("th", {}, x)))), this.body)),
        this.detail)]);
    this.listen();
  },
  listen() {
    if (this.source) this.source.close();
    const params = new URLSearchParams({service: this.service.value, path: this.path.value, status: this.status.value});
    this.source = new EventSource("/api/requests?" + params);
    this.note.textContent = "connecting…";
    this.source.addEventListener("tapping", () => { this.note.textContent = "listening"; });
    this.source.addEventListener("request", (e) => this.add(JSON.parse(e.data)));
  },
  add(event) {
    if (this.paused) return;
    const row = h("tr", {class: "clickable", "data-path": event.path, "data-request-id": event.request_id || ""},
      h("td", {class: "mono"}, M.fmtTime(event.ts)),
      h("td", {class: "note"}, event.direction === "inbound" ? "in" : "out"),
      h("td", {}, `${event.source} → ${event.destination}` + (event.version ? "@" + event.version : ""), event.tls ? [" ", M.inlineLock()] : ""),
      h("td", {class: "mono"}, `${event.method} ${event.path}`),
      h("td", {}, M.badge(event.status >= 500 || event.mesh_error ? "bad" : event.status >= 400 ? "warn" : "ok", String(event.status))),
      h("td", {class: "num"}, M.fmtMs(event.ms)),
      h("td", {class: "note"}, event.trace_id ? "trace" : ""));
    row.addEventListener("click", () => {
      for (const r of this.body.querySelectorAll("tr.selected")) r.classList.remove("selected");
      row.classList.add("selected");
      detail(event, this.detail);
    });
    this.body.prepend(row);
    while (this.body.children.length > MAX_ROWS) this.body.lastElementChild.remove();
  },
  update(state) {
    if (!state.mesh) return;
    if (this.service.options.length === 1) {
      for (const s of state.services) this.service.append(h("option", {value: s.name}, s.name));
    }
  },
  unmount() { if (this.source) this.source.close(); },
};
})();
