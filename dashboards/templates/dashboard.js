/* mailwarden dashboard: plain browser JavaScript (no build step). Everything it shows comes from
   the authenticated API; the key is asked once and kept in sessionStorage (this tab only). */
"use strict";

(function () {
  const KEY_SLOT = "mailwarden.apiKey";
  const RANGE_SLOT = "mailwarden.range";  // the range preset, kept for the tab like the key
  const REFRESH_MS = 60000;
  const ZONE = (Intl.DateTimeFormat().resolvedOptions().timeZone) || "UTC";
  const PLOT_CONFIG = {
    responsive: true,
    displaylogo: false,
    modeBarButtonsToRemove: ["select2d", "lasso2d"],
    toImageButtonOptions: { format: "png", scale: 2 },
  };
  // plotly.js (4.8 MB) loads after this script: the data is fetched meanwhile, drawn once it is here.
  const plotlyReady = new Promise((resolve, reject) => {
    if (window.Plotly) { resolve(); return; }
    const tag = document.getElementById("plotly-js");
    tag.addEventListener("load", () => resolve());
    tag.addEventListener("error", () => reject(new Error("plotly.js did not load")));
  });
  const view = document.getElementById("view");
  const FIGURES = (view.dataset.figures || "").split(",").filter(Boolean);
  const WIDE = new Set(["requests_over_time", "alert_timeline", "countries_map"]);

  const state = {
    key: sessionStorage.getItem(KEY_SLOT),
    stored: null,      // {first, last}: the stored events' time range
    range: null,       // {since, until} as Date
    status: "open",
    timer: null,
    loading: 0,
  };

  // ---- small helpers ---------------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") el.className = value;
      else if (name === "dataset") Object.assign(el.dataset, value);
      else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else el.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  function pad(n) { return String(n).padStart(2, "0"); }

  function utcText(date) {
    return `${date.getUTCFullYear()}-${pad(date.getUTCMonth() + 1)}-${pad(date.getUTCDate())} ` +
      `${pad(date.getUTCHours())}:${pad(date.getUTCMinutes())}`;
  }

  function localText(date) {
    return date.toLocaleString(undefined, {
      year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit",
      timeZoneName: "short",
    });
  }

  /* A UTC time with the viewer's local time under it (the zone is named in the header). */
  function when(value) {
    const date = new Date(value);
    return h("span", { title: `${localText(date)} (${ZONE})` },
      `${utcText(date)} UTC`, h("span", { class: "local" }, localText(date)));
  }

  function toast(message) {
    const el = document.getElementById("toast");
    el.textContent = message;
    el.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { el.hidden = true; }, 4000);
  }

  function shortKey(value) {
    return value && value.length > 16 ? value.slice(0, 12) + "…" : value;
  }

  function offsetText() {
    const minutes = -new Date().getTimezoneOffset();
    const sign = minutes >= 0 ? "+" : "−";
    const abs = Math.abs(minutes);
    return `UTC${sign}${pad(Math.floor(abs / 60))}:${pad(abs % 60)}`;
  }

  class AuthError extends Error {}

  class ApiError extends Error {
    constructor(status, detail) { super(detail); this.status = status; }
  }

  async function api(path, options) {
    const opts = Object.assign({}, options || {});
    opts.headers = Object.assign({ "X-API-Key": state.key || "" }, opts.headers || {});
    const response = await fetch(path, opts);
    if (response.status === 401) {
      askKey("The API refused this key; enter a valid one.");
      throw new AuthError("unauthorised");
    }
    if (!response.ok) {
      let detail = response.statusText;
      try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
      throw new ApiError(response.status, typeof detail === "string" ? detail : JSON.stringify(detail));
    }
    return response.json();
  }

  function params(extra) {
    const q = new URLSearchParams();
    if (state.range) {
      q.set("since", state.range.since.toISOString());
      q.set("until", state.range.until.toISOString());
    }
    for (const [k, v] of Object.entries(extra || {})) q.set(k, v);
    return q.toString();
  }

  // ---- the key ---------------------------------------------------------------------------------

  function askKey(message) {
    state.key = null;
    sessionStorage.removeItem(KEY_SLOT);
    stopTimer();
    document.getElementById("key-error").textContent = message || "";
    document.getElementById("key-dialog").hidden = false;
    document.getElementById("key-input").focus();
  }

  async function submitKey(event) {
    event.preventDefault();
    const input = document.getElementById("key-input");
    const error = document.getElementById("key-error");
    const candidate = input.value.trim();
    if (!candidate) return;
    error.textContent = "checking…";
    const headers = { "X-API-Key": candidate };
    const [events, alerts] = await Promise.all([
      fetch("/dashboard/range", { headers }), fetch("/alerts?limit=1", { headers }),
    ]);
    if (events.status === 401 || alerts.status === 401) {
      error.textContent = "This key is not valid (or it was revoked).";
      return;
    }
    if (events.status === 429 || alerts.status === 429) {
      error.textContent = "Too many failed attempts from this address; wait a minute.";
      return;
    }
    const missing = [];
    if (events.status === 403) missing.push("events:read");
    if (alerts.status === 403) missing.push("alerts:read");
    if (missing.length) {
      error.textContent = `This key lacks the ${missing.join(" and ")} scope.`;
      return;
    }
    state.key = candidate;
    sessionStorage.setItem(KEY_SLOT, candidate);
    input.value = "";
    error.textContent = "";
    document.getElementById("key-dialog").hidden = true;
    refresh();
  }

  // ---- time range ------------------------------------------------------------------------------

  function toInput(date) { return date.toISOString().slice(0, 16); }

  function fromInput(value) { return value ? new Date(value + ":00Z") : null; }

  function computeRange() {
    const preset = document.getElementById("range-preset").value;
    if (!state.stored) { state.range = null; return; }
    const first = new Date(state.stored.first);
    const last = new Date(state.stored.last);
    if (preset === "custom") {
      const since = fromInput(document.getElementById("range-since").value) || first;
      const until = fromInput(document.getElementById("range-until").value) || last;
      state.range = since <= until ? { since, until } : { since: until, until: since };
    } else if (preset === "all") {
      state.range = { since: first, until: last };
    } else {
      // Relative to the newest stored event: a replayed month reads the same as a live feed.
      const seconds = Number(preset);
      const since = new Date(Math.max(first.getTime(), last.getTime() - seconds * 1000));
      state.range = { since, until: last };
    }
    document.getElementById("range-label").textContent =
      `${utcText(state.range.since)} → ${utcText(state.range.until)} UTC`;
  }

  function onPreset() {
    const preset = document.getElementById("range-preset").value;
    sessionStorage.setItem(RANGE_SLOT, preset);
    const custom = preset === "custom";
    document.getElementById("custom-range").classList.toggle("shown", custom);
    if (custom && state.range) {
      document.getElementById("range-since").value = toInput(state.range.since);
      document.getElementById("range-until").value = toInput(state.range.until);
      return;
    }
    refresh();
  }

  // ---- figures ---------------------------------------------------------------------------------

  function countPoints(figure) {
    let n = 0;
    for (const trace of figure.data || []) {
      const values = trace.z || trace.y || trace.x || [];
      if (Array.isArray(values)) n += values.filter((v) => v !== null).length;
    }
    return n;
  }

  async function drawFigure(div, url) {
    div.dataset.state = "loading";
    try {
      const figure = await api(url);
      await plotlyReady;
      await Plotly.react(div, figure.data, figure.layout, PLOT_CONFIG);
      const empty = Boolean(figure.layout && figure.layout.meta && figure.layout.meta.empty);
      div.dataset.points = String(countPoints(figure));
      div.dataset.empty = String(empty);
      div.dataset.state = "ready";
      // Timings for bench/dashboard.py (and the browser's performance panel).
      if (!performance.getEntriesByName("mailwarden:first-figure").length) performance.mark("mailwarden:first-figure");
    } catch (error) {
      if (error instanceof AuthError) throw error;
      div.dataset.state = "failed";
      if (window.Plotly) Plotly.purge(div);
      div.replaceChildren(h("div", { class: "failed" }, `Could not draw this figure: ${error.message}`));
    }
  }

  // ---- overview --------------------------------------------------------------------------------

  function severityBadge(alert) {
    return h("span", { class: `sev sev-${alert.severity}` }, alert.severity);
  }

  function statusText(alert) {
    return h("span", { class: `status status-${alert.status}` },
      alert.status + (alert.silenced_by ? " (silenced)" : ""));
  }

  async function moveAlert(alertId, action, after) {
    try {
      const alert = await api(`/alerts/${encodeURIComponent(alertId)}/${action}`, { method: "POST" });
      toast(`Alert ${action === "ack" ? "acknowledged" : "resolved"}: ${alert.title}`);
      await after();
    } catch (error) {
      if (error instanceof AuthError) return;
      toast(error.status === 403 ? "This key lacks the alerts:write scope." : `Could not change the alert: ${error.message}`);
    }
  }

  function actionButtons(alert, after) {
    const ack = h("button", {
      class: "action", type: "button", dataset: { action: "ack" },
      disabled: !["open", "silenced"].includes(alert.status),
      onclick: (event) => { event.stopPropagation(); moveAlert(alert.alert_id, "ack", after); },
    }, "Acknowledge");
    const resolve = h("button", {
      class: "action", type: "button", dataset: { action: "resolve" },
      disabled: alert.status === "resolved",
      onclick: (event) => { event.stopPropagation(); moveAlert(alert.alert_id, "resolve", after); },
    }, "Resolve");
    return h("span", { class: "chips" }, ack, resolve);
  }

  function buildOverview() {
    const statusSelect = h("select", {
      id: "alert-status", "aria-label": "alert status",
      onchange: (event) => { state.status = event.target.value; loadAlerts(); },
    }, ...["open", "acknowledged", "silenced", "resolved", "all"].map((s) =>
      h("option", { value: s, selected: s === state.status }, s)));
    const alertsPanel = h("section", { class: "panel", id: "alerts-panel" },
      h("div", { class: "toolbar" }, h("h2", {}, "Alerts"), statusSelect,
        h("span", { class: "count", id: "alert-count" })),
      h("div", { class: "scroll", id: "alerts-table" }, h("div", { class: "empty" }, "loading…")));
    const grid = h("section", { class: "grid", id: "figures" },
      ...FIGURES.map((name) => h("div", {
        class: "figure" + (WIDE.has(name) ? " wide" : ""), id: `fig-${name}`, dataset: { figure: name },
      })));
    view.replaceChildren(alertsPanel, grid);
  }

  async function loadAlerts() {
    const holder = document.getElementById("alerts-table");
    if (!holder) return;
    const extra = { sort: "-severity,-window_start", limit: "200" };
    if (state.status !== "all") extra.status = state.status;
    const page = await api(`/alerts?${params(extra)}`);
    document.getElementById("alert-count").textContent =
      `${page.total} ${state.status === "all" ? "" : state.status + " "}alert${page.total === 1 ? "" : "s"} in this range` +
      (page.total > page.items.length ? ` (first ${page.items.length} shown)` : "");
    if (!page.items.length) {
      holder.replaceChildren(h("div", { class: "empty" }, "No alerts match."));
      return;
    }
    const rows = page.items.map((alert) => h("tr", {
      class: "clickable", dataset: { alertId: alert.alert_id },
      onclick: () => { location.hash = `#/alert/${encodeURIComponent(alert.alert_id)}`; },
    },
    h("td", {}, severityBadge(alert)),
    h("td", {}, when(alert.window_start)),
    h("td", {}, alert.detector),
    h("td", {}, h("a", { href: `#/alert/${encodeURIComponent(alert.alert_id)}` }, alert.title)),
    h("td", {}, statusText(alert)),
    h("td", {}, actionButtons(alert, loadAlerts))));
    holder.replaceChildren(h("table", { id: "alerts" },
      h("thead", {}, h("tr", {}, ...["severity", "window start", "detector", "alert", "status", ""].map((c) => h("th", {}, c)))),
      h("tbody", {}, rows)));
  }

  async function loadOverview() {
    if (!document.getElementById("figures")) buildOverview();
    const tz = { tz: ZONE };
    const jobs = [loadAlerts()];
    for (const name of FIGURES) {
      const div = document.getElementById(`fig-${name}`);
      jobs.push(drawFigure(div, `/plots/${name}?${params(tz)}`));
    }
    await Promise.all(jobs);
    if (!performance.getEntriesByName("mailwarden:overview").length) performance.mark("mailwarden:overview");
  }

  // ---- one alert -------------------------------------------------------------------------------

  function evidenceValue(value) {
    if (Array.isArray(value)) {
      const shown = value.slice(0, 60).map((v) => h("span", { class: "chip mono" },
        typeof v === "object" ? JSON.stringify(v) : String(v)));
      if (value.length > 60) shown.push(h("span", { class: "chip" }, `+${value.length - 60} more`));
      return h("div", { class: "chips" }, shown);
    }
    if (value && typeof value === "object") {
      const entries = Object.entries(value);
      if (entries.length > 8 && entries.every(([, v]) => v === null || typeof v !== "object")) {
        // Long counts (accounts tried, countries…) wrap as chips instead of a page-long table.
        const shown = entries.slice(0, 60).map(([k, v]) => h("span", { class: "chip mono" }, `${k}: ${v}`));
        if (entries.length > 60) shown.push(h("span", { class: "chip" }, `+${entries.length - 60} more`));
        return h("div", { class: "chips" }, shown);
      }
      return h("table", {}, h("tbody", {}, entries.slice(0, 40).map(([k, v]) =>
        h("tr", {}, h("td", { class: "mono" }, k), h("td", { class: "num" },
          typeof v === "object" ? JSON.stringify(v) : String(v))))));
    }
    return h("span", { class: "mono" }, String(value));
  }

  function countBy(items, field) {
    const counts = new Map();
    for (const item of items) {
      const value = item[field];
      if (value === null || value === undefined) continue;
      counts.set(value, (counts.get(value) || 0) + 1);
    }
    return [...counts.entries()].sort((a, b) => b[1] - a[1]);
  }

  function chipsOf(pairs, label) {
    if (!pairs.length) return h("span", { class: "status" }, "none");
    return h("div", { class: "chips" }, pairs.slice(0, 30).map(([value, n]) =>
      h("span", { class: "chip mono", title: String(value) }, `${label ? label(value) : value} ×${n}`)));
  }

  function eventsTable(items) {
    if (!items.length) return h("div", { class: "empty" }, "No events.");
    const cols = ["ts", "source_ip", "service", "method", "path", "status", "outcome", "api_key_id", "account", "origin"];
    return h("div", { class: "scroll" }, h("table", { class: "events" },
      h("thead", {}, h("tr", {}, cols.map((c) => h("th", {}, c === "ts" ? "time (UTC)" : c)))),
      h("tbody", {}, items.map((e) => h("tr", {}, cols.map((c) => {
        if (c === "ts") return h("td", { class: "mono" }, utcText(new Date(e.ts)) + ":" + pad(new Date(e.ts).getUTCSeconds()));
        if (c === "api_key_id") return h("td", { class: "mono", title: e[c] || "" }, shortKey(e[c]) || "");
        return h("td", { class: c === "status" ? "num" : "" }, e[c] === null || e[c] === undefined ? "" : String(e[c]));
      }))))));
  }

  function entityFilter(alert) {
    const kind = alert.entity_kind;
    if (kind === "ip" || kind === "subnet") return { ip: alert.entity };
    if (kind === "api_key") return { key_id: alert.entity };
    if (kind === "account") return { account: alert.entity };
    return null;
  }

  async function loadAlert(alertId) {
    const alert = await api(`/alerts/${encodeURIComponent(alertId)}`);
    const reload = () => loadAlert(alertId);
    const facts = h("dl", { class: "facts" },
      h("dt", {}, "detector"), h("dd", {}, alert.detector),
      h("dt", {}, "entity"), h("dd", { class: "mono" }, `${alert.entity_kind} ${alert.entity}`),
      h("dt", {}, "window"), h("dd", {}, when(alert.window_start), " → ", when(alert.window_end)),
      h("dt", {}, "score"), h("dd", {}, alert.score.toFixed(2) + " (higher is worse)"),
      h("dt", {}, "MITRE ATT&CK"), h("dd", {}, alert.mitre || "—"),
      h("dt", {}, "status"), h("dd", {}, statusText(alert)),
      h("dt", {}, "id"), h("dd", { class: "mono" }, alert.alert_id));
    const evidence = h("dl", { class: "facts", id: "evidence" },
      Object.entries(alert.evidence || {}).flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, evidenceValue(v))]));
    const plot = h("div", { class: "figure", id: "fig-alert_activity", dataset: { figure: "alert_activity" } });
    const related = h("div", {},
      h("h3", {}, "Addresses in the evidence"), chipsOf(countBy(alert.events, "source_ip")),
      h("h3", {}, "API keys"), chipsOf(countBy(alert.events, "api_key_id"), shortKey),
      h("h3", {}, "Accounts"), chipsOf(countBy(alert.events, "account")),
      h("h3", {}, "Paths"), chipsOf(countBy(alert.events, "path")));
    const elsewhere = h("div", { id: "entity-activity" }, h("div", { class: "empty" }, "loading…"));
    view.replaceChildren(
      h("p", {}, h("a", { href: "#/" }, "← all alerts")),
      h("section", { class: "panel", id: "alert-page", dataset: { alertId: alert.alert_id, status: alert.status } },
        h("div", { class: "alert-head" }, severityBadge(alert), h("h1", {}, alert.title), actionButtons(alert, reload)),
        facts),
      h("section", { class: "grid" },
        h("div", { class: "wide" }, plot),
        h("section", { class: "panel" }, h("h2", {}, "Evidence"), evidence),
        h("section", { class: "panel" }, h("h2", {}, "Related entities"), related)),
      h("section", { class: "panel" }, h("h2", {}, `Evidence events (${alert.events.length})`), eventsTable(alert.events)),
      h("section", { class: "panel" }, h("h2", {}, `What else ${alert.entity} did (a day either side)`), elsewhere));
    const jobs = [drawFigure(plot, `/plots/alert_activity?${new URLSearchParams({ alert_id: alert.alert_id, tz: ZONE })}`)];
    const filter = entityFilter(alert);
    if (filter) jobs.push(loadElsewhere(alert, filter, elsewhere));
    else elsewhere.replaceChildren(h("div", { class: "empty" }, "Not an entity events can be searched by."));
    await Promise.all(jobs);
  }

  async function loadElsewhere(alert, filter, holder) {
    const day = 86400000;
    const q = new URLSearchParams(Object.assign({
      since: new Date(new Date(alert.window_start).getTime() - day).toISOString(),
      until: new Date(new Date(alert.window_end).getTime() + day).toISOString(),
      limit: "500",
    }, filter));
    try {
      const page = await api(`/events?${q}`);
      const items = page.items;
      holder.replaceChildren(
        h("p", { class: "status" }, `${items.length}${page.next_cursor ? "+" : ""} events (newest first).`),
        h("h3", {}, "Outcomes"), chipsOf(countBy(items, "outcome")),
        h("h3", {}, "Addresses"), chipsOf(countBy(items, "source_ip")),
        h("h3", {}, "API keys"), chipsOf(countBy(items, "api_key_id"), shortKey),
        h("h3", {}, "Accounts"), chipsOf(countBy(items, "account")),
        h("h3", {}, "Services and paths"), chipsOf(countBy(items.map((e) => ({ p: `${e.service || "?"} ${e.path || ""}` })), "p")));
    } catch (error) {
      if (error instanceof AuthError) throw error;
      holder.replaceChildren(h("div", { class: "error" }, `Could not search events: ${error.message}`));
    }
  }

  // ---- the model's view ------------------------------------------------------------------------

  /* The isolation forest's scores of the range's IP windows: fitted on demand (it takes seconds on a
     big store), so it has its own page instead of slowing the overview down. */
  async function loadModel() {
    let plot = document.getElementById("fig-score_distribution");
    if (!plot) {
      plot = h("div", { class: "figure wide", id: "fig-score_distribution", dataset: { figure: "score_distribution" } });
      view.replaceChildren(
        h("p", {}, h("a", { href: "#/" }, "← overview")),
        h("section", { class: "panel", id: "model-page" },
          h("h2", {}, "Isolation forest (iforest_ip)"),
          h("p", {}, "Every IP's 10-minute window at the end of the range, scored by a forest fitted on those " +
            "windows (higher is worse). The dashed line is the detector's threshold; windows of addresses " +
            "an alert named at the time are drawn in red.")),
        h("section", { class: "grid" }, plot));
    }
    await drawFigure(plot, `/plots/score_distribution?${params({ tz: ZONE })}`);
  }

  // ---- routing and refresh ---------------------------------------------------------------------

  function currentAlertId() {
    const match = location.hash.match(/^#\/alert\/(.+)$/);
    return match ? decodeURIComponent(match[1]) : null;
  }

  async function refresh() {
    if (!state.key) { askKey(); return; }
    state.loading += 1;
    document.body.dataset.loading = "true";
    try {
      state.stored = await api("/dashboard/range");
      computeRange();
      const alertId = currentAlertId();
      if (alertId) await loadAlert(alertId);
      else if (location.hash === "#/model") await loadModel();
      else if (!state.stored.first) view.replaceChildren(h("section", { class: "panel" },
        h("h2", {}, "No events stored yet"), h("p", {}, "Ingest logs with `mailwarden ingest`, then refresh.")));
      else await loadOverview();
      document.getElementById("refreshed").textContent = `↻ ${new Date().toLocaleTimeString()}`;
      startTimer();
    } catch (error) {
      if (!(error instanceof AuthError)) toast(`Refresh failed: ${error.message}`);
    } finally {
      state.loading -= 1;
      if (!state.loading) {
        document.body.dataset.loading = "false";
        document.body.dataset.loads = String(Number(document.body.dataset.loads || 0) + 1);
      }
    }
  }

  function startTimer() {
    stopTimer();
    if (document.getElementById("auto-refresh").checked) {
      state.timer = setTimeout(() => {
        if (document.visibilityState === "visible") refresh(); else startTimer();
      }, REFRESH_MS);
    }
  }

  function stopTimer() {
    if (state.timer) clearTimeout(state.timer);
    state.timer = null;
  }

  function onRoute() {
    // Each page builds its own elements; the overview is rebuilt on the way back.
    view.replaceChildren();
    refresh();
  }

  function start() {
    const select = document.getElementById("range-preset");
    const kept = sessionStorage.getItem(RANGE_SLOT);
    if (kept && kept !== "custom" && [...select.options].some((o) => o.value === kept)) select.value = kept;
    document.getElementById("zone-note").textContent = `UTC times · your zone ${ZONE} (${offsetText()})`;
    document.getElementById("key-form").addEventListener("submit", submitKey);
    document.getElementById("range-preset").addEventListener("change", onPreset);
    document.getElementById("range-apply").addEventListener("click", refresh);
    document.getElementById("refresh").addEventListener("click", refresh);
    document.getElementById("auto-refresh").addEventListener("change", startTimer);
    document.getElementById("forget-key").addEventListener("click", () => { view.replaceChildren(); askKey(); });
    window.addEventListener("hashchange", onRoute);
    refresh();
  }

  start();
})();
