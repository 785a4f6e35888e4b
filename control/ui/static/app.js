// consulate's web UI: plain JavaScript over the agent's own API, no build step.
//
// The catalog arrives on one Server-Sent Events stream (/v1/internal/ui/events:
// a snapshot, then instance "up"/"down" events) and is kept here as a model;
// each change marks its service dirty and one animation frame re-renders only
// the dirty rows, so a 1,000-service table stays cheap to keep live. Counters
// (/v1/agent/self) are polled while the page is visible: they change with every
// byte, which no event stream should carry. VIPs (/v1/agent/routes) are fetched
// again when the set of services changes.
"use strict";

const STATS_EVERY_MS = 2000;
const TOKEN_KEY = "consulate-token";
const STATUSES = ["passing", "warning", "critical"];
const DEFAULT_LB = "round_robin"; // proxy/balance.py's default
const MAX_ROW_UPDATES = 100; // past this many changed rows, one full render is cheaper

const state = {
  instances: new Map(), // ID -> instance (control/ui/feed.py's instance_view)
  services: new Map(), // name -> Map(ID -> instance)
  vips: new Map(), // service -> VIP
  counters: {}, // service -> proxy counters
  nodes: null, // the last /v1/catalog/nodes answer
  filter: "",
  firstRender: true,
  renders: 0, // full renders of the services list so far
  measuring: false, // the first full list is still being filled in
};
const dirty = new Set();
let fullRender = true;
let frame = 0;
let view = null; // the view shown: {name, mount(), update(full)}
let routesTimer = 0;
let nodesTimer = 0;

const $ = (selector) => document.querySelector(selector);
const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const esc = (text) => String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
const keyPath = (key) => key.split("/").map(encodeURIComponent).join("/");

// -- the API ------------------------------------------------------------------------

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function api(path, options = {}) {
  const headers = { ...options.headers };
  if (token()) headers["X-Consul-Token"] = token();
  return fetch(path, { ...options, headers });
}

// For the background reads (VIPs, counters, nodes): while the agent does not answer,
// the header's live badge already says "reconnecting"; they try again on their own.
const quietly = (read) => () => read().catch(() => {});

let errorTimer = 0;
function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = false;
  clearTimeout(errorTimer);
  errorTimer = setTimeout(() => { box.hidden = true; }, 10000);
}

// -- the model ------------------------------------------------------------------------

function putInstance(instance) {
  const old = state.instances.get(instance.ID);
  if (old && old.Service !== instance.Service) removeInstance(instance.ID);
  if (!old || old.Node !== instance.Node) nodesChanged();
  state.instances.set(instance.ID, instance);
  let members = state.services.get(instance.Service);
  if (!members) {
    members = new Map();
    state.services.set(instance.Service, members);
    servicesChanged();
  }
  members.set(instance.ID, instance);
  changed(instance.Service);
}

function removeInstance(id) {
  const instance = state.instances.get(id);
  if (!instance) return;
  state.instances.delete(id);
  const members = state.services.get(instance.Service);
  members.delete(id);
  if (members.size === 0) {
    state.services.delete(instance.Service);
    servicesChanged();
  }
  nodesChanged();
  changed(instance.Service);
}

function changed(service) {
  dirty.add(service);
  if (!frame) frame = requestAnimationFrame(render);
}

function servicesChanged() {
  fullRender = true;
  clearTimeout(routesTimer);
  routesTimer = setTimeout(quietly(fetchRoutes), 250);
}

function nodesChanged() {
  if (view && view.name === "nodes") {
    clearTimeout(nodesTimer);
    nodesTimer = setTimeout(quietly(fetchNodes), 250);
  }
}

function rerenderAll() {
  fullRender = true;
  if (!frame) frame = requestAnimationFrame(render);
}

function summaryOf(members) {
  const counts = { passing: 0, warning: 0, critical: 0 };
  for (const instance of members.values()) counts[instance.Status] += 1;
  const status = counts.critical ? "critical" : counts.warning ? "warning" : "passing";
  return { counts, status };
}

// The balancer the route table picks: the first instance (by ID) still routed
// (not critical) whose meta "lb" asks for one (proxy/table.py's rule).
function balancerOf(members) {
  const routed = [...members.values()].filter((i) => i.Status !== "critical");
  routed.sort((a, b) => (a.ID < b.ID ? -1 : a.ID > b.ID ? 1 : 0));
  const asking = routed.find((i) => i.Meta && i.Meta.lb);
  return asking ? asking.Meta.lb : DEFAULT_LB;
}

// -- the live stream --------------------------------------------------------------------

function connect() {
  const live = $("#live");
  const source = new EventSource("/v1/internal/ui/events");
  performance.mark("consulate:stream-opening");
  source.onopen = () => {
    performance.mark("consulate:stream-open");
    live.dataset.state = "live";
    live.textContent = "live";
  };
  source.onerror = () => { live.dataset.state = "reconnecting"; live.textContent = "reconnecting"; };
  source.addEventListener("snapshot", (event) => {
    if (state.firstRender) performance.mark("consulate:snapshot-received");
    const data = JSON.parse(event.data);
    state.instances.clear();
    state.services.clear();
    for (const instance of data.Instances) putInstance(instance);
    cancelAnimationFrame(frame); // render now: the first paint should not wait a frame
    fullRender = true;
    render();
    nodesChanged();
  });
  source.addEventListener("up", (event) => putInstance(JSON.parse(event.data).Instance));
  source.addEventListener("down", (event) => removeInstance(JSON.parse(event.data).ID));
  source.addEventListener("unavailable", (event) => showError(JSON.parse(event.data).Error));
}

async function fetchRoutes() {
  const response = await api("/v1/agent/routes");
  if (!response.ok) return; // an API without a route table: no VIP column values
  const vips = new Map((await response.json()).map((r) => [r.Service, r.VIP]));
  for (const name of new Set([...vips.keys(), ...state.vips.keys()])) {
    if (vips.get(name) !== state.vips.get(name)) changed(name);
  }
  state.vips = vips;
}

async function fetchStats() {
  if (document.hidden) return;
  const response = await api("/v1/agent/self");
  if (!response.ok) return;
  const body = await response.json();
  const proxy = body.Stats && body.Stats.proxy;
  const counters = (proxy && proxy.services) || {};
  for (const name of new Set([...Object.keys(counters), ...Object.keys(state.counters)])) {
    if (JSON.stringify(counters[name]) !== JSON.stringify(state.counters[name])) changed(name);
  }
  state.counters = counters;
}

async function fetchNodes() {
  const response = await api("/v1/catalog/nodes");
  if (!response.ok) return showError(`GET /v1/catalog/nodes: ${await response.text()}`);
  state.nodes = await response.json();
  rerenderAll();
}

// -- rendering ------------------------------------------------------------------------------

// Runs ``fn`` once the next frame is painted (a task queued from an animation frame
// runs after that frame's paint).
const afterPaint = (fn) => requestAnimationFrame(() => setTimeout(fn));

function render() {
  frame = 0;
  if (dirty.size > MAX_ROW_UPDATES) fullRender = true;
  const first = state.firstRender && view && view.name === "services" && state.services.size > 0;
  if (first) {
    state.firstRender = false;
    state.measuring = true; // until the whole list is in
    afterPaint(() => performance.mark("consulate:services-painted"));
  }
  if (view) view.update(fullRender);
  fullRender = false;
  dirty.clear();
  if (first) performance.mark("consulate:services-rendered");
}

const human = (n) => {
  if (n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return i ? `${n.toFixed(1)} ${units[i]}` : `${n} B`;
};

const tagList = (tags) => tags.map((t) => `<span class="tag">${esc(t)}</span>`).join(" ");

function badges(counts) {
  return STATUSES.filter((s) => counts[s])
    .map((s) => `<span class="st ${s}" title="${s}">${counts[s]}</span>`).join(" ");
}

// The proxy's counters of a service, as five display values.
function counterValues(c) {
  if (!c) return ["", "", "", "", ""];
  return [`${c.connections_active} / ${c.connections_total}`,
    `${human(c.bytes_to_upstream)} / ${human(c.bytes_to_client)}`,
    `${c.connect_failures}`, `${c.rejected}`, `${c.ejections} / ${c.ejections_active}`];
}

const COUNTER_NAMES = [["Conns", "active / total"], ["Bytes", "to upstream / to client"],
  ["Failures", "upstream connect failures"], ["Rejected", "closed at once: no endpoint answered"],
  ["Ejections", "outlier ejections: total / active"]];
const counterHeads = (tag, attrs) => COUNTER_NAMES.map(([name, title]) =>
  `<${tag} class="num" ${attrs} title="${title}">${name}</${tag}>`).join("");

// The services list is a grid of rows in chunks of CHUNK_ROWS: a chunk out of view
// has content-visibility: auto, so the browser skips its style, layout and paint,
// and a 1,000-service list costs what one screenful does.
const CHUNK_ROWS = 40;
const ROW_PX = 33; // a row's height in style.css: the size of a chunk not laid out yet
const FIRST_ROWS = 2 * CHUNK_ROWS; // more than a tall screen shows
const cell = (content, cls = "") => `<span role="cell"${cls ? ` class="${cls}"` : ""}>${content}</span>`;

function chunksHtml(names) {
  const chunks = [];
  for (let n = 0; n < names.length; n += CHUNK_ROWS) {
    const rows = names.slice(n, n + CHUNK_ROWS);
    chunks.push(`<div class="chunk" style="contain-intrinsic-size: auto ${rows.length * ROW_PX}px">` +
      `${rows.map(serviceRow).join("")}</div>`);
  }
  return chunks.join("");
}

function serviceRow(name) {
  const members = state.services.get(name);
  const { counts, status } = summaryOf(members);
  const tags = new Set();
  for (const instance of members.values()) for (const t of instance.Tags) tags.add(t);
  return `<div role="row" class="row" data-service="${esc(name)}" data-status="${status}">` +
    cell(`<a href="#/services/${encodeURIComponent(name)}">${esc(name)}</a>`) +
    cell(badges(counts)) + cell(members.size, "num") + cell(tagList([...tags].sort())) +
    cell(esc(state.vips.get(name) || "")) + cell(esc(balancerOf(members))) +
    counterValues(state.counters[name]).map((v) => cell(v, "num")).join("") + "</div>";
}

function matches(name) {
  if (!state.filter) return true;
  if (name.includes(state.filter)) return true;
  for (const instance of state.services.get(name).values()) {
    if (instance.Tags.some((t) => t.includes(state.filter))) return true;
  }
  return false;
}

function fromHtml(html) {
  const template = document.createElement("template");
  template.innerHTML = html;
  return template.content.firstElementChild;
}

const servicesView = {
  name: "services",
  mount() {
    $("#main").innerHTML = '<h2>Services <span id="service-count" class="muted"></span></h2>' +
      '<div id="summary" class="summary"></div>' +
      `<input id="filter" class="filter" placeholder="Filter by name or tag" value="${esc(state.filter)}">` +
      '<div id="services" role="table" class="grid"><div role="row" class="row head">' +
      '<span role="columnheader">Service</span><span role="columnheader">Health</span>' +
      '<span role="columnheader" class="num">Instances</span><span role="columnheader">Tags</span>' +
      '<span role="columnheader">VIP</span><span role="columnheader">Balancer</span>' +
      `${counterHeads("span", 'role="columnheader"')}</div>` +
      '<div id="service-rows" role="rowgroup"></div></div>';
    $("#filter").addEventListener("input", (event) => {
      state.filter = event.target.value.trim();
      rerenderAll();
    });
  },
  update(full) {
    const total = { passing: 0, warning: 0, critical: 0 };
    for (const instance of state.instances.values()) total[instance.Status] += 1;
    $("#service-count").textContent = `(${state.services.size})`;
    $("#summary").innerHTML = STATUSES.map((s) => `<div><b>${total[s]}</b>` +
      `<span class="muted">${s} instances</span></div>`).join("");
    const body = $("#service-rows");
    if (full) {
      // The first screenful now, the rest once it is painted: a long list is on
      // screen as soon as a short one would be.
      const names = [...state.services.keys()].sort().filter(matches);
      const epoch = ++state.renders;
      body.innerHTML = chunksHtml(names.slice(0, FIRST_ROWS));
      afterPaint(() => {
        if (epoch !== state.renders) return; // a newer full render has replaced these rows
        const rest = names.slice(FIRST_ROWS).filter((name) => state.services.has(name));
        body.insertAdjacentHTML("beforeend", chunksHtml(rest));
        if (state.measuring) performance.mark("consulate:services-complete");
        state.measuring = false;
      });
      return;
    }
    for (const name of dirty) {
      const row = body.querySelector(`[data-service="${CSS.escape(name)}"]`);
      if (row && state.services.has(name)) row.replaceWith(fromHtml(serviceRow(name)));
    }
  },
};

function instanceRow(i) {
  const checks = i.Checks.map((c) => `<div class="check"><span class="st ${c.Status}">` +
    `${esc(c.Status)}</span> ${esc(c.Name || c.CheckID)} <span class="muted">${esc(c.Output)}</span></div>`);
  const meta = Object.entries(i.Meta).map(([k, v]) => `${esc(k)}=${esc(v)}`).join(" ");
  return `<tr data-instance="${esc(i.ID)}" data-status="${i.Status}">` +
    `<td>${esc(i.ID)}</td><td>${esc(i.Node)}</td><td>${esc(i.Address)}:${i.Port}</td>` +
    `<td>${tagList(i.Tags)}</td><td class="muted">${meta}</td>` +
    `<td><span class="st ${i.Status}">${i.Status}</span></td><td>${checks.join("")}</td></tr>`;
}

function serviceView(name) {
  return {
    name: "service",
    mount() {
      $("#main").innerHTML = `<h2><a href="#/services">Services</a> / ${esc(name)}</h2>` +
        '<div id="detail"></div>';
    },
    update(full) {
      if (!full && !dirty.has(name)) return;
      const members = state.services.get(name);
      if (!members) {
        $("#detail").innerHTML = `<p class="muted">No live instance of ${esc(name)}.</p>`;
        return;
      }
      const sorted = [...members.values()].sort((a, b) => (a.ID < b.ID ? -1 : 1));
      $("#detail").innerHTML = `<div class="summary"><div><b>${esc(state.vips.get(name) || "-")}</b>` +
        `<span class="muted">VIP</span></div><div><b>${esc(balancerOf(members))}</b>` +
        '<span class="muted">balancer</span></div></div>' +
        (state.counters[name] ? `<table id="counters"><thead><tr>${counterHeads("th", "")}</tr>` +
          `</thead><tbody><tr>${counterValues(state.counters[name]).map((v) =>
            `<td class="num">${v}</td>`).join("")}</tr></tbody></table>`
          : '<p id="counters" class="muted">No connection through this agent\'s proxy yet.</p>') +
        '<table id="instances"><thead><tr><th>Instance</th><th>Node</th><th>Address</th>' +
        '<th>Tags</th><th>Meta</th><th>Health</th><th>Checks</th></tr></thead><tbody>' +
        `${sorted.map(instanceRow).join("")}</tbody></table>`;
    },
  };
}

const nodesView = {
  name: "nodes",
  mount() {
    $("#main").innerHTML = '<h2>Nodes</h2><table id="nodes"><thead><tr><th>Node</th>' +
      '<th>Address</th><th>Datacenter</th><th class="num">Instances</th><th>Health</th>' +
      '</tr></thead><tbody id="node-rows"></tbody></table>';
    quietly(fetchNodes)();
  },
  update() {
    if (!state.nodes) return;
    const byNode = new Map();
    for (const i of state.instances.values()) {
      if (!byNode.has(i.Node)) byNode.set(i.Node, new Map());
      byNode.get(i.Node).set(i.ID, i);
    }
    $("#node-rows").innerHTML = state.nodes.map((n) => {
      const members = byNode.get(n.Node) || new Map();
      const { counts, status } = summaryOf(members);
      return `<tr data-node="${esc(n.Node)}" data-status="${status}"><td>${esc(n.Node)}</td>` +
        `<td>${esc(n.Address)}</td><td>${esc(n.Datacenter)}</td>` +
        `<td class="num">${members.size}</td><td>${badges(counts)}</td></tr>`;
    }).join("");
  },
};

// -- the KV browser ---------------------------------------------------------------------------

function crumbs(path) {
  const parts = path.split("/").filter(Boolean);
  let link = "";
  const items = ['<a href="#/kv/">(root)</a>'];
  parts.forEach((part, n) => {
    link += part + (n < parts.length - 1 || path.endsWith("/") ? "/" : "");
    items.push(`<a href="#/kv/${keyPath(link)}">${esc(part)}</a>`);
  });
  return `<h2 class="crumbs">Key/Value: ${items.join(" / ")}</h2>`;
}

async function kvWrite(method, key, body) {
  let response;
  try {
    response = await api(`/v1/kv/${keyPath(key)}`, { method, body });
  } catch {
    showError(`${method} ${key}: the agent did not answer; nothing was written`);
    return false;
  }
  if (response.ok) return true;
  const text = (await response.text()).trim();
  showError(`${method} ${key}: ${response.status} ${text}`);
  if (response.status === 403) $("#token").focus();
  return false;
}

function kvView(path) {
  const folder = path === "" || path.endsWith("/");
  return {
    name: "kv",
    async mount() {
      $("#main").innerHTML = crumbs(path) + '<div id="kv"><p class="muted">Loading&hellip;</p></div>';
      try {
        if (folder) await this.list(); else await this.open();
      } catch {
        showError(`GET /v1/kv/${path}: the agent did not answer; reload to try again`);
      }
    },
    update() {},
    async list() {
      const response = await api(`/v1/kv/${keyPath(path)}?keys&separator=/`);
      const keys = response.status === 404 ? [] : await response.json();
      if (!response.ok && response.status !== 404) return showError(await response.text());
      const rows = keys.map((k) => `<tr data-key="${esc(k)}"><td><a href="#/kv/${keyPath(k)}">` +
        `${esc(k.slice(path.length))}</a></td></tr>`).join("");
      $("#kv").innerHTML = `<table id="kv-keys"><thead><tr><th>Key</th></tr></thead><tbody>${rows ||
        '<tr><td class="muted">No keys here.</td></tr>'}</tbody></table>` +
        '<h2>Create a key</h2><form id="kv-create"><input id="kv-new-key" placeholder="name, or a/b/c" ' +
        'required> <textarea id="kv-new-value" placeholder="value"></textarea>' +
        '<div class="kv-actions"><button type="submit">Create</button></div></form>';
      $("#kv-create").addEventListener("submit", async (event) => {
        event.preventDefault();
        const key = path + $("#kv-new-key").value.trim();
        if (await kvWrite("PUT", key, $("#kv-new-value").value)) location.hash = `#/kv/${keyPath(key)}`;
      });
    },
    async open() {
      const response = await api(`/v1/kv/${keyPath(path)}?raw`);
      if (response.status === 404) {
        $("#kv").innerHTML = `<p class="muted">No key ${esc(path)}.</p>`;
        return;
      }
      if (!response.ok) return showError(await response.text());
      const value = await response.text();
      $("#kv").innerHTML = '<textarea id="kv-value"></textarea><div class="kv-actions">' +
        '<button id="kv-save">Save</button><button id="kv-delete">Delete</button>' +
        '<span id="kv-status" class="muted"></span></div>';
      $("#kv-value").value = value;
      $("#kv-save").addEventListener("click", async () => {
        if (await kvWrite("PUT", path, $("#kv-value").value)) {
          $("#kv-status").textContent = `saved at ${new Date().toLocaleTimeString()}`;
        }
      });
      $("#kv-delete").addEventListener("click", async () => {
        const parent = path.slice(0, path.lastIndexOf("/") + 1);
        if (await kvWrite("DELETE", path)) location.hash = `#/kv/${keyPath(parent)}`;
      });
    },
  };
}

// -- navigation and start ---------------------------------------------------------------------

function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [section, ...rest] = hash.split("/");
  const arg = decodeURIComponent(rest.join("/"));
  if (section === "services" && arg) view = serviceView(arg);
  else if (section === "nodes") view = nodesView;
  else if (section === "kv") view = kvView(rest.map(decodeURIComponent).join("/"));
  else view = servicesView;
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.view === (view.name === "service" ? "services" : view.name));
  }
  view.mount();
  rerenderAll();
}

function start() {
  const input = $("#token");
  input.value = token();
  $("#token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (input.value) sessionStorage.setItem(TOKEN_KEY, input.value);
    else sessionStorage.removeItem(TOKEN_KEY);
  });
  window.addEventListener("hashchange", route);
  route();
  quietly(fetchRoutes)(); // usually back before the snapshot: the first render has the VIPs
  connect();
  quietly(fetchStats)();
  setInterval(quietly(fetchStats), STATS_EVERY_MS);
}

start();
