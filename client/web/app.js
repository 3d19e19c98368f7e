/* advanced-trainer · Cloud tab. Plain JS, no build step, no external requests.
 *
 * Works under the server's CSP (script-src 'self', style-src 'self'): no inline script or
 * handlers, no style attributes in markup (only element.style from here). Every request is a
 * same-origin fetch with a JSON body; the API token is sent once, from the token form, and the
 * API never returns it.
 */
"use strict";

(function () {
  const POLL_MS = 1500;
  const VALIDATE_DEBOUNCE_MS = 350;
  const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
  const UPLOAD_CAP = 110 * 1024 * 1024; // the server refuses larger request bodies

  const $ = (sel, root) => (root || document).querySelector(sel);
  const byId = (id) => document.getElementById(id);

  /* ---------------------------------------------------------------- requests -- */

  class ApiError extends Error {
    constructor(status, detail) {
      super(detailText(detail) || `HTTP ${status}`);
      this.status = status;
      this.detail = detail;
      this.problems = detailProblems(detail);
    }
  }

  let authPaused = false;

  async function api(method, path, body) {
    const init = { method, credentials: "same-origin", headers: { accept: "application/json" } };
    if (body !== undefined) {
      init.headers["content-type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, "Cannot reach the local server. Is `advanced-trainer serve` still running?");
    }
    return handle(resp.status, resp.ok, await resp.text());
  }

  function handle(status, ok, text) {
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch (e) { data = text; }
    }
    if (!ok) {
      const detail = data && typeof data === "object" && "detail" in data ? data.detail : (data || `HTTP ${status}`);
      if (status === 401 && /authentication required|log in/i.test(String(detail))) showLogin();
      throw new ApiError(status, detail);
    }
    return data;
  }

  /** A detail (string, {problems}, or FastAPI's list) in words. */
  function detailText(detail) {
    if (detail == null) return "";
    if (typeof detail === "string") return detail;
    const problems = detailProblems(detail);
    if (problems.length) return problems.map((p) => (p.field ? `${p.field}: ${p.message}` : p.message)).join("\n");
    try { return JSON.stringify(detail); } catch (e) { return String(detail); }
  }

  /** [{field, message}] from any detail shape; field is null when none is named. */
  function detailProblems(detail) {
    if (detail == null) return [];
    if (Array.isArray(detail)) {
      return detail.map((d) => ({
        field: Array.isArray(d.loc) ? d.loc.filter((x) => x !== "body").join(".") || null : null,
        message: d.msg || String(d),
      }));
    }
    if (typeof detail === "object") {
      if (Array.isArray(detail.problems)) {
        return detail.problems.map((p) => (typeof p === "string" ? splitKey(p) : { field: p.field || null, message: p.message || "" }));
      }
      return [{ field: null, message: JSON.stringify(detail) }];
    }
    const text = String(detail);
    // "invalid training spec:\n  - steps: ...\n  - lora.rank: ..."
    const bullets = text.split("\n").filter((l) => /^\s*-\s+/.test(l));
    if (bullets.length) return bullets.map((l) => splitKey(l.replace(/^\s*-\s+/, "")));
    // "public_url: ...; webhook_allowed_ips: ..." (settings name every bad key)
    return text.split(/;\s+(?=[A-Za-z_][\w.]*:\s)/).map(splitKey);
  }

  function splitKey(s) {
    const m = /^([A-Za-z_][\w.]*):\s+([\s\S]*)$/.exec(s.trim());
    return m ? { field: m[1], message: m[2] } : { field: null, message: s.trim() };
  }

  /* ----------------------------------------------------------------- helpers -- */

  function setText(el, text) {
    if (el && el.textContent !== text) el.textContent = text;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v == null || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) if (c != null) node.append(c);
    return node;
  }

  function debounce(fn, ms) {
    let t = null;
    return (...args) => {
      clearTimeout(t);
      t = setTimeout(() => fn(...args), ms);
    };
  }

  /** A message in a live region; kind: "ok" | "error" | "info" | "warn". */
  function say(target, text, kind) {
    const node = typeof target === "string" ? byId(target) : target;
    if (!node) return;
    node.classList.remove("is-ok", "is-error", "is-info", "is-warn");
    if (text) node.classList.add(`is-${kind || "info"}`);
    setText(node, text || "");
  }

  function fmtBytes(n) {
    if (n == null) return "?";
    const MiB = 1024 * 1024;
    if (n >= MiB) return `${(n / MiB).toFixed(n >= 10 * MiB ? 0 : 1)} MiB`;
    if (n >= 1024) return `${(n / 1024).toFixed(0)} KiB`;
    return `${n} bytes`;
  }

  function fmtUSD(x) {
    if (x == null || !Number.isFinite(Number(x))) return "—";
    x = Number(x);
    if (x === 0) return "$0.00";
    if (x >= 1) return `$${x.toFixed(2)}`;
    return `$${x.toFixed(x < 0.01 ? 4 : 3)}`;
  }

  function fmtDuration(s) {
    if (s == null || !Number.isFinite(Number(s))) return "—";
    s = Math.max(0, Math.round(Number(s)));
    if (s < 60) return `${s} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min ${s % 60} s`;
    return `${Math.floor(m / 60)} h ${m % 60} min`;
  }

  function parseTime(v) {
    if (!v) return null;
    const d = new Date(String(v).replace(/(\.\d{3})\d+/, "$1"));
    return Number.isNaN(d.getTime()) ? null : d;
  }

  function fmtTime(v) {
    const d = parseTime(v);
    if (!d) return "—";
    const today = new Date().toDateString() === d.toDateString();
    return today
      ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" })
      : d.toLocaleString([], { dateStyle: "medium", timeStyle: "short" });
  }

  function fmtLoss(x) {
    if (x == null || !Number.isFinite(Number(x))) return "—";
    return Number(x).toPrecision(4);
  }

  function announce(text) {
    const a = byId("announcer");
    a.textContent = "";
    setTimeout(() => { a.textContent = text; }, 50);
  }

  /* ------------------------------------------------------------- field errors -- */

  /** Form fields that show server problems beside them: problem field -> element ids. */
  const SPEC_FIELDS = {
    model: "spec-model",
    steps: "spec-steps",
    learning_rate: "spec-lr",
    "lora.rank": "spec-rank",
    "lora.type": "spec-adapter",
    resolutions: "spec-resolutions",
    trigger_word: "spec-trigger",
    spec: "spec-json",
  };
  const SETTINGS_FIELDS = {
    public_url: "public-url",
    webhook_allowed_ips: "allowed-ips",
    trusted_proxies: "trusted-proxies",
  };

  function matchField(field, map) {
    if (!field) return null;
    let best = null;
    for (const key of Object.keys(map)) {
      if ((field === key || field.startsWith(key + ".")) && (!best || key.length > best.length)) best = key;
    }
    return best;
  }

  function setFieldError(key, inputId, message) {
    const input = byId(inputId);
    const err = byId(`err-${key}`);
    if (input) {
      if (message) input.setAttribute("aria-invalid", "true");
      else input.removeAttribute("aria-invalid");
    }
    if (err) say(err, message, "error");
  }

  function clearFieldErrors(map) {
    for (const [key, id] of Object.entries(map)) setFieldError(key, id, "");
  }

  /** Shows problems beside their fields; returns those that have no field on the form. */
  function showProblems(problems, map) {
    const byKey = {};
    const rest = [];
    for (const p of problems) {
      const key = matchField(p.field, map);
      if (key) {
        const sub = p.field !== key ? `${p.field}: ` : "";
        (byKey[key] = byKey[key] || []).push(sub + p.message);
      } else {
        rest.push(p);
      }
    }
    for (const [key, id] of Object.entries(map)) setFieldError(key, id, (byKey[key] || []).join(" · "));
    if (byKey.spec) byId("advanced").open = true;
    return rest;
  }

  function renderGeneral(container, problems, heading) {
    container.replaceChildren();
    container.classList.toggle("has-problems", problems.length > 0);
    if (!problems.length) return;
    container.append(el("p", { class: "problems-title", text: heading }));
    const ul = el("ul");
    for (const p of problems) ul.append(el("li", { text: p.field ? `${p.field}: ${p.message}` : p.message }));
    container.append(ul);
  }

  /* ----------------------------------------------------------------- login -- */

  function showLogin() {
    if (authPaused) return;
    authPaused = true;
    const sec = byId("login");
    sec.hidden = false;
    byId("login-key").focus();
  }

  byId("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const key = byId("login-key").value;
    if (!key) {
      say("login-error", "Enter the API key.", "error");
      return;
    }
    try {
      await api("POST", "/api/session", { api_key: key });
      byId("login-key").value = "";
      say("login-error", "");
      byId("login").hidden = true;
      authPaused = false;
      loadAll();
    } catch (e) {
      say("login-error", e.message, "error");
    }
  });

  /* ----------------------------------------------------------- provider panel -- */

  const state = {
    hardware: [],
    images: null, // from the dataset check; the estimate assumes 20 otherwise
    specOk: null, // the resolved spec of the last good validation
    jobs: new Map(), // id -> record
    rows: new Map(), // id -> <tr>
    openJob: null,
    openJobImages: null, // what the open job's model takes as input images ({max, required})
    filesShown: null,
    logsAt: 0,
    lastStatus: new Map(),
  };

  async function loadStatus() {
    const box = byId("replicate-status");
    const dot = $(".dot", box);
    const text = $(".status-text", box);
    try {
      const s = await api("GET", "/api/cloud/status");
      const ind = s.indicator || "unknown";
      dot.dataset.indicator = ind;
      if (ind === "unknown") {
        setText(text, `Replicate status: unknown (${s.description || "status page unreachable"})`);
      } else {
        setText(text, `Replicate: ${s.description || ind}`);
      }
    } catch (e) {
      dot.dataset.indicator = "unknown";
      setText(text, `Replicate status: unknown (${e.message})`);
    }
  }

  function tokenWords(t) {
    if (!t) return "Unknown.";
    if (t.set && t.source) return `Set (from the ${t.source}).`;
    if (t.problem) return t.problem;
    return "Not set: save one below or set REPLICATE_API_TOKEN where the server runs.";
  }

  async function loadProvider() {
    try {
      const data = await api("GET", "/api/cloud/providers/replicate");
      say("token-status", tokenWords(data.token), data.token && data.token.set ? "ok" : "warn");
      fillSettings(data.settings || {}, data.webhook_url);
      return data.settings || {};
    } catch (e) {
      say("token-status", e.message, "error");
      return {};
    }
  }

  byId("validate-btn").addEventListener("click", async () => {
    const btn = byId("validate-btn");
    btn.disabled = true;
    say("account-out", "Checking the token with Replicate…", "info");
    try {
      const r = await api("GET", "/api/cloud/providers/replicate/validate");
      if (r.ok && r.account) {
        const a = r.account;
        const who = a.name && a.name !== a.username ? `${a.name} (${a.username})` : a.username || a.name || "?";
        say("account-out", `Signed in as ${who}${a.type ? `, ${a.type} account` : ""}.`, "ok");
      } else {
        say("account-out", r.problem || "The token was not accepted.", "error");
      }
      if (r.token) say("token-status", tokenWords(r.token), r.token.set ? "ok" : "warn");
    } catch (e) {
      say("account-out", e.message, "error");
    } finally {
      btn.disabled = false;
    }
  });

  byId("token-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const input = byId("token-input");
    const value = input.value.trim();
    if (!value) {
      say("token-error", "Paste a token first (it starts with r8_).", "error");
      input.setAttribute("aria-invalid", "true");
      return;
    }
    try {
      const r = await api("PUT", "/api/cloud/providers/replicate/token", { token: value });
      input.value = "";
      input.removeAttribute("aria-invalid");
      say("token-error", r.warning ? `Saved, but: ${r.warning}` : "Token saved.", r.warning ? "warn" : "ok");
      say("token-status", tokenWords(r.token), r.token && r.token.set ? "ok" : "warn");
      loadVersions();
    } catch (e) {
      input.setAttribute("aria-invalid", "true");
      say("token-error", e.message, "error");
    }
  });

  byId("token-delete").addEventListener("click", async () => {
    try {
      const r = await api("DELETE", "/api/cloud/providers/replicate/token");
      let msg = r.deleted ? "Saved token deleted." : "There was no saved token to delete.";
      if (r.token && r.token.set && r.token.source === "environment") {
        msg += " The server still uses REPLICATE_API_TOKEN from its environment.";
      }
      say("token-error", msg, r.deleted ? "ok" : "info");
      say("token-status", tokenWords(r.token), r.token && r.token.set ? "ok" : "warn");
    } catch (e) {
      say("token-error", e.message, "error");
    }
  });

  async function loadVersions() {
    const list = byId("versions-list");
    say("versions-msg", "Loading…", "info");
    try {
      const r = await api("GET", "/api/cloud/providers/replicate/versions");
      setText(byId("versions-model"), r.model ? `Model ${r.model}` : "");
      list.replaceChildren();
      const versions = r.versions || [];
      versions.forEach((v, i) => list.append(versionItem(v, r.pinned === v.id, i === 0)));
      if (r.pinned && !versions.some((v) => v.id === r.pinned)) {
        list.append(versionItem({ id: r.pinned, created_at: null }, true, false, true));
      }
      if (!versions.length) say("versions-msg", "This model has no versions yet.", "warn");
      else if (r.pinned) say("versions-msg", "Jobs use the pinned version.", "info");
      else say("versions-msg", "Nothing pinned: jobs use the latest version.", "info");
    } catch (e) {
      list.replaceChildren();
      say("versions-msg", e.message, "error");
    }
  }

  function versionItem(v, pinned, latest, missing) {
    const short = v.id.slice(0, 12);
    const li = el("li", { class: pinned ? "version is-pinned" : "version" });
    const label = el("span", { class: "version-id" }, el("code", { title: v.id, text: short }));
    if (latest) label.append(el("span", { class: "tag", text: "latest" }));
    if (pinned) label.append(el("span", { class: "tag tag-pinned", text: "pinned" }));
    if (missing) label.append(el("span", { class: "tag", text: "not listed" }));
    li.append(label);
    const created = parseTime(v.created_at);
    li.append(el("span", { class: "help", text: created ? created.toLocaleDateString() : "" }));
    const btn = el("button", {
      type: "button",
      class: "small",
      "aria-label": `${pinned ? "Unpin" : "Pin"} version ${short}`,
      text: pinned ? "Unpin" : "Pin",
    });
    btn.addEventListener("click", async () => {
      btn.disabled = true;
      try {
        await api("PUT", "/api/cloud/providers/replicate", { version: pinned ? null : v.id });
        await loadVersions();
        say("versions-msg", pinned ? "Unpinned: jobs use the latest version." : `Pinned ${short}.`, "ok");
      } catch (e) {
        btn.disabled = false;
        say("versions-msg", e.message, "error");
      }
    });
    li.append(btn);
    return li;
  }
  byId("versions-refresh").addEventListener("click", loadVersions);

  async function loadHardware(defaultSku) {
    const sel = byId("hardware");
    try {
      const r = await api("GET", "/api/cloud/providers/replicate/hardware");
      const items = Array.isArray(r) ? r : r.hardware || [];
      state.hardware = items;
      sel.replaceChildren();
      for (const h of items) {
        const price = h.usd_per_hour != null ? ` — $${Number(h.usd_per_hour).toFixed(2)}/h` : "";
        sel.append(el("option", { value: h.sku, text: `${h.name || h.sku}${price}` }));
      }
      if (defaultSku && items.some((h) => h.sku === defaultSku)) sel.value = defaultSku;
      showTrainerModel();
      say("hardware-error", "");
    } catch (e) {
      say("hardware-error", e.message, "error");
    }
  }
  // a Replicate model has one hardware setting: each SKU trains through its profile's model
  function showTrainerModel() {
    const h = state.hardware.find((x) => x.sku === byId("hardware").value);
    setText(byId("hardware-model"), h && h.trainer_model ? `Trains with ${h.trainer_model}` : "");
  }
  byId("hardware").addEventListener("change", () => {
    showTrainerModel();
    updateEstimate();
  });

  async function updateEstimate() {
    const out = byId("estimate-out");
    const near = byId("submit-estimate");
    const sku = byId("hardware").value;
    if (!state.specOk || !sku) {
      say(out, state.specOk ? "" : "The estimate appears once the spec is valid.", "info");
      setText(near, "");
      return;
    }
    const images = state.images || 20;
    try {
      const r = await api("POST", "/api/cloud/estimate", { spec: state.specOk, hardware: sku, images });
      const e = (r.estimates || []).find((x) => x.hardware === sku) || (r.estimates || [])[0];
      if (!e) return;
      const basis = state.images ? `for ${images} images` : "assuming 20 images";
      const hw = (state.hardware.find((h) => h.sku === sku) || {}).name || sku;
      const source = e.source ? `; ${e.source}, ±${Math.round((e.expected_error || 0) * 100)}%` : "";
      const alt = e.same_images_fewer_steps;
      const fewer = alt
        ? ` The same images in ${alt.steps} steps on these ${e.gpus} GPUs: ${fmtDuration(alt.seconds)}, about ${fmtUSD(alt.usd)}.`
        : "";
      say(out, `Estimated ${fmtDuration(e.seconds)} on ${hw}, about ${fmtUSD(e.usd)} (${e.steps} steps, ${basis}${source}).${fewer}`, "info");
      setText(near, `Estimated ${fmtDuration(e.seconds)} · ${fmtUSD(e.usd)}`);
    } catch (e) {
      say(out, e.message, "error");
      setText(near, "");
    }
  }

  /* ----------------------------------------------------------------- submit -- */

  function specInput(id) {
    return byId(id);
  }

  function numberOrRaw(s) {
    const t = s.trim();
    const n = Number(t);
    return t !== "" && Number.isFinite(n) ? n : t;
  }

  /** {spec} or {error} from the JSON textarea plus the fields that are filled in. */
  function buildSpec() {
    const raw = byId("spec-json").value.trim();
    let spec = {};
    let base = {};
    if (raw) {
      try {
        spec = JSON.parse(raw);
        base = JSON.parse(raw);
      } catch (e) {
        return { error: `Not valid JSON: ${e.message}` };
      }
      if (spec === null || typeof spec !== "object" || Array.isArray(spec)) {
        return { error: "The spec must be a JSON object: { … }" };
      }
    }
    const model = specInput("spec-model").value;
    if (model) spec.model = model;
    const steps = specInput("spec-steps");
    if (steps.validity && steps.validity.badInput) return { error: null, local: { steps: "Enter a whole number." } };
    if (steps.value.trim()) spec.steps = numberOrRaw(steps.value);
    const lr = specInput("spec-lr").value;
    if (lr.trim()) spec.learning_rate = numberOrRaw(lr);
    const rank = specInput("spec-rank");
    if (rank.validity && rank.validity.badInput) return { error: null, local: { "lora.rank": "Enter a whole number." } };
    const adapter = specInput("spec-adapter").value;
    if (rank.value.trim() || adapter) {
      spec.lora = spec.lora && typeof spec.lora === "object" && !Array.isArray(spec.lora) ? { ...spec.lora } : {};
      if (rank.value.trim()) spec.lora.rank = numberOrRaw(rank.value);
      if (adapter) spec.lora.type = adapter;
    }
    const res = specInput("spec-resolutions").value;
    if (res.trim()) spec.resolutions = res.trim();
    const trig = specInput("spec-trigger").value;
    if (trig.trim()) spec.trigger_word = trig;
    return { spec, fromJson: JSON.parse(JSON.stringify(base)) };
  }

  let validateSeq = 0;

  async function validateSpec() {
    const seq = ++validateSeq;
    const built = buildSpec();
    const general = byId("spec-general");
    if (built.error || built.local) {
      state.specOk = null;
      const problems = built.error ? [{ field: "spec", message: built.error }]
        : Object.entries(built.local).map(([field, message]) => ({ field, message }));
      renderGeneral(general, showProblems(problems, SPEC_FIELDS), "Spec problems:");
      say("spec-ok", "");
      updateEstimate();
      return null;
    }
    try {
      const r = await api("POST", "/api/cloud/spec/validate", { spec: built.spec });
      if (seq !== validateSeq) return null;
      state.specOk = built.spec;
      clearFieldErrors(SPEC_FIELDS);
      renderGeneral(general, [], "");
      showResolved(r.spec || {}, built.fromJson || {});
      updateEstimate();
      return r.spec;
    } catch (e) {
      if (seq !== validateSeq) return null;
      state.specOk = null;
      say("spec-ok", "");
      const problems = e.problems.length ? e.problems : [{ field: null, message: e.message }];
      renderGeneral(general, showProblems(problems, SPEC_FIELDS), "Spec problems:");
      updateEstimate();
      return null;
    }
  }

  /** "Spec OK" plus the resolved values as placeholders of the empty fields, saying where they come from. */
  function showResolved(s, json) {
    const ph = [
      ["spec-steps", s.steps, "steps" in json],
      ["spec-lr", s.learning_rate, "learning_rate" in json],
      ["spec-rank", s.lora && s.lora.rank, !!(json.lora && typeof json.lora === "object" && "rank" in json.lora)],
      ["spec-resolutions", Array.isArray(s.resolutions) ? s.resolutions.join(",") : s.resolutions, "resolutions" in json],
    ];
    for (const [id, v, given] of ph) if (v != null) byId(id).placeholder = `${v} (${given ? "from the JSON" : "default"})`;
    const opt = $('#spec-model option[value=""]');
    if (s.model) setText(opt, `Default (${s.model})`);
    const parts = [
      s.model,
      s.steps != null ? `${s.steps} steps` : null,
      s.learning_rate != null ? `lr ${s.learning_rate}` : null,
      s.lora && s.mode !== "full" ? `${s.lora.type && s.lora.type !== "lora" ? `${s.lora.type} ` : ""}rank ${s.lora.rank}` : s.mode,
      Array.isArray(s.resolutions) ? `${s.resolutions.join("/")} px` : null,
      s.trigger_word ? `trigger “${s.trigger_word}”` : null,
    ].filter(Boolean);
    say("spec-ok", `Spec OK: ${parts.join(" · ")}`, "ok");
  }

  const validateSoon = debounce(validateSpec, VALIDATE_DEBOUNCE_MS);
  for (const id of ["spec-model", "spec-steps", "spec-lr", "spec-rank", "spec-adapter", "spec-resolutions", "spec-trigger", "spec-json"]) {
    byId(id).addEventListener("input", validateSoon);
    byId(id).addEventListener("change", validateSoon);
  }

  // Dataset: a path on the server's machine, checked for its packed size.
  let inspectSeq = 0;

  async function inspectDataset() {
    const path = byId("dataset-path").value.trim();
    const info = byId("dataset-info");
    const seq = ++inspectSeq;
    byId("dataset-path").removeAttribute("aria-invalid");
    if (!path) {
      info.hidden = true;
      say("dataset-error", "");
      state.images = null;
      updateEstimate();
      return;
    }
    say("dataset-error", "Checking the dataset…", "info");
    try {
      const r = await api("POST", "/api/cloud/datasets/inspect", { path });
      if (seq !== inspectSeq) return;
      say("dataset-error", "");
      showPack(r);
      state.images = r.images || null;
      updateEstimate();
    } catch (e) {
      if (seq !== inspectSeq) return;
      info.hidden = true;
      byId("dataset-path").setAttribute("aria-invalid", "true");
      say("dataset-error", e.message.replace(/^path:\s*/, ""), "error");
    }
  }

  function showPack(r) {
    const info = byId("dataset-info");
    const limit = r.limit_bytes || 100 * 1024 * 1024;
    const bytes = r.bytes || 0;
    const pct = Math.min(100, (bytes / limit) * 100);
    const meter = byId("pack-meter");
    meter.setAttribute("aria-valuemax", String(limit));
    meter.setAttribute("aria-valuenow", String(Math.min(bytes, limit)));
    meter.setAttribute("aria-valuetext", `${fmtBytes(bytes)} of ${fmtBytes(limit)}`);
    meter.classList.toggle("is-over", !!r.over_limit);
    meter.classList.toggle("is-high", !r.over_limit && pct > 80);
    $(".meter-fill", meter).style.width = `${Math.max(pct, bytes > 0 ? 1 : 0)}%`;
    const what = r.kind === "zip" ? "Zip" : "Packed size";
    const imgs = r.images != null ? ` · ${r.images} image${r.images === 1 ? "" : "s"}` : "";
    const over = r.over_limit ? ` — over the limit by ${fmtBytes(bytes - limit)}` : "";
    setText(byId("pack-label"), `${what}: ${fmtBytes(bytes)} of the ${fmtBytes(limit)} upload limit (${pct > 0 && pct < 0.1 ? "<0.1" : pct.toFixed(pct < 10 ? 1 : 0)}%)${imgs}${over}`);
    const largest = byId("pack-largest");
    const ul = $("ul", largest);
    ul.replaceChildren();
    for (const f of (r.over_limit ? r.largest || [] : [])) {
      ul.append(el("li", {}, el("code", { text: f.path }), ` ${fmtBytes(f.bytes)}`));
    }
    largest.hidden = !ul.children.length;
    info.hidden = false;
  }

  byId("dataset-check").addEventListener("click", inspectDataset);
  byId("dataset-path").addEventListener("change", inspectDataset);
  byId("dataset-path").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter") {
      ev.preventDefault();
      inspectDataset();
    }
  });

  byId("dataset-file").addEventListener("change", () => {
    const input = byId("dataset-file");
    const file = input.files && input.files[0];
    if (!file) return;
    if (file.size > UPLOAD_CAP) {
      say("upload-status", `${file.name} is ${fmtBytes(file.size)}; the server accepts uploads up to ${fmtBytes(UPLOAD_CAP)}.`, "error");
      return;
    }
    const form = new FormData();
    form.append("file", file, file.name);
    const xhr = new XMLHttpRequest(); // fetch() reports no upload progress
    xhr.open("POST", "/api/cloud/datasets");
    xhr.withCredentials = true;
    xhr.setRequestHeader("accept", "application/json");
    xhr.upload.addEventListener("progress", (ev) => {
      if (ev.lengthComputable) {
        say("upload-status", `Uploading ${file.name}: ${Math.round((ev.loaded / ev.total) * 100)}%`, "info");
      }
    });
    xhr.addEventListener("load", () => {
      try {
        const r = handle(xhr.status, xhr.status >= 200 && xhr.status < 300, xhr.responseText);
        say("upload-status", `Uploaded ${file.name} (${fmtBytes(r.bytes)}).`, r.over_limit ? "warn" : "ok");
        byId("dataset-path").value = r.path;
        inspectDataset();
      } catch (e) {
        say("upload-status", `Upload failed: ${e.message}`, "error");
      }
    });
    xhr.addEventListener("error", () => say("upload-status", "Upload failed: the server could not be reached.", "error"));
    say("upload-status", `Uploading ${file.name}…`, "info");
    xhr.send(form);
  });

  byId("submit-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const msg = byId("submit-msg");
    msg.replaceChildren();
    msg.className = "message";
    const built = buildSpec();
    if (built.error || built.local || !(await validateSpec())) {
      say(msg, "Fix the spec first (see the messages above).", "error");
      const bad = document.querySelector("#submit-form [aria-invalid='true']");
      if (bad) bad.focus();
      return;
    }
    const dataset = byId("dataset-path").value.trim();
    if (!dataset) {
      byId("dataset-path").setAttribute("aria-invalid", "true");
      say("dataset-error", "Choose a dataset: a folder or .zip path, or upload a .zip.", "error");
      say(msg, "Choose a dataset first.", "error");
      byId("dataset-path").focus();
      return;
    }
    const body = { spec: built.spec, dataset, hardware: byId("hardware").value || undefined };
    const dest = byId("destination").value.trim();
    if (dest) body.destination = dest;
    if (byId("fit").checked) body.fit = true;
    setFieldError("destination", "destination", "");
    const btn = byId("submit-btn");
    btn.disabled = true;
    btn.setAttribute("aria-busy", "true");
    say(msg, "Packing, uploading and submitting… (large datasets take a while)", "info");
    try {
      const r = await api("POST", "/api/cloud/jobs/submit", body);
      const job = r.job || {};
      msg.replaceChildren();
      say(msg, `Submitted job ${job.id} (${job.kind || "job"}, estimated ${fmtUSD(r.estimate_usd)}). It appears in the jobs list below.`, "ok");
      for (const w of r.warnings || []) msg.append(el("span", { class: "warn-line", text: `Warning: ${w}` }));
      if (job.id) {
        state.jobs.set(job.id, job);
        renderJobs([...state.jobs.values()]);
      }
      pollJobs(true);
    } catch (e) {
      const problems = e.problems || [];
      const specProblems = problems.filter((p) => matchField(p.field, SPEC_FIELDS));
      if (specProblems.length) showProblems(specProblems, SPEC_FIELDS);
      const destProblem = problems.find((p) => p.field === "destination");
      if (destProblem) setFieldError("destination", "destination", destProblem.message);
      const dsProblem = problems.find((p) => p.field === "dataset");
      if (dsProblem || e.status === 413) say("dataset-error", dsProblem ? dsProblem.message : e.message, "error");
      const prefix = {
        400: "Not submitted",
        401: "Not submitted (token)",
        402: "Not submitted: Replicate needs payment details or credit",
        413: "Not submitted: the dataset is too large",
        422: "Not submitted",
        502: "Not submitted: Replicate failed",
      }[e.status] || "Not submitted";
      say(msg, `${prefix}: ${e.message}`, "error");
    } finally {
      btn.disabled = false;
      btn.removeAttribute("aria-busy");
    }
  });

  /* ------------------------------------------------------------------ jobs -- */

  function costCell(j) {
    if (TERMINAL.has(j.status) && j.cost_usd != null) return fmtUSD(j.cost_usd);
    if (j.estimate_usd != null) return `≈ ${fmtUSD(j.estimate_usd)} est.`;
    return "—";
  }

  function progressText(j) {
    if (j.total) return `${j.step || 0} / ${j.total}`;
    if (j.step) return String(j.step);
    return j.phase || "—";
  }

  function etaText(j) {
    if (TERMINAL.has(j.status)) return "—";
    return j.eta_s != null ? fmtDuration(j.eta_s) : "—";
  }

  function statusBadge(status) {
    return el("span", { class: `badge badge-${status}`, text: status });
  }

  function makeRow(j) {
    const tr = el("tr", { "data-id": j.id });
    const open = el("button", { type: "button", class: "link job-open", text: j.id });
    open.addEventListener("click", () => openJob(j.id, true));
    // each cell holds one wrapper, so a narrow window can show it beside its label
    const cell = (label, cls, ...kids) => el("td", { "data-label": label, class: cls }, el("div", { class: "cell" }, ...kids));
    tr.append(
      cell("Job", "c-job", open, el("span", { class: "kind" })),
      cell("Status", "c-status"),
      cell("Progress", "c-progress", el("span", { class: "progress-text" }),
        el("span", { class: "mini-bar", "aria-hidden": "true" }, el("span", { class: "mini-fill" }))),
      cell("Loss", "c-loss num"),
      cell("ETA", "c-eta num"),
      cell("Cost", "c-cost num"),
      cell("Created", "c-created"),
    );
    // a click anywhere on the row opens it too (the button is the keyboard route)
    tr.addEventListener("click", (ev) => {
      if (!(ev.target instanceof HTMLButtonElement)) openJob(j.id, false);
    });
    return tr;
  }

  function updateRow(tr, j) {
    tr.dataset.status = j.status;
    setText($(".kind", tr), j.destination ? ` ${j.kind} → ${j.destination}` : ` ${j.kind || ""}`);
    const st = $(".c-status .cell", tr);
    if (st.textContent !== j.status) st.replaceChildren(statusBadge(j.status));
    setText($(".progress-text", tr), progressText(j));
    const pct = j.total ? Math.min(100, ((j.step || 0) / j.total) * 100) : 0;
    $(".mini-fill", tr).style.width = `${pct}%`;
    $(".mini-bar", tr).hidden = !j.total;
    setText($(".c-loss .cell", tr), fmtLoss(j.loss));
    setText($(".c-eta .cell", tr), etaText(j));
    setText($(".c-cost .cell", tr), costCell(j));
    setText($(".c-created .cell", tr), fmtTime(j.created_at));
    if (j.error) tr.title = j.error;
    else if (j.publish_failed) tr.title = `publish failed: ${j.publish_failed}`;
    if (state.openJob === j.id) tr.setAttribute("aria-current", "true");
    else tr.removeAttribute("aria-current");
  }

  function renderJobs(jobs) {
    const tbody = $("#jobs-table tbody");
    const seen = new Set();
    jobs.sort((a, b) => String(b.created_at || "").localeCompare(String(a.created_at || "")));
    let prev = null;
    for (const j of jobs) {
      seen.add(j.id);
      let tr = state.rows.get(j.id);
      if (!tr) {
        tr = makeRow(j);
        state.rows.set(j.id, tr);
      }
      updateRow(tr, j);
      const want = prev ? prev.nextSibling : tbody.firstChild;
      if (want !== tr) tbody.insertBefore(tr, want);
      prev = tr;
      const before = state.lastStatus.get(j.id);
      if (before && before !== j.status) announce(`Job ${j.id} is ${j.status}.`);
      state.lastStatus.set(j.id, j.status);
    }
    for (const [id, tr] of state.rows) {
      if (!seen.has(id)) {
        tr.remove();
        state.rows.delete(id);
      }
    }
    byId("jobs-empty").hidden = jobs.length > 0;
    byId("jobs-table").hidden = jobs.length === 0;
  }

  let pollTimer = null;
  let polling = false;

  async function pollJobs(now) {
    if (now) clearTimeout(pollTimer);
    if (polling) return;
    polling = true;
    try {
      if (!authPaused) {
        const r = await api("GET", "/api/cloud/jobs?limit=50");
        const jobs = r.jobs || [];
        state.jobs = new Map(jobs.map((j) => [j.id, j]));
        renderJobs(jobs);
        say("jobs-msg", "");
        setText(byId("jobs-updated"), `Updated ${new Date().toLocaleTimeString()}`);
        if (state.openJob) await refreshJobView();
      }
    } catch (e) {
      say("jobs-msg", `Could not update the jobs: ${e.message}`, "error");
    } finally {
      polling = false;
      clearTimeout(pollTimer);
      pollTimer = setTimeout(pollJobs, document.hidden ? POLL_MS * 4 : POLL_MS);
    }
  }

  /* --------------------------------------------------------------- job view -- */

  function openJob(id, focus) {
    state.openJob = id;
    state.filesShown = null;
    state.logsAt = 0;
    const view = byId("job-view");
    view.hidden = false;
    setText(byId("job-title"), `Job ${id}`);
    byId("job-details").replaceChildren();
    byId("job-error").hidden = true;
    byId("job-cancel").hidden = true; // shown once the job is known to be unfinished
    byId("job-resume").hidden = true; // failed or canceled jobs
    byId("job-continue").hidden = true; // succeeded resumable jobs
    byId("job-selection").hidden = true;
    byId("job-sheet").replaceChildren();
    byId("try-step-field").hidden = true;
    byId("try-step").replaceChildren();
    byId("job-outputs").hidden = true;
    byId("job-loss").replaceChildren();
    byId("job-samples").replaceChildren();
    byId("job-files").replaceChildren();
    byId("job-try").hidden = true;
    byId("try-images").replaceChildren();
    byId("try-image-field").hidden = true;
    byId("try-image").value = "";
    byId("try-frames-field").hidden = true;
    byId("try-frames").value = "";
    say("try-msg", "");
    setText(byId("job-logs"), "Loading the log…");
    say("job-msg", "");
    say("job-outputs-msg", "");
    for (const [rid, tr] of state.rows) {
      if (rid === id) tr.setAttribute("aria-current", "true");
      else tr.removeAttribute("aria-current");
    }
    refreshJobView(true);
    view.scrollIntoView({ block: "start", behavior: "auto" });
    if (focus !== false) byId("job-title").focus({ preventScroll: true });
  }

  byId("job-close").addEventListener("click", () => {
    const id = state.openJob;
    state.openJob = null;
    byId("job-view").hidden = true;
    const tr = state.rows.get(id);
    if (tr) {
      tr.removeAttribute("aria-current");
      $(".job-open", tr).focus();
    }
  });

  function detailRow(dl, term, value) {
    dl.append(el("div", { class: "detail" }, el("dt", { text: term }), el("dd", {}, value)));
  }

  async function refreshJobView(first) {
    const id = state.openJob;
    if (!id) return;
    let j = state.jobs.get(id);
    if (!j || first) {
      try {
        j = (await api("GET", `/api/cloud/jobs/${encodeURIComponent(id)}`)).job;
      } catch (e) {
        say("job-msg", e.message, "error");
        return;
      }
    }
    if (state.openJob !== id || !j) return;
    const key = [j.status, j.step, j.total, j.loss, j.eta_s, j.cost_usd, j.estimate_usd, j.error, j.completed_at].join("|");
    const dl = byId("job-details");
    if (first || state.viewKey !== key) {
      state.viewKey = key;
      fillJobDetails(dl, j);
    }
    const finished = TERMINAL.has(j.status);
    const cancel = byId("job-cancel");
    cancel.disabled = finished;
    cancel.hidden = finished;
    byId("job-resume").hidden = !(j.status === "failed" || j.status === "canceled");
    byId("job-continue").hidden = !(j.status === "succeeded" && j.spec && j.spec.resumable);

    // the log: every ~3 s while the job runs, once more when it ends
    const now = Date.now();
    if (first || (!finished && now - state.logsAt > 3000) || (finished && state.logsFinal !== id)) {
      state.logsAt = now;
      if (finished) state.logsFinal = id;
      loadLogs(id);
    }
    if (j.status === "succeeded") {
      if (state.filesShown !== id) loadFiles(id);
      const tryBox = byId("job-try");
      if (tryBox.hidden) {
        tryBox.hidden = false;
        const prompt = byId("try-prompt");
        if (!prompt.value) prompt.value = tryPrompt(j);
        const images = j.input_images || { max: 0, required: false };
        state.openJobImages = images;
        const field = byId("try-image-field");
        field.hidden = !images.max;
        byId("try-image").multiple = images.max > 1;
        const label = images.first_frame ? "First frame to animate"
          : images.required ? "Image to edit" : "Reference images (optional)";
        setText(byId("try-image-label"), label);
        const frames = images.frames;
        byId("try-frames-field").hidden = !frames;
        if (frames) {
          const input = byId("try-frames");
          input.step = frames.step;
          input.max = frames.max;
          input.placeholder = String(frames.max);
          setText(byId("try-frames-help"),
            `${frames.step}k+1 up to ${frames.max} (empty: ${frames.max}); fewer frames render sooner.`);
        }
      }
    } else {
      byId("job-try").hidden = true;
      byId("job-outputs").hidden = true;
      say("job-outputs-msg", finished ? "This job has no outputs." : "", "info");
    }
  }

  function fillJobDetails(dl, j) {
    dl.replaceChildren();
    detailRow(dl, "Status", statusBadge(j.status));
    detailRow(dl, "Kind", j.destination ? `${j.kind} → ${j.destination}` : j.kind || "—");
    detailRow(dl, "Progress", progressText(j));
    detailRow(dl, "Loss", fmtLoss(j.loss));
    detailRow(dl, "ETA", etaText(j));
    detailRow(dl, TERMINAL.has(j.status) && j.cost_usd != null ? "Cost" : "Cost (estimate)", costCell(j));
    detailRow(dl, "Hardware", j.hardware || "—");
    if (j.parent_id) detailRow(dl, j.relation === "continue" ? "Continues" : "Resumes", j.parent_id);
    detailRow(dl, "Created", fmtTime(j.created_at));
    if (j.completed_at) detailRow(dl, "Finished", fmtTime(j.completed_at));
    if (j.publish_failed) detailRow(dl, "Publish", `publish failed: ${j.publish_failed} (the weights are in the outputs)`);
    const err = byId("job-error");
    err.hidden = !j.error;
    setText(err, j.error ? `Error: ${j.error}` : "");
  }

  async function loadLogs(id) {
    try {
      const r = await api("GET", `/api/cloud/jobs/${encodeURIComponent(id)}/logs`);
      if (state.openJob !== id) return;
      const pre = byId("job-logs");
      const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24;
      setText(pre, r.logs || "(no log yet)");
      if (atBottom) pre.scrollTop = pre.scrollHeight;
    } catch (e) {
      if (state.openJob === id) setText(byId("job-logs"), `Could not load the log: ${e.message}`);
    }
  }

  let filesLoading = false;

  async function loadFiles(id) {
    if (filesLoading) return;
    filesLoading = true;
    try {
      const r = await api("GET", `/api/cloud/jobs/${encodeURIComponent(id)}/files`);
      if (state.openJob !== id) return;
      const files = r.files || [];
      if (!files.length) {
        say("job-outputs-msg", "Downloading the outputs to this machine…", "info");
        return; // try again on the next poll
      }
      state.filesShown = id;
      renderFiles(files);
      renderSelection(r.selection);
      say("job-outputs-msg", "");
    } catch (e) {
      say("job-outputs-msg", e.message, "error");
    } finally {
      filesLoading = false;
    }
  }

  function isVideo(url) {
    return /\.(mp4|webm)(\?|#|$)/i.test(url);
  }

  // a video that plays in place (muted, looping: a validation clip is a few seconds long)
  function videoEl(url, label, cls) {
    return el("video", { src: url, controls: "", muted: "", loop: "", playsinline: "", preload: "metadata",
      "aria-label": label, class: cls });
  }

  function renderFiles(files) {
    const loss = byId("job-loss");
    const gallery = byId("job-samples");
    const list = byId("job-files");
    loss.replaceChildren();
    gallery.replaceChildren();
    list.replaceChildren();
    // a video model's validation renders: the .mp4 (played here) and its frame strip (.png, for the
    // contact sheet); the strip is shown only where there is no video of the same render
    const videos = new Set(files.filter((f) => /^samples\/.+\.mp4$/i.test(f.path)).map((f) => f.path.replace(/\.mp4$/i, "")));
    const samples = files.filter((f) => /^samples\/.+\.(png|jpe?g|webp|mp4)$/i.test(f.path)
      && (/\.mp4$/i.test(f.path) || !videos.has(f.path.replace(/\.[^.]+$/, ""))));
    const lossFile = files.find((f) => f.path === "loss.png");
    if (lossFile) {
      loss.append(el("figure", {},
        el("img", { src: lossFile.url, alt: "Training loss by step", class: "loss-img", id: "job-loss-img" }),
        el("figcaption", { text: "Loss by step" })));
    } else {
      loss.append(el("p", { class: "help", text: "No loss curve in the outputs." }));
    }
    for (const f of samples) {
      const name = f.path.replace(/^samples\//, "");
      const m = /step-0*(\d+)-(\d+)/.exec(name);
      const caption = m ? `Step ${m[1]}, prompt ${Number(m[2]) + 1}` : name;
      gallery.append(el("figure", { class: "sample" },
        isVideo(f.url)
          ? videoEl(f.url, `Validation video: ${caption}`, "sample-img")
          : el("a", { href: f.url, target: "_blank", rel: "noopener" },
            el("img", { src: f.url, alt: `Validation image: ${caption}`, class: "sample-img" })),
        el("figcaption", { text: caption })));
    }
    const videoJob = samples.length > 0 && samples.every((f) => isVideo(f.url));
    setText(byId("job-samples-title"), videoJob ? "Validation videos" : "Validation images");
    if (!samples.length) gallery.append(el("p", { class: "help", text: "No validation images in the outputs." }));
    // tries/ are renders of "try it"; steps/ are listed by step under "Which step"
    const rest = files.filter((f) => f !== lossFile && !samples.includes(f) && !/^(tries|steps)\//.test(f.path));
    for (const f of rest) {
      const base = f.path.split("/").pop();
      list.append(el("li", {},
        el("a", { href: f.url, download: base, text: f.path }),
        el("span", { class: "help", text: ` ${fmtBytes(f.bytes)}` })));
    }
    byId("job-outputs").hidden = false;
  }

  function renderSelection(sel) {
    const box = byId("job-selection");
    const sheet = byId("job-sheet");
    const pick = byId("try-step");
    sheet.replaceChildren();
    pick.replaceChildren();
    const steps = Object.keys((sel && sel.kept_steps) || {});
    box.hidden = !(sel && (sel.contact_sheet || sel.chosen_step != null));
    if (box.hidden) return;
    setText(byId("job-choice"), sel.chosen_step != null
      ? `These weights are step ${sel.chosen_step}: ${sel.selection_reason || ""}`
      : "No step was chosen.");
    if (sel.contact_sheet) {
      sheet.append(el("figure", {},
        el("a", { href: sel.contact_sheet, target: "_blank", rel: "noopener" },
          el("img", { src: sel.contact_sheet, id: "job-sheet-img", class: "sheet-img",
            alt: `Contact sheet: each validation prompt at each kept step; step ${sel.chosen_step} is framed` })),
        el("figcaption", { text: "Prompts × steps; the chosen step is framed, its scores under each column" })));
    }
    if (steps.length) {
      const list = el("ul", { class: "files", id: "job-steps" });
      for (const step of steps) {
        const mark = String(sel.chosen_step) === step ? " (chosen: the top-level files)" : "";
        list.append(el("li", {}, el("a", { href: sel.kept_steps[step], download: `step-${step}.safetensors`,
          text: `Step ${step}: pytorch_lora_weights.safetensors` }), el("span", { class: "help", text: mark })));
      }
      sheet.append(list);
    }
    byId("try-step-field").hidden = steps.length < 2;
    for (const step of steps) {
      const chosen = String(sel.chosen_step) === step;
      pick.append(el("option", { value: chosen ? "" : step, text: chosen ? `${step} (chosen)` : step }));
      if (chosen) pick.lastChild.selected = true;
    }
  }

  async function carryOn(action, body, btn) {
    const id = state.openJob;
    if (!id) return;
    btn.disabled = true;
    say("job-msg", action === "resume" ? "Submitting the resumed job…" : "Submitting the continued job…", "info");
    try {
      const r = await api("POST", `/api/cloud/jobs/${encodeURIComponent(id)}/${action}`, body);
      state.jobs.set(r.job.id, r.job);
      renderJobs([...state.jobs.values()]);
      openJob(r.job.id, false); // the new job's view, which says where it came from
      say("job-msg", `Submitted ${r.job.id}, which ${action}s ${id} (estimate ${fmtUSD(r.estimate_usd)}).`, "ok");
    } catch (e) {
      say("job-msg", `Could not ${action}: ${e.message}`, "error");
    } finally {
      btn.disabled = false;
    }
  }

  byId("job-resume").addEventListener("click", () => carryOn("resume", {}, byId("job-resume")));

  byId("job-continue").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const steps = Number(byId("continue-steps").value);
    const bad = !(Number.isInteger(steps) && steps >= 1);
    setFieldError("continue-steps", "continue-steps", bad ? "A whole number of steps, 1 or more." : "");
    if (!bad) carryOn("continue", { steps }, byId("continue-btn"));
  });

  /* ------------------------------------------------------------------ try it -- */

  function readDataUri(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  function tryPrompt(j) {
    let trigger = "";
    try {
      trigger = (j.spec && j.spec.trigger_word) || "";
    } catch (e) { /* no spec: no trigger word */ }
    return trigger ? `a photo of ${trigger}` : "";
  }

  byId("try-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const id = state.openJob;
    if (!id) return;
    const prompt = byId("try-prompt").value.trim();
    const seedText = byId("try-seed").value.trim();
    setFieldError("try-prompt", "try-prompt", prompt ? "" : "Write a prompt to render.");
    const seed = seedText === "" ? null : Number(seedText);
    const badSeed = seed !== null && !(Number.isInteger(seed) && seed >= 0);
    setFieldError("try-seed", "try-seed", badSeed ? "A whole number, 0 or more." : "");
    const files = byId("try-image-field").hidden ? [] : Array.from(byId("try-image").files || []);
    const wanted = state.openJobImages || { max: 0, required: false };
    let imageError = "";
    if (wanted.required && !files.length) {
      imageError = wanted.first_frame ? "Choose the first frame to animate." : "Choose the image to edit.";
    }
    else if (files.length > wanted.max) imageError = `At most ${wanted.max} image${wanted.max === 1 ? "" : "s"}.`;
    setFieldError("try-image", "try-image", imageError);
    const framesText = byId("try-frames-field").hidden ? "" : byId("try-frames").value.trim();
    const frames = framesText === "" ? null : Number(framesText);
    const rule = wanted.frames;
    const badFrames = frames !== null && rule
      && !(Number.isInteger(frames) && frames >= 1 && frames <= rule.max && (frames - 1) % rule.step === 0);
    setFieldError("try-frames", "try-frames",
      badFrames ? `${rule.step}k+1 frames (1, ${rule.step + 1}, ${2 * rule.step + 1}, …) up to ${rule.max}.` : "");
    if (!prompt || badSeed || imageError || badFrames) return;
    const body = { prompt, num_outputs: Number(byId("try-count").value) };
    if (frames !== null) body.num_frames = frames;
    const uris = await Promise.all(files.map(readDataUri));
    if (uris.length) body.input_image = uris[0];
    if (uris.length > 1) body.input_images = uris.slice(1);
    if (seed !== null) body.seed = seed;
    const step = byId("try-step").value;
    if (!byId("try-step-field").hidden && step !== "") body.step = Number(step);
    const btn = byId("try-btn");
    btn.disabled = true;
    say("try-msg", "Rendering… (a model that has not run for a while takes a minute to start)", "info");
    try {
      const r = await api("POST", `/api/cloud/jobs/${encodeURIComponent(id)}/run`, body);
      if (state.openJob !== id) return;
      const gallery = byId("try-images");
      gallery.replaceChildren();
      const kind = r.images.length && r.images.every((img) => isVideo(img.url)) ? "video" : "image";
      r.images.forEach((img, i) => {
        gallery.append(el("figure", { class: "sample" },
          isVideo(img.url)
            ? videoEl(img.url, `Rendered video ${i + 1}: ${prompt}`, "sample-img try-img")
            : el("a", { href: img.url, target: "_blank", rel: "noopener" },
              el("img", { src: img.url, alt: `Rendered image ${i + 1}: ${prompt}`, class: "sample-img try-img" })),
          el("figcaption", { text: `${kind === "video" ? "Video" : "Image"} ${i + 1}` })));
      });
      const secs = r.predict_time != null ? ` in ${fmtDuration(r.predict_time)}` : "";
      say("try-msg", `${r.images.length} ${kind}${r.images.length === 1 ? "" : "s"} rendered${secs}.`, "ok");
    } catch (e) {
      const prompt = e.problems.find((p) => p.field === "prompt");
      if (prompt) setFieldError("try-prompt", "try-prompt", prompt.message);
      say("try-msg", `Could not render: ${e.message}`, "error");
    } finally {
      btn.disabled = false;
    }
  });

  byId("job-cancel").addEventListener("click", async () => {
    const id = state.openJob;
    if (!id) return;
    const btn = byId("job-cancel");
    btn.disabled = true;
    say("job-msg", "Canceling…", "info");
    try {
      const r = await api("POST", `/api/cloud/jobs/${encodeURIComponent(id)}/cancel`);
      const j = r.job;
      if (j) {
        state.jobs.set(j.id, j);
        renderJobs([...state.jobs.values()]);
      }
      say("job-msg", j && j.status === "canceled" ? "Job canceled." : `Cancel requested; the job is ${j ? j.status : "?"}.`, "ok");
      await refreshJobView();
    } catch (e) {
      btn.disabled = false;
      say("job-msg", `Could not cancel: ${e.message}`, "error");
    }
  });

  /* --------------------------------------------------------------- settings -- */

  function fillSettings(s, webhookUrl) {
    const active = document.activeElement;
    const fill = (id, v) => { if (active !== byId(id)) byId(id).value = v; };
    fill("public-url", s.public_url || "");
    fill("allowed-ips", (s.webhook_allowed_ips || []).join("\n"));
    fill("trusted-proxies", (s.trusted_proxies || []).join("\n"));
    setText(byId("webhook-url"), webhookUrl
      ? `Replicate sends webhooks to ${webhookUrl}`
      : "No public URL: the server polls Replicate for job updates.");
    fillSpend(s.spend_limit);
  }

  function fillSpend(limit) {
    const per = { daily: "day", weekly: "week", monthly: "month" };
    if (limit) {
      byId("spend-amount").value = String(limit.amount_usd);
      byId("spend-period").value = limit.period;
      byId("spend-action").value = limit.action;
      setText(byId("spend-current"), `Now: ${fmtUSD(limit.amount_usd)} per ${per[limit.period] || limit.period}; ` +
        (limit.action === "block" ? "jobs over it are refused." : "jobs over it get a warning."));
    } else {
      byId("spend-amount").value = "";
      setText(byId("spend-current"), "Now: no limit.");
    }
  }

  function lines(text) {
    return text.split(/[\n,]+/).map((s) => s.trim()).filter(Boolean);
  }

  byId("webhook-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearFieldErrors(SETTINGS_FIELDS);
    const body = {
      public_url: byId("public-url").value.trim() || null,
      webhook_allowed_ips: lines(byId("allowed-ips").value),
      trusted_proxies: lines(byId("trusted-proxies").value),
    };
    try {
      const r = await api("PUT", "/api/cloud/providers/replicate", body);
      const s = r.settings || {};
      fillSettings(s, s.public_url ? `${s.public_url}/api/webhooks/replicate` : null);
      say("webhook-msg", "Webhook settings saved.", "ok");
    } catch (e) {
      const rest = showProblems(e.problems.length ? e.problems : [{ field: null, message: e.message }], SETTINGS_FIELDS);
      say("webhook-msg", rest.length ? `Not saved: ${rest.map((p) => (p.field ? `${p.field}: ${p.message}` : p.message)).join("; ")}`
        : "Not saved: fix the fields marked above.", "error");
    }
  });

  byId("spend-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const amountEl = byId("spend-amount");
    const raw = amountEl.value.trim();
    setFieldError("spend_limit", "spend-amount", "");
    if (!raw || amountEl.validity.badInput) {
      setFieldError("spend_limit", "spend-amount", "Enter an amount in US dollars (or remove the limit).");
      say("spend-msg", "");
      return;
    }
    const body = { amount_usd: Number(raw), period: byId("spend-period").value, action: byId("spend-action").value };
    try {
      const r = await api("PUT", "/api/cloud/spend-limit", body);
      const limit = (r.settings && r.settings.spend_limit) || r.spend_limit || body;
      fillSpend(limit);
      say("spend-msg", "Spend limit saved.", "ok");
    } catch (e) {
      setFieldError("spend_limit", "spend-amount", e.message.replace(/^spend_limit:\s*/, ""));
      say("spend-msg", "Not saved.", "error");
    }
  });

  byId("spend-clear").addEventListener("click", async () => {
    setFieldError("spend_limit", "spend-amount", "");
    try {
      await api("PUT", "/api/cloud/spend-limit", null);
      fillSpend(null);
      say("spend-msg", "Spend limit removed.", "ok");
    } catch (e) {
      say("spend-msg", e.message, "error");
    }
  });

  /* ------------------------------------------------------------------ start -- */

  async function loadAll() {
    loadStatus();
    const settings = await loadProvider();
    if (authPaused) return;
    await loadHardware(settings.hardware);
    loadVersions();
    validateSpec();
    pollJobs(true);
  }

  loadAll();
})();
