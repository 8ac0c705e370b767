// Fluxbase dashboard behaviour: copy buttons, type-to-confirm, and the SQL editor (keyboard run,
// highlighting, history, CSV). No inline script anywhere: the CSP allows only files from here.
"use strict";

(function () {
  function copyText(text, button) {
    const done = () => {
      const old = button.textContent;
      button.textContent = "Copied";
      setTimeout(() => { button.textContent = old; }, 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, () => fallbackCopy(text) && done());
    } else if (fallbackCopy(text)) {
      done();
    }
  }

  function fallbackCopy(text) {
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "sr";
    document.body.appendChild(area);
    area.select();
    let ok = false;
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    area.remove();
    return ok;
  }

  document.addEventListener("click", (event) => {
    const copy = event.target.closest("[data-copy]");
    if (copy) {
      const source = document.querySelector(copy.getAttribute("data-copy"));
      if (source) copyText(source.textContent, copy);
      return;
    }
    const csv = event.target.closest("[data-csv]");
    if (csv) downloadCsv(csv.getAttribute("data-csv"));
  });

  // Type the name to confirm: the button stays disabled until the text matches.
  function wireConfirm(root) {
    root.querySelectorAll("[data-confirm-name]").forEach((input) => {
      const form = input.closest("form");
      const button = form && form.querySelector("[data-confirm-submit]");
      if (!button) return;
      const update = () => { button.disabled = input.value !== input.getAttribute("data-confirm-name"); };
      input.addEventListener("input", update);
      update();
    });
  }

  // -- SQL editor ------------------------------------------------------------------------------
  const KEYWORDS = new Set(("select from where and or not insert into values update set delete create table " +
    "alter drop index primary key references default null is in as on join left right inner outer full " +
    "group by order having limit offset returning distinct union all case when then else end exists " +
    "between like ilike true false with policy enable disable row level security for using check to " +
    "grant revoke begin commit rollback serial text integer int bigint boolean timestamptz jsonb uuid " +
    "unique constraint foreign cascade asc desc count sum avg min max now coalesce view function trigger " +
    "returns language plpgsql if replace explain analyze truncate").split(" "));
  const TOKEN = /(--[^\n\r]*|\/\*[\s\S]*?(?:\*\/|$))|('(?:[^']|'')*'?)|("(?:[^"]|"")*"?)|(\$\d+)|(\b\d+(?:\.\d+)?\b)|([A-Za-z_][A-Za-z0-9_]*)(\s*\()?|([\s\S])/g;

  function escapeHtml(s) {
    return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }

  function highlight(sql) {
    let out = "";
    TOKEN.lastIndex = 0;
    let m;
    while ((m = TOKEN.exec(sql)) !== null) {
      if (m[0] === "") { TOKEN.lastIndex++; continue; }
      if (m[1]) out += '<span class="tok-com">' + escapeHtml(m[1]) + "</span>";
      else if (m[2]) out += '<span class="tok-str">' + escapeHtml(m[2]) + "</span>";
      else if (m[3]) out += escapeHtml(m[3]);
      else if (m[4]) out += '<span class="tok-param">' + m[4] + "</span>";
      else if (m[5]) out += '<span class="tok-num">' + m[5] + "</span>";
      else if (m[6]) {
        const word = m[6];
        const cls = KEYWORDS.has(word.toLowerCase()) ? "tok-kw" : (m[7] ? "tok-fn" : "");
        out += cls ? '<span class="' + cls + '">' + escapeHtml(word) + "</span>" : escapeHtml(word);
        if (m[7]) out += escapeHtml(m[7]);
      } else out += escapeHtml(m[8]);
    }
    return out + "\n";
  }

  function wireEditor() {
    const form = document.getElementById("sql-form");
    if (!form) return;
    const query = document.getElementById("query");
    const code = document.getElementById("query-highlight");
    const pre = code.parentElement;
    const paint = () => { code.innerHTML = highlight(query.value); pre.scrollTop = query.scrollTop; };
    query.addEventListener("input", paint);
    query.addEventListener("scroll", () => { pre.scrollTop = query.scrollTop; });
    paint();
    form.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
    const key = form.getAttribute("data-history-key");
    const list = document.getElementById("sql-history");
    const load = () => { try { return JSON.parse(localStorage.getItem(key) || "[]"); } catch (e) { return []; } };
    const show = () => {
      const items = load();
      list.replaceChildren();
      if (!items.length) {
        const li = document.createElement("li");
        li.className = "empty";
        li.textContent = "Queries you run in this browser appear here.";
        list.appendChild(li);
        return;
      }
      items.forEach((q) => {
        const li = document.createElement("li");
        const b = document.createElement("button");
        b.type = "button";
        b.textContent = q;
        b.title = "Put this query back in the editor";
        b.addEventListener("click", () => { query.value = q; paint(); query.focus(); });
        li.appendChild(b);
        list.appendChild(li);
      });
    };
    form.addEventListener("htmx:beforeRequest", () => {
      const q = query.value.trim();
      if (!q) return;
      const items = load().filter((x) => x !== q);
      items.unshift(q);
      localStorage.setItem(key, JSON.stringify(items.slice(0, 50)));
      show();
    });
    show();
  }

  function csvCell(v) {
    if (v === null || v === undefined) return "";
    const s = typeof v === "object" ? JSON.stringify(v) : String(v);
    return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  }

  function downloadCsv(selector) {
    const node = document.querySelector(selector);
    if (!node) return;
    const data = JSON.parse(node.getAttribute("data-json"));
    const lines = [data.columns.map(csvCell).join(",")];
    data.rows.forEach((row) => lines.push(data.columns.map((c) => csvCell(row[c])).join(",")));
    const blob = new Blob([lines.join("\r\n") + "\r\n"], { type: "text/csv" });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = "result.csv";
    document.body.appendChild(a);
    a.click();
    setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
  }

  // Uploads with a progress bar: small files through the API, large ones straight to S3.
  function csrfToken() {
    const headers = document.body.getAttribute("hx-headers");
    try { return JSON.parse(headers)["X-CSRF-Token"]; } catch (e) { return ""; }
  }

  // One XMLHttpRequest with upload progress; resolves with the parsed JSON of an `ok` status.
  function send(method, url, body, headers, ok, onProgress) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open(method, url);
      Object.keys(headers).forEach((h) => xhr.setRequestHeader(h, headers[h]));
      if (onProgress) {
        xhr.upload.addEventListener("progress", (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); });
      }
      xhr.addEventListener("load", () => {
        let parsed = {};
        try { parsed = JSON.parse(xhr.responseText); } catch (e) { parsed = {}; }
        if ([].concat(ok).includes(xhr.status)) resolve(parsed);
        else if (parsed.error) reject(new Error(parsed.error.code + ": " + parsed.error.message));
        else reject(new Error("HTTP " + xhr.status + (xhr.responseText ? ": " + xhr.responseText.slice(0, 200) : "")));
      });
      xhr.addEventListener("error", () => reject(new Error("The upload failed (network).")));
      xhr.send(body);
    });
  }

  function dashForm(fields) {
    const body = new URLSearchParams();
    Object.keys(fields).forEach((k) => body.append(k, fields[k]));
    return body;
  }

  // Small files: streamed through the API's upload path in one request.
  function uploadOne(url, file, name, onProgress) {
    const data = new FormData();
    data.append("file", file, file.name);
    return send("POST", url + "?name=" + encodeURIComponent(name), data, { "X-CSRF-Token": csrfToken() }, 201, onProgress);
  }

  // Large files: the API's presigned POST (createUploadUrl), the bytes straight to S3, then
  // confirmUpload. The S3 origin is in this page's CSP connect-src, derived from the settings.
  async function uploadDirect(base, file, name, onProgress) {
    const csrf = { "X-CSRF-Token": csrfToken() };
    const form = await send("POST", base + "/upload-url",
      dashForm({ name: name, size: String(file.size), contentType: file.type || "application/octet-stream" }), csrf, 201);
    const data = new FormData();
    Object.keys(form.fields).forEach((k) => data.append(k, form.fields[k]));
    data.append("file", file, file.name);  // S3 wants the file as the form's last field
    try {
      await send("POST", form.url, data, {}, [200, 201, 204], onProgress);
    } catch (err) {
      // A browser that cannot reach the object store, or a store without CORS for this origin.
      throw new Error(err.message + " (to the object store at " + new URL(form.url).origin +
        ": it must be reachable from this browser and allow this origin by CORS)");
    }
    return send("POST", base + "/upload-confirm", dashForm({ fileId: form.file.id }), csrf, 200);
  }

  function wireUploads() {
    const zone = document.querySelector("[data-upload]");
    if (!zone) return;
    const input = zone.querySelector("input[type=file]");
    const bar = document.getElementById("upload-progress");
    const status = document.getElementById("upload-status");
    const run = async (files) => {
      const list = Array.from(files);
      if (!list.length) return;
      const total = list.reduce((n, f) => n + f.size, 0) || 1;
      let done = 0;
      bar.hidden = false;
      for (const file of list) {
        status.textContent = "Uploading " + file.name + "…";
        try {
          const name = zone.getAttribute("data-prefix") + file.name;
          const onProgress = (part) => { bar.value = Math.round(100 * (done + part * file.size) / total); };
          if (file.size >= Number(zone.getAttribute("data-direct-min"))) {
            await uploadDirect(zone.getAttribute("data-direct"), file, name, onProgress);
          } else {
            await uploadOne(zone.getAttribute("data-upload"), file, name, onProgress);
          }
        } catch (err) {
          status.textContent = file.name + ": " + err.message;
          status.classList.add("error");
          return;
        }
        done += file.size;
        bar.value = Math.round(100 * done / total);
      }
      status.textContent = "Uploaded " + list.length + " file" + (list.length === 1 ? "" : "s") + ".";
      window.location.reload();
    };
    input.addEventListener("change", () => run(input.files));
    zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => { e.preventDefault(); zone.classList.remove("over"); run(e.dataTransfer.files); });
    zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
  }

  // Import: the export file as the request body, with upload progress; then the new project.
  function wireImport() {
    const box = document.querySelector("[data-import]");
    if (!box) return;
    const file = document.getElementById("import-file");
    const name = document.getElementById("import-name");
    const bar = document.getElementById("import-progress");
    const status = document.getElementById("import-status");
    document.getElementById("import-start").addEventListener("click", async () => {
      const chosen = file.files[0];
      status.classList.remove("error");
      if (!chosen) { status.textContent = "Choose an export file first."; status.classList.add("error"); return; }
      bar.hidden = false;
      bar.value = 0;
      status.textContent = "Uploading " + chosen.name + "…";
      const url = box.getAttribute("data-import") + "?name=" + encodeURIComponent(name.value.trim());
      try {
        const done = await send("POST", url, chosen, { "X-CSRF-Token": csrfToken(), "Content-Type": "application/sql" }, 201,
          (part) => { bar.value = Math.round(100 * part); if (part >= 1) status.textContent = "Uploaded; importing…"; });
        bar.value = 100;
        status.textContent = "Imported as " + done.project.name + ".";
        window.location.assign(done.url);
      } catch (err) {
        status.textContent = err.message;
        status.classList.add("error");
      }
    });
  }

  // The live event inspector: a member realtime token, then the project's room over WebSocket.
  function wireInspector() {
    const button = document.getElementById("rt-toggle");
    if (!button) return;
    const status = document.getElementById("rt-status");
    const list = document.getElementById("rt-events");
    const filter = document.getElementById("rt-filter");
    let socket = null;
    let paused = false;
    const show = (kind, table, text) => {
      if (paused) return;
      const wanted = filter.value.trim();
      if (wanted && table !== wanted) return;
      const li = document.createElement("li");
      li.setAttribute("data-table", table || "");
      const op = document.createElement("span");
      op.className = "op";
      op.textContent = kind + (table ? " " + table : "");
      const body = document.createElement("code");
      body.textContent = text;
      li.append(new Date().toLocaleTimeString() + " ", op, body);
      list.prepend(li);
      while (list.children.length > 200) list.lastChild.remove();
    };
    const start = async () => {
      status.textContent = "Connecting…";
      const res = await fetch(button.getAttribute("data-token-url"), {
        method: "POST", headers: { "X-CSRF-Token": csrfToken() }, credentials: "same-origin",
      });
      if (!res.ok) { status.textContent = "Could not get a realtime token (HTTP " + res.status + ")."; return; }
      const grant = await res.json();
      socket = new WebSocket(grant.url);
      socket.addEventListener("open", () => {
        socket.send(JSON.stringify({ type: "subscribe", roomId: grant.roomId, token: grant.token }));
      });
      socket.addEventListener("message", (e) => {
        let msg = {};
        try { msg = JSON.parse(e.data); } catch (err) { return; }
        if (msg.type === "subscribed") { status.textContent = "Live: watching " + grant.roomId + "."; }
        else if (msg.type === "db_event") {
          const p = msg.payload || {};
          show(p.operation || "event", p.table, JSON.stringify(p.record !== undefined ? p.record : p));
        } else if (msg.type === "schema_update") {
          const p = msg.payload || {};
          show("schema " + (p.command || ""), p.object || "", "");
        } else if (msg.type === "error") { status.textContent = "Error: " + (msg.message || msg.code || e.data); }
      });
      socket.addEventListener("close", (e) => {
        status.textContent = "Disconnected (" + e.code + "). Start again to reconnect.";
        button.textContent = "Start";
        socket = null;
      });
      button.textContent = "Pause";
    };
    button.addEventListener("click", () => {
      if (!socket) { paused = false; start(); return; }
      paused = !paused;
      button.textContent = paused ? "Resume" : "Pause";
      status.textContent = paused ? "Paused: new events are not shown." : "Live.";
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    wireConfirm(document);
    wireEditor();
    wireUploads();
    wireImport();
    wireInspector();
  });
})();
