// riprap dashboard: polls /dashboard.json on this admin listener once a second and draws it.
// No libraries, no external requests: the charts are plain SVG polylines.
"use strict";
(function () {
  const POLL_MS = 1000;
  const container = document.getElementById("services");
  const cards = new Map();      // service name -> {el, userToggled}
  let lastHash = null;
  let filterText = "";

  function fmt(n, digits) {
    if (n === null || n === undefined || Number.isNaN(n)) return "–";
    return Number(n).toFixed(digits);
  }
  function pct(x) { return x === null || x === undefined ? "–" : (x * 100).toFixed(x >= 0.999 || x === 0 ? 0 : 1) + "%"; }
  function esc(s) {
    return String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;", "'": "&#39;"}[c]));
  }
  function breakerText(b) {
    if (!b) return "none";
    if (b.state === "open") {
      const left = b.retry_in === null || b.retry_in === undefined ? "" : " (" + fmt(b.retry_in, 1) + " s left)";
      return "open" + left;
    }
    return b.state;
  }

  function polyline(values, maxY, width, height, color) {
    const n = values.length;
    if (n < 2) return "";
    const pts = [];
    for (let i = 0; i < n; i++) {
      const v = values[i];
      if (v === null || v === undefined) continue;
      const x = (i / (n - 1)) * width;
      const y = height - Math.min(1, v / maxY) * (height - 4) - 2;
      pts.push(x.toFixed(1) + "," + y.toFixed(1));
    }
    return '<polyline fill="none" stroke="' + color + '" stroke-width="1.5" points="' + pts.join(" ") + '"/>';
  }

  function chart(title, series, unit, fixedMax) {
    const w = 300, h = 90;
    let max = fixedMax || 0;
    if (!fixedMax) {
      for (const s of series) for (const v of s.values) if (v !== null && v > max) max = v;
      max = max > 0 ? max * 1.15 : 1;
    }
    const lines = series.map((s) => polyline(s.values, max, w, h, s.color)).join("");
    const legend = series.map((s) => '<span style="color:' + s.color + '">■ ' + esc(s.label) + "</span>").join("");
    return '<div class="chart"><h4>' + esc(title) + " (max " + fmt(max, unit === "%" ? 0 : 1) + " " + unit +
      ')</h4><svg viewBox="0 0 ' + w + " " + h + '" preserveAspectRatio="none" role="img" aria-label="' + esc(title) + '">' +
      lines + '</svg><div class="legend">' + legend + "</div></div>";
  }

  function endpointRows(shard) {
    if (!shard.endpoints.length) return "<tr><td colspan=5>no endpoints</td></tr>";
    return shard.endpoints.map((e) => {
      const health = e.ejected ? "ejected" : (e.healthy ? "healthy" : "unhealthy");
      const extra = e.ejected && e.ejected_for !== null && e.ejected_for !== undefined ?
        " (" + fmt(e.ejected_for, 1) + " s left)" : "";
      return '<tr data-endpoint="' + esc(e.url) + '"><td>' + esc(e.url) + "</td><td>" + esc(e.tier) + "</td><td>" +
        esc(e.weight) + '</td><td class="health" data-health="' + health + '">' + health + extra + "</td><td>" +
        esc(e.in_flight) + "</td></tr>";
    }).join("");
  }

  function shardBlock(svc, shard) {
    const title = svc.sharded ? '<h3 class="shard">shard ' + esc(shard.name) + ' · breaker <span class="breaker" data-shard-breaker="' +
      esc(shard.name) + '" data-state="' + esc(shard.breaker ? shard.breaker.state : "none") + '">' + esc(breakerText(shard.breaker)) +
      "</span></h3>" : "";
    return title + '<table class="eps"><thead><tr><th>endpoint</th><th>tier</th><th>weight</th><th>health</th><th>in flight</th></tr></thead><tbody>' +
      endpointRows(shard) + "</tbody></table>";
  }

  function summaryHtml(svc) {
    const b = svc.breaker ? svc.shards.find((s) => s.breaker && s.breaker.state === svc.breaker) : null;
    const rej = svc.rejected_per_second;
    return '<span class="name">' + esc(svc.name) + '<span class="status" data-role="status">' + esc(svc.status) + "</span></span>" +
      kv("calls/s", fmt(svc.calls_per_second, 1)) + kv("success", pct(svc.success_rate)) +
      kv("p50", fmt(svc.p50_ms, 1) + " ms") + kv("p99", fmt(svc.p99_ms, 1) + " ms") +
      kv("retries/s", fmt(svc.retries_per_second, 1)) + kv("hedges/s", fmt(svc.hedges_per_second, 1)) +
      kv("fallbacks/s", fmt(svc.fallbacks_per_second, 1)) +
      '<span class="kv"><small>breaker</small><b class="breaker" data-role="breaker" data-state="' + esc(svc.breaker || "none") + '">' +
      esc(breakerText(b ? b.breaker : null)) + "</b></span>" +
      '<span class="kv"><small>rejected/s (limit · overload)</small><b>' + fmt(rej.limit, 1) + " · " + fmt(rej.concurrency, 1) + "</b></span>" +
      kv("endpoints down", svc.endpoints_down + " / " + svc.endpoints_total);
  }
  function kv(label, value) { return '<span class="kv"><small>' + esc(label) + "</small><b>" + esc(value) + "</b></span>"; }

  function bodyHtml(svc) {
    const h = svc.history;
    const charts = chart("success rate", [{label: "success", values: h.success.map((v) => v === null ? null : v * 100), color: "#1f7a3a"}], "%", 100) +
      chart("latency", [{label: "p50", values: h.p50, color: "#1a73e8"}, {label: "p99", values: h.p99, color: "#b3261e"}], "ms") +
      chart("calls per second", [{label: "calls/s", values: h.rps, color: "#5f6368"}], "/s");
    return '<div class="charts">' + charts + "</div>" + svc.shards.map((s) => shardBlock(svc, s)).join("");
  }

  function render(doc) {
    document.getElementById("app").textContent = doc.app ? "· " + doc.app : "";
    document.getElementById("plan").textContent = "plan " + (doc.hash ? doc.hash.slice(0, 12) : "?") +
      (doc.draining ? " · draining" : "") + (doc.last_reload_failed ? " · last reload failed (see /plan)" : "");
    const counts = {ok: 0, warning: 0, degraded: 0, down: 0};
    for (const s of doc.services) counts[s.status] = (counts[s.status] || 0) + 1;
    document.getElementById("summary").textContent = doc.services.length + " services: " + counts.down + " down, " +
      counts.degraded + " degraded, " + counts.warning + " warning, " + counts.ok + " ok";
    if (doc.hash !== lastHash) lastHash = doc.hash;
    const seen = new Set();
    doc.services.forEach((svc, index) => {
      seen.add(svc.name);
      let card = cards.get(svc.name);
      if (!card) {
        const el = document.createElement("details");
        el.className = "svc";
        el.dataset.service = svc.name;
        el.innerHTML = "<summary></summary><div class=\"body\"></div>";
        card = {el: el, userToggled: false};
        el.querySelector("summary").addEventListener("click", () => { card.userToggled = true; });
        cards.set(svc.name, card);
        // a small plan opens every card; a large one opens only the troubled ones
        el.open = doc.services.length <= 12 || svc.trouble > 0;
      } else if (!card.userToggled && doc.services.length > 12) {
        card.el.open = svc.trouble > 0;
      }
      card.el.dataset.status = svc.status;
      card.el.dataset.breaker = svc.breaker || "none";
      card.el.querySelector("summary").innerHTML = summaryHtml(svc);
      if (card.el.open) card.el.querySelector(".body").innerHTML = bodyHtml(svc);
      card.el.hidden = filterText !== "" && svc.name.toLowerCase().indexOf(filterText) < 0;
      if (container.children[index] !== card.el) container.insertBefore(card.el, container.children[index] || null);
    });
    for (const [name, card] of cards) {
      if (!seen.has(name)) { card.el.remove(); cards.delete(name); }  // a reload removed it
    }
    document.getElementById("empty").hidden = doc.services.length > 0;
    document.body.dataset.updated = String(doc.generated_at);
  }

  function setConn(state, text) {
    const c = document.getElementById("conn");
    c.dataset.conn = state;
    c.textContent = text;
  }

  async function poll() {
    try {
      const r = await fetch("/dashboard.json", {cache: "no-store"});
      if (!r.ok) throw new Error("HTTP " + r.status);
      render(await r.json());
      setConn("live", "live");
    } catch (e) {
      setConn("reconnecting", "reconnecting… (" + e.message + ")");
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  document.getElementById("filter").addEventListener("input", (ev) => {
    filterText = ev.target.value.trim().toLowerCase();
    for (const [name, card] of cards) card.el.hidden = filterText !== "" && name.toLowerCase().indexOf(filterText) < 0;
  });
  document.getElementById("expand").addEventListener("click", () => { for (const c of cards.values()) { c.el.open = true; c.userToggled = true; } });
  document.getElementById("collapse").addEventListener("click", () => { for (const c of cards.values()) { c.el.open = false; c.userToggled = true; } });
  poll();
})();
