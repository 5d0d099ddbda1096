// sse-broadcaster demo, agent run page: plain JS, no framework, no CDN.
//
// The run lives on the server (EventBroadcaster.start_run), not in this page.
// The page follows it with the browser's own EventSource on /runs/NAME/events:
// a fresh page (a reload, a second tab) gets the whole run from its first
// token; the browser's own reconnects send Last-Event-ID and get exactly the
// rest; after the `end` event the server closes the stream, the browser comes
// back once with the end's id and is answered 204, and stops. window.runDemo
// exposes what the page received, for the browser test and the devtools console.
"use strict";

(function () {
  const params = new URLSearchParams(window.location.search);
  const defaultRun = document.querySelector('meta[name="sse-default-run"]').content;
  const name = params.get("run") || defaultRun;
  const base = "/runs/" + encodeURIComponent(name);

  const $ = (id) => document.getElementById(id);
  const run = {
    name: name,
    tokens: [],       // the text of every token received, in order
    indices: [],      // their positions in the answer ("i"): 0, 1, 2, ... with no hole
    ids: [],          // their event ids
    ends: [],         // data of every `end` event
    gaps: [],         // data of every `gap` event
    state: "none",    // none, running, finished, cancelled, failed, expired
    status: "connecting",
    opens: 0,         // streams opened (each EventSource's first open and its reconnects)
    errors: 0,        // "error" events: a stream ended, or the server said stop (204, 404)
    sources: 0,       // EventSource objects made
    source: null,
  };
  window.runDemo = run;

  $("run-name").textContent = name;
  $("run-name-2").textContent = name;
  const transcript = $("transcript");

  function setState(state) {
    run.state = state;
    const pill = $("run-state");
    pill.dataset.state = state;
    pill.className = "pill pill-" + (state === "none" ? "idle" : state);
    pill.textContent = state === "none" ? "no run" : state;
    $("stop-button").disabled = state !== "running";
  }

  function setStatus(status) {
    run.status = status;
    const pill = $("status");
    pill.dataset.state = status;
    const look = status === "open" ? "open" : status === "closed" ? "closed" : "connecting";
    pill.className = "pill pill-" + look;
    pill.textContent = status;
  }

  function notice(text) {
    const box = $("notice");
    box.textContent = text;
    box.hidden = !text;
  }

  function clear() {
    run.tokens.length = 0;
    run.indices.length = 0;
    run.ids.length = 0;
    transcript.textContent = "";
    $("token-count").textContent = "0";
    $("last-id").textContent = "\u2013";
  }

  function follow() {
    if (run.source) {
      run.source.close();
    }
    const source = new EventSource(base + "/events");
    run.source = source;
    run.sources += 1;
    source.onopen = () => {
      if (source !== run.source) return;
      run.opens += 1;
      $("connections").textContent = String(run.opens);
      setStatus("open");
    };
    source.addEventListener("token", (event) => {
      if (source !== run.source) return;
      const token = JSON.parse(event.data);
      run.tokens.push(token.text);
      run.indices.push(token.i);
      run.ids.push(event.lastEventId);
      transcript.appendChild(document.createTextNode(token.text));
      transcript.scrollTop = transcript.scrollHeight;
      $("token-count").textContent = String(run.tokens.length);
      $("last-id").textContent = event.lastEventId;
      if (run.state !== "running") setState("running");
    });
    source.addEventListener("gap", (event) => {
      if (source !== run.source) return;
      const gap = JSON.parse(event.data);
      run.gaps.push(gap);
      if (gap.expired) {
        notice("This run's transcript has expired on the server: it cannot be shown again.");
      } else {
        // The id we held is from an earlier run: the current run follows from its start.
        clear();
        notice("The run changed while this page was away: showing the current run.");
      }
    });
    source.addEventListener("end", (event) => {
      if (source !== run.source) return;
      const end = JSON.parse(event.data);
      run.ends.push(end);
      setState(end.expired ? "expired" : end.state);
      if (end.state === "failed" && end.error) notice("The run failed: " + end.error);
    });
    source.onerror = () => {
      if (source !== run.source) return;
      run.errors += 1;
      if (source.readyState === EventSource.CLOSED) {
        // 204 after the end (nothing more will come) or 404 (no run yet): stop here.
        setStatus("closed");
      } else {
        setStatus("reconnecting");
      }
    };
  }

  async function post(path) {
    const response = await fetch(base + path, { method: "POST" });
    let body = {};
    try {
      body = await response.json();
    } catch (_) {
      body = {};
    }
    return { ok: response.ok, status: response.status, body: body };
  }

  $("start-button").addEventListener("click", async () => {
    $("action-result").textContent = "";
    const answer = await post("");
    if (!answer.ok) {
      $("action-result").textContent = answer.body.error || "HTTP " + answer.status;
      return;
    }
    notice("");
    clear();
    setState("running");
    $("action-result").textContent = "started run " + answer.body.runId;
    follow();
  });

  $("stop-button").addEventListener("click", async () => {
    const answer = await post("/cancel");
    $("action-result").textContent = answer.ok
      ? (answer.body.cancelled ? "stopping" : "the run was not running")
      : answer.body.error || "HTTP " + answer.status;
  });

  setState("none");
  follow();
})();
