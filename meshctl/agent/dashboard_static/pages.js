// The Topology, Service, Security and Sidecars pages. Each page has mount(root, param),
// called when it is opened, and update(state), called with every picture from the agent.
(function () {
"use strict";
window.M = window.M || {};
M.pages = M.pages || {};
const {h} = M;

function table(headers, rows, opts) {
  return h("table", opts || {},
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", {class: /^(RPS|SUCCESS|P99|REPLICAS|PID|RESTARTS|PUSHED|ACKED)$/i.test(x) ? "num" : null}, x)))),
    h("tbody", {}, rows));
}

function ackList(answer) {
  // As `meshctl route split` reports a change: each sidecar's ACK, or its NACK / STALE and why.
  if (!answer.ok) return h("div", {class: "error"}, answer.error.code + ": " + answer.error.message);
  const result = answer.result;
  if (!result.sidecars) return h("div", {class: "okay"}, "done");
  const problems = result.problems || [];
  const items = result.sidecars.map(function (name) {
    const problem = problems.find((p) => p.startsWith(name + " "));
    const state = !problem ? "ACK" : problem.includes("rejected") ? "NACK" : "STALE";
    return h("li", {"data-sidecar": name, "data-ack": state}, M.badge(state === "ACK" ? "ok" : "bad", state), " ",
             h("span", {class: "mono"}, name), problem ? h("span", {class: "error"}, " — " + problem) : "");
  });
  const head = problems.length
    ? h("div", {class: "error"}, `config v${result.version} not in force everywhere`)
    : h("div", {class: "okay"}, `config v${result.version} ACKed by ${result.sidecars.length} sidecar${result.sidecars.length === 1 ? "" : "s"}`);
  return h("div", {}, head, h("ul", {class: "result"}, items));
}

// -- Topology ---------------------------------------------------------------------------------

M.pages.topology = {
  mount(root) {
    this.summary = h("div", {class: "sub"});
    this.wrap = h("div", {class: "topology-wrap"}, h("div", {class: "empty"}, "waiting for the agent…"));
    M.append(root, [h("h1", {}, "Topology"), this.summary,
      h("div", {class: "panel"}, this.wrap,
        h("div", {class: "legend"}, h("span", {class: "ok"}, "≥ 99% success"), h("span", {class: "warn"}, "≥ 95%"),
          h("span", {class: "bad"}, "< 95%"), h("span", {class: "idle"}, "no traffic"),
          h("span", {class: "plain"}, "edges: rps over the last 10 s, lock = mTLS, dashed = declared, no traffic")))]);
    this.root = root;
  },
  update(state) {
    if (!state.mesh) return M.noMesh(this.root);
    const versions = state.services.reduce((n, s) => n + s.versions.length, 0);
    const rps = state.edges.filter((e) => e.source === "ingress").reduce((n, e) => n + e.rps, 0);
    this.summary.textContent = `${state.services.length} services, ${versions} versions · ` +
      `${M.fmtRps(rps)} rps at the ingress · click a service for its page`;
    M.replace(this.wrap, M.renderTopology(state));
  },
};

// -- Service ----------------------------------------------------------------------------------

function rebalance(weights, changed, value) {
  // Keep the sum at 100: the other versions share what is left in their current proportions.
  const names = Object.keys(weights);
  const others = names.filter((n) => n !== changed);
  value = Math.max(0, Math.min(100, Math.round(Number(value) || 0)));
  if (!others.length) value = 100;
  const remaining = 100 - value;
  const before = others.reduce((n, o) => n + weights[o], 0);
  weights[changed] = value;
  let given = 0;
  for (const o of others) {
    weights[o] = before ? Math.floor((weights[o] * remaining) / before) : 0;
    given += weights[o];
  }
  if (others.length) {
    const largest = others.reduce((a, b) => (weights[b] > weights[a] ? b : a), others[0]);
    weights[largest] += remaining - given;
  }
  return weights;
}
M.rebalance = rebalance;

function splitEditor(svc, onDone) {
  const names = svc.versions.map((v) => v.name);
  // dirty: changed and not applied yet; editing: a field has the focus. Either way the live
  // split, which arrives every second, must not overwrite what the user is typing.
  const editor = {dirty: false, editing: false, weights: {}};
  const inputs = {}, sliders = {};
  const sum = h("span", {class: "split-sum", id: "split-sum"});
  const result = h("div", {id: "split-result"});
  const sync = function () {
    for (const n of names) { inputs[n].value = editor.weights[n]; sliders[n].value = editor.weights[n]; }
    sum.textContent = "total " + names.reduce((t, n) => t + editor.weights[n], 0) + "%";
  };
  editor.load = function (split) {
    editor.weights = Object.fromEntries(names.map((n) => [n, split && n in split ? split[n] : 0]));
    if (!split) editor.weights[names[0]] = 100;
    sync();
  };
  const changed = (n, value) => { editor.dirty = true; rebalance(editor.weights, n, value); sync(); };
  const rows = names.map(function (n) {
    sliders[n] = h("input", {type: "range", min: 0, max: 100, step: 1, "aria-label": n + " weight",
                             oninput: (e) => changed(n, e.target.value)});
    inputs[n] = h("input", {type: "number", min: 0, max: 100, step: 1, id: "split-input-" + n,
                            oninput: (e) => changed(n, e.target.value),
                            onfocus: () => { editor.editing = true; }, onblur: () => { editor.editing = false; }});
    return h("div", {class: "row"}, h("label", {}, n), sliders[n], inputs[n], "%");
  });
  const apply = h("button", {class: "primary", id: "split-apply", onclick: async function () {
    apply.disabled = true;
    M.replace(result, h("span", {class: "note"}, "pushing to the sidecars, waiting for their ACKs…"));
    try {
      M.replace(result, ackList(await M.change("route-split", {service: svc.name, split: editor.weights})));
    } finally { apply.disabled = false; editor.dirty = false; onDone(); }
  }}, "Apply");
  const reset = h("button", {onclick: async function () {
    M.replace(result, ackList(await M.change("route-reset", {service: svc.name})));
    editor.dirty = false; onDone();
  }}, "Back to the manifest");
  editor.live = h("div", {class: "note"});
  editor.el = h("div", {}, rows, h("div", {class: "row"}, sum, apply, reset), editor.live, result);
  editor.update = function (s) {
    editor.live.textContent = `live: ${M.formatSplit(s.split)} · manifest: ${M.formatSplit(s.manifest_split)}` +
      (s.overridden ? " · live override in force" : "");
    if (!editor.dirty && !editor.editing) editor.load(s.split);
  };
  editor.load(svc.split);
  return editor;
}

function rulesForm(svc) {
  const header = h("input", {placeholder: "header, e.g. x-canary", size: 16});
  const value = h("input", {placeholder: "value", size: 10});
  const version = h("select", {}, svc.versions.map((v) => h("option", {value: v.name}, v.name)));
  const result = h("div", {});
  const add = h("button", {onclick: async function () {
    M.replace(result, ackList(await M.change("route-set", {service: svc.name, header: header.value, value: value.value,
                                                           version: version.value})));
  }}, "Add rule");
  return h("div", {}, h("div", {class: "row"}, header, "=", value, "→", version, add), result);
}

function promotionPanel(svc, body) {
  const p = svc.promotion;
  if (!p) return null;
  const current = p.steps.filter((s) => s.reached).pop();
  return h("div", {},
    h("div", {}, p.running ? M.badge("warn", "running") : M.badge(p.last && p.last.action === "rollback" ? "bad" : "ok",
                                                                  p.last ? p.last.action : "ended"),
      ` ${p.canary} at ${p.weight}% (from ${p.baseline}), +${p.step}% every ${p.interval_s} s while errors ≤ ` +
      `${M.fmtPct(p.max_error_rate)}` + (p.max_p99_ms ? ` and p99 ≤ ${p.max_p99_ms} ms` : "")),
    h("div", {class: "ladder"}, p.steps.map((s) => h("span", {class: (s.reached ? "reached" : "") + (s === current ? " current" : "")},
                                                     s.weight + "%"))),
    h("div", {class: "note"}, p.last ? "last step: " + p.last.reason : "first step after one interval"),
    p.running ? h("div", {class: "row"}, h("button", {class: "danger", id: "promote-cancel", onclick: async function () {
      M.replace(body, ackList(await M.change("route-reset", {service: svc.name})));
    }}, "Cancel (back to the manifest's routing)")) : null);
}

function promoteForm(svc, result) {
  const version = h("select", {}, svc.versions.map((v) => h("option", {value: v.name}, v.name)));
  version.value = svc.versions[svc.versions.length - 1].name;
  const step = h("input", {type: "number", name: "step", min: 1, max: 100, value: 10});
  const interval = h("input", {type: "number", name: "interval", min: 1, value: 30});
  const maxErr = h("input", {type: "number", name: "max-error-rate", min: 0, max: 100, step: 0.1, value: 1});
  const go = h("button", {onclick: async function () {
    const answer = await M.change("promote", {service: svc.name, version: version.value, step: Number(step.value),
                                              interval: Number(interval.value), max_error_rate: Number(maxErr.value) / 100});
    M.replace(result, answer.ok ? h("div", {class: "okay"}, `promoting ${version.value} from ${answer.result.weight}%`)
                                : h("div", {class: "error"}, answer.error.message));
  }}, "Promote");
  return h("div", {class: "row", id: "promote-form"}, "promote", version, "step", step, "% every", interval, "s, max errors", maxErr, "%", go);
}

// Scale and restart, built once per page so that a click never lands on a re-rendered button.
function versionActions(svc) {
  const version = h("select", {}, svc.versions.map((v) => h("option", {value: v.name}, v.name)));
  const count = h("input", {type: "number", min: 0, max: 64, value: svc.versions[0].replicas});
  version.addEventListener("change", () => { count.value = svc.versions.find((v) => v.name === version.value).replicas; });
  const result = h("span", {class: "note"});
  const act = (button, busy, op, body, done) => async function () {
    button.disabled = true;
    result.className = "note";
    result.textContent = busy;
    const answer = await M.change(op, Object.assign({service: svc.name, version: version.value}, body()));
    button.disabled = false;
    result.textContent = answer.ok ? done(answer.result) : answer.error.message;
    result.className = answer.ok ? "okay" : "error";
  };
  const scale = h("button", {}, "Scale");
  scale.addEventListener("click", act(scale, "scaling (new replicas join once ready)…", "scale",
                                      () => ({replicas: Number(count.value)}), (r) => `${r.version}: ${r.replicas} replicas`));
  const restart = h("button", {}, "Rolling restart");
  restart.addEventListener("click", act(restart, "restarting one instance at a time…", "restart", () => ({}),
                                        (r) => `restarted ${r.restarted.join(", ") || "nothing"}`));
  return h("div", {class: "row"}, version, "replicas", count, scale, restart, result);
}

function versionsTable(svc) {
  return table(["Version", "Weight", "Replicas", "Instances", "RPS", "Success", "p99"], svc.versions.map(function (v) {
    const s = v.stats || {};
    const ready = v.instances.filter((i) => i.state === "ready").length;
    return h("tr", {},
      h("td", {}, h("b", {}, v.name)),
      h("td", {}, svc.split ? (svc.split[v.name] || 0) + "%" : "100%"),
      h("td", {class: "num"}, `${ready}/${v.instances.length}`),
      h("td", {}, v.instances.map((i) => h("div", {}, h("span", {class: "mono"}, i.id), " ",
        M.badge(i.state === "ready" ? "ok" : i.state === "failed" ? "bad" : "warn", i.state),
        i.restarts ? h("span", {class: "note"}, ` ${i.restarts} restarts`) : "",
        i.message && i.state !== "ready" ? h("div", {class: "note"}, i.message) : ""))),
      h("td", {class: "num"}, M.fmtRps(s.rps)),
      h("td", {class: "num"}, M.badge(M.health(s.success_rate), M.fmtPct(s.success_rate))),
      h("td", {class: "num"}, M.fmtMs(s.p99_ms)));
  }));
}

function charts(svc) {
  const now = Date.now() / 1000;
  return svc.versions.map(function (v) {
    const series = M.history[svc.name + "@" + v.name] || [];
    return h("div", {class: "version-block"}, h("h2", {}, `${svc.name}@${v.name}`),
      h("div", {class: "charts"},
        M.chart("requests / s", series.map((p) => [p[0], p[1]]), now, M.fmtRps),
        M.chart("success rate", series.map((p) => [p[0], p[2]]), now, M.fmtPct, {min: 0, max: 1}),
        M.chart("p99 latency", series.map((p) => [p[0], p[3]]), now, M.fmtMs)));
  });
}

M.pages.service = {
  mount(root, name) {
    this.root = root;
    this.name = name;
    this.built = null;
  },
  build(svc, state) {
    const root = M.replace(this.root);
    this.tabs = h("div", {class: "svc-tabs"});
    this.head = h("div", {class: "sub"});
    this.versions = h("div", {});
    this.rules = h("div", {});
    this.promotion = h("div", {});
    this.promoteResult = h("div", {});
    this.promoteForm = promoteForm(svc, this.promoteResult);
    this.charts = h("div", {});
    this.editor = splitEditor(svc, () => {});
    const multi = svc.versions.length > 1;
    M.append(root, [h("h1", {}, svc.name), this.head, this.tabs,
      h("div", {class: "panel"}, h("h2", {}, "Versions and replicas"), this.versions, versionActions(svc)),
      h("div", {class: "grid2"},
        h("div", {class: "panel"}, h("h2", {}, "Traffic split"),
          multi ? this.editor.el : h("div", {class: "note"}, `one version: ${svc.versions[0].name} gets every request`)),
        h("div", {class: "panel"}, h("h2", {}, "Header rules"), this.rules, multi ? rulesForm(svc) : null)),
      multi ? h("div", {class: "panel"}, h("h2", {}, "Promotion"), this.promotion, this.promoteForm, this.promoteResult) : null,
      h("div", {class: "panel"}, h("h2", {}, "Golden signals, last 5 minutes"), this.charts)]);
    this.built = svc.name + ":" + svc.versions.map((v) => v.name).join(",");
  },
  update(state) {
    if (!state.mesh) return M.noMesh(this.root);
    if (!this.name) { location.hash = "#/service/" + encodeURIComponent(state.services[0].name); return; }
    const svc = state.services.find((s) => s.name === this.name);
    if (!svc) return M.replace(this.root, h("div", {class: "panel empty"}, `no service ${this.name} in mesh ${state.mesh}`));
    if (this.built !== svc.name + ":" + svc.versions.map((v) => v.name).join(",")) this.build(svc, state);
    M.replace(this.tabs, state.services.map((s) => h("a", {href: "#/service/" + encodeURIComponent(s.name),
                                                          class: s.name === svc.name ? "active" : null}, s.name)));
    this.head.textContent = [svc.protocol, "mTLS " + svc.mtls, svc.upstreams.length ? "calls " + svc.upstreams.join(", ") : "calls nothing",
                             svc.overridden ? "live overrides in force" : "routing as in the manifest"].join(" · ");
    M.replace(this.versions, versionsTable(svc));
    this.editor.update(svc);
    M.replace(this.rules, svc.routes.length ? h("ol", {}, svc.routes.map((r) => h("li", {class: "mono"}, M.formatRule(r))))
                                            : h("div", {class: "note"}, "no header rules: every request follows the split"));
    if (svc.versions.length > 1) {
      const key = JSON.stringify(svc.promotion);
      if (this.promotion.dataset.key !== key) {  // only when it moves: its Cancel button must stay clickable
        this.promotion.dataset.key = key;
        M.replace(this.promotion, promotionPanel(svc, this.promoteResult) || h("div", {class: "note"}, "no promotion running"));
      }
      this.promoteForm.hidden = Boolean(svc.promotion && svc.promotion.running);
    }
    M.replace(this.charts, charts(svc));
  },
};

// -- Security ---------------------------------------------------------------------------------

function formatRule(rule) {
  const parts = [];
  if (rule.from) parts.push("from " + rule.from.join(", "));
  if (rule.paths) parts.push("paths " + rule.paths.join(", "));
  if (rule.methods) parts.push("methods " + rule.methods.join(", "));
  if (rule.headers) parts.push("headers " + Object.entries(rule.headers).map(([k, v]) => k + "=" + v).join(", "));
  return parts.join(" · ") || "any request";
}

M.pages.security = {
  mount(root) { this.root = root; },
  update(state) {
    if (!state.mesh) return M.noMesh(this.root);
    const certs = state.certs;
    const now = Date.now() / 1000;
    const root = certs ? certs.root : null;
    const ca = root ? h("dl", {class: "kv"},
      h("dt", {}, "subject"), h("dd", {}, root.subject),
      h("dt", {}, "expires"), h("dd", {}, `${M.fmtDate(root.not_after)} (in ${M.fmtAgo(root.not_after - now)})`),
      h("dt", {}, "fingerprint"), h("dd", {class: "mono"}, root.fingerprint),
      h("dt", {}, "origin"), h("dd", {}, root.imported ? "imported (meshctl certs import-ca)" : "meshctl's own CA"),
      root.next ? [h("dt", {}, "rotating to"), h("dd", {}, root.next.subject)] : null,
      root.previous ? [h("dt", {}, "still trusted"), h("dd", {}, root.previous.subject)] : null) : h("div", {class: "note"}, "no certificates yet");
    const leaves = certs ? table(["Sidecar", "Identity", "Expires", "Remaining", "Serial"], certs.certificates.map((c) => h("tr", {},
      h("td", {class: "mono"}, c.instance), h("td", {class: "mono"}, c.identity), h("td", {}, M.fmtDate(c.not_after)),
      h("td", {}, M.badge(c.remaining_s < 3600 ? "warn" : "ok", M.fmtAgo(c.remaining_s))), h("td", {class: "mono"}, String(c.serial).slice(0, 16))))) : null;
    const edges = table(["Caller", "Callee", "Caller identity", "Callee identity", "mTLS"], state.edges.map((e) => h("tr", {},
      h("td", {}, e.source), h("td", {}, e.destination), h("td", {class: "mono"}, e.client_identity || "–"),
      h("td", {class: "mono"}, e.server_identity || "–"), h("td", {}, e.mtls ? M.badge("ok", "yes") : M.badge("bad", "no")))));
    const authz = table(["Service", "mTLS", "Deny", "Allow"], state.services.map(function (s) {
      const rules = s.authorization || {};
      const list = (items) => h("ul", {}, items.map((r) => h("li", {}, formatRule(r))));
      return h("tr", {}, h("td", {}, h("b", {}, s.name)), h("td", {}, M.badge(s.mtls === "strict" ? "ok" : "warn", s.mtls)),
        h("td", {}, rules.deny && rules.deny.length ? list(rules.deny) : h("span", {class: "note"}, "none")),
        h("td", {}, rules.allow ? (rules.allow.length ? list(rules.allow) : h("span", {class: "note"}, "empty: nothing admitted"))
                                : h("span", {class: "note"}, `no allow rules: default_policy ${state.default_policy}`)));
    }));
    M.replace(this.root, h("h1", {}, "Security"),
      h("div", {class: "sub"}, certs ? `trust domain ${certs.trust_domain}` : ""),
      h("div", {class: "grid2"}, h("div", {class: "panel"}, h("h2", {}, "Certificate authority"), ca),
        h("div", {class: "panel"}, h("h2", {}, "Authorization"), authz)),
      h("div", {class: "panel"}, h("h2", {}, "Sidecar certificates"), leaves),
      h("div", {class: "panel"}, h("h2", {}, "Identities on each edge"), state.edges.length ? edges : h("div", {class: "note"}, "no traffic seen yet")));
  },
};

// -- Sidecars ---------------------------------------------------------------------------------

M.pages.sidecars = {
  mount(root) { this.root = root; },
  update(state) {
    if (!state.mesh) return M.noMesh(this.root);
    const cls = {SYNCED: "ok", STALE: "warn", NACK: "bad"};
    const rows = state.sidecars.map((s) => h("tr", {"data-sidecar": s.sidecar},
      h("td", {class: "mono"}, s.sidecar), h("td", {class: "num"}, s.pid ?? "–"), h("td", {class: "num"}, "v" + s.pushed),
      h("td", {class: "num"}, "v" + s.acked), h("td", {}, M.badge(cls[s.state] || "idle", s.state)),
      h("td", {}, s.since_ack_s === null ? "–" : M.fmtAgo(s.since_ack_s) + " ago"), h("td", {class: "error"}, s.nack || "")));
    const counts = {};
    for (const s of state.sidecars) counts[s.state] = (counts[s.state] || 0) + 1;
    M.replace(this.root, h("h1", {}, "Sidecars"),
      h("div", {class: "sub"}, `config v${state.config_version} · ` + Object.entries(counts).map(([k, n]) => `${n} ${k}`).join(", ")),
      h("div", {class: "panel"}, table(["Sidecar", "PID", "Pushed", "ACKed", "State", "Last ACK", "NACK reason"], rows)));
  },
};
})();
