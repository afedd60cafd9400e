// LineInspect operator view: plain JS + SVG, no library, no build step. Read-only: GETs and
// one Server-Sent Events stream (/events). Everything shown comes from the station process.
"use strict";
(function () {
  const $ = (s, el) => (el || document).querySelector(s);
  const NS = "http://www.w3.org/2000/svg";
  const KEEP = 300; // points in each strip chart
  const cams = {}; // cam index -> {meta, scores, els, loading, pending}
  const opts = { heat: true, boxes: true };

  function el(tag, attrs, text) {
    const e = tag.startsWith("svg:") ? document.createElementNS(NS, tag.slice(4)) : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  const fmt = (x, d = 4) => (x === null || x === undefined ? "–" : Number(x).toPrecision(d));

  // ---------------------------------------------------------------- cameras
  function camera(c) {
    if (cams[c.cam]) { cams[c.cam].meta = c; return cams[c.cam]; }
    const card = el("section", { class: "cam", id: "cam-" + c.cam });
    card.append(el("h2", {}, c.label));
    const live = el("div", { class: "live" });
    const img = el("img", { id: "live-" + c.cam, alt: "live frame " + c.label, width: "640", height: "480" });
    const svg = el("svg:svg", { preserveAspectRatio: "none" });
    live.append(img, svg);
    const caption = el("div", { class: "caption" });
    const chart = el("svg:svg", { class: "chart", viewBox: "0 0 600 140", preserveAspectRatio: "none", id: "chart-" + c.cam });
    const stats = el("div", { class: "stats" });
    const side = el("div", { class: "side" });
    side.append(el("h2", {}, "Scores"), chart, stats);
    card.append(live, caption, side);
    $("#cameras").append(card);
    cams[c.cam] = { meta: c, scores: [], els: { img, svg, caption, chart, stats }, loading: false, pending: null, shown: null };
    return cams[c.cam];
  }

  function showFrame(f) {
    const c = cams[f.cam];
    if (!c) return;
    if (c.loading) { c.pending = f; return; } // a slow viewer skips frames, never queues them
    c.loading = true;
    const next = new Image();
    next.onload = () => {
      c.els.img.src = next.src;
      c.shown = f;
      drawBoxes(c);
      c.loading = false;
      if (c.pending) { const p = c.pending; c.pending = null; showFrame(p); }
    };
    next.onerror = () => { c.loading = false; if (c.pending) { const p = c.pending; c.pending = null; showFrame(p); } };
    next.src = `/live/${f.cam}/${f.seq}.jpg?overlay=${opts.heat ? 1 : 0}`;
    c.els.caption.innerHTML = "";
    c.els.caption.append(el("span", {}, `part ${f.part}`), el("span", {}, `score ${fmt(f.score)} / ${fmt(f.image_threshold)}`));
    const vs = el("span", { class: "verdict " + (f.reject ? "reject" : "pass") }, f.reject ? "REJECT" + (f.reason ? " (" + f.reason + ")" : "") : "pass");
    c.els.caption.append(vs);
  }

  function drawBoxes(c) {
    const f = c.shown, svg = c.els.svg;
    svg.innerHTML = "";
    if (!f || !opts.boxes) return;
    svg.setAttribute("viewBox", `0 0 ${f.width} ${f.height}`);
    for (const [x, y, w, h] of f.regions) {
      const s = f.scale;
      svg.append(el("svg:rect", { x: x * s, y: y * s, width: w * s, height: h * s }));
    }
  }

  // ---------------------------------------------------------------- strip chart
  function addScores(c, pts) {
    const last = c.scores.length ? c.scores[c.scores.length - 1][0] : -1;
    for (const p of pts) if (p[0] > last || !c.scores.length) c.scores.push(p);
    if (c.scores.length > KEEP) c.scores.splice(0, c.scores.length - KEEP);
  }

  function drawChart(c) {
    const svg = c.els.chart, W = 600, H = 140, m = c.meta, pts = c.scores;
    svg.innerHTML = "";
    const thr = m.image_threshold, band = m.good_band;
    let top = thr * 1.3;
    for (const p of pts) if (isFinite(p[1]) && p[1] > top) top = p[1] * 1.05;
    const y = (v) => H - 4 - (Math.max(0, v) / top) * (H - 8);
    const x = (i) => (pts.length > 1 ? (i / (KEEP - 1)) * W : 0);
    if (band && band[0] !== null && band[1] !== null) {
      svg.append(el("svg:rect", { class: "band", x: 0, width: W, y: y(band[1]), height: Math.max(1, y(band[0]) - y(band[1])) }));
      svg.append(el("svg:text", { x: 4, y: y(band[1]) - 2 }, "calibration good p50–p99"));
    }
    svg.append(el("svg:line", { class: "thr", x1: 0, x2: W, y1: y(thr), y2: y(thr) }));
    svg.append(el("svg:text", { x: W - 4, y: y(thr) - 3, "text-anchor": "end" }, `threshold ${fmt(thr, 3)}`));
    if (!pts.length) return;
    const d = pts.map((p, i) => `${i ? "L" : "M"}${x(i).toFixed(1)},${y(isFinite(p[1]) ? p[1] : top).toFixed(1)}`).join("");
    svg.append(el("svg:path", { class: "line", d }));
    pts.forEach((p, i) => { if (p[2]) svg.append(el("svg:circle", { class: "rej", cx: x(i), cy: y(isFinite(p[1]) ? p[1] : top), r: 2.5 })); });
  }

  // ---------------------------------------------------------------- status
  function status(s) {
    const alarms = $("#alarms");
    alarms.innerHTML = "";
    let bad = 0;
    for (const st of s.stations) {
      const c = camera(st);
      addScores(c, st.new_scores);
      drawChart(c);
      for (const a of st.alarms) {
        bad++;
        const div = el("div", { class: "alarm " + a.kind, "data-kind": a.kind });
        div.append(el("b", {}, a.kind), document.createTextNode(`${st.label}: ${a.text}`));
        alarms.append(div);
      }
      const t = el("table");
      const n = st.counters;
      const rows = [["parts", n.frames], ["rejects", n.rejects], ["unverified", n.unverified], ["dropped", n.drops], ["errors", st.errors], ["parts/s", st.fps], ["reject rate", (100 * st.reject_rate).toFixed(1) + " %"], ["broker", st.broker.connected ? "connected" : "DOWN"], ["spooled", st.broker.spooled]];
      if (st.drift) rows.push(["drift CUSUM", `${st.drift.statistic} / ${st.drift.threshold}`]);
      for (const [k, v] of rows) { const tr = el("tr"); tr.append(el("td", {}, k), el("td", {}, String(v))); t.append(tr); }
      const lt = el("table");
      const hr = el("tr"); hr.append(el("th", {}, "latency ms"), el("th", {}, "p50"), el("th", {}, "p99")); lt.append(hr);
      for (const [k, v] of Object.entries(st.latency_ms)) { const tr = el("tr"); tr.append(el("td", {}, k), el("td", {}, fmt(v.p50, 3)), el("td", {}, fmt(v.p99, 3))); lt.append(tr); }
      c.els.stats.innerHTML = "";
      c.els.stats.append(t, lt);
    }
    const o = $("#overall");
    o.textContent = bad ? `${bad} alarm${bad > 1 ? "s" : ""}` : "OK";
    o.className = "pill " + (bad ? "bad" : "ok");
    $("#viewers").textContent = `${s.viewers} viewer(s)`;
  }

  // ---------------------------------------------------------------- gallery
  function reject(r) {
    const g = $("#gallery");
    if (document.getElementById("reject-" + r.id)) return; // already shown (state, then event)
    const none = $("#no-rejects"); if (none) none.remove();
    const b = el("button", { class: "reject", id: "reject-" + r.id, "data-event-id": r.event_id || "", "data-part": r.part });
    const img = el("img", { src: `/reject/${r.id}.jpg`, alt: "reject " + r.part, loading: "lazy" });
    b.append(img, el("div", {}, `${r.part}`), el("div", {}, `score ${fmt(r.score)} / ${fmt(r.image_threshold)}`));
    b.append(el("span", { class: "reason " + (r.reason || "") }, r.reason || "reject"));
    b.addEventListener("click", () => openDetail(r));
    g.prepend(b);
    while (g.children.length > 48) g.lastChild.remove();
  }

  async function openDetail(r) {
    const d = $("#detail");
    $("#detail-title").textContent = `${r.part}: score ${fmt(r.score)} vs threshold ${fmt(r.image_threshold)} (${r.reason || "reject"})`;
    $("#detail-img").src = `/reject/${r.id}/full.jpg`;
    const links = $("#detail-links"); links.innerHTML = "";
    if (r.evidence) {
      const stem = r.evidence.replace(/\.jpg$/, "");
      links.append(el("a", { href: `/evidence/${r.cam}/${stem}.jpg`, target: "_blank" }, "evidence image"), document.createTextNode(" · "), el("a", { href: `/evidence/${r.cam}/${stem}.json`, target: "_blank" }, "evidence JSON"));
    } else links.textContent = "no evidence folder configured: the view's copy is shown";
    $("#detail-json").textContent = "…";
    if (d.showModal) d.showModal(); else d.setAttribute("open", "");
    const res = await fetch(`/reject/${r.id}.json`);
    $("#detail-json").textContent = res.ok ? JSON.stringify((await res.json()).event, null, 1) : `(${res.status}: no longer in the gallery)`;
  }

  // ---------------------------------------------------------------- wiring
  async function start() {
    // Subscribe first, then read the state: nothing published in between is lost; events that
    // arrive before the state are applied after it (rejects are kept once, by id).
    const early = [];
    let ready = false;
    const on = (fn) => (e) => { const d = JSON.parse(e.data); if (ready) fn(d); else early.push([fn, d]); };
    const es = new EventSource("/events");
    es.addEventListener("status", on(status));
    es.addEventListener("frame", on(showFrame));
    es.addEventListener("reject", on(reject));
    es.onerror = () => { const o = $("#overall"); o.textContent = "reconnecting…"; o.className = "pill"; };
    const res = await fetch("/api/state");
    if (!res.ok) throw new Error("state: " + res.status);
    const s = await res.json();
    for (const c of s.cameras) { const cc = camera(c); cc.scores = c.scores.slice(-KEEP); if (c.last_frame) showFrame(c.last_frame); }
    for (const r of s.rejects) reject(r);
    status(s.status);
    ready = true;
    for (const [fn, d] of early) fn(d);
  }
  $("#t-heat").addEventListener("change", (e) => { opts.heat = e.target.checked; });
  $("#t-boxes").addEventListener("change", (e) => { opts.boxes = e.target.checked; for (const c of Object.values(cams)) drawBoxes(c); });
  start().catch((err) => { const o = $("#overall"); o.textContent = "view unavailable: " + err.message; o.className = "pill bad"; });
})();
