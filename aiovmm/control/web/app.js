// The aiovmm web page: polls the daemon's API once a second and draws the domains with
// their counters; the buttons call the same endpoints as the CLI. No external assets.
"use strict";
const API = "/api/v1";
const prev = new Map();           // domain id -> [time ms, cpu s] for CPU %
let consoleWs = null;

// Over TCP the daemon wants its bearer token: open the page as https://host:port/#token=...
// (the fragment never leaves the browser); it is kept for this tab only.
(function takeToken() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem("aiovmm-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname);
  }
})();
const token = () => sessionStorage.getItem("aiovmm-token");

async function call(method, path, body) {
  const opts = { method, headers: {} };
  if (token()) opts.headers["Authorization"] = "Bearer " + token();
  if (body !== undefined) { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
  const r = await fetch(API + path, opts);
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function button(td, label, fn) {
  const b = document.createElement("button");
  b.textContent = label;
  b.dataset.action = label;
  b.addEventListener("click", async () => {
    try { await fn(); document.getElementById("error").textContent = ""; }
    catch (e) { document.getElementById("error").textContent = e.message; }
    refresh();
  });
  td.appendChild(b);
}

function draw(doms) {
  const body = document.querySelector("#domains tbody");
  body.replaceChildren();
  const now = Date.now();
  for (const d of doms) {
    const tr = document.createElement("tr");
    tr.dataset.domid = d.id;
    tr.dataset.name = d.name;
    cell(tr, d.id);
    cell(tr, d.name, "name");
    const st = cell(tr, "", "state");
    const span = document.createElement("span");
    span.className = d.status;
    span.textContent = d.status + " " + d.state;
    st.appendChild(span);
    cell(tr, d.cpu_time_s.toFixed(2), "cpu");
    const p = prev.get(d.id);
    const pct = p && now > p[0] ? 100 * (d.cpu_time_s - p[1]) / ((now - p[0]) / 1000) : 0;
    prev.set(d.id, [now, d.cpu_time_s]);
    cell(tr, pct.toFixed(1), "cpupct");
    cell(tr, (d.memory_kib / 1024).toFixed(1) + " / " + (d.max_memory_kib / 1024).toFixed(0), "mem");
    const tx = d.vifs.reduce((a, v) => a + v.tx_bytes, 0), rx = d.vifs.reduce((a, v) => a + v.rx_bytes, 0);
    cell(tr, (tx / 1024).toFixed(1) + " / " + (rx / 1024).toFixed(1), "net");
    const rd = d.vbds.reduce((a, v) => a + v.rd_reqs, 0), wr = d.vbds.reduce((a, v) => a + v.wr_reqs, 0);
    cell(tr, rd + " / " + wr, "disk");
    const act = cell(tr, "", "actions");
    const ref = "/domains/" + d.id;
    if (d.status === "paused") button(act, "unpause", () => call("POST", ref + "/unpause"));
    else button(act, "pause", () => call("POST", ref + "/pause"));
    button(act, "shutdown", () => call("POST", ref + "/shutdown", {}));
    button(act, "destroy", () => call("DELETE", ref));
    button(act, "console", async () => openConsole(d));
    body.appendChild(tr);
  }
  document.getElementById("empty").hidden = doms.length > 0;
}

function openConsole(d) {
  if (consoleWs) consoleWs.close();
  const view = document.getElementById("console-view");
  const out = document.getElementById("console-out");
  out.textContent = "";
  document.getElementById("console-name").textContent = d.name + " (d" + d.id + ")";
  view.hidden = false;
  let url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + API + "/domains/" + d.id + "/console/ws";
  if (token()) url += "?access_token=" + encodeURIComponent(token());
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  const dec = new TextDecoder();
  ws.onmessage = (ev) => {
    out.textContent += typeof ev.data === "string" ? ev.data : dec.decode(ev.data, { stream: true });
    out.scrollTop = out.scrollHeight;
  };
  ws.onclose = () => { out.textContent += "\n[console closed]\n"; };
  consoleWs = ws;
}

document.getElementById("console-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const inp = document.getElementById("console-in");
  if (consoleWs && consoleWs.readyState === WebSocket.OPEN) consoleWs.send(inp.value + "\n");
  inp.value = "";
});
document.getElementById("console-close").addEventListener("click", () => {
  if (consoleWs) consoleWs.close();
  consoleWs = null;
  document.getElementById("console-view").hidden = true;
});

async function refresh() {
  try {
    draw(await call("GET", "/domains"));
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    document.getElementById("error").textContent = "cannot reach the daemon: " + e.message;
  }
}

call("GET", "/info").then((i) => {
  document.getElementById("host").textContent = i.host + " · " + i.total_memory + " MiB · Xen " + i.xen_version;
}).catch(() => {});
refresh();
setInterval(refresh, 1000);
