// joynode operator dashboard: polls the control socket (JSON-RPC 2.0 over a
// websocket) every 2 s and renders what it answers. Everything from the node
// goes into the DOM as text (textContent / attributes), never as HTML.
"use strict";
(() => {
  const TOKEN_KEY = "joynode-token";
  const POLL_MS = 2000;
  const CALL_TIMEOUT_MS = 15000;
  const BACKOFF_MIN_MS = 1000;
  const BACKOFF_MAX_MS = 10000;
  const METHOD_NOT_FOUND = -32601;
  const UNAUTHORIZED = -32001;
  const WEI = 10n ** 18n;
  const SVG_NS = "http://www.w3.org/2000/svg";

  const $ = (selector) => document.querySelector(selector);

  // ---- DOM helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined && value !== false) node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  // A short form of a long id with the full one as a tooltip.
  function short(value, head = 6, tail = 4) {
    if (value === null || value === undefined || value === "") return el("span", { class: "muted" }, "—");
    const text = String(value);
    const shown = text.length > head + tail + 1 ? text.slice(0, head) + "…" + text.slice(-tail) : text;
    return el("code", { title: text }, shown);
  }

  const shortPeer = (id) => (id.length > 8 ? "…" + id.slice(-6) : id);

  function badge(text, kind) {
    return el("span", { class: "badge state-" + String(kind || text).replace(/[^a-z0-9_-]/gi, "") }, text);
  }

  function fields(dl, rows) {
    dl.replaceChildren();
    for (const [label, value] of rows) {
      dl.append(el("dt", null, label), el("dd", null, value === null || value === undefined ? "—" : value));
    }
  }

  function setRows(tbody, rows) {
    tbody.replaceChildren(...rows);
  }

  // ---- formatting

  // Integer strings in base units (18 decimals) as "1,234.56".
  function units(raw, symbol) {
    if (raw === null || raw === undefined) return "—";
    let value;
    try {
      value = BigInt(raw);
    } catch (_) {
      return String(raw);
    }
    const negative = value < 0n;
    if (negative) value = -value;
    const cents = (value * 100n) / WEI; // rounded down to 2 decimals
    const whole = (cents / 100n).toLocaleString("en-US");
    const frac = String(cents % 100n).padStart(2, "0");
    return (negative ? "-" : "") + whole + "." + frac + (symbol ? " " + symbol : "");
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "—";
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  const age = (unixSeconds) => (unixSeconds ? duration(Date.now() / 1000 - unixSeconds) : "—");
  const errorText = (err) => (err && err.message ? err.message : String(err));

  // ---- state

  let endpoints = {};
  let token = null;
  let ws = null;
  let nextId = 1;
  let pending = new Map();
  let backoff = BACKOFF_MIN_MS;
  let pollTimer = null;
  let reconnectTimer = null;
  let modelNames = new Map(); // model id -> name, from models.list
  let peerModels = new Map(); // model id -> peers up serving it

  function setConn(text, detail) {
    const conn = $("#conn");
    conn.textContent = text;
    conn.className = "badge state-" + text.replace(/[^a-z]/g, "");
    $("#conn-detail").textContent = detail || "";
  }

  // ---- token

  function readToken() {
    const hash = new URLSearchParams(location.hash.slice(1));
    const fromHash = hash.get("token");
    if (fromHash) {
      localStorage.setItem(TOKEN_KEY, fromHash);
      history.replaceState(null, "", location.pathname + location.search);
      return fromHash;
    }
    return localStorage.getItem(TOKEN_KEY);
  }

  function showTokenForm(message) {
    $("#token-form").hidden = false;
    $("#token-msg").textContent = message || "";
    $("#token-input").focus();
    setConn("no token", message ? "" : "enter the control token");
  }

  function onTokenSave(event) {
    event.preventDefault();
    const value = $("#token-input").value.trim();
    if (!value) return;
    token = value;
    localStorage.setItem(TOKEN_KEY, token);
    $("#token-input").value = "";
    $("#token-form").hidden = true;
    backoff = BACKOFF_MIN_MS;
    connect();
  }

  // ---- JSON-RPC over the websocket

  function call(method, params) {
    const socket = ws;
    if (!socket || socket.readyState !== WebSocket.OPEN) return Promise.reject(new Error("not connected"));
    const id = nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        pending.delete(id);
        reject(new Error(method + " timed out"));
      }, CALL_TIMEOUT_MS);
      pending.set(id, { resolve, reject, timer });
      socket.send(JSON.stringify({ jsonrpc: "2.0", id, method, params: params || {} }));
    });
  }

  function onMessage(event) {
    let data;
    try {
      data = JSON.parse(event.data);
    } catch (_) {
      return;
    }
    for (const message of Array.isArray(data) ? data : [data]) {
      if (!message || typeof message !== "object" || !pending.has(message.id)) continue; // notifications
      const { resolve, reject, timer } = pending.get(message.id);
      pending.delete(message.id);
      clearTimeout(timer);
      if (message.error) {
        const err = new Error(String(message.error.message || "error"));
        err.code = message.error.code;
        reject(err);
      } else {
        resolve(message.result);
      }
    }
  }

  function failPending(reason) {
    for (const { reject, timer } of pending.values()) {
      clearTimeout(timer);
      reject(new Error(reason));
    }
    pending = new Map();
  }

  function retryLater(reason) {
    const wait = backoff;
    backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
    setConn("disconnected", "retrying in " + wait / 1000 + " s" + (reason ? " (" + reason + ")" : ""));
    reconnectTimer = setTimeout(connect, wait);
  }

  // (Re)reads endpoints.json each time: a restarted node may have a new control port.
  async function connect() {
    clearTimeout(reconnectTimer);
    if (!token) {
      showTokenForm();
      return;
    }
    if (!(await loadEndpoints())) {
      retryLater("cannot read endpoints.json");
      return;
    }
    renderIdentity({ status: "rejected" });
    if (!endpoints.control_url) {
      setConn("disconnected", "no control_url in endpoints.json");
      return;
    }
    setConn("connecting", endpoints.control_url);
    let socket;
    try {
      socket = new WebSocket(endpoints.control_url);
    } catch (err) {
      retryLater(errorText(err));
      return;
    }
    ws = socket;
    nextId = 1;
    let rejected = false;
    socket.onmessage = onMessage;
    socket.onopen = async () => {
      try {
        await call("auth", { token });
      } catch (err) {
        if (err.code === UNAUTHORIZED) {
          rejected = true;
          token = null;
          localStorage.removeItem(TOKEN_KEY);
          showTokenForm("The node rejected this token. Paste the current contents of control.token.");
        }
        socket.close(); // (after a rejection: no reconnect; else onclose retries)
        return;
      }
      backoff = BACKOFF_MIN_MS;
      poll(socket);
    };
    socket.onclose = (event) => {
      if (ws !== socket) return;
      clearTimeout(pollTimer);
      failPending("disconnected");
      ws = null;
      if (!rejected) retryLater(event.reason);
    };
  }

  // ---- polling

  async function poll(socket) {
    if (ws !== socket) return;
    const started = Date.now();
    const names = ["node.status", "peers.list", "models.list", "jobs.list", "chain.status", "zk.jobs"];
    const params = [{}, {}, {}, { limit: 20 }, {}, {}];
    const results = await Promise.allSettled(names.map((name, i) => call(name, params[i])));
    if (ws !== socket) return;
    const [status, peers, models, jobs, chain, zk] = results;
    // Each section renders on its own, so one failure leaves the others intact.
    const sections = [
      [renderIdentity, status],
      [renderPeers, peers], // before models: it counts the peers serving each model
      [renderModels, models], // before jobs: it maps model ids to names
      [renderJobs, jobs],
      [renderChain, chain],
      [renderZk, zk],
    ];
    for (const [render, result] of sections) {
      try {
        render(result);
      } catch (err) {
        console.error(render.name, err);
      }
    }
    if (status.status === "fulfilled") {
      setConn("live", "updated " + new Date().toLocaleTimeString());
    } else {
      setConn("error", "node.status: " + errorText(status.reason));
    }
    pollTimer = setTimeout(() => poll(socket), Math.max(0, POLL_MS - (Date.now() - started)));
  }

  // ---- sections

  function renderIdentity(result) {
    const s = result.status === "fulfilled" ? result.value : {};
    fields($("#identity-fields"), [
      ["address", short(s.address || endpoints.address, 10, 8)],
      ["peer id", short(s.peer_id || endpoints.peer_id, 10, 8)],
      ["version", s.version || endpoints.version],
      ["uptime", duration(s.uptime_s)],
      ["boot", s.boot === undefined ? null : "#" + s.boot],
      ["control", short(endpoints.control_url, 40, 0)],
    ]);
    const actors = Object.entries(s.actors || {}).map(([name, a]) =>
      el("li", { class: "chip", title: a.error || "since " + new Date(a.since * 1000).toLocaleString() },
        badge(a.state), " " + name, a.error ? el("span", { class: "error" }, " " + a.error) : null),
    );
    $("#actor-list").replaceChildren(...actors);
  }

  function renderChain(result) {
    const body = $("#chain-body");
    if (result.status === "rejected") {
      const err = result.reason;
      body.replaceChildren(
        err.code === METHOD_NOT_FOUND
          ? el("p", { class: "muted" }, "no chain (chain.mode is off)")
          : el("p", { class: "error" }, "no chain: " + errorText(err)),
      );
      return;
    }
    const c = result.value;
    const release = c.unbonding_release_at ? " (release " + new Date(c.unbonding_release_at * 1000).toLocaleString() + ")" : "";
    // While the RPC is unreachable the node answers with the last values it read (as_of).
    const rpc = c.reachable
      ? badge("reachable", "up")
      : el("span", null, badge("unreachable", "down"), " " + (c.last_error || ""),
          el("span", { class: "muted" }, c.as_of ? " (values as of " + age(c.as_of) + " ago)" : " (no values read yet)"));
    const dl = el("dl", { class: "fields" });
    fields(dl, [
      ["RPC", el("span", null, short(c.rpc_url, 40, 0), " ", rpc)],
      ["registered", c.registered === undefined ? null : badge(c.registered ? "yes" : "no", c.registered ? "up" : "down")],
      ["stake", units(c.stake, "JOY")],
      ["unbonding", units(c.unbonding, "JOY") + (c.unbonding && c.unbonding !== "0" ? release : "")],
      ["reputation", c.reputation === undefined ? null : c.reputation + " / 10000"],
      ["rewards earned", units(c.rewards, "JOY")],
      ["JOY balance", units(c.joy_balance, "JOY")],
      ["ETH balance", units(c.eth_balance, "ETH")],
      ["chain id", c.chain_id],
      ["head block", c.head],
      ["processed", c.last_processed_block + " (" + c.events_applied + " events)"],
    ]);
    const contracts = el("details", null, el("summary", null, "contracts"));
    const cdl = el("dl", { class: "fields" });
    fields(cdl, Object.entries(c.contracts || {}).map(([name, address]) => [name, short(address, 10, 8)]));
    contracts.append(cdl);
    const wasOpen = body.querySelector("details") && body.querySelector("details").open;
    contracts.open = !!wasOpen;
    body.replaceChildren(dl, contracts);
  }

  function renderPeers(result) {
    const graph = $("#peer-graph");
    const list = $("#peer-list");
    if (result.status === "rejected") {
      list.replaceChildren(el("li", { class: "error" }, "peers.list: " + errorText(result.reason)));
      return;
    }
    const peers = result.value || [];
    const up = peers.filter((p) => p.state === "up").length;
    $("#peer-count").textContent = up + " up / " + peers.length;

    peerModels = new Map();
    for (const p of peers) {
      if (p.state !== "up") continue;
      for (const m of p.models || []) peerModels.set(m, (peerModels.get(m) || 0) + 1);
    }

    // Graph: this node in the centre, the peers on a circle around it.
    const radius = 110;
    const labels = peers.length <= 24;
    const lines = svg("g", { class: "edges" });
    const nodes = svg("g", { class: "nodes" });
    peers.forEach((p, i) => {
      const angle = (2 * Math.PI * i) / Math.max(peers.length, 1) - Math.PI / 2;
      const x = (radius * Math.cos(angle)).toFixed(1);
      const y = (radius * Math.sin(angle)).toFixed(1);
      const state = ["up", "discovered", "down"].includes(p.state) ? p.state : "unknown";
      if (p.connected) lines.append(svg("line", { x1: 0, y1: 0, x2: x, y2: y, class: "edge state-" + state }));
      const g = svg("g", { class: "peer-node state-" + state + (p.banned ? " banned" : "") });
      g.append(svg("title", null, p.peer_id + " (" + p.state + (p.connected ? ", connected" : "") + ")"));
      g.append(svg("circle", { cx: x, cy: y, r: 9 }));
      if (labels) {
        const below = Math.sin(angle) >= 0;
        g.append(svg("text", { x, y: (+y + (below ? 22 : -14)).toFixed(1), "text-anchor": "middle" }, shortPeer(p.peer_id)));
      }
      nodes.append(g);
    });
    const self = svg("g", { class: "peer-node self" });
    self.append(svg("title", null, "this node " + (endpoints.peer_id || "")));
    self.append(svg("circle", { cx: 0, cy: 0, r: 14 }));
    self.append(svg("text", { x: 0, y: 4, "text-anchor": "middle" }, "me"));
    nodes.append(self);
    graph.replaceChildren(lines, nodes);

    const items = peers.map((p) => {
      const seen = p.last_seen_s_ago === null ? "never heard" : "seen " + duration(p.last_seen_s_ago) + " ago";
      return el("li", { class: "peer state-" + p.state, "data-peer-id": p.peer_id, "data-state": p.state },
        badge(p.state), " ", short(p.peer_id, 8, 6), " ", short(p.address, 6, 4),
        el("span", { class: "muted" },
          " · " + seen +
          (p.version ? " · v" + p.version : "") +
          " · " + (p.models || []).length + " models · queue " + p.queue_depth + "/" + p.capacity +
          " · score " + p.score + (p.connected ? " · connected" : "")),
        p.banned ? badge("banned", "down") : null);
    });
    list.replaceChildren(...(items.length ? items : [el("li", { class: "muted" }, "no peers known")]));
  }

  function renderModels(result) {
    const tbody = $("#model-table tbody");
    if (result.status === "rejected") {
      setRows(tbody, [el("tr", null, el("td", { colspan: 6, class: "error" }, "models.list: " + errorText(result.reason)))]);
      return;
    }
    const models = result.value || [];
    modelNames = new Map(models.map((m) => [m.id, m.name]));
    $("#model-empty").hidden = models.length > 0;
    setRows(tbody, models.map((m) => m.state === "refused"
      ? el("tr", { class: "model refused", "data-model-id": m.id },
        el("td", null, m.name),
        el("td", null, short(m.id, 8, 6)),
        el("td", { colspan: 4, class: "error", title: m.reason }, badge("refused"), " " + m.reason))
      : el("tr", { class: "model", "data-model-id": m.id },
      el("td", { title: m.path }, m.name),
      el("td", null, short(m.id, 8, 6)),
      el("td", null, m.dtype),
      el("td", null, m.max_model_len),
      el("td", null, m.inflight + " / " + m.max_num_seqs),
      el("td", { title: "peers up serving this model" }, peerModels.get(m.id) || 0))));
  }

  function renderJobs(result) {
    const tbody = $("#job-table tbody");
    if (result.status === "rejected") {
      setRows(tbody, [el("tr", null, el("td", { colspan: 9, class: "error" }, "jobs.list: " + errorText(result.reason)))]);
      return;
    }
    const jobs = result.value || [];
    $("#job-count").textContent = jobs.length ? "(newest " + jobs.length + ")" : "";
    $("#job-empty").hidden = jobs.length > 0;
    setRows(tbody, jobs.map((j) => {
      const size = (j.committee || []).length;
      const cert = j.certificate;
      const pay = j.payment;
      const status = el("td", null, badge(j.status));
      if (j.reason) status.append(el("div", { class: "muted small", title: j.reason }, j.reason));
      const votes = (j.commits || []).length + " / " + (j.reveals || []).length;
      const flags = [];
      if ((j.dissenters || []).length) flags.push(j.dissenters.length + " dissent");
      if ((j.equivocators || []).length) flags.push(j.equivocators.length + " equivocated");
      return el("tr", { class: "job", "data-request-id": j.request_id, "data-status": j.status },
        el("td", null, short(j.request_id, 8, 4)),
        el("td", null, modelNames.has(j.model) ? el("span", { title: j.model }, modelNames.get(j.model)) : short(j.model, 8, 4)),
        status,
        el("td", null, j.role),
        el("td", { title: (j.committee || []).join("\n") }, size),
        el("td", null, votes, flags.length ? el("div", { class: "error small" }, flags.join(", ")) : null),
        el("td", null, cert ? el("span", null, cert.signers.length + (cert.signers.length === 1 ? " signer " : " signers "), short(cert.output_hash, 6, 4)) : "—"),
        el("td", null, pay
          ? el("span", { title: pay.detail || "" }, badge(pay.status), " " + units(pay.price, "JOY") + " ", pay.tx ? short(pay.tx, 6, 4) : null)
          : (j.paid ? "paid" : el("span", { class: "muted" }, "unpaid"))),
        el("td", { class: "nowrap", title: new Date(j.created_at * 1000).toLocaleString() }, age(j.created_at)));
    }));
  }

  function renderZk(result) {
    const body = $("#zk-body");
    if (result.status === "rejected") {
      const err = result.reason;
      body.replaceChildren(el("p", { class: err.code === METHOD_NOT_FOUND ? "muted" : "error" },
        err.code === METHOD_NOT_FOUND ? "not available on this node" : "zk.jobs: " + errorText(err)));
      return;
    }
    const { served = [], jobs = [] } = result.value || {};
    const servedLine = el("p", null, "served: ");
    if (served.length) served.forEach((name, i) => servedLine.append(i ? ", " : "", el("code", null, name)));
    else servedLine.append(el("span", { class: "muted" }, "none"));
    if (!jobs.length) {
      body.replaceChildren(servedLine, el("p", { class: "muted" }, "no zk jobs yet"));
      return;
    }
    const table = el("table", { id: "zk-table" },
      el("thead", null, el("tr", null, ...["request", "model", "status", "detail", "tx", "updated"].map((h) => el("th", null, h)))));
    const tbody = el("tbody");
    for (const j of jobs) {
      tbody.append(el("tr", { class: "zk-job", "data-request-id": j.request_id, "data-status": j.status },
        el("td", { title: "input " + JSON.stringify(j.input) }, short(j.request_id, 6, 4)),
        el("td", null, j.model),
        el("td", null, badge(j.status)),
        el("td", null, el("div", { class: "small", title: j.detail || "" }, j.detail || "")),
        el("td", null, j.tx ? short(j.tx, 6, 4) : "—"),
        el("td", { class: "nowrap" }, age(j.updated_at))));
    }
    table.append(tbody);
    body.replaceChildren(servedLine, table);
  }

  // ---- start

  async function loadEndpoints() {
    try {
      const response = await fetch("/dashboard/endpoints.json", { cache: "no-store" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      endpoints = await response.json();
      return true;
    } catch (err) {
      setConn("disconnected", "cannot read /dashboard/endpoints.json: " + errorText(err));
      return false;
    }
  }

  function start() {
    $("#token-form").addEventListener("submit", onTokenSave);
    token = readToken();
    connect();
  }

  start();
})();
