// sse-broadcaster demo page: plain JS, no framework, no CDN.
//
// The feed uses the browser's own EventSource, which reconnects by itself after
// the server ends a stream and sends the Last-Event-ID header, so the server
// replays what was missed. window.demo exposes what the page received, for the
// browser test and for curious people in the devtools console.
"use strict";

(function () {
  const MAX_FEED_ITEMS = 200;
  const MAX_IDS = 100000;
  const STATS_EVERY_MS = 1000;
  const CHART_SECONDS = 120;

  const params = new URLSearchParams(window.location.search);
  const defaultRoom = document.querySelector('meta[name="sse-default-room"]').content;
  const room = params.get("room") || defaultRoom;

  const $ = (id) => document.getElementById(id);
  const demo = {
    room: room,
    receivedIds: [],   // every event id received, in order (gap notices excluded)
    reconnects: 0,     // times the stream opened again after the first open
    opens: 0,
    errors: 0,         // "error" events: the stream ended or could not open
    gaps: [],          // data of every `gap` event
    recreated: 0,      // new EventSource objects made after one gave up (CLOSED)
    source: null,
    memory: [],        // [{t, mb}] samples from /stats
    lastStats: null,
  };
  window.demo = demo;
  window.receivedIds = demo.receivedIds;

  $("room-name").textContent = room;
  $("room-name-2").textContent = room;

  // -- feed -----------------------------------------------------------------------

  function timeText(date) {
    return date.toTimeString().slice(0, 8);
  }

  function addFeedItem(name, text, id) {
    const item = document.createElement("li");
    const when = document.createElement("span");
    when.className = "time";
    when.textContent = timeText(new Date());
    const badge = document.createElement("span");
    badge.className = "name name-" + name.replace(/[^a-z0-9-]/gi, "");
    badge.textContent = name;
    const body = document.createElement("span");
    body.className = "body";
    body.textContent = text;
    if (id) {
      const idText = document.createElement("span");
      idText.className = "id";
      idText.textContent = "#" + id;
      body.appendChild(idText);
    }
    item.append(when, badge, body);
    const feed = $("feed");
    feed.prepend(item);
    while (feed.childElementCount > MAX_FEED_ITEMS) {
      feed.lastElementChild.remove();
    }
  }

  function describe(name, data) {
    try {
      const value = JSON.parse(data);
      if (name === "tick" && value && typeof value === "object" && "tick" in value) {
        return "tick " + value.tick;
      }
      return typeof value === "string" ? value : JSON.stringify(value);
    } catch (_) {
      return data;
    }
  }

  function onEvent(e) {
    if (e.lastEventId) {
      demo.receivedIds.push(e.lastEventId);
      if (demo.receivedIds.length > MAX_IDS) {
        demo.receivedIds.splice(0, demo.receivedIds.length - MAX_IDS);
      }
    }
    $("received-count").textContent = String(demo.receivedIds.length);
    $("last-id").textContent = e.lastEventId || "\u2013";
    addFeedItem(e.type, describe(e.type, e.data), e.lastEventId);
  }

  // The adapters open a stream with a `gap` event, {"lastEventId": ..., "replayed": n},
  // when they cannot resume exactly after the id the browser sent.
  function onGap(e) {
    let requested = "";
    try {
      const info = JSON.parse(e.data);
      demo.gaps.push(info);
      requested = (info && info.lastEventId) || "";
    } catch (_) {
      demo.gaps.push(e.data);
    }
    $("gap-text").textContent = requested
      ? "The server no longer holds the events after id " + requested +
        " (expired, or the server restarted); the feed continues with what it still has."
      : "The server could not resume the stream where it stopped; the feed continues.";
    $("gap-notice").hidden = false;
    addFeedItem("gap", "events missed after " + (requested || "the last id"), "");
  }

  $("gap-dismiss").addEventListener("click", () => { $("gap-notice").hidden = true; });

  // -- connection -----------------------------------------------------------------

  const listened = new Set(["message", "tick", "chat"]);
  const STATES = ["connecting", "open", "closed"];

  function showState() {
    const source = demo.source;
    const state = STATES[source ? source.readyState : 2];
    const pill = $("status");
    pill.textContent = state;
    pill.dataset.state = state;
    pill.className = "pill pill-" + state;
  }

  function listen(name) {
    listened.add(name);
    if (demo.source) demo.source.addEventListener(name, onEvent);
  }

  function connect() {
    let url = "/events/" + encodeURIComponent(room);
    const last = demo.receivedIds[demo.receivedIds.length - 1];
    if (last) {
      // A new EventSource object has no Last-Event-ID of its own: pass it in the query.
      url += "?lastEventId=" + encodeURIComponent(last);
    }
    const source = new EventSource(url);
    demo.source = source;
    for (const name of listened) source.addEventListener(name, onEvent);
    source.addEventListener("gap", onGap);
    source.addEventListener("open", () => {
      demo.opens += 1;
      if (demo.opens > 1) demo.reconnects += 1;
      $("reconnects").textContent = String(demo.reconnects);
      showState();
    });
    source.addEventListener("error", () => {
      demo.errors += 1;
      showState();
      if (source.readyState === EventSource.CLOSED) {
        // The browser gives up for good on a non-200 answer (say a proxy's 502):
        // try again later with a new object.
        setTimeout(() => {
          if (demo.source === source) {
            demo.recreated += 1;
            connect();
          }
        }, 5000);
      }
    });
    showState();
  }

  connect();
  setInterval(showState, 500);

  // -- publish --------------------------------------------------------------------

  $("publish-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const data = $("publish-data").value;
    const name = $("publish-event").value.trim();
    const result = $("publish-result");
    const button = $("publish-button");
    if (name && !listened.has(name)) listen(name);
    button.disabled = true;
    result.className = "muted";
    result.textContent = "publishing\u2026";
    try {
      const response = await fetch("/publish/" + encodeURIComponent(room), {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ data: data, event: name || null }),
      });
      const answer = await response.json();
      if (!response.ok) throw new Error(answer.error || "HTTP " + response.status);
      result.textContent = "published #" + answer.id;
      $("publish-data").value = "";
    } catch (err) {
      result.className = "error";
      result.textContent = String(err.message || err);
    } finally {
      button.disabled = false;
    }
  });

  // -- stats ----------------------------------------------------------------------

  function setText(id, value) {
    $(id).textContent = value === undefined || value === null ? "\u2013" : String(value);
  }

  async function pollStats() {
    try {
      const response = await fetch("/stats", { cache: "no-store" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      const stats = await response.json();
      demo.lastStats = stats;
      setText("stat-sessions", stats.totalSessions);
      setText("stat-subscribers", stats.totalSubscribers);
      setText("stat-events", stats.totalEvents);
      setText("stat-memory", Number(stats.memoryUsageMB).toFixed(1));
      setText("stat-published", stats.eventsPublished);
      setText("stat-delivered", stats.eventsDelivered);
      const now = Date.now() / 1000;
      demo.memory.push({ t: now, mb: Number(stats.memoryUsageMB) });
      while (demo.memory.length && demo.memory[0].t < now - CHART_SECONDS) demo.memory.shift();
      $("stats-age").textContent = "updated " + timeText(new Date());
      drawChart();
    } catch (err) {
      $("stats-age").textContent = "stats unavailable (" + (err.message || err) + ")";
    }
  }

  function drawChart() {
    const canvas = $("memory-chart");
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || canvas.width;
    const height = canvas.clientHeight || canvas.height;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);

    const pad = { left: 46, right: 12, top: 12, bottom: 22 };
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    const points = demo.memory;
    const now = points.length ? points[points.length - 1].t : Date.now() / 1000;
    // The window grows with the page's age up to CHART_SECONDS, so that a young
    // series fills the chart instead of hugging its right edge.
    const seconds = points.length
      ? Math.min(CHART_SECONDS, Math.max(10, Math.ceil(now - points[0].t)))
      : CHART_SECONDS;
    let low = Infinity;
    let high = -Infinity;
    for (const p of points) {
      low = Math.min(low, p.mb);
      high = Math.max(high, p.mb);
    }
    if (!points.length) { low = 0; high = 1; }
    const span = Math.max(high - low, 1);
    low = Math.max(0, low - span * 0.25);
    high = high + span * 0.25;

    const x = (t) => pad.left + plotW * (1 - (now - t) / seconds);
    const y = (mb) => pad.top + plotH * (1 - (mb - low) / (high - low));

    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#6b7487";
    ctx.strokeStyle = "#e2e6ee";
    ctx.lineWidth = 1;
    ctx.textBaseline = "middle";
    ctx.textAlign = "right";
    for (let i = 0; i <= 4; i += 1) {
      const mb = low + ((high - low) * i) / 4;
      const gy = Math.round(y(mb)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(pad.left, gy);
      ctx.lineTo(width - pad.right, gy);
      ctx.stroke();
      ctx.fillText(mb.toFixed(1), pad.left - 6, gy);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (let i = 4; i >= 0; i -= 1) {
      const ago = Math.round((seconds * i) / 4);
      ctx.fillText(ago ? "-" + ago + "s" : "now", x(now - ago), height - pad.bottom + 6);
    }
    if (points.length < 2) return;

    ctx.beginPath();
    points.forEach((p, i) => (i ? ctx.lineTo(x(p.t), y(p.mb)) : ctx.moveTo(x(p.t), y(p.mb))));
    ctx.lineTo(x(points[points.length - 1].t), pad.top + plotH);
    ctx.lineTo(x(points[0].t), pad.top + plotH);
    ctx.closePath();
    const fill = ctx.createLinearGradient(0, pad.top, 0, pad.top + plotH);
    fill.addColorStop(0, "rgba(53, 99, 233, 0.28)");
    fill.addColorStop(1, "rgba(53, 99, 233, 0.02)");
    ctx.fillStyle = fill;
    ctx.fill();

    ctx.beginPath();
    points.forEach((p, i) => (i ? ctx.lineTo(x(p.t), y(p.mb)) : ctx.moveTo(x(p.t), y(p.mb))));
    ctx.strokeStyle = "#3563e9";
    ctx.lineWidth = 2;
    ctx.lineJoin = "round";
    ctx.stroke();
  }

  pollStats();
  setInterval(pollStats, STATS_EVERY_MS);
  window.addEventListener("resize", drawChart);
})();
