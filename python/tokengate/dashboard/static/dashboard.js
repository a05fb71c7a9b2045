/*
 * TokenGate dashboard: the page's client.
 *
 * One module, no framework. The server pushes a `state` snapshot over Socket.IO; each panel
 * has a render* function that updates the DOM in place (rows are kept by key and only moved
 * or changed when the data does), then the snapshot is acknowledged so the server may send
 * the next one. Controls are `control` events with an acknowledgement; the outcome is shown
 * in #message. Every string that comes from the server is inserted with textContent (or as
 * an attribute value / form value), never parsed as HTML.
 */
(function () {
  "use strict";

  const CONTROL_TIMEOUT_MS = 15000;
  const CHART_MIN_SPAN_S = 30;
  const CHART_MAX_SPAN_S = 300;
  const PREVIEW_LIST_MAX = 100;
  const LAUNCH_ARGS_MAX = 200 * 1024; // characters of launch JSON (the server takes 256 KiB)

  // ---------------------------------------------------------------- DOM helpers

  function $(selector, root) {
    return (root || document).querySelector(selector);
  }

  function $all(selector, root) {
    return Array.from((root || document).querySelectorAll(selector));
  }

  /** Create an element. props: text, className, dataset, on<event>, or plain attributes. */
  function el(tag, props, children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [key, value] of Object.entries(props)) {
        if (value === null || value === undefined || value === false) continue;
        if (key === "text") node.textContent = String(value);
        else if (key === "className") node.className = value;
        else if (key === "dataset") Object.assign(node.dataset, value);
        else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
        else node.setAttribute(key, value === true ? "" : String(value));
      }
    }
    if (children) {
      for (const child of children) node.append(child); // strings become text nodes
    }
    return node;
  }

  /** Set a node's text only when it changed (no needless layout or mutation). */
  function setText(node, value) {
    if (!node) return;
    const text = value === null || value === undefined ? "" : String(value);
    if (node.textContent !== text) node.textContent = text;
  }

  function setAttr(node, name, value) {
    const text = value === null || value === undefined ? "" : String(value);
    if (node.getAttribute(name) !== text) node.setAttribute(name, text);
  }

  function field(root, name) {
    return root.querySelector('[data-field="' + name + '"]');
  }

  /** Set a [data-field] node's text, and its raw value in data-value for scripts. */
  function setField(root, name, text, raw) {
    const node = field(root, name);
    if (!node) return;
    setText(node, text);
    if (raw !== undefined) setAttr(node, "data-value", raw === null ? "" : raw);
  }

  /**
   * Keep a <tbody> in step with a list: one row per key, created once, updated in place,
   * moved only when out of order, removed when gone. Duplicate keys get a suffix.
   */
  function syncRows(tbody, items, keyOf, createRow, updateRow) {
    const existing = new Map();
    for (const row of Array.from(tbody.rows)) existing.set(row.dataset.key, row);
    const seen = new Set();
    let cursor = tbody.firstElementChild;
    for (const item of items) {
      const base = String(keyOf(item));
      let key = base;
      for (let n = 1; seen.has(key); n += 1) key = base + "#" + n;
      seen.add(key);
      let row = existing.get(key);
      if (!row) {
        row = createRow(item);
        row.dataset.key = key;
      }
      updateRow(row, item);
      if (row === cursor) cursor = cursor.nextElementSibling;
      else tbody.insertBefore(row, cursor);
    }
    while (cursor) {
      const next = cursor.nextElementSibling;
      cursor.remove();
      cursor = next;
    }
  }

  /** Keep a <select>'s options equal to `values` (keeps the current choice when possible). */
  function syncOptions(select, values) {
    const current = $all("option", select).map((o) => o.value);
    if (current.length === values.length && current.every((v, i) => v === values[i])) return;
    const chosen = select.value;
    select.replaceChildren(...values.map((v) => el("option", { value: v, text: v })));
    if (values.includes(chosen)) select.value = chosen;
  }

  function showEmpty(id, empty) {
    const node = document.getElementById(id);
    if (node && node.hidden === empty) node.hidden = !empty;
  }

  // ---------------------------------------------------------------- formatting

  function isNum(v) {
    return typeof v === "number" && Number.isFinite(v);
  }

  function fmtInt(v) {
    return isNum(v) ? Math.round(v).toLocaleString("en-US") : "—";
  }

  function fmtFloat(v, digits) {
    return isNum(v) ? v.toLocaleString("en-US", {
      minimumFractionDigits: digits, maximumFractionDigits: digits,
    }) : "—";
  }

  function fmtMs(ms) {
    if (!isNum(ms)) return "—";
    if (ms >= 1000) return (ms / 1000).toFixed(ms >= 10000 ? 1 : 2) + " s";
    if (ms >= 100) return ms.toFixed(0) + " ms";
    if (ms >= 10) return ms.toFixed(1) + " ms";
    return ms.toFixed(2) + " ms";
  }

  function fmtPercent(ratio) {
    return isNum(ratio) ? (ratio * 100).toFixed(1) + " %" : "—";
  }

  function fmtUptime(seconds) {
    if (!isNum(seconds)) return "—";
    const s = Math.floor(seconds);
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const rest = s % 60;
    if (h > 0) return h + " h " + String(m).padStart(2, "0") + " m";
    if (m > 0) return m + " m " + String(rest).padStart(2, "0") + " s";
    return rest + " s";
  }

  function pad2(n) {
    return String(n).padStart(2, "0");
  }

  /** Local wall-clock time of a unix timestamp, HH:MM:SS.mmm. */
  function fmtClock(unix) {
    if (!isNum(unix)) return "—";
    const d = new Date(unix * 1000);
    return pad2(d.getHours()) + ":" + pad2(d.getMinutes()) + ":" + pad2(d.getSeconds()) +
      "." + String(d.getMilliseconds()).padStart(3, "0");
  }

  /** Local date and time of a unix timestamp, YYYY-MM-DD HH:MM:SS. */
  function fmtDateTime(unix) {
    if (!isNum(unix)) return "—";
    const d = new Date(unix * 1000);
    return d.getFullYear() + "-" + pad2(d.getMonth() + 1) + "-" + pad2(d.getDate()) + " " +
      pad2(d.getHours()) + ":" + pad2(d.getMinutes()) + ":" + pad2(d.getSeconds());
  }

  function fmtLimit(limit) {
    if (!limit) return "none";
    const parts = [];
    if (isNum(limit.max_concurrency)) parts.push("max " + limit.max_concurrency);
    if (isNum(limit.rate_limit)) {
      let rate = limit.rate_limit + "/s";
      if (isNum(limit.rate_burst)) rate += " (burst " + limit.rate_burst + ")";
      parts.push(rate);
    }
    return parts.length ? parts.join(" · ") : "none";
  }

  /** A record id's distinctive tail (its head is a timestamp shared by neighbours). */
  function shortId(id) {
    const text = String(id || "");
    const parts = text.split("-");
    if (parts.length >= 4) return "…" + parts.slice(-2).join("-"); // token id and random tail
    return text.length > 16 ? "…" + text.slice(-14) : text;
  }

  function plainId(v) {
    return isNum(v) ? String(v) : "—";
  }

  function lower(v) {
    return typeof v === "string" ? v.toLowerCase() : "";
  }

  // ---------------------------------------------------------------- page state

  const page = {
    socket: null,
    csrf: "",
    actions: new Set(),
    launchables: [],
    snapshot: null,
    series: null,
    preview: null, // {filter, ids} of the last quarantine preview: the records a bulk action touches
    states: 0,
    renderErrors: new Set(),
  };

  function meta(name) {
    const node = document.querySelector('meta[name="' + name + '"]');
    return node ? node.getAttribute("content") || "" : "";
  }

  function may(action) {
    return page.actions.has(action);
  }

  /** Show or hide every [data-action] element (a space-separated list means "any of"). */
  function applyActions(root) {
    for (const node of $all("[data-action]", root)) gate(node);
    const note = $("#controls-note");
    setText(note, page.actions.size ? "" : "view only: your role has no actions");
  }

  function gate(node) {
    const wanted = node.getAttribute("data-action").split(/\s+/).filter(Boolean);
    const hidden = !wanted.some(may);
    if (node.hidden !== hidden) node.hidden = hidden;
    return node;
  }

  // ---------------------------------------------------------------- status line

  function showMessage(outcome, text) {
    const node = $("#message");
    setAttr(node, "data-outcome", outcome || "");
    setText(node, text);
  }

  function setConnection(state, text, relogin) {
    const node = $("#connection");
    setAttr(node, "data-state", state);
    if (relogin) {
      node.replaceChildren(
        document.createTextNode(text + " "),
        el("a", { href: "login", text: "log in again" }),
      );
    } else {
      setText(node, text);
    }
  }

  // ---------------------------------------------------------------- controls

  /** Send one control event; resolves with the server's acknowledgement. */
  function sendControl(action, params) {
    return new Promise((resolve) => {
      const socket = page.socket;
      if (!socket) {
        resolve({ ok: false, outcome: "failed", message: "not connected", result: null });
        return;
      }
      const payload = Object.assign({}, params || {}, { action: action, csrf: page.csrf });
      socket.timeout(CONTROL_TIMEOUT_MS).emit("control", payload, (err, reply) => {
        if (err) {
          resolve({ ok: false, outcome: "failed", message: "no answer from the server", result: null });
        } else if (!reply || typeof reply !== "object") {
          resolve({ ok: false, outcome: "failed", message: "empty answer", result: null });
        } else {
          resolve(reply);
        }
      });
    });
  }

  /** Send a control, disable `button` meanwhile, and show the outcome in #message. */
  async function runControl(action, params, label, button) {
    const name = label || action.replace(/_/g, " ");
    showMessage("pending", name + "…");
    if (button) button.disabled = true;
    try {
      const reply = await sendControl(action, params);
      const outcome = reply.outcome || (reply.ok ? "ok" : "failed");
      showMessage(outcome, name + ": " + (reply.message || outcome));
      return reply;
    } finally {
      if (button) button.disabled = false;
    }
  }

  function invalid(text) {
    showMessage("invalid", text);
    return null;
  }

  function readTokenId() {
    const raw = $("#token-id").value.trim();
    if (!/^\d+$/.test(raw)) return invalid("enter a token id (a whole number ≥ 0)");
    return Number(raw);
  }

  function tokenControl(action, extra, button) {
    const tokenId = readTokenId();
    if (tokenId === null) return;
    const params = Object.assign({ token_id: tokenId }, extra);
    runControl(action, params, action + " token " + tokenId, button);
  }

  /** The launch box's JSON: an array of args, or {"args": [...], "kwargs": {...}}. */
  function readLaunchArguments() {
    const text = $("#launch-args").value.trim() || "[]";
    // The server takes messages of up to 256 KiB and closes the connection on a bigger one.
    if (text.length > LAUNCH_ARGS_MAX) {
      return invalid("launch arguments are too large: at most " + LAUNCH_ARGS_MAX / 1024 +
        " KiB of JSON (got " + Math.ceil(text.length / 1024) + " KiB)");
    }
    let value;
    try {
      value = JSON.parse(text);
    } catch (err) {
      return invalid("launch arguments are not valid JSON: " + err.message);
    }
    if (Array.isArray(value)) return { args: value, kwargs: {} };
    if (value && typeof value === "object") {
      const extra = Object.keys(value).filter((k) => k !== "args" && k !== "kwargs");
      if (extra.length) return invalid("launch arguments: unexpected key " + extra[0] + " (use args, kwargs)");
      const args = value.args === undefined ? [] : value.args;
      const kwargs = value.kwargs === undefined ? {} : value.kwargs;
      if (!Array.isArray(args)) return invalid("launch arguments: args must be a JSON array");
      if (!kwargs || typeof kwargs !== "object" || Array.isArray(kwargs)) {
        return invalid("launch arguments: kwargs must be a JSON object");
      }
      return { args: args, kwargs: kwargs };
    }
    return invalid("launch arguments: give a JSON array or an object with args and kwargs");
  }

  async function launch(button) {
    const name = $("#launch-name").value;
    if (!name) {
      invalid("nothing to launch: no launchable functions are registered");
      return;
    }
    const parsed = readLaunchArguments();
    if (!parsed) return;
    const reply = await runControl("launch", { name: name, args: parsed.args, kwargs: parsed.kwargs },
      "launch " + name, button);
    if (reply.ok && reply.result && isNum(reply.result.token_id)) {
      $("#token-id").value = String(reply.result.token_id);
    }
  }

  function optionalNumber(input, integer) {
    const raw = input.value.trim();
    if (raw === "") return { value: null };
    const value = Number(raw);
    if (!Number.isFinite(value) || value < 0 || (integer && !Number.isInteger(value))) {
      return { error: input.getAttribute("id").replace("limit-", "") + " must be " +
        (integer ? "a whole number" : "a number") + " ≥ 0" };
    }
    return { value: value };
  }

  function setLimit(event) {
    event.preventDefault();
    const operation = $("#limit-operation").value;
    if (!operation) {
      invalid("set limit: choose an operation");
      return;
    }
    const max = optionalNumber($("#limit-max"), true);
    const rate = optionalNumber($("#limit-rate"), false);
    const burst = optionalNumber($("#limit-burst"), true);
    const error = max.error || rate.error || burst.error;
    if (error) {
      invalid("set limit: " + error);
      return;
    }
    runControl("set_limit", {
      operation: operation, max_concurrency: max.value, rate_limit: rate.value, rate_burst: burst.value,
    }, "set limit on " + operation, $("#limit-btn"));
  }

  // -- quarantine bulk: preview, then release/discard of exactly the records it listed --

  function datetimeValue(input) {
    if (!input.value) return null;
    const ms = new Date(input.value).getTime();
    return Number.isFinite(ms) ? ms / 1000 : undefined;
  }

  function readQuarantineFilter() {
    const operation = $("#quarantine-operation").value.trim();
    const since = datetimeValue($("#quarantine-since"));
    const until = datetimeValue($("#quarantine-until"));
    if (since === undefined || until === undefined) return invalid("quarantine: a date is not valid");
    return { operation: operation || null, since: since, until: until };
  }

  function describeFilter(filter) {
    const parts = [];
    if (filter.operation) parts.push("operation " + filter.operation);
    if (filter.since !== null) parts.push("since " + fmtDateTime(filter.since));
    if (filter.until !== null) parts.push("until " + fmtDateTime(filter.until));
    return parts.length ? parts.join(", ") : "no filter";
  }

  function hidePreview() {
    page.preview = null;
    $("#quarantine-preview").hidden = true;
    $("#quarantine-preview-list").replaceChildren();
  }

  function previewItem(record) {
    return el("li", null, [
      el("span", { className: "mono", text: shortId(record.record_id) }),
      " · ",
      el("strong", { text: record.operation }),
       " · token " + plainId(record.token_id) + " · " + fmtDateTime(record.quarantined_at),
      record.reason ? " · " + record.reason : "",
    ]);
  }

  async function previewQuarantine(event) {
    event.preventDefault();
    const filter = readQuarantineFilter();
    if (!filter) return;
    hidePreview();
    const params = Object.assign({ record_ids: null }, filter);
    const reply = await runControl("quarantine_preview", params, "preview", $("#quarantine-preview-btn"));
    if (!reply.ok) return;
    const selected = (reply.result && Array.isArray(reply.result.selected)) ? reply.result.selected : [];
    const matched = (reply.result && typeof reply.result.selected_count === "number")
      ? reply.result.selected_count : selected.length;
    // The buttons act on exactly the records listed here, never on the filter again: a record
    // quarantined after the preview, or one past the listed ones, is not touched.
    page.preview = { filter: filter, ids: selected.map((r) => r.record_id) };
    const items = selected.slice(0, PREVIEW_LIST_MAX).map(previewItem);
    if (selected.length > PREVIEW_LIST_MAX) {
      items.push(el("li", { className: "muted", text: "… and " + (selected.length - PREVIEW_LIST_MAX) + " more" }));
    }
    $("#quarantine-preview-list").replaceChildren(...items);
    let summary = selected.length === 1
      ? "1 record matches (" + describeFilter(filter) + "):"
      : selected.length + " records match (" + describeFilter(filter) + "):";
    if (matched > selected.length) {
      summary = matched + " records match (" + describeFilter(filter) + "); the oldest " +
        selected.length + " are listed, and the buttons act on those " + selected.length + ":";
    }
    setText($("#quarantine-preview-summary"), summary);
    for (const [id, verb] of [["#quarantine-release-btn", "Release"], ["#quarantine-discard-btn", "Discard"]]) {
      const button = $(id);
      setText(button, verb + " " + selected.length);
      button.disabled = selected.length === 0;
    }
    $("#quarantine-preview").hidden = false;
  }

  async function bulkQuarantine(action, button) {
    const preview = page.preview;
    if (!preview) return;
    const params = { record_ids: preview.ids, operation: null, since: null, until: null, dry_run: false };
    const verb = action === "quarantine_release" ? "release" : "discard";
    const what = verb + " " + preview.ids.length + " (" + describeFilter(preview.filter) + ")";
    const reply = await runControl(action, params, what, button);
    if (reply.ok || reply.outcome === "failed") hidePreview();
  }

  /** A button that needs a second click within 4 s (for irreversible per-row actions). */
  function armed(button, confirmText) {
    if (button.dataset.armed === "1") {
      delete button.dataset.armed;
      clearTimeout(Number(button.dataset.timer));
      setText(button, button.dataset.label);
      return true;
    }
    button.dataset.armed = "1";
    button.dataset.label = button.textContent;
    setText(button, confirmText);
    button.dataset.timer = String(setTimeout(() => {
      delete button.dataset.armed;
      setText(button, button.dataset.label);
    }, 4000));
    return false;
  }

  function bindControls() {
    $("#drain-btn").addEventListener("click", (e) => runControl("drain", {}, "drain", e.currentTarget));
    $("#pause-btn").addEventListener("click", (e) => runControl("pause", {}, "pause", e.currentTarget));
    $("#resume-btn").addEventListener("click", (e) => runControl("resume", {}, "resume", e.currentTarget));
    $("#kill-btn").addEventListener("click", (e) => tokenControl("kill", {}, e.currentTarget));
    $("#reprioritize-btn").addEventListener("click", (e) =>
      tokenControl("reprioritize", { priority: $("#priority-select").value }, e.currentTarget));
    $("#reroute-btn").addEventListener("click", (e) =>
      tokenControl("reroute", { weight: $("#weight-select").value }, e.currentTarget));
    $("#launch-btn").addEventListener("click", (e) => launch(e.currentTarget));
    $("#launch-name").addEventListener("change", renderLaunchDetails);
    $("#limit-form").addEventListener("submit", setLimit);
    const form = $("#quarantine-form");
    form.addEventListener("submit", previewQuarantine);
    form.addEventListener("input", hidePreview); // a changed filter voids the preview
    $("#quarantine-release-btn").addEventListener("click", (e) =>
      bulkQuarantine("quarantine_release", e.currentTarget));
    $("#quarantine-discard-btn").addEventListener("click", (e) =>
      bulkQuarantine("quarantine_discard", e.currentTarget));
    $("#quarantine-cancel-btn").addEventListener("click", hidePreview);
    window.addEventListener("resize", scheduleChartRedraw);
  }

  // ---------------------------------------------------------------- panels

  function badge(node, text, tone) {
    setText(node, text);
    setAttr(node, "data-tone", tone);
  }

  function renderSystem(sys, pool) {
    const root = $("#system");
    badge(field(root, "running"), sys.running ? "running" : "stopped", sys.running ? "good" : "bad");
    badge(field(root, "paused"), sys.paused ? "paused" : "not paused", sys.paused ? "warn" : "good");
    // A closed admission with nothing accepted left is a finished drain.
    const inFlight = (pool.waiting || 0) + (pool.admitted || 0) + (pool.executing || 0);
    let admission = "admission open";
    if (!sys.admission_open) admission = inFlight ? "admission closed: draining" : "admission closed: drained";
    badge(field(root, "admission"), admission, sys.admission_open ? "good" : "warn");
    badge(field(root, "pinned"), sys.pinned ? "pinned" : "not pinned", "neutral");
    badge(field(root, "backend"), backendText(sys.backend), "neutral");
    setField(root, "mode", sys.mode || "—");
    setField(root, "uptime", fmtUptime(sys.uptime_s), sys.uptime_s);
    setField(root, "throughput", fmtFloat(sys.throughput_per_s, 1), sys.throughput_per_s);
    setField(root, "workers", fmtInt(sys.workers), sys.workers);
    setField(root, "cores", fmtInt(sys.cores), sys.cores);
    setField(root, "physical-cores", fmtInt(sys.physical_cores), sys.physical_cores);
    setField(root, "logical-cpus", fmtInt(sys.logical_cpus), sys.logical_cpus);
    syncRows($("#per-core tbody"), sys.per_core || [], (c) => c.core, createCoreRow, updateCoreRow);
  }

  // "local", or e.g. "dask tcp://10.0.0.5:8786 · 2 workers · 4 threads · 3/8 in flight".
  function backendText(b) {
    if (!b || !b.name || b.name === "local") return "backend: local";
    const parts = [b.name + (b.scheduler ? " " + b.scheduler : "")];
    const count = (n, one) => fmtInt(n) + " " + one + (n === 1 ? "" : "s");
    if (isNum(b.workers)) parts.push(count(b.workers, "worker"));
    if (isNum(b.threads)) parts.push(count(b.threads, "thread"));
    if (isNum(b.in_flight)) parts.push(fmtInt(b.running || 0) + "/" + fmtInt(b.in_flight) + " in flight");
    return parts.join(" · ");
  }

  function createCoreRow(core) {
    return el("tr", null, [
      el("td", { className: "mono", text: core.core }),
      el("td", { className: "mono muted", "data-field": "cpu" }),
      el("td", { className: "num", "data-field": "active-core-" + core.core }),
      el("td", { className: "num", "data-field": "busy" }),
      el("td", { className: "num", "data-field": "executing" }),
      el("td", { className: "num", "data-field": "queue-depth" }),
    ]);
  }

  function updateCoreRow(row, core) {
    setField(row, "cpu", isNum(core.cpu) ? "cpu " + core.cpu : "—");
    setField(row, "active-core-" + core.core, fmtInt(core.active_workers), core.active_workers);
    setField(row, "busy", fmtInt(core.busy_workers), core.busy_workers);
    setField(row, "executing", fmtInt(core.executing), core.executing);
    setField(row, "queue-depth", fmtInt(core.queue_depth), core.queue_depth);
  }

  const POOL_FIELDS = [
    ["created", "created"], ["waiting", "waiting"], ["admitted", "admitted"],
    ["executing", "executing"], ["completed", "completed"], ["failed", "failed"],
    ["killed", "killed"], ["timed-out", "timed_out"],
  ];

  function renderPool(pool, queued) {
    const root = $("#pool");
    for (const [name, key] of POOL_FIELDS) setField(root, name, fmtInt(pool[key]), pool[key]);
    const rows = Array.isArray(queued) ? queued : [];
    setField(root, "queued-count", fmtInt(rows.length), rows.length);
    syncRows($("#queued tbody"), rows, (t) => t.token_id, createQueuedRow, updateQueuedRow);
    showEmpty("queued-empty", rows.length === 0);
  }

  function rowSelect(values, label, onChange, action) {
    const select = el("select", { "aria-label": label, "data-action": action },
      values.map((v) => el("option", { value: v, text: v })));
    select.addEventListener("change", onChange);
    return gate(select);
  }

  function createQueuedRow(token) {
    const id = token.token_id;
    const kill = gate(el("button", {
      type: "button", className: "btn small danger", "data-action": "kill", text: "Kill",
      "aria-label": "kill token " + id,
    }));
    kill.addEventListener("click", () => runControl("kill", { token_id: id }, "kill token " + id, kill));
    const priority = rowSelect(["high", "normal", "low"], "priority of token " + id, (e) =>
      runControl("reprioritize", { token_id: id, priority: e.target.value }, "reprioritize token " + id),
    "reprioritize");
    const weight = rowSelect(["light", "medium", "heavy"], "weight of token " + id, (e) =>
      runControl("reroute", { token_id: id, weight: e.target.value }, "reroute token " + id),
    "reroute");
    return el("tr", { "data-token-id": id }, [
      el("td", { className: "num mono", text: id }),
      el("td", { className: "op", "data-field": "operation" }),
      el("td", { "data-field": "state" }),
      el("td", { "data-field": "priority" }, [priority, el("span", { className: "ro", "data-field": "priority-text" })]),
      el("td", { "data-field": "weight" }, [weight, el("span", { className: "ro", "data-field": "weight-text" })]),
      el("td", { className: "actions" }, [kill]),
    ]);
  }

  function updateQueuedRow(row, token) {
    setField(row, "operation", token.operation);
    setAttr(field(row, "operation"), "title", token.operation);
    setField(row, "state", token.state);
    const [priority, weight] = $all("select", row);
    // Do not fight the user: leave a select alone while it has the focus.
    if (document.activeElement !== priority && priority.value !== token.priority) priority.value = token.priority;
    if (document.activeElement !== weight && weight.value !== token.weight) weight.value = token.weight;
    setField(row, "priority-text", may("reprioritize") ? "" : token.priority);
    setField(row, "weight-text", may("reroute") ? "" : token.weight);
  }

  function renderAffinity(perCore) {
    const cores = perCore || [];
    const total = (c) => ["heavy", "medium", "light"].reduce((sum, w) => sum + ((c.routed || {})[w] || 0), 0);
    const max = cores.reduce((m, c) => Math.max(m, total(c)), 0);
    syncRows($("#affinity-table tbody"), cores, (c) => c.core, createAffinityRow,
      (row, c) => updateAffinityRow(row, c, total(c), max));
    const foot = $("#affinity-table tfoot");
    let all = 0;
    for (const weight of ["heavy", "medium", "light"]) {
      const sum = cores.reduce((s, c) => s + ((c.routed || {})[weight] || 0), 0);
      all += sum;
      setField(foot, weight + "-total", fmtInt(sum), sum);
    }
    setField(foot, "all-total", fmtInt(all), all);
  }

  function createAffinityRow(core) {
    const bar = el("div", { className: "stack", role: "presentation" }, [
      el("span", { className: "seg heavy" }), el("span", { className: "seg medium" }),
      el("span", { className: "seg light" }),
    ]);
    return el("tr", { "data-core": core.core }, [
      el("td", { className: "mono", text: core.core }),
      el("td", { className: "num", "data-field": "heavy" }),
      el("td", { className: "num", "data-field": "medium" }),
      el("td", { className: "num", "data-field": "light" }),
      el("td", { className: "num strong", "data-field": "total" }),
      el("td", { className: "bar-col" }, [bar]),
    ]);
  }

  function updateAffinityRow(row, core, total, max) {
    const routed = core.routed || {};
    for (const weight of ["heavy", "medium", "light"]) {
      setField(row, weight, fmtInt(routed[weight] || 0), routed[weight] || 0);
      // CSSOM width (allowed by the CSP, unlike a style attribute)
      const seg = $(".seg." + weight, row);
      const width = max > 0 ? ((routed[weight] || 0) / max * 100).toFixed(2) + "%" : "0%";
      if (seg.style.width !== width) seg.style.width = width;
    }
    setField(row, "total", fmtInt(total), total);
    const bar = $(".stack", row);
    setAttr(bar, "title", "core " + core.core + ": " + fmtInt(total) + " tokens routed");
  }

  function renderGuard(ops) {
    const list = Array.isArray(ops) ? ops : [];
    setField($("#guard"), "guard-count", fmtInt(list.length), list.length);
    syncRows($("#guard-table tbody"), list, (op) => op.operation, createGuardRow, updateGuardRow);
    showEmpty("guard-empty", list.length === 0);
    const names = list.map((op) => String(op.operation));
    syncOptions($("#limit-operation"), names);
    const datalist = $("#operation-names");
    if (datalist.children.length !== names.length ||
        names.some((n, i) => datalist.children[i].value !== n)) {
      datalist.replaceChildren(...names.map((n) => el("option", { value: n })));
    }
  }

  function guardButton(label, action, operation, tone) {
    const button = gate(el("button", {
      type: "button", className: "btn small " + (tone || ""), "data-action": action, text: label,
    }));
    button.addEventListener("click", () =>
      runControl(action, { operation: operation }, label.toLowerCase() + " " + operation, button));
    return button;
  }

  function createGuardRow(op) {
    const name = op.operation;
    const limitButton = gate(el("button", {
      type: "button", className: "btn small ghost", "data-action": "set_limit", text: "Limit",
      title: "set a limit on " + name,
    }));
    limitButton.addEventListener("click", () => {
      $("#limit-operation").value = name;
      $("#limit-max").focus();
    });
    return el("tr", { "data-operation": name }, [
      el("td", { className: "op", "data-field": "operation", text: name, title: name }),
      el("td", { className: "num", "data-field": "rate" }),
      el("td", { className: "num", "data-field": "attempts" }),
      el("td", { className: "num", "data-field": "success" }),
      el("td", { className: "num", "data-field": "p50" }),
      el("td", { className: "num", "data-field": "p95" }),
      el("td", null, [el("span", { className: "badge", "data-field": "health" })]),
      el("td", null, [el("span", { className: "badge", "data-field": "breaker" })]),
      el("td", { className: "small nowrap", "data-field": "limit" }),
      el("td", { className: "num", "data-field": "blocked" }),
      el("td", { className: "error-cell", "data-field": "last-error" }),
      el("td", { className: "actions" }, [
        guardButton("Block", "block", name, "warn"),
        guardButton("Unblock", "unblock", name),
        guardButton("Force open", "force_open", name),
        limitButton,
      ]),
    ]);
  }

  function updateGuardRow(row, op) {
    setField(row, "rate", fmtFloat(op.rate_per_s, 1), op.rate_per_s);
    setField(row, "attempts", fmtInt(op.attempts), op.attempts);
    setField(row, "success", fmtPercent(op.success_rate), op.success_rate);
    setField(row, "p50", fmtMs(op.p50_ms), op.p50_ms);
    setField(row, "p95", fmtMs(op.p95_ms), op.p95_ms);
    const health = field(row, "health");
    setText(health, lower(op.health) || "—");
    setAttr(health, "data-health", lower(op.health));
    const breaker = field(row, "breaker");
    setText(breaker, (op.breaker_state || "—").replace(/_/g, " "));
    setAttr(breaker, "data-breaker", lower(op.breaker_state));
    setField(row, "limit", fmtLimit(op.limit));
    setField(row, "blocked", fmtInt(op.blocked), op.blocked);
    const error = field(row, "last-error");
    setText(error, op.last_error || "");
    setAttr(error, "title", op.last_error || "");
  }

  function renderRecent(recent) {
    const list = Array.isArray(recent) ? recent : [];
    syncRows($("#recent-table tbody"), list, (r) => r.token_id + ":" + r.outcome, createRecentRow, updateRecentRow);
    showEmpty("recent-empty", list.length === 0);
  }

  function createRecentRow(rec) {
    return el("tr", { "data-token-id": rec.token_id }, [
      el("td", { className: "num mono", text: rec.token_id }),
      el("td", { className: "op", "data-field": "operation" }),
      el("td", { className: "mono small", "data-field": "time" }),
      el("td", { className: "num", "data-field": "core" }),
      el("td", { className: "num", "data-field": "worker" }),
      el("td", null, [el("span", { className: "badge", "data-field": "outcome" })]),
      el("td", { className: "num", "data-field": "duration" }),
      el("td", { className: "error-cell", "data-field": "error" }),
    ]);
  }

  function updateRecentRow(row, rec) {
    setField(row, "operation", rec.operation);
    setAttr(field(row, "operation"), "title", rec.operation);
    setField(row, "time", fmtClock(rec.time), rec.time);
    setField(row, "core", isNum(rec.core) ? rec.core : "—", rec.core);
    setField(row, "worker", isNum(rec.worker) ? rec.worker : "—", rec.worker);
    const outcome = field(row, "outcome");
    setText(outcome, rec.outcome);
    setAttr(outcome, "data-outcome", rec.outcome);
    setField(row, "duration", fmtMs(rec.duration_ms), rec.duration_ms);
    const error = field(row, "error");
    setText(error, rec.error || "");
    setAttr(error, "title", rec.error || "");
  }

  function renderQuarantine(q) {
    const data = q || { count: 0, records: [] };
    const records = Array.isArray(data.records) ? data.records : [];
    setField($("#quarantine"), "quarantine-count", fmtInt(data.count), data.count);
    syncRows($("#quarantine-table tbody"), records, (r) => r.record_id, createQuarantineRow, updateQuarantineRow);
    showEmpty("quarantine-empty", records.length === 0);
  }

  function createQuarantineRow(rec) {
    const id = String(rec.record_id);
    const release = gate(el("button", {
      type: "button", className: "btn small", "data-action": "quarantine_release", text: "Release",
    }));
    release.addEventListener("click", () => runControl("quarantine_release",
      { record_ids: [id], operation: null, since: null, until: null, dry_run: false },
      "release " + shortId(id), release));
    const discard = gate(el("button", {
      type: "button", className: "btn small danger", "data-action": "quarantine_discard", text: "Discard",
    }));
    discard.addEventListener("click", () => {
      if (!armed(discard, "Confirm")) return;
      runControl("quarantine_discard",
        { record_ids: [id], operation: null, since: null, until: null, dry_run: false },
        "discard " + shortId(id), discard);
    });
    return el("tr", { "data-record-id": id }, [
      el("td", { className: "mono small", title: id, text: shortId(id) }),
      el("td", { className: "num mono", "data-field": "token" }),
      el("td", { className: "op", "data-field": "operation" }),
      el("td", { className: "mono small", "data-field": "time" }),
      el("td", { className: "error-cell", "data-field": "reason" }),
      el("td", { className: "error-cell mono small", "data-field": "arguments" }),
      el("td", { "data-field": "replayable" }),
      el("td", { className: "actions" }, [release, discard]),
    ]);
  }

  function updateQuarantineRow(row, rec) {
    setField(row, "token", plainId(rec.token_id), rec.token_id);
    setField(row, "operation", rec.operation);
    setAttr(field(row, "operation"), "title", rec.operation);
    setField(row, "time", fmtDateTime(rec.quarantined_at), rec.quarantined_at);
    setField(row, "reason", rec.reason || "");
    setAttr(field(row, "reason"), "title", rec.reason || "");
    setField(row, "arguments", rec.argument_summary || "");
    setAttr(field(row, "arguments"), "title", rec.argument_summary || "");
    setField(row, "replayable", rec.replayable ? "yes" : "no");
  }

  function renderAudit(records) {
    const list = Array.isArray(records) ? records : [];
    syncRows($("#audit-table tbody"), list,
      (r) => [r.ts, r.action, r.user, r.client, r.target, r.outcome].join("|"), createAuditRow, updateAuditRow);
    showEmpty("audit-empty", list.length === 0);
  }

  function createAuditRow() {
    return el("tr", null, [
      el("td", { className: "mono small", "data-field": "time" }),
      el("td", { "data-field": "user" }),
      el("td", { "data-field": "role" }),
      el("td", { className: "mono small", "data-field": "client" }),
      el("td", { className: "mono", "data-field": "action" }),
      el("td", { className: "op", "data-field": "target" }),
      el("td", null, [el("span", { className: "badge", "data-field": "outcome" })]),
      el("td", { className: "error-cell", "data-field": "detail" }),
    ]);
  }

  function updateAuditRow(row, rec) {
    setField(row, "time", isNum(rec.ts) ? fmtDateTime(rec.ts) : rec.time || "—");
    setField(row, "user", rec.user || "—");
    setField(row, "role", rec.role || "—");
    setField(row, "client", rec.client || "—");
    setField(row, "action", rec.action);
    setField(row, "target", rec.target || "");
    const outcome = field(row, "outcome");
    setText(outcome, rec.outcome);
    setAttr(outcome, "data-outcome", rec.outcome);
    setField(row, "detail", rec.detail || "");
    setAttr(field(row, "detail"), "title", rec.detail || "");
  }

  // -- launchables (from hello) --

  function renderLaunchables(list) {
    page.launchables = Array.isArray(list) ? list : [];
    syncOptions($("#launch-name"), page.launchables.map((l) => String(l.name)));
    $("#launch-btn").disabled = page.launchables.length === 0;
    renderLaunchDetails();
  }

  function renderLaunchDetails() {
    const name = $("#launch-name").value;
    const item = page.launchables.find((l) => String(l.name) === name);
    setText($("#launch-signature"), item ? name + (item.signature || "()") : "none registered");
    setText($("#launch-doc"), item ? item.doc || "" : "");
  }

  // ---------------------------------------------------------------- charts

  function cssVar(name, fallback) {
    const value = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    return value || fallback;
  }

  /** A "nice" step (1, 2, 2.5, 5 × 10^k) so that max/step is about `ticks`. */
  function niceStep(max, ticks) {
    const raw = max / ticks;
    const magnitude = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 2.5, 5, 10]) {
      if (raw <= m * magnitude) return m * magnitude;
    }
    return 10 * magnitude;
  }

  /** An axis label with as many decimals as the tick step needs. */
  function fmtTick(value, step) {
    if (value >= 10000 && step >= 1000) return (value / 1000).toLocaleString("en-US") + "k";
    let decimals = 0;
    while (decimals < 4 && Math.abs(step * 10 ** decimals - Math.round(step * 10 ** decimals)) > 1e-9) {
      decimals += 1;
    }
    return value.toLocaleString("en-US", { minimumFractionDigits: decimals, maximumFractionDigits: decimals });
  }

  /** Resize the canvas' backing store to its CSS size × devicePixelRatio; returns a 2D context. */
  function prepareCanvas(canvas) {
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(200, Math.round(canvas.clientWidth));
    const height = Math.max(120, Math.round(canvas.clientHeight));
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    return { ctx: ctx, width: width, height: height };
  }

  /**
   * Draw a time-series chart. spec: {t: [unix s], lines: [{values, color, label, fill}],
   * unit: "tokens/s" | "ms"}. Null values leave gaps.
   */
  function drawChart(canvas, spec) {
    const { ctx, width, height } = prepareCanvas(canvas);
    const pad = { left: 52, right: 14, top: 12, bottom: 34 };
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    const ink = cssVar("--ink-muted", "#5b6472");
    const grid = cssVar("--grid", "#e4e8ee");
    ctx.font = "11px " + cssVar("--font-ui", "sans-serif");
    ctx.lineWidth = 1;

    const t = spec.t;
    const end = t.length ? t[t.length - 1] : 0;
    const span = t.length ? Math.min(CHART_MAX_SPAN_S, Math.max(CHART_MIN_SPAN_S, end - t[0])) : CHART_MAX_SPAN_S;
    const start = end - span;
    let max = 0;
    for (const line of spec.lines) {
      for (let i = 0; i < t.length; i += 1) {
        const v = line.values[i];
        if (isNum(v) && t[i] >= start && v > max) max = v;
      }
    }
    const step = niceStep(max > 0 ? max : 1, 4);
    const top = Math.max(step, Math.ceil(max / step) * step);
    const x = (ts) => pad.left + ((ts - start) / span) * plotW;
    const y = (v) => pad.top + plotH - (v / top) * plotH;

    // grid and y axis
    ctx.strokeStyle = grid;
    ctx.fillStyle = ink;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let v = 0; v <= top + step / 1000; v += step) {
      const yy = Math.round(y(v)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(pad.left, yy);
      ctx.lineTo(pad.left + plotW, yy);
      ctx.stroke();
      ctx.fillText(fmtTick(v, step), pad.left - 6, yy);
    }
    // x axis: seconds before the newest point
    const xStep = span > 180 ? 60 : span > 90 ? 30 : span > 45 ? 15 : 5;
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (let ago = 0; ago <= span; ago += xStep) {
      const xx = Math.round(x(end - ago)) + 0.5;
      ctx.strokeStyle = grid;
      ctx.beginPath();
      ctx.moveTo(xx, pad.top);
      ctx.lineTo(xx, pad.top + plotH);
      ctx.stroke();
      ctx.fillText(ago === 0 ? "now" : "−" + ago + " s", xx, pad.top + plotH + 5);
    }
    // axis titles
    ctx.textAlign = "right";
    ctx.fillText("seconds ago", pad.left + plotW, pad.top + plotH + 19);
    ctx.save();
    ctx.translate(12, pad.top + plotH / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText(spec.unit, 0, 0);
    ctx.restore();
    // baseline
    ctx.strokeStyle = ink;
    ctx.beginPath();
    ctx.moveTo(pad.left, Math.round(y(0)) + 0.5);
    ctx.lineTo(pad.left + plotW, Math.round(y(0)) + 0.5);
    ctx.stroke();

    if (!t.length) {
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText("waiting for data…", pad.left + plotW / 2, pad.top + plotH / 2);
      return;
    }
    ctx.save();
    ctx.beginPath();
    ctx.rect(pad.left, pad.top - 2, plotW + 2, plotH + 4);
    ctx.clip();
    for (const line of spec.lines) drawLine(ctx, t, line, x, y, start);
    ctx.restore();
  }

  /** One series: runs of consecutive values become a path (optionally filled); lone points dots. */
  function drawLine(ctx, t, line, x, y, start) {
    const runs = [];
    let run = [];
    for (let i = 0; i < t.length; i += 1) {
      const v = line.values[i];
      if (isNum(v) && t[i] >= start) run.push([x(t[i]), y(v)]);
      else if (run.length) {
        runs.push(run);
        run = [];
      }
    }
    if (run.length) runs.push(run);
    ctx.strokeStyle = line.color;
    ctx.fillStyle = line.color;
    ctx.lineWidth = line.width || 1.75;
    ctx.lineJoin = "round";
    for (const points of runs) {
      if (points.length === 1) {
        ctx.beginPath();
        ctx.arc(points[0][0], points[0][1], 2.5, 0, Math.PI * 2);
        ctx.fill();
        continue;
      }
      if (line.fill) {
        ctx.save();
        ctx.globalAlpha = 0.14;
        ctx.beginPath();
        ctx.moveTo(points[0][0], y(0));
        for (const [px, py] of points) ctx.lineTo(px, py);
        ctx.lineTo(points[points.length - 1][0], y(0));
        ctx.closePath();
        ctx.fill();
        ctx.restore();
      }
      ctx.beginPath();
      ctx.moveTo(points[0][0], points[0][1]);
      for (let i = 1; i < points.length; i += 1) ctx.lineTo(points[i][0], points[i][1]);
      ctx.stroke();
    }
  }

  function seriesArrays(series) {
    const s = series || {};
    const t = Array.isArray(s.t) ? s.t : [];
    const pick = (name) => (Array.isArray(s[name]) ? s[name] : []);
    return { t: t, completed: pick("completed"), failed: pick("failed"), p50: pick("p50_ms"), p95: pick("p95_ms") };
  }

  function sumLast(values, n) {
    let sum = 0;
    for (let i = Math.max(0, values.length - n); i < values.length; i += 1) {
      if (isNum(values[i])) sum += values[i];
    }
    return sum;
  }

  function maxOf(values) {
    let max = null;
    for (const v of values) if (isNum(v) && (max === null || v > max)) max = v;
    return max;
  }

  function lastNum(values) {
    for (let i = values.length - 1; i >= 0; i -= 1) if (isNum(values[i])) return values[i];
    return null;
  }

  function renderCharts(series) {
    page.series = series;
    const s = seriesArrays(series);
    drawChart($("#throughput-chart"), {
      t: s.t, unit: "tokens/s", lines: [
        { values: s.completed, color: cssVar("--c-completed", "#2563eb"), fill: true, label: "completed" },
        { values: s.failed, color: cssVar("--c-failed", "#dc2626"), label: "failed" },
      ],
    });
    drawChart($("#latency-chart"), {
      t: s.t, unit: "ms", lines: [
        { values: s.p50, color: cssVar("--c-p50", "#0d9488"), label: "p50" },
        { values: s.p95, color: cssVar("--c-p95", "#d97706"), label: "p95" },
      ],
    });
    setText($("#throughput-summary"), throughputSummary(s));
    setText($("#latency-summary"), latencySummary(s));
  }

  function throughputSummary(s) {
    if (!s.t.length) return "No data yet.";
    const n = Math.min(60, s.t.length);
    const completed = sumLast(s.completed, n);
    const failed = sumLast(s.failed, n);
    const peak = maxOf(s.completed.slice(-CHART_MAX_SPAN_S));
    return "Last " + n + " s: " + fmtInt(completed) + " completed (" + fmtFloat(completed / n, 1) +
      "/s), " + fmtInt(failed) + " failed. Peak " + fmtInt(peak === null ? 0 : peak) +
      " completed/s over the window; latest second " + fmtInt(lastNum(s.completed) || 0) +
      " completed, " + fmtInt(lastNum(s.failed) || 0) + " failed.";
  }

  function latencySummary(s) {
    const p50 = lastNum(s.p50);
    const p95 = lastNum(s.p95);
    if (p50 === null && p95 === null) return "No finished tokens in the window.";
    return "Latest p50 " + fmtMs(p50) + ", p95 " + fmtMs(p95) + "; highest p95 over the window " +
      fmtMs(maxOf(s.p95)) + ".";
  }

  let redrawPending = false;

  function scheduleChartRedraw() {
    if (redrawPending) return;
    redrawPending = true;
    requestAnimationFrame(() => {
      redrawPending = false;
      renderCharts(page.series);
    });
  }

  // ---------------------------------------------------------------- snapshot

  /** Run one panel's renderer; a failing panel is reported once and does not stop the rest. */
  function safely(name, fn) {
    try {
      fn();
    } catch (err) {
      if (!page.renderErrors.has(name)) {
        page.renderErrors.add(name);
        console.error("tokengate dashboard: rendering " + name + " failed", err);
      }
    }
  }

  function render(snap) {
    page.snapshot = snap;
    page.states += 1;
    const sys = snap.system || {};
    safely("system", () => renderSystem(sys, snap.pool || {}));
    safely("pool", () => renderPool(snap.pool || {}, snap.queued));
    safely("affinity", () => renderAffinity(sys.per_core));
    safely("guard", () => renderGuard(snap.guard));
    safely("recent", () => renderRecent(snap.recent));
    safely("charts", () => renderCharts(snap.series));
    safely("quarantine", () => renderQuarantine(snap.quarantine));
    safely("audit", () => renderAudit(snap.audit));
    if (snap.coordinator) setText($("#coordinator-name"), snap.coordinator);
    setText($("#last-update"), fmtClock(snap.time));
    setAttr(document.body, "data-version", isNum(snap.version) ? snap.version : "");
  }

  function onState(snap, ack) {
    try {
      if (snap && typeof snap === "object") render(snap);
    } finally {
      if (typeof ack === "function") ack(); // drawn: the server may send the next one
    }
  }

  function onHello(hello) {
    const h = hello || {};
    page.actions = new Set(Array.isArray(h.actions) ? h.actions : []);
    applyActions(document);
    if (h.user) setText($("#user-name"), h.user);
    if (h.role) {
      const role = $("#user-role");
      setText(role, h.role);
      role.className = "badge role-" + lower(h.role).replace(/[^a-z]/g, "");
    }
    if (h.coordinator) setText($("#coordinator-name"), h.coordinator);
    renderLaunchables(h.launchables);
  }

  // ---------------------------------------------------------------- connection

  function connect() {
    if (typeof window.io !== "function") {
      setConnection("closed", "the Socket.IO client did not load");
      return;
    }
    const socket = window.io({
      auth: { csrf: page.csrf },
      transports: ["websocket", "polling"],
      tryAllTransports: true,
      reconnectionDelayMax: 5000,
    });
    page.socket = socket;
    socket.on("connect", () => setConnection("connected", "connected"));
    socket.on("disconnect", (reason) => {
      if (reason === "io server disconnect") setConnection("closed", "disconnected by the server.", true);
      else setConnection("disconnected", "disconnected — reconnecting…");
    });
    socket.on("connect_error", (err) => {
      if (!socket.active) {
        setConnection("closed", "connection refused: " + (err && err.message ? err.message : "unknown") + ".", true);
        return;
      }
      setConnection("disconnected", "disconnected — reconnecting…");
      // A transport error hides why: ask the server whether the session still stands, and
      // stop retrying once it does not (the server answers the handshake 401 then).
      sessionGone().then((gone) => {
        if (!gone) return;
        socket.disconnect();
        setConnection("closed", "your session ended.", true);
      });
    });
    socket.io.on("reconnect_attempt", (n) => setConnection("disconnected", "disconnected — reconnecting (attempt " + n + ")…"));
    socket.on("hello", onHello);
    socket.on("state", onState);
  }

  /** Whether the server no longer knows this page's session (its API answers 401). */
  async function sessionGone() {
    try {
      const resp = await fetch("api/audit?limit=1", { credentials: "same-origin", cache: "no-store" });
      return resp.status === 401;
    } catch (err) {
      return false; // the server is unreachable: keep reconnecting
    }
  }

  function start() {
    page.csrf = meta("csrf-token");
    page.actions = new Set(meta("tokengate-actions").split(/\s+/).filter(Boolean));
    applyActions(document);
    bindControls();
    renderCharts(null);
    connect();
  }

  // A small hook for scripts and end-to-end tests: window.tokengate.control(action, params)
  // sends a control exactly as the buttons do and resolves with the server's answer.
  window.tokengate = Object.freeze({
    control: (action, params) => runControl(String(action), params || {}),
    snapshot: () => page.snapshot,
    states: () => page.states,
    connected: () => Boolean(page.socket && page.socket.connected),
  });

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
