// The trio-stream playground: streams chat completions with fetch() and a
// streaming body, one run per pane.  docs/api.md section 9 is its contract.
//
// Model output is text, never markup: it only ever reaches the page through
// textContent.  Nothing here builds HTML from strings.

import { SSEParser } from "./sse.js";

const $ = (selector, root = document) => root.querySelector(selector);

// -- sessionStorage: the key, the tab's session, the form, each pane's run ----

const store = {
  get(name, fallback = null) {
    try {
      const raw = sessionStorage.getItem("trio-stream." + name);
      return raw === null ? fallback : JSON.parse(raw);
    } catch {
      return fallback;
    }
  },
  set(name, value) {
    try {
      sessionStorage.setItem("trio-stream." + name, JSON.stringify(value));
    } catch {
      // storage full or disabled: the page still works, only reloads forget
    }
  },
};

/** This tab's session id: made once, kept in sessionStorage (so per tab, kept across reloads). */
function tabSession() {
  let id = store.get("session");
  if (typeof id !== "string" || !/^[A-Za-z0-9._:-]{1,100}$/.test(id)) {
    const bytes = crypto.getRandomValues(new Uint8Array(8));
    id = "tab-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    store.set("session", id);
  }
  return id;
}

// -- the API ------------------------------------------------------------------

function headers(extra = {}) {
  const key = $("#api-key").value.trim();
  return key ? { authorization: "Bearer " + key, ...extra } : { ...extra };
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch {
    // not the JSON error body
  }
  return `HTTP ${response.status}`;
}

function post(path) {
  return fetch(path, { method: "POST", headers: headers() });
}

// -- panes ----------------------------------------------------------------------

const STOPPED_CODES = new Set(["stopped", "interrupted", "superseded", "client_disconnect"]);

class Pane {
  constructor(index) {
    this.index = index;
    this.session = `${tabSession()}-${index + 1}`;
    this.element = $("#pane-template").content.firstElementChild.cloneNode(true);
    this.output = $(".output", this.element);
    this.statusEl = $(".status", this.element);
    this.noteEl = $(".note", this.element);
    $(".title", this.element).textContent = `Pane ${index + 1}`;
    this.element.dataset.sessionId = this.session;
    this.stopButton = $(".stop", this.element);
    this.stopButton.addEventListener("click", () => this.stop());
    if (index === 0) this.output.id = "output";
    this.generation = 0; // a newer send or resume makes older readers stale
    this.controller = null;
    this.reset();
  }

  reset() {
    this.run = { runId: null, lastId: 0, text: "", detached: false, active: false };
    this.stopRequested = false;
    this.resumedAfter = null; // the cursor a resume after a reload started from
    this.finishReason = null;
    this.setStatus("idle");
    this.render("");
  }

  get busy() {
    return this.status === "streaming";
  }

  setStatus(status, note = null) {
    this.status = status;
    this.statusEl.textContent = status;
    this.statusEl.dataset.status = status;
    this.stopButton.disabled = status !== "streaming";
    if (note !== null) this.note(note);
    app.refreshStatus();
  }

  render(note) {
    this.output.textContent = this.run.text;
    this.element.dataset.runId = this.run.runId || "";
    this.element.dataset.servedBy = this.run.servedBy || "";
    if (note !== undefined) this.note(note);
    // Follow the answer unless the reader scrolled up.
    const out = this.output;
    if (out.scrollHeight - out.scrollTop - out.clientHeight < 40) out.scrollTop = out.scrollHeight;
  }

  note(text) {
    this.noteEl.textContent = text;
    this.noteEl.title = text; // the line is cut with an ellipsis; hovering shows it all
  }

  save() {
    store.set("pane." + this.index, { ...this.run, status: this.status, note: this.noteEl.textContent });
  }

  /** Start a run: POST /v1/chat/completions with this pane's session id. */
  async send(prompt, { model, detach }) {
    const generation = ++this.generation;
    this.run = { runId: null, lastId: 0, text: "", detached: detach, active: true };
    this.stopRequested = false;
    this.resumedAfter = null;
    this.setStatus("streaming", "waiting for the first token…");
    this.render();
    this.save();
    const body = { messages: [{ role: "user", content: prompt }], stream: true, detach };
    if (model) body.model = model;
    await this.stream(generation, "/v1/chat/completions", {
      method: "POST",
      headers: headers({ "content-type": "application/json", "x-session-id": this.session }),
      body: JSON.stringify(body),
    });
  }

  /** After a reload: follow a detached run from the last event this pane stored. */
  async resume(saved) {
    const generation = ++this.generation;
    this.run = { ...saved, active: true };
    this.stopRequested = false;
    this.resumedAfter = saved.lastId;
    this.setStatus("streaming", `resuming after event ${saved.lastId}…`);
    this.render();
    const path = `/v1/runs/${encodeURIComponent(saved.runId)}/events`;
    await this.stream(generation, path, {
      headers: headers({ "last-event-id": String(saved.lastId) }),
    });
  }

  async stream(generation, path, init) {
    const controller = (this.controller = new AbortController());
    let response;
    try {
      response = await fetch(path, { ...init, signal: controller.signal });
    } catch (error) {
      if (generation === this.generation) this.finish("error", `request failed: ${error.message}`);
      return;
    }
    if (generation !== this.generation) return; // a newer send superseded this one
    this.run.runId = response.headers.get("x-run-id") || this.run.runId;
    this.render();
    if (this.stopRequested && this.run.runId) this.cancel();
    if (response.status === 404 && this.run.runId && path.endsWith("/events")) {
      return this.fromSavedRow(generation);
    }
    if (!response.ok) {
      return this.finish("error", await errorMessage(response));
    }
    await this.read(generation, response);
  }

  /** Read the event stream to its end; stale readers drain silently (the server ends them). */
  async read(generation, response) {
    const parser = new SSEParser();
    const decoder = new TextDecoder();
    const reader = response.body.getReader();
    let ending = null; // [status, note] once a terminal frame arrived
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        if (generation !== this.generation) continue;
        for (const event of parser.push(decoder.decode(value, { stream: true }))) {
          ending = this.apply(event) || ending;
        }
        this.render(ending ? undefined : this.progressNote());
        this.save(); // text and cursor together: a reload resumes exactly here
      }
      parser.push(decoder.decode());
      parser.end();
    } catch (error) {
      if (generation !== this.generation) return;
      if (!ending) ending = this.stopRequested ? ["stopped", "stopped"] : ["error", `stream broken: ${error.message}`];
    }
    if (generation !== this.generation) return;
    if (!ending) {
      // No terminal frame: the run was fenced, or the connection was cut.
      ending = this.stopRequested ? ["stopped", "stopped"] : ["error", "the stream ended without [DONE]"];
    }
    this.finish(...ending);
  }

  /** Apply one event; returns [status, note] for a terminal frame. */
  apply(event) {
    if (event.data === "[DONE]") return ["done", this.finishReason || "done"];
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return ["error", "an event that is not JSON"];
    }
    if (message.error) {
      const { code, type, message: text } = message.error;
      if (this.stopRequested || STOPPED_CODES.has(code)) return ["stopped", code || type];
      return ["error", `${code || type}: ${text}`];
    }
    for (const choice of message.choices || []) {
      const content = choice.delta && choice.delta.content;
      if (typeof content === "string") this.run.text += content;
      if (choice.finish_reason) this.finishReason = choice.finish_reason;
    }
    if (/^\d+$/.test(event.id)) this.run.lastId = Number(event.id);
    return null;
  }

  progressNote() {
    const kind = this.run.detached ? "detached" : "attached";
    const resumed = this.resumedAfter === null ? "" : ` · resumed after ${this.resumedAfter}`;
    return `${kind} · event ${this.run.lastId}${resumed} · ${this.run.runId || "run pending"}`;
  }

  /** A run that left memory (past --run-ttl): show its saved row. */
  async fromSavedRow(generation) {
    const response = await fetch(`/v1/runs/${encodeURIComponent(this.run.runId)}`, { headers: headers() });
    if (generation !== this.generation) return;
    if (!response.ok) return this.finish("error", await errorMessage(response));
    const run = await response.json();
    this.run.text = run.content || "";
    const status = { completed: "done", cancelled: "stopped" }[run.status] || "error";
    this.finish(status, `from the saved run (${run.reason || run.status})`);
  }

  /** The run is over for this pane: ``reason`` says how (a finish_reason, a cancel code, an error). */
  finish(status, reason) {
    this.run.active = false;
    this.controller = null;
    this.finishReason = null;
    this.render();
    this.setStatus(status, this.run.runId ? `${reason} · ${this.progressNote()}` : reason);
    this.save();
    if (this.run.runId) this.showServedBy(this.generation);
  }

  /** Name the upstream member that served the run: GET /v1/runs/{id}'s
   * ``served_by`` (the run's saved row once it has left memory). */
  async showServedBy(generation) {
    try {
      const response = await fetch(`/v1/runs/${encodeURIComponent(this.run.runId)}`, { headers: headers() });
      if (!response.ok || generation !== this.generation) return;
      const servedBy = (await response.json()).served_by;
      if (!servedBy || generation !== this.generation) return;
      this.run.servedBy = String(servedBy);
      this.render(`${this.noteEl.textContent} · served by ${this.run.servedBy}`);
      this.save();
    } catch {
      // the member's name is a convenience
    }
  }

  /** Stop: cancel the run by id (POST /v1/runs/{id}/cancel); before its id is
   * known (headers come with the first event), interrupt the session, and
   * cancel by id as soon as the headers arrive. The stream then ends with the
   * server's terminal frame. */
  async stop() {
    if (!this.busy || this.stopRequested) return;
    this.stopRequested = true;
    this.note("stopping…");
    const generation = this.generation;
    const controller = this.controller;
    if (this.run.runId) await this.cancel();
    else await post(`/v1/sessions/${encodeURIComponent(this.session)}/interrupt`).catch(() => null);
    // Safety net: a stream that has not ended 3 s later is dropped.
    setTimeout(() => {
      if (generation === this.generation && this.busy && controller) controller.abort();
    }, 3000);
  }

  async cancel() {
    const response = await post(`/v1/runs/${encodeURIComponent(this.run.runId)}/cancel`).catch(() => null);
    if (response && !response.ok && this.busy) this.note(await errorMessage(response));
  }

  /** Put back what this pane showed before a reload; resume a detached run. */
  restore() {
    const saved = store.get("pane." + this.index);
    if (!saved || typeof saved.text !== "string") return;
    this.run = {
      runId: saved.runId, lastId: saved.lastId | 0, text: saved.text, detached: !!saved.detached,
      active: false, servedBy: saved.servedBy || null,
    };
    this.render();
    if (saved.active && saved.detached && saved.runId) {
      this.resume(this.run);
    } else if (saved.active && saved.detached) {
      // Reloaded before the first event: the run goes on, but its id never
      // reached the page, so it cannot be followed. Do not leave it running.
      post(`/v1/sessions/${encodeURIComponent(this.session)}/interrupt`).catch(() => null);
      this.finish("stopped", "reloaded before the first event: the run was interrupted");
    } else if (saved.active) {
      this.finish("stopped", "the reload ended this attached run (tick Detach to survive reloads)");
    } else {
      this.setStatus(saved.status || "idle", saved.note || "");
    }
  }
}

// -- the page -----------------------------------------------------------------

const app = {
  panes: [],

  /** The page-wide #status: streaming while any pane streams, else the most telling end. */
  refreshStatus() {
    const statuses = this.panes.map((p) => p.status);
    const order = ["streaming", "error", "stopped", "done", "idle"];
    const status = order.find((s) => statuses.includes(s)) || "idle";
    const el = $("#status");
    el.textContent = status;
    el.dataset.status = status;
    $("#stop").disabled = status !== "streaming";
  },

  paneCount() {
    const n = Math.round(Number($("#panes").value));
    return Number.isFinite(n) ? Math.min(16, Math.max(1, n)) : 1;
  },

  /** Make exactly n panes: keep the first ones, stop and drop the rest. */
  setPanes(n) {
    while (this.panes.length > n) {
      const pane = this.panes.pop();
      pane.stop();
      pane.generation += 1;
      pane.element.remove();
      sessionStorage.removeItem("trio-stream.pane." + pane.index);
    }
    while (this.panes.length < n) {
      const pane = new Pane(this.panes.length);
      this.panes.push(pane);
      $("#pane-grid").append(pane.element);
    }
    $("#pane-grid").dataset.count = String(n);
    this.refreshStatus();
  },

  saveForm() {
    store.set("form", {
      prompt: $("#prompt").value,
      model: $("#model").value,
      panes: this.paneCount(),
      detach: $("#detach").checked,
    });
  },

  send() {
    const prompt = $("#prompt").value;
    if (!prompt.trim()) {
      $("#prompt").focus();
      return;
    }
    const n = this.paneCount();
    $("#panes").value = String(n);
    this.setPanes(n);
    this.saveForm();
    const options = { model: $("#model").value.trim(), detach: $("#detach").checked };
    for (const pane of this.panes) pane.send(prompt, options);
  },

  async pollMetrics() {
    const show = (id, value) => {
      $(id).textContent = value === undefined ? "–" : String(value);
    };
    try {
      const response = await fetch("/metrics", { cache: "no-store" });
      if (!response.ok) throw new Error(String(response.status));
      const metrics = parsePrometheus(await response.text());
      show("#metric-streams", metrics.get("trio_stream_active_streams"));
      show("#metric-runs", metrics.get("trio_stream_active_runs"));
      show("#metric-tasks", metrics.get("trio_stream_tasks_living"));
    } catch {
      for (const id of ["#metric-streams", "#metric-runs", "#metric-tasks"]) show(id, undefined);
    }
  },

  async loadModels() {
    try {
      const response = await fetch("/v1/models", { headers: headers() });
      if (!response.ok) return;
      const list = $("#models");
      list.replaceChildren();
      for (const model of (await response.json()).data || []) {
        const option = document.createElement("option");
        option.value = String(model.id);
        list.append(option);
      }
    } catch {
      // the datalist is a convenience
    }
  },

  start() {
    const form = store.get("form", {});
    $("#api-key").value = store.get("key", "");
    $("#prompt").value = form.prompt || "Tell me about structured concurrency.";
    $("#model").value = form.model || "";
    $("#panes").value = String(form.panes || 1);
    $("#detach").checked = !!form.detach;
    $("#session").textContent = `session ${tabSession()}`;
    this.setPanes(this.paneCount());
    for (const pane of this.panes) pane.restore();

    $("#send").addEventListener("click", () => this.send());
    $("#stop").addEventListener("click", () => this.panes.forEach((p) => p.stop()));
    $("#prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        this.send();
      }
    });
    $("#api-key").addEventListener("input", () => store.set("key", $("#api-key").value.trim()));
    $("#api-key").addEventListener("change", () => this.loadModels());
    $("#panes").addEventListener("change", () => {
      this.setPanes(this.paneCount());
      this.saveForm();
    });
    for (const id of ["#prompt", "#model", "#detach"]) $(id).addEventListener("change", () => this.saveForm());

    this.loadModels();
    this.pollMetrics();
    setInterval(() => this.pollMetrics(), 1000);
  },
};

/** Prometheus text format: the value of every series without labels, by name. */
export function parsePrometheus(text) {
  const values = new Map();
  const sample = /^([A-Za-z_:][A-Za-z0-9_:]*)(\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?[ \t]+(\S+)/;
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = sample.exec(line);
    if (match && !match[2]) values.set(match[1], Number(match[3]));
  }
  return values;
}

app.start();
