// Turnout dashboard: a client of the admin API (relative URLs, so it works wherever the page
// is served from: plain HTTP, admin.tls, a --workers supervisor). It keeps 15 minutes of
// samples in sessionStorage so that a reload keeps the picture.
"use strict";

(() => {
  const HISTORY_MS = 15 * 60 * 1000;
  const POLL_MS = 1000;
  const STALL_MS = 40000; // the API sends a keep-alive every 15 s
  const RETRY_MAX_MS = 5000;
  const MAX_EVENTS = 300;
  const STORE_KEY = "turnout.dashboard";
  const TOKEN_KEY = "turnout.token";
  const SVG = "http://www.w3.org/2000/svg";
  const POOLS = ["blue", "green"];
  const MOVES_TRAFFIC = new Set(["resume", "promote", "rollback"]);

  const $ = (id) => document.getElementById(id);

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY) || "",
    tokenRequired: null, // unknown until the API answers
    status: null,
    previous: null, // last totals, for rates
    history: loadHistory(),
    seen: new Set(),
    streamAbort: null,
    lostSince: null,
  };
  for (const event of state.history.events) state.seen.add(eventKey(event));

  // storage ---------------------------------------------------------------

  function loadHistory() {
    try {
      const raw = JSON.parse(sessionStorage.getItem(STORE_KEY) || "null");
      if (raw && Array.isArray(raw.samples) && Array.isArray(raw.events)) {
        return { samples: raw.samples, events: raw.events, lastEventId: raw.lastEventId ?? null };
      }
    } catch (err) {
      // A damaged entry is dropped: the page starts a fresh picture.
    }
    return { samples: [], events: [], lastEventId: null };
  }

  let saveTimer = null;
  function saveSoon() {
    if (saveTimer === null) saveTimer = setTimeout(save, 2000);
  }

  function save() {
    clearTimeout(saveTimer);
    saveTimer = null;
    const now = Date.now();
    const h = state.history;
    h.samples = h.samples.filter((s) => now - s.t <= HISTORY_MS);
    h.events = h.events.slice(-MAX_EVENTS);
    try {
      sessionStorage.setItem(STORE_KEY, JSON.stringify(h));
    } catch (err) {
      // Over the storage quota: keep the newer half, the next save tries again.
      h.samples = h.samples.slice(Math.floor(h.samples.length / 2));
    }
  }

  // the admin API ---------------------------------------------------------

  function headers(extra) {
    const h = { Accept: "application/json", ...extra };
    if (state.token) h.Authorization = "Bearer " + state.token;
    return h;
  }

  async function errorText(resp) {
    let text = `${resp.status} ${resp.statusText}`;
    try {
      const body = await resp.json();
      if (body && body.error) {
        text = `${resp.status} ${body.error}`;
        if (body.detail !== undefined && body.detail !== null) {
          const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
          text += `: ${detail}`;
        }
      }
    } catch (err) {
      // Not JSON: the status line says enough.
    }
    return text;
  }

  async function call(method, path, body) {
    const init = { method, headers: headers(), cache: "no-store", credentials: "omit" };
    if (method !== "GET") {
      // Every mutation is JSON, even one without fields: the admin API may insist on it.
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body === undefined ? {} : body);
    }
    return fetch(path, init);
  }

  function unauthorized(text) {
    state.tokenRequired = true;
    const alert = $("auth-error");
    alert.textContent = state.token
      ? `The admin API refused the token (${text}). Enter the right one.`
      : `This admin API needs a token (${text}): enter it to see and act.`;
    alert.hidden = false;
    renderAuth();
  }

  function authorized() {
    $("auth-error").hidden = true;
    renderAuth();
  }

  // contact ---------------------------------------------------------------

  function setContact(ok, why) {
    const el = $("contact");
    if (ok) {
      state.lostSince = null;
      el.dataset.contact = "live";
      el.textContent = "live";
    } else {
      if (state.lostSince === null) state.lostSince = new Date();
      el.dataset.contact = "lost";
      el.textContent = `lost contact since ${clock(state.lostSince)} (${why}); reconnecting…`;
    }
  }

  // status polling --------------------------------------------------------

  let pollTimer = null;
  let polling = false;
  let pollAgain = false;

  // One poll at a time; asking for one while one runs queues exactly one more.
  async function poll() {
    clearTimeout(pollTimer);
    if (polling) {
      pollAgain = true;
      return;
    }
    polling = true;
    try {
      const resp = await call("GET", "status");
      if (resp.status === 401) {
        setContact(true);
        unauthorized(await errorText(resp));
      } else if (!resp.ok) {
        setContact(false, await errorText(resp));
      } else {
        const status = await resp.json();
        if (!state.token) state.tokenRequired = false;
        setContact(true);
        authorized();
        take(status);
      }
    } catch (err) {
      setContact(false, "no answer");
    } finally {
      polling = false;
    }
    if (pollAgain) {
      pollAgain = false;
      poll();
    } else {
      pollTimer = setTimeout(poll, POLL_MS);
    }
  }

  function totals(status) {
    const out = {};
    for (const pool of POOLS) {
      let requests = 0;
      for (const u of status.pools[pool].upstreams) requests += u.requests;
      out[pool] = requests;
    }
    return out;
  }

  function evidence(figures) {
    if (!figures || !figures.errors) return null;
    const e = figures.errors;
    const l = figures.latency || {};
    const most = (...xs) => Math.max(...xs.filter((x) => typeof x === "number"), 1);
    return {
      errors: most(e.relative_lr, e.absolute_lr),
      latency: most(Math.min(l.relative_lr ?? 1, l.pooled_lr ?? 1), l.absolute_lr),
    };
  }

  function take(status) {
    state.status = status;
    const now = Date.now();
    const sum = totals(status);
    const sample = { t: now, split: status.split.green, rate: {}, err: {}, p99: {} };
    const prev = state.previous;
    for (const pool of POOLS) {
      if (prev && now > prev.t && sum[pool] >= prev.sum[pool]) {
        sample.rate[pool] = ((sum[pool] - prev.sum[pool]) * 1000) / (now - prev.t);
      }
      const recent = status.recent && status.recent[pool];
      if (recent && recent.requests > 0) {
        sample.err[pool] = recent.error_rate;
        if (recent.p99 !== null) sample.p99[pool] = recent.p99 * 1000;
      }
    }
    const rollout = status.rollout;
    if (rollout.state === "progressing" || rollout.state === "insufficient_data" || rollout.state === "paused") {
      sample.ev = evidence(rollout.figures);
    }
    state.previous = { t: now, sum };
    state.history.samples.push(sample);
    saveSoon();
    render();
  }

  // the event stream ------------------------------------------------------

  function eventKey(event) {
    return `${event.seq}@${event.time}`;
  }

  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  async function stream() {
    let delay = 250;
    for (;;) {
      const controller = new AbortController();
      state.streamAbort = controller;
      let stall = null;
      const arm = () => {
        clearTimeout(stall);
        stall = setTimeout(() => controller.abort(), STALL_MS);
      };
      try {
        const extra = {};
        const last = state.history.lastEventId;
        if (last !== null) extra["Last-Event-ID"] = String(last);
        // A first visit replays the recent events; a returning one resumes after the last seen.
        const path = last === null ? "events?replay=100" : "events";
        const init = { headers: headers(extra), cache: "no-store", credentials: "omit", signal: controller.signal };
        arm();
        const resp = await fetch(path, init);
        if (resp.status === 401) {
          unauthorized(await errorText(resp));
          $("stream").textContent = "(event stream: waiting for a token)";
          await waitForToken(controller.signal);
          continue;
        }
        if (!resp.ok || !resp.body) throw new Error(await errorText(resp));
        $("stream").textContent = "(live)";
        delay = 250;
        const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          arm();
          buffer += value.replace(/\r\n?/g, "\n");
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            dispatch(block);
          }
        }
      } catch (err) {
        // Lost or aborted: reconnect below, resuming after the last event seen.
      } finally {
        clearTimeout(stall);
      }
      $("stream").textContent = "(event stream lost; reconnecting…)";
      await sleep(delay);
      delay = Math.min(delay * 2, RETRY_MAX_MS);
    }
  }

  function waitForToken(signal) {
    return new Promise((resolve) => {
      if (signal.aborted) return resolve();
      signal.addEventListener("abort", () => resolve(), { once: true });
    });
  }

  function dispatch(block) {
    let id = null;
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "id") id = value;
      else if (field === "data") data.push(value);
    }
    if (data.length === 0) return;
    let event;
    try {
      event = JSON.parse(data.join("\n"));
    } catch (err) {
      return;
    }
    if (id !== null && /^\d+$/.test(id)) state.history.lastEventId = Number(id);
    const key = eventKey(event);
    if (state.seen.has(key)) return;
    state.seen.add(key);
    state.history.events.push(event);
    if (state.history.events.length > MAX_EVENTS) {
      const gone = state.history.events.shift();
      state.seen.delete(eventKey(gone));
    }
    if (event.kind === "split" && typeof event.after === "number") {
      // Drawn when it happened (a replayed one too), and shown at once, before the next poll.
      const t = Math.min(event.time * 1000, Date.now());
      const samples = state.history.samples;
      let at = samples.length;
      while (at > 0 && samples[at - 1].t > t) at--;
      samples.splice(at, 0, { t, split: event.after, rate: {}, err: {}, p99: {} });
      if (state.status) {
        state.status.split = { green: event.after, blue: 100 - event.after };
      }
    }
    if (event.kind === "rollout" && state.status) {
      state.status.rollout.state = event.after;
      state.status.rollout.reason = event.reason;
    }
    saveSoon();
    renderEvents();
    render();
  }

  // actions ---------------------------------------------------------------

  async function act(label, method, path, body, question) {
    if (question && !window.confirm(question)) return;
    const result = $("action-result");
    result.dataset.outcome = "pending";
    result.textContent = `${label}…`;
    try {
      const resp = await call(method, path, body);
      if (!resp.ok) {
        const text = await errorText(resp);
        if (resp.status === 401) unauthorized(text);
        if (resp.status === 409 && path.endsWith("/drain") && !body
            && window.confirm(`${text}\n\nDrain anyway?`)) {
          return act(label, method, path, { force: true });
        }
        result.dataset.outcome = "refused";
        result.textContent = `${label} refused: ${text}`;
        return;
      }
      const answer = await resp.json();
      result.dataset.outcome = "done";
      result.textContent = `${label}: done${describeChange(answer)}`;
      poll();
    } catch (err) {
      result.dataset.outcome = "refused";
      result.textContent = `${label} failed: no answer from the admin API`;
    }
  }

  function describeChange(answer) {
    const b = answer.before;
    const a = answer.after;
    if (b && a && typeof b === "object" && typeof a === "object" && "state" in a) {
      return ` (${b.state} → ${a.state}, split ${a.split}% green)`;
    }
    if (typeof answer.split === "number") return ` (split ${answer.before}% → ${answer.split}% green)`;
    return "";
  }

  function bindActions() {
    $("shift-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const green = Number($("shift-green").value);
      const over = $("shift-over").value.trim();
      const body = { green };
      if (over) body.over = over;
      const question = `Shift the split to ${green}% green${over ? ` over ${over}` : " at once"}?`;
      act("shift", "PUT", "split", body, question);
    });
    $("start-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const strategy = $("strategy-choice").value;
      act(`start (${strategy})`, "POST", "rollout/start", { strategy },
        `Start a ${strategy} rollout? It moves traffic to the candidate.`);
    });
    for (const button of document.querySelectorAll("[data-rollout]")) {
      button.addEventListener("click", () => {
        const action = button.dataset.rollout;
        const question = MOVES_TRAFFIC.has(action) ? `${button.textContent}: this moves traffic. Go on?` : null;
        act(action, "POST", `rollout/${action}`, undefined, question);
      });
    }
    $("upstreams").addEventListener("click", (e) => {
      const button = e.target.closest("button[data-upstream]");
      if (!button) return;
      const what = button.dataset.action;
      const [pool, index] = button.dataset.upstream.split("/");
      act(`${what} ${pool}/${index}`, "POST", `pools/${pool}/upstreams/${index}/${what}`, undefined,
        `${what === "drain" ? "Drain" : "Undrain"} ${pool}/${index}? This moves traffic.`);
    });
    $("token-form").addEventListener("submit", (e) => {
      e.preventDefault();
      setToken($("token").value.trim());
    });
    $("token-forget").addEventListener("click", () => setToken(""));
  }

  function setToken(token) {
    if (/[^\x21-\x7e]/.test(token)) {
      // An HTTP header carries printable ASCII only: say so rather than fail every call.
      const alert = $("auth-error");
      alert.textContent = "A token is printable ASCII without spaces: check what was typed.";
      alert.hidden = false;
      return;
    }
    state.token = token;
    $("token").value = "";
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    renderAuth();
    if (state.streamAbort) state.streamAbort.abort();
    poll();
  }

  // rendering -------------------------------------------------------------

  function clock(date) {
    return date.toTimeString().slice(0, 8);
  }

  function pct(x, digits = 1) {
    return typeof x === "number" ? `${(x * 100).toFixed(digits)}%` : "–";
  }

  function num(x, digits = 1) {
    return typeof x === "number" ? x.toFixed(digits) : "–";
  }

  function renderAuth() {
    const el = $("auth");
    let readOnly = false;
    if (state.tokenRequired && !state.token) {
      el.textContent = "read-only: enter the admin token to act";
      readOnly = true;
    } else if (state.token) {
      el.textContent = "token set for this tab";
    } else if (state.tokenRequired === false || state.status) {
      el.textContent = "no token configured: actions work directly";
    } else {
      el.textContent = "";
    }
    for (const button of document.querySelectorAll("button.act, #upstreams button")) {
      button.disabled = readOnly;
    }
  }

  function render() {
    const status = state.status;
    if (!status) return;
    const r = status.rollout;
    const badge = $("state");
    badge.textContent = r.state;
    badge.dataset.state = r.state;
    $("strategy").textContent = `${r.strategy} strategy`;
    $("step").textContent = r.step ? `· step ${r.step} of ${r.steps.length}` : "";
    $("reason").textContent = r.reason;
    const ramp = status.ramp ? ` (ramping to ${status.ramp.target}% green, ${status.ramp.remaining} s left)` : "";
    $("split").textContent = `${num(status.split.green, 1)}% green · ${num(status.split.blue, 1)}% blue${ramp}`;
    $("stable").textContent = status.stable;
    $("candidate").textContent = status.candidate;
    $("steps").textContent = r.steps.map((s) => `${s}%`).join(" → ") + (r.interval ? `, each ≥ ${num(r.interval, 1)} s` : "");
    const t = r.threshold;
    $("thresholds").textContent = t
      ? `error rate ≤ ${pct(t.max_error_rate, 2)}, p99 ≤ ${t.max_p99_ms} ms and ≤ ${t.max_p99_ratio}× stable, ≥ ${t.min_requests} requests a step`
      : "–";
    renderWorkers(status.workers);
    renderUpstreams(status);
    renderVerdict(r);
    renderCharts(r);
    renderAuth();
  }

  function renderWorkers(workers) {
    // Only a supervisor (turnout run --workers N) has workers to show.
    const shown = Array.isArray(workers) && workers.length > 0;
    $("workers-t").hidden = !shown;
    $("workers").hidden = !shown;
    if (!shown) return;
    const states = new Map();
    let restarts = 0;
    for (const w of workers) {
      states.set(w.state, (states.get(w.state) || 0) + 1);
      restarts += w.restarts || 0;
    }
    const counts = Array.from(states, ([name, n]) => `${n} ${name}`).join(", ");
    $("workers").textContent = `${counts} · ${restarts} restart${restarts === 1 ? "" : "s"}`;
  }

  function cell(row, index) {
    return row.cells[index];
  }

  function renderUpstreams(status) {
    const body = $("upstreams").tBodies[0];
    const present = new Set();
    for (const pool of POOLS) {
      for (const u of status.pools[pool].upstreams) {
        const key = `${pool}/${u.index}`;
        present.add(key);
        let row = body.querySelector(`tr[data-key="${key}"]`);
        if (!row) {
          row = body.insertRow();
          row.dataset.key = key;
          for (let i = 0; i < 9; i++) row.insertCell();
          const head = document.createElement("th");
          head.scope = "row";
          row.replaceChild(head, row.cells[0]);
          const button = document.createElement("button");
          button.type = "button";
          button.dataset.upstream = key;
          cell(row, 8).appendChild(button);
        }
        row.dataset.pool = pool;
        row.cells[0].textContent = key;
        cell(row, 1).textContent = u.url;
        setWord(cell(row, 2), u.state);
        setWord(cell(row, 3), u.breaker);
        cell(row, 4).textContent = u.in_flight;
        cell(row, 5).textContent = u.queued;
        cell(row, 6).textContent = u.requests;
        cell(row, 7).textContent = u.failures;
        const button = cell(row, 8).firstChild;
        const action = u.draining ? "undrain" : "drain";
        if (button.dataset.action !== action) {
          button.dataset.action = action;
          button.textContent = u.draining ? "Undrain" : "Drain";
          button.setAttribute("aria-label", `${u.draining ? "Undrain" : "Drain"} ${key}`);
        }
      }
    }
    for (const row of Array.from(body.rows)) {
      if (!present.has(row.dataset.key)) row.remove();
    }
  }

  function setWord(td, word) {
    td.textContent = word;
    td.dataset.word = word;
  }

  function figuresTable(figures, limit) {
    const table = document.createElement("table");
    table.className = "figures";
    const rows = [["", "candidate", "stable"]];
    const c = figures.candidate || {};
    const s = figures.stable || {};
    rows.push(["requests", c.requests, s.requests]);
    rows.push(["errors", c.errors, s.errors]);
    rows.push(["error rate", pct(c.error_rate, 2), pct(s.error_rate, 2)]);
    rows.push(["p99", ms(c.p99), ms(s.p99)]);
    const e = figures.errors || {};
    const l = figures.latency || {};
    const bar = limit ? ` (limit ${Math.round(limit)})` : "";
    rows.push(["error test", `${e.outcome ?? "–"}${bar}`, `LR vs stable ${lr(e.relative_lr)}, vs max ${lr(e.absolute_lr)}`]);
    rows.push(["latency test", `${l.outcome ?? "–"}${l.limit ? `, limit ${ms(l.limit)}` : ""}`,
      `LR vs stable ${lr(l.relative_lr)}, pooled ${lr(l.pooled_lr)}, vs max ${lr(l.absolute_lr)}`]);
    if (typeof figures.elapsed === "number") rows.push(["step", `${figures.step} (${figures.split}%)`, `${figures.elapsed.toFixed(1)} s in`]);
    rows.forEach((values, i) => {
      const tr = table.insertRow();
      values.forEach((v, j) => {
        const td = document.createElement(i === 0 || j === 0 ? "th" : "td");
        if (i === 0) td.scope = "col";
        else if (j === 0) td.scope = "row";
        td.textContent = v === undefined || v === null ? "–" : String(v);
        tr.appendChild(td);
      });
    });
    return table;
  }

  function ms(seconds) {
    return typeof seconds === "number" ? `${(seconds * 1000).toFixed(1)} ms` : "–";
  }

  function lr(x) {
    if (typeof x !== "number") return "–";
    return x >= 1000 ? x.toExponential(1) : x.toFixed(2);
  }

  let verdictKey = "";
  function renderVerdict(r) {
    const figures = r.figures && r.figures.candidate ? r.figures : lastEventFigures();
    const key = JSON.stringify(figures) + r.evidence_limit;
    if (key === verdictKey) return;
    verdictKey = key;
    const box = $("verdict");
    box.replaceChildren();
    if (!figures) {
      const p = document.createElement("p");
      p.className = "muted";
      p.textContent = "No verdict yet: an adaptive rollout shows its measurements here.";
      box.appendChild(p);
      return;
    }
    box.appendChild(figuresTable(figures, r.evidence_limit));
  }

  function lastEventFigures() {
    const events = state.history.events;
    for (let i = events.length - 1; i >= 0; i--) {
      if (events[i].figures && events[i].figures.candidate) return events[i].figures;
    }
    return null;
  }

  function summary(event) {
    const d = event;
    switch (event.kind) {
      case "split": return `split ${d.before}% → ${d.after}% green${d.by ? ` by ${d.by}` : ""}${d.ramp ? ` (ramp ${d.ramp} s)` : ""}`;
      case "ramp": return `ramp from ${d.start}% to ${d.target}% green over ${d.over} s`;
      case "rollout": return `${d.before} → ${d.after}: ${d.reason}`;
      case "rollout_step": return `step ${d.step}: ${d.share}% on ${d.candidate}`;
      case "breach": return `breach (${d.fallback}): ${d.reason}`;
      case "rollout_note": return d.reason;
      case "drain": case "undrain": case "drained": return `${event.kind} ${d.upstream}`;
      default: {
        const rest = { ...d };
        delete rest.seq; delete rest.kind; delete rest.time; delete rest.figures;
        return JSON.stringify(rest);
      }
    }
  }

  function renderEvents() {
    const list = $("events");
    const events = state.history.events;
    const shown = new Set(Array.from(list.children, (li) => li.dataset.key));
    const wanted = new Set(events.map(eventKey));
    for (const li of Array.from(list.children)) {
      if (!wanted.has(li.dataset.key)) li.remove();
    }
    for (const event of events) {
      const key = eventKey(event);
      if (shown.has(key)) continue;
      const li = document.createElement("li");
      li.dataset.key = key;
      li.dataset.kind = event.kind;
      const time = document.createElement("time");
      time.dateTime = new Date(event.time * 1000).toISOString();
      time.textContent = clock(new Date(event.time * 1000));
      const kind = document.createElement("strong");
      kind.textContent = event.kind;
      li.append(time, " ", kind, " ", summary(event));
      if (event.figures && event.figures.candidate) {
        const details = document.createElement("details");
        const s = document.createElement("summary");
        s.textContent = "measurements";
        details.append(s, figuresTable(event.figures, state.status && state.status.rollout.evidence_limit));
        li.appendChild(details);
      }
      list.prepend(li);
    }
  }

  // charts ----------------------------------------------------------------

  function el(name, attrs, text) {
    const node = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  const W = 400, H = 140, L = 44, R = 8, T = 8, B = 18;

  function chart(id, { series, yMax, yMin = 0, lines = [], marks = [], format }) {
    const svg = $(id);
    const now = Date.now();
    const t0 = Math.max(now - HISTORY_MS, Math.min(now - 60000, ...series.flatMap((s) => s.points.map((p) => p[0]))));
    const xs = (t) => L + ((t - t0) / (now - t0)) * (W - L - R);
    let top = yMax;
    for (const s of series) for (const p of s.points) top = Math.max(top, p[1]);
    for (const line of lines) if (typeof line.value === "number") top = Math.max(top, line.value * 1.15);
    if (top <= yMin) top = yMin + 1;
    const ys = (v) => T + (1 - (Math.min(v, top) - yMin) / (top - yMin)) * (H - T - B);
    const nodes = [];
    for (const frac of [0, 0.5, 1]) {
      const v = yMin + frac * (top - yMin);
      nodes.push(el("line", { x1: L, x2: W - R, y1: ys(v), y2: ys(v), class: "grid" }));
      nodes.push(el("text", { x: L - 4, y: ys(v) + 4, class: "axis", "text-anchor": "end" }, format(v)));
    }
    const spanMin = (now - t0) / 60000;
    const every = [1, 2, 5].find((m) => spanMin / m <= 5) || 5;
    for (let m = 0; m <= spanMin; m += every) {
      const t = now - m * 60000;
      nodes.push(el("text", { x: xs(t), y: H - 4, class: "axis", "text-anchor": m === 0 ? "end" : "middle" },
        m === 0 ? "now" : `-${m} min`));
    }
    for (const mark of marks) {
      if (mark.t < t0) continue;
      nodes.push(el("line", { x1: xs(mark.t), x2: xs(mark.t), y1: T, y2: H - B, class: "mark" }));
      nodes.push(el("text", { x: xs(mark.t) + 2, y: T + 9, class: "mark-label" }, mark.label));
    }
    for (const line of lines) {
      if (typeof line.value !== "number") continue;
      nodes.push(el("line", { x1: L, x2: W - R, y1: ys(line.value), y2: ys(line.value), class: "limit" }));
      nodes.push(el("text", { x: W - R - 2, y: ys(line.value) - 3, class: "limit-label", "text-anchor": "end" }, line.label));
    }
    let count = 0;
    for (const s of series) {
      const pts = s.points.filter((p) => p[0] >= t0);
      count += pts.length;
      if (pts.length === 0) continue;
      if (s.step) pts.push([now, pts[pts.length - 1][1]]);
      const d = pts.map((p, i) => {
        const x = xs(p[0]).toFixed(1);
        const y = ys(p[1]).toFixed(1);
        // A split holds until it changes: a step line, not a slope between two samples.
        const hold = s.step && i ? `L${x},${ys(pts[i - 1][1]).toFixed(1)}` : "";
        return `${hold}${i ? "L" : "M"}${x},${y}`;
      }).join("");
      nodes.push(el("path", { d, class: `series ${s.cls}` }));
      const [lt, lv] = pts[pts.length - 1];
      nodes.push(el("circle", { cx: xs(lt), cy: ys(lv), r: 2.5, class: `dot ${s.cls}` }));
    }
    const described = series.map((s) => {
      const last = s.points[s.points.length - 1];
      return `${s.name} ${last ? format(last[1]) : "no data"}`;
    }).join(", ");
    nodes.unshift(el("title", {}, `${svg.getAttribute("aria-label")}: ${described}`));
    svg.replaceChildren(...nodes);
    svg.dataset.points = String(count);
  }

  function renderCharts(r) {
    const samples = state.history.samples;
    const pick = (key, pool) => samples.filter((s) => s[key] && typeof s[key][pool] === "number").map((s) => [s.t, s[key][pool]]);
    const marks = [];
    for (const e of state.history.events) {
      if (e.kind === "rollout_step") marks.push({ t: e.time * 1000, label: `${e.step}` });
      else if (e.kind === "rollout" && ["promoted", "rolled_back", "paused"].includes(e.after)) {
        marks.push({ t: e.time * 1000, label: e.after === "rolled_back" ? "rb" : e.after.slice(0, 5) });
      }
    }
    const t = r.threshold || {};
    chart("chart-split", {
      series: [{ name: "green", cls: "green", step: true, points: samples.map((s) => [s.t, s.split]) }],
      yMax: 100, marks, format: (v) => `${Math.round(v)}%`,
      lines: (r.steps || []).filter((s) => s < 100).slice(0, 1).map((s) => ({ value: s, label: `first step ${s}%` })),
    });
    chart("chart-rate", {
      series: POOLS.map((p) => ({ name: p, cls: p, points: pick("rate", p) })),
      yMax: 1, marks, format: (v) => (v >= 1000 ? `${(v / 1000).toFixed(1)}k` : `${Math.round(v)}`),
    });
    chart("chart-errors", {
      series: POOLS.map((p) => ({ name: p, cls: p, points: pick("err", p).map(([x, v]) => [x, v * 100]) })),
      yMax: 0.1, marks, format: (v) => `${v.toFixed(v < 1 ? 2 : 1)}%`,
      lines: [{ value: typeof t.max_error_rate === "number" ? t.max_error_rate * 100 : null, label: "max_error_rate" }],
    });
    chart("chart-p99", {
      series: POOLS.map((p) => ({ name: p, cls: p, points: pick("p99", p) })),
      yMax: 1, marks, format: (v) => `${v.toFixed(v < 10 ? 1 : 0)}`,
      lines: [{ value: t.max_p99_ms, label: "max_p99" }],
    });
    const log10 = (x) => Math.log10(Math.max(x, 1));
    const evidence = (kind) => samples.filter((s) => s.ev).map((s) => [s.t, log10(s.ev[kind])]);
    chart("chart-evidence", {
      series: [
        { name: "errors", cls: "errors", points: evidence("errors") },
        { name: "latency", cls: "latency", points: evidence("latency") },
      ],
      yMax: 1, marks, format: (v) => ratioText(10 ** v),
      lines: [{ value: r.evidence_limit ? log10(r.evidence_limit) : null, label: "limit (1/alpha)" }],
    });
    renderLegend(samples);
  }

  function ratioText(x) {
    if (x >= 1e6) return x.toExponential(0);
    if (x >= 1000) return `${(x / 1000).toFixed(1)}k`;
    return x >= 10 ? x.toFixed(0) : x.toFixed(1);
  }

  function renderLegend(samples) {
    const last = samples.length ? samples[samples.length - 1] : null;
    const lastWith = (key, pool) => {
      for (let i = samples.length - 1; i >= 0; i--) {
        const v = samples[i][key] && samples[i][key][pool];
        if (typeof v === "number") return v;
      }
      return null;
    };
    const parts = POOLS.map((p) => `${p}: ${num(lastWith("rate", p), 0)} req/s, ${pct(lastWith("err", p), 2)} errors, p99 ${num(lastWith("p99", p), 1)} ms`);
    if (last) parts.push(`split ${num(last.split, 1)}% green`);
    const legend = $("legend");
    legend.replaceChildren(...parts.map((text, i) => {
      const span = document.createElement("span");
      span.className = `key ${POOLS[i] || "split"}`;
      span.textContent = text;
      return span;
    }));
  }

  // start -----------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    bindActions();
    renderAuth();
    renderEvents();
    renderCharts({}); // the stored picture at once; the first answer brings the limits
    window.addEventListener("pagehide", save);
    poll();
    stream();
  });
})();
