// Fluxbase client: one ES module, no dependencies. Runs unchanged in browsers, Node >= 20, Deno
// and edge runtimes through the platform's fetch, WebSocket and WebCrypto (pass your own
// `fetch` / `WebSocket` where the runtime has none, e.g. Node 20 without --experimental-websocket).

const IDEMPOTENT = new Set(['GET', 'HEAD', 'OPTIONS']);

/** An error answered by Fluxbase: HTTP `status`, the documented `code` and its `message`. */
export class FluxbaseError extends Error {
  constructor(status, code, message, extra = {}) {
    super(message);
    this.name = 'FluxbaseError';
    this.status = status;
    this.code = code;
    this.details = extra.details ?? null;
    this.statementIndex = extra.statementIndex ?? null;
    this.retryAfter = extra.retryAfter ?? null;
    this.body = extra.body ?? null;
  }
}
/** A statement PostgreSQL refused (SQL_EXEC_ERROR); `sqlstate` is parsed from `details`. */
export class SqlError extends FluxbaseError {
  constructor(...a) { super(...a); this.name = 'SqlError'; }
  get sqlstate() { const d = (this.details ?? '').trim().split(/\s+/); return d[d.length - 1] || null; }
}
FluxbaseError.prototype.toString = function toString() { return `${this.name}: ${this.code} (${this.status}): ${this.message}`; };
export class WebhookVerificationError extends Error {
  constructor(m) { super(m); this.name = 'WebhookVerificationError'; }
}

function errorFor(status, body, retryAfter) {
  const err = body && typeof body === 'object' && body.error && typeof body.error === 'object'
    ? body.error : { code: 'HTTP_ERROR', message: `HTTP ${status}` };
  const code = String(err.code ?? 'HTTP_ERROR');
  const Cls = code === 'SQL_EXEC_ERROR' || code === 'QUERY_TIMEOUT' ? SqlError : FluxbaseError;
  return new Cls(status, code, String(err.message ?? code), {
    details: typeof err.details === 'string' ? err.details : null,
    statementIndex: Number.isInteger(err.statementIndex) ? err.statementIndex : null,
    retryAfter, body,
  });
}

function b64(bytes) {
  let s = '';
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}
function unb64(text) {
  const bin = atob(text);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/** Values as the API binds them exactly: BigInt as digits, Date as ISO, bytes as base64. */
export function toJSONValue(v) {
  if (typeof v === 'bigint') return v.toString();
  if (v instanceof Date) return v.toISOString();
  if (v instanceof Uint8Array) return b64(v);
  if (v instanceof ArrayBuffer) return b64(new Uint8Array(v));
  if (Array.isArray(v)) return v.map(toJSONValue);
  if (v && typeof v === 'object' && v.constructor === Object) {
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, toJSONValue(x)]));
  }
  return v;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const backoff = (attempt, base = 250, cap = 8000) => Math.random() * Math.min(cap, base * 2 ** attempt);

function retryAfterOf(res) {
  const v = res.headers.get('retry-after');
  if (v == null) return null;
  const n = Number(v);
  return Number.isFinite(n) ? Math.min(Math.max(n, 0), 60) : null;
}

/** Create a client for one project. */
export function createClient(options) { return new FluxbaseClient(options); }

export class FluxbaseClient {
  constructor({ url, projectId, apiKey = null, realtimeUrl = null, fetch: f = null, WebSocket: W = null,
    maxRetries = 3, refreshMarginMs = 60_000, storage = null, storageKey = null } = {}) {
    if (!url || !projectId) throw new TypeError('url and projectId are required');
    this.url = url.replace(/\/+$/, '');
    this.projectId = projectId;
    this.apiKey = apiKey;
    this.realtimeUrl = realtimeUrl;
    this._fetch = f ?? globalThis.fetch.bind(globalThis);
    this._WebSocket = W ?? globalThis.WebSocket ?? null;
    this.maxRetries = maxRetries;
    this.auth = new Auth(this, { refreshMarginMs, storage, storageKey });
    this.storage = new Storage(this);
  }

  async _headers(withUser) {
    const h = {};
    if (this.apiKey) h.Authorization = `Bearer ${this.apiKey}`;
    if (withUser && this.auth.session) {
      const t = await this.auth.accessToken();
      if (t) h['X-Fluxbase-User-Token'] = t;
    }
    return h;
  }

  /** One call. 429 (the server did nothing) is retried after Retry-After; 503 and network
   * failures with backoff only when the call is idempotent. Resolves to the decoded body. */
  async request(method, path, { json, query, headers, idempotent, withUser = true, body, allowSqlError = false } = {}) {
    const safe = idempotent ?? IDEMPOTENT.has(method);
    const qs = query ? new URLSearchParams(Object.entries(query).filter(([, v]) => v != null).map(([k, v]) => [k, String(v)])).toString() : '';
    const target = `${this.url}${path}${qs ? `?${qs}` : ''}`;
    for (let attempt = 0; ; attempt++) {
      const h = { ...(await this._headers(withUser)), ...(headers ?? {}) };
      let payload = body;
      if (json !== undefined) { h['Content-Type'] = 'application/json'; payload = JSON.stringify(toJSONValue(json)); }
      let res;
      try {
        res = await this._fetch(target, { method, headers: h, body: payload });
      } catch (e) {
        if (safe && attempt < this.maxRetries) { await sleep(backoff(attempt + 1)); continue; }
        throw new FluxbaseError(0, 'CONNECTION_FAILED', String(e?.message ?? e));
      }
      const ra = retryAfterOf(res);
      if (res.status === 429 && attempt < this.maxRetries) {
        await sleep(ra != null ? ra * 1000 : backoff(attempt + 1)); continue;
      }
      if (res.status === 503 && safe && attempt < this.maxRetries) {
        await sleep(Math.max((ra ?? 0) * 1000, backoff(attempt + 1))); continue;
      }
      let out = null;
      const text = await res.text();
      try { out = text ? JSON.parse(text) : null; } catch { out = null; }
      if (res.status >= 400 || (out && out.success === false && !allowSqlError)) throw errorFor(res.status, out, ra);
      return out;
    }
  }

  /** Run one statement: `{rows, columns, rowCount, message, truncated, executionInfo}`. Values as
   * the API documents them (int8 beyond 2^53 and numeric are exact strings). */
  async sql(query, params, { authUid } = {}) {
    const json = { projectId: this.projectId, query };
    if (params !== undefined) json.params = params;
    if (authUid !== undefined) json.authUid = authUid;
    const out = await this.request('POST', '/api/execute-sql', { json, idempotent: false });
    return sqlResult(out.result, out.executionInfo);
  }

  /** Statements in one transaction, all or nothing; SqlError.statementIndex names the failing one. */
  async batch(statements, { readOnly = false, isolationLevel, authUid } = {}) {
    const json = {
      projectId: this.projectId,
      statements: statements.map((s) => (typeof s === 'string' ? { query: s } : Array.isArray(s) ? { query: s[0], params: s[1] } : s)),
    };
    if (readOnly) json.readOnly = true;
    if (isolationLevel) json.isolationLevel = isolationLevel;
    if (authUid !== undefined) json.authUid = authUid;
    const out = await this.request('POST', '/api/execute-batch', { json, idempotent: false });
    return out.results.map((r) => sqlResult(r.result ?? r, r.executionInfo));
  }

  transaction(statements, opts) { return this.batch(statements, opts); }

  /** A records query builder for one table. */
  from(table) { return new Query(this, table); }

  async realtimeToken({ authUid, expiresIn } = {}) {
    const json = { projectId: this.projectId };
    if (authUid !== undefined) json.authUid = authUid;
    if (expiresIn !== undefined) json.expiresIn = expiresIn;
    return this.request('POST', '/api/realtime/token', { json, idempotent: false });
  }

  async broadcast(event, payload = null) {
    const out = await this.request('POST', '/api/realtime/broadcast', { json: { projectId: this.projectId, event, payload }, idempotent: false });
    return out.id;
  }

  /** A realtime connection. Credential: `token` (a string or an async function called at every
   * connect), else the end user's access token, else the API key. */
  realtime({ token, url, ...options } = {}) {
    const wsUrl = url ?? this.realtimeUrl;
    if (!wsUrl) throw new TypeError('realtimeUrl is not set');
    const credential = async () => {
      if (typeof token === 'function') return token();
      if (token) return token;
      if (this.auth.session) return (await this.auth.accessToken()) ?? '';
      return this.apiKey ?? '';
    };
    return new Realtime(wsUrl, this.projectId, credential, { WebSocket: this._WebSocket, ...options });
  }
}

function sqlResult(r, info) {
  return {
    rows: r?.rows ?? [], columns: r?.columns ?? [], rowCount: r?.rowCount ?? 0,
    message: r?.message ?? null, truncated: Boolean(r?.truncated), executionInfo: info ?? {},
  };
}

export class Query {
  constructor(client, table) {
    this.client = client; this.table = table;
    this._filter = {}; this._sort = []; this._fields = null; this._limit = null; this._offset = null;
  }
  get _path() { return `/api/projects/${this.client.projectId}/tables/${encodeURIComponent(this.table)}/records`; }
  _op(col, op, v) {
    let c = this._filter[col];
    if (c === undefined || c === null || typeof c !== 'object' || Array.isArray(c)) c = this._filter[col] = c === undefined ? {} : { $eq: c };
    c[op] = v; return this;
  }
  eq(c, v) { return this._op(c, '$eq', v); }
  neq(c, v) { return this._op(c, '$ne', v); }
  gt(c, v) { return this._op(c, '$gt', v); }
  gte(c, v) { return this._op(c, '$gte', v); }
  lt(c, v) { return this._op(c, '$lt', v); }
  lte(c, v) { return this._op(c, '$lte', v); }
  in(c, vs) { return this._op(c, '$in', [...vs]); }
  like(c, p) { return this._op(c, '$like', p); }
  ilike(c, p) { return this._op(c, '$ilike', p); }
  isNull(c, yes = true) { return this._op(c, '$null', yes); }
  where(filter) { Object.assign(this._filter, filter); return this; }
  order(col, { desc = false } = {}) { this._sort.push((desc ? '-' : '') + col); return this; }
  select(...fields) { this._fields = fields.flat(); return this; }
  limit(n) { this._limit = n; return this; }
  offset(n) { this._offset = n; return this; }
  range(from, to) { return this.offset(from).limit(to - from + 1); }
  _query() {
    return {
      filter: Object.keys(this._filter).length ? JSON.stringify(toJSONValue(this._filter)) : null,
      sort: this._sort.length ? this._sort.join(',') : null,
      fields: this._fields ? this._fields.join(',') : null,
      limit: this._limit, offset: this._offset,
    };
  }
  /** The whole answer: records, count, limit, offset, hasMore. */
  page() { return this.client.request('GET', this._path, { query: this._query() }); }
  async get() { return (await this.page()).records; }
  async *all(pageSize = 1000) {
    let offset = this._offset ?? 0;
    for (;;) {
      this._offset = offset; this._limit = pageSize;
      const p = await this.page();
      yield* p.records;
      if (!p.hasMore) return;
      offset += p.records.length;
    }
  }
  async getOne(key) { return (await this.client.request('GET', `${this._path}/${encodeURIComponent(key)}`)).record; }
  async insert(values) { return (await this.client.request('POST', this._path, { json: values, idempotent: false })).records; }
  async update(key, values) { return (await this.client.request('PATCH', `${this._path}/${encodeURIComponent(key)}`, { json: values, idempotent: true })).record; }
  delete(key) { return this.client.request('DELETE', `${this._path}/${encodeURIComponent(key)}`, { idempotent: false }); }
}

// -- end-user auth --------------------------------------------------------------------------------

class Auth {
  constructor(client, { refreshMarginMs, storage, storageKey }) {
    this.client = client;
    this.refreshMarginMs = refreshMarginMs;
    // Optional persistence shared by tabs (localStorage): the refreshed pair is written back, and
    // a refresh first re-reads it, so two tabs never spend the same single-use refresh token.
    this.store = storage;
    this.storeKey = storageKey ?? `fluxbase.session.${client.projectId}`;
    this.listeners = new Set();
    this._inflight = null;
    this._session = null;
    if (this.store) { try { this._session = JSON.parse(this.store.getItem(this.storeKey)); } catch { this._session = null; } }
  }
  get _base() { return `/api/projects/${this.client.projectId}/auth`; }
  get session() { return this._session; }
  get user() { return this._session?.user ?? null; }
  /** `cb(event, session)` on SIGNED_IN, TOKEN_REFRESHED, SIGNED_OUT; returns an unsubscribe function. */
  onAuthStateChange(cb) { this.listeners.add(cb); return () => this.listeners.delete(cb); }
  _set(session, event) {
    this._session = session;
    if (this.store) {
      if (session) this.store.setItem(this.storeKey, JSON.stringify(session)); else this.store.removeItem(this.storeKey);
    }
    for (const cb of [...this.listeners]) { try { cb(event, session); } catch (e) { queueMicrotask(() => { throw e; }); } }
    return session;
  }
  _adopt(pair, event) {
    return this._set({ accessToken: pair.accessToken, refreshToken: pair.refreshToken, expiresAt: Number(pair.expiresAt), user: pair.user ?? null }, event);
  }
  async register(email, password, displayName = '') {
    return (await this.client.request('POST', `${this._base}/register`, { json: { email, password, displayName }, idempotent: false, withUser: false })).user;
  }
  async login(email, password) {
    const out = await this.client.request('POST', `${this._base}/login`, { json: { email, password }, idempotent: false, withUser: false });
    return this._adopt(out, 'SIGNED_IN');
  }
  setSession(session) { return this._set(session, 'SIGNED_IN'); }
  _due(s) { return s.expiresAt * 1000 - Date.now() <= this.refreshMarginMs; }
  /** Trade the refresh token for a new pair, once, however many callers (and tabs) ask. */
  refresh({ force = true } = {}) {
    if (!this._session) return Promise.reject(new FluxbaseError(401, 'AUTH_REQUIRED', 'Not logged in.'));
    if (this._inflight) return this._inflight;
    const before = this._session.refreshToken;
    const run = async () => {
      if (this.store) {
        // Another tab may have rotated the pair while this one slept.
        let stored = null;
        try { stored = JSON.parse(this.store.getItem(this.storeKey)); } catch { stored = null; }
        if (!stored) { this._set(null, 'SIGNED_OUT'); throw new FluxbaseError(401, 'AUTH_REQUIRED', 'Logged out.'); }
        if (stored.refreshToken !== before) { this._session = stored; if (!force || !this._due(stored)) return stored; }
      }
      if (!force && !this._due(this._session)) return this._session;
      try {
        const out = await this.client.request('POST', `${this._base}/refresh`, { json: { refreshToken: this._session.refreshToken }, idempotent: false, withUser: false });
        return this._adopt(out, 'TOKEN_REFRESHED');
      } catch (e) {
        if (e instanceof FluxbaseError && e.status === 401) this._set(null, 'SIGNED_OUT');
        throw e;
      }
    };
    const locks = globalThis.navigator?.locks;
    const p = locks ? locks.request(this.storeKey, run) : run();
    this._inflight = p.finally(() => { this._inflight = null; });
    return this._inflight;
  }
  async accessToken() {
    let s = this._session;
    if (!s) return null;
    if (this._due(s)) s = await this.refresh({ force: false });
    return s.accessToken;
  }
  async me() {
    const t = await this.accessToken();
    if (!t) throw new FluxbaseError(401, 'AUTH_REQUIRED', 'Not logged in.');
    return (await this.client.request('GET', `${this._base}/me`, { headers: { Authorization: `Bearer ${t}` }, withUser: false })).user;
  }
  async logout() {
    const s = this._session;
    if (!s) return;
    try {
      await this.client.request('POST', `${this._base}/logout`, { headers: { Authorization: `Bearer ${s.accessToken}` }, idempotent: false, withUser: false });
    } finally { this._set(null, 'SIGNED_OUT'); }
  }
}

// -- storage --------------------------------------------------------------------------------------

function toBlob(data, type) {
  if (typeof Blob !== 'undefined' && data instanceof Blob) return data;
  return new Blob([typeof data === 'string' ? new TextEncoder().encode(data) : data], { type: type || 'application/octet-stream' });
}

class Storage {
  constructor(client) { this.client = client; }
  get _pid() { return this.client.projectId; }
  async listBuckets() { return (await this.client.request('GET', '/api/storage/buckets', { query: { projectId: this._pid } })).buckets; }
  async createBucket(name, { isPublic = false, ...extra } = {}) {
    return (await this.client.request('POST', '/api/storage/buckets', { json: { projectId: this._pid, name, isPublic, ...extra }, idempotent: false })).bucket;
  }
  async deleteBucket(bucket) {
    return (await this.client.request('DELETE', '/api/storage/buckets', { json: { projectId: this._pid, bucketId: bucket }, idempotent: true })).bucket;
  }
  /** Upload through the API (multipart). `data`: Blob/File, Uint8Array or string. */
  async upload(bucket, data, { name, contentType, onProgress } = {}) {
    const blob = toBlob(data, contentType);
    name = name ?? data.name;
    if (!name) throw new TypeError('name is required');
    const form = new FormData();
    form.append('projectId', this._pid);
    form.append('bucketId', bucket);
    form.append('file', blob, name);
    onProgress?.(0, blob.size);
    const out = await this.client.request('POST', '/api/storage/upload', { body: form, idempotent: false });
    onProgress?.(blob.size, blob.size);
    return out.file;
  }
  /** Upload straight to S3 with a presigned POST (large files from the browser), then confirm.
   * With XMLHttpRequest (browsers) `onProgress(sent, total)` follows the bytes as they go. */
  async uploadDirect(bucket, data, { name, contentType, onProgress } = {}) {
    const blob = toBlob(data, contentType);
    name = name ?? data.name;
    if (!name) throw new TypeError('name is required');
    const type = contentType || blob.type || 'application/octet-stream';
    const post = await this.client.request('POST', '/api/storage/upload-url', {
      json: { projectId: this._pid, bucketId: bucket, name, contentType: type, size: blob.size }, idempotent: false,
    });
    const form = new FormData();
    for (const [k, v] of Object.entries(post.fields)) form.append(k, v);
    form.append('file', blob, name);
    if (typeof XMLHttpRequest !== 'undefined') {
      await new Promise((resolve, reject) => {
        const xhr = new XMLHttpRequest();
        xhr.open('POST', post.url);
        xhr.upload.onprogress = (e) => onProgress?.(e.loaded, e.total || blob.size);
        xhr.onload = () => (xhr.status < 300 ? resolve() : reject(new FluxbaseError(xhr.status, 'STORAGE_UPLOAD_FAILED', xhr.responseText.slice(0, 200))));
        xhr.onerror = () => reject(new FluxbaseError(0, 'STORAGE_UPLOAD_FAILED', 'network error'));
        xhr.send(form);
      });
    } else {
      onProgress?.(0, blob.size);
      const res = await this.client._fetch(post.url, { method: 'POST', body: form });
      if (res.status >= 300) throw new FluxbaseError(res.status, 'STORAGE_UPLOAD_FAILED', (await res.text()).slice(0, 200));
    }
    onProgress?.(blob.size, blob.size);
    return (await this.client.request('POST', '/api/storage/upload-url/confirm', { json: { projectId: this._pid, fileId: post.file.id }, idempotent: true })).file;
  }
  list(bucket, { prefix = '', limit = 100, cursor } = {}) {
    return this.client.request('GET', '/api/storage/files', { query: { projectId: this._pid, bucketId: bucket, prefix, limit, cursor } });
  }
  async downloadUrl(s3Key, { expiresIn } = {}) {
    return (await this.client.request('GET', '/api/storage/url', { query: { projectId: this._pid, s3Key, expiresIn } })).url;
  }
  remove(...s3Keys) {
    return this.client.request('DELETE', '/api/storage/files', { json: { projectId: this._pid, s3Keys: s3Keys.flat() }, idempotent: true });
  }
}

// -- realtime -------------------------------------------------------------------------------------

const FATAL = new Set(['AUTH_REQUIRED', 'TOKEN_EXPIRED', 'SCOPE_MISMATCH', 'PROJECT_SUSPENDED', 'PROJECT_NOT_FOUND',
  'INSUFFICIENT_PERMISSIONS', 'INVALID_USER_TOKEN', 'USER_DISABLED', 'USER_TOKEN_REQUIRED', 'VALIDATION_ERROR',
  'CONFLICT', 'PAYLOAD_TOO_LARGE']);  // (the last two: presence, a full topic or a state too large)
const EVENTS = new Set(['db_event', 'schema_update', 'broadcast']);
const PRESENCE = new Set(['presence_state', 'presence_diff']);

/** Compare two cursors '<xid>:<id>' exactly (xids exceed 2^53 in long-lived clusters). */
export function compareCursors(a, b) {
  const [ax, ai] = a.split(':').map(BigInt);
  const [bx, bi] = b.split(':').map(BigInt);
  return ax < bx ? -1 : ax > bx ? 1 : ai < bi ? -1 : ai > bi ? 1 : 0;
}

/** The subscription to one project (or to one of its topics). Every committed event is delivered
 * once, in commit order, across reconnects: it resumes with `since` = the cursor of the last event
 * delivered. On a topic, `track(state)` / `untrack()` and `presence` (key → state); a tracked
 * state is tracked again after a reconnect. */
export class Channel {
  constructor(rt, room, { tables, operations, since, onEvent, filters }) {
    this.rt = rt; this.room = room;
    this.tables = tables ?? null;
    this.filters = filters ?? null;
    this.presence = {};
    this.presenceKey = null;
    this._tracked = null;
    this._pending = null;
    this.operations = operations ? operations.map((o) => o.toUpperCase()) : null;
    this.cursor = since ?? null;
    this.listeners = new Set(onEvent ? [onEvent] : []);
    this.error = null;
    this.subscribed = false;
    this.duplicatesDropped = 0;
    this._buffer = [];
    this._waiters = [];
    this._readyWaiters = [];
    this.closed = false;
  }
  on(cb) { this.listeners.add(cb); return () => this.listeners.delete(cb); }
  _message(token) {
    const m = { type: 'subscribe', roomId: this.room };
    if (token) m.token = token;
    if (this.cursor != null) m.since = this.cursor;
    if (this.tables) m.tables = this.tables;
    if (this.operations) m.operations = this.operations;
    if (this.filters) m.filters = this.filters;
    return m;
  }
  _deliver(msg) {
    for (const cb of [...this.listeners]) { try { cb(msg); } catch (e) { queueMicrotask(() => { throw e; }); } }
    const w = this._waiters.shift();
    if (w) w(msg); else this._buffer.push(msg);
  }
  _settle(ok) { for (const w of this._readyWaiters.splice(0)) w(ok); }
  _handle(msg) {
    const t = msg.type;
    if (this._pending && (t === 'tracked' || t === 'untracked' || (t === 'error' && this.subscribed))) {
      const p = this._pending; this._pending = null; p(msg); return;  // the answer to track()/untrack()
    }
    if (t === 'tracked') { this.presenceKey = msg.key; return; }  // tracked again after a reconnect
    if (PRESENCE.has(t)) {
      const p = msg.payload ?? {};
      if (t === 'presence_state') this.presence = { ...p };
      else {
        for (const k of Object.keys(p.leaves ?? {})) delete this.presence[k];
        Object.assign(this.presence, p.joins ?? {});
      }
      this._deliver(msg);
      return;
    }
    if (t === 'subscribed') {
      if (this.cursor == null && typeof msg.cursor === 'string') this.cursor = msg.cursor;
      this.error = null; this.subscribed = true; this._settle(true);
    } else if (EVENTS.has(t)) {
      if (typeof msg.cursor === 'string') {
        if (this.cursor != null && compareCursors(msg.cursor, this.cursor) <= 0) { this.duplicatesDropped++; return; }
        this.cursor = msg.cursor;
      }
      this._deliver(msg);
    } else if (t === 'resync_required') {
      if (typeof msg.cursor === 'string') this.cursor = msg.cursor;
      this._deliver(msg);
    } else if (t === 'error') {
      this.error = msg; this.subscribed = false; this._deliver(msg); this._settle(false);
    }
  }
  /** The next event (db_event, schema_update, broadcast, resync_required or error). */
  next(timeoutMs) {
    if (this._buffer.length) return Promise.resolve(this._buffer.shift());
    return new Promise((resolve, reject) => {
      const w = (m) => { clearTimeout(timer); resolve(m); };
      const timer = timeoutMs == null ? null : setTimeout(() => {
        this._waiters = this._waiters.filter((x) => x !== w);
        reject(new Error('timed out waiting for a realtime event'));
      }, timeoutMs);
      this._waiters.push(w);
    });
  }
  async *[Symbol.asyncIterator]() { while (!this.closed) yield await this.next(); }
  broadcast(event, payload = null) { this.rt._send({ type: 'broadcast', roomId: this.room, event, payload }); }
  _request(msg, timeoutMs = 10000) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => { this._pending = null; reject(new Error('no answer from the realtime service')); }, timeoutMs);
      this._pending = (answer) => {
        clearTimeout(timer);
        if (answer.type === 'error') {
          const err = answer.error ?? {};
          reject(new FluxbaseError(0, String(err.code), String(err.message), { body: answer }));
        } else resolve(answer);
      };
      try { this.rt._send(msg); } catch (e) { clearTimeout(timer); this._pending = null; reject(e); }
    });
  }
  /** Track this connection in the topic with `state` (a small JSON object); resolves to its key. */
  async track(state, { timeoutMs } = {}) {
    const answer = await this._request({ type: 'track', roomId: this.room, payload: state }, timeoutMs);
    this._tracked = state; this.presenceKey = answer.key;
    return answer.key;
  }
  async untrack({ timeoutMs } = {}) {
    this._tracked = null;
    await this._request({ type: 'untrack', roomId: this.room }, timeoutMs);
    this.presenceKey = null;
  }
  unsubscribe() {
    this.closed = true;
    this.rt.channels.delete(this.room);
    try { this.rt._send({ type: 'unsubscribe', roomId: this.room }); } catch { /* not connected */ }
  }
}

/** A self-healing realtime connection: heartbeats, reconnection with backoff and jitter. */
export class Realtime {
  constructor(url, projectId, credential, { WebSocket: W, heartbeatMs = 15000, heartbeatTimeoutMs = 10000,
    backoffBaseMs = 500, backoffMaxMs = 15000, onStatus = null } = {}) {
    if (!W) throw new TypeError('no WebSocket implementation: pass { WebSocket } to createClient');
    this.url = url; this.projectId = projectId; this.credential = credential; this.W = W;
    this.heartbeatMs = heartbeatMs; this.heartbeatTimeoutMs = heartbeatTimeoutMs;
    this.backoffBaseMs = backoffBaseMs; this.backoffMaxMs = backoffMaxMs; this.onStatus = onStatus;
    this.channels = new Map();
    this.reconnects = 0;
    this.ws = null; this._closing = false; this._attempt = 0; this._token = ''; this._timer = null; this._started = false;
  }
  _status(s) { try { this.onStatus?.(s); } catch { /* the app's callback */ } }
  _send(msg) {
    if (!this.ws || this.ws.readyState !== 1) throw new Error('not connected');
    this.ws.send(JSON.stringify(msg));
  }
  _backoff() {
    const ceiling = Math.min(this.backoffMaxMs, this.backoffBaseMs * 2 ** this._attempt);
    return ceiling / 2 + Math.random() * (ceiling / 2);
  }
  start() { if (!this._started) { this._started = true; this._connect(); } return this; }
  async _connect() {
    if (this._closing) return;
    let ws;
    try {
      this._token = await this.credential();
      ws = new this.W(this.url);
    } catch (e) { this._scheduleReconnect(); return; }
    this.ws = ws;
    let lastRx = Date.now();
    let confirmed = false;
    const beat = setInterval(() => {
      if (Date.now() - lastRx > this.heartbeatMs + this.heartbeatTimeoutMs) { finish(); try { ws.close(); } catch { /* */ } return; }
      if (ws.readyState === 1) ws.send('{"type":"ping"}');
    }, this.heartbeatMs);
    let finished = false;
    const finish = () => {
      if (finished) return;
      finished = true;
      clearInterval(beat);
      if (this.ws === ws) this.ws = null;
      for (const ch of this.channels.values()) ch.subscribed = false;
      if (confirmed) this._attempt = 0;
      if (!this._closing) { this._status('disconnected'); this._scheduleReconnect(); }
    };
    ws.onopen = () => {
      lastRx = Date.now();
      this._status('connected');
      for (const ch of this.channels.values()) {
        if (!ch.error || !FATAL.has(ch.error.error?.code)) ws.send(JSON.stringify(ch._message(this._token)));
      }
    };
    ws.onmessage = (e) => {
      lastRx = Date.now();
      let msg;
      try { msg = JSON.parse(typeof e.data === 'string' ? e.data : new TextDecoder().decode(e.data)); } catch { return; }
      if (!msg || typeof msg !== 'object') return;
      const ch = this.channels.get(String(msg.roomId));
      if (!ch) return;
      if (msg.type === 'subscribed') {
        confirmed = true;
        // Presence does not survive the old socket: track the same state again.
        if (ch._tracked != null) ws.send(JSON.stringify({ type: 'track', roomId: ch.room, payload: ch._tracked }));
      }
      if (msg.type === 'error' && ch._pending) { ch._handle(msg); return; }
      if (msg.type === 'error' && !FATAL.has(msg.error?.code)) {
        ch._handle(msg); ch.error = null;
        finish();
        try { ws.close(); } catch { /* */ }
        return;
      }
      ch._handle(msg);
    };
    ws.onclose = () => finish();
    // (finish first: closing a socket that failed may fire `error` again synchronously.)
    ws.onerror = () => { if (finished) return; finish(); try { ws.close(); } catch { /* */ } };
  }
  _scheduleReconnect() {
    if (this._closing) return;
    this.reconnects++;
    const delay = this._backoff();
    this._attempt++;
    this._timer = setTimeout(() => this._connect(), delay);
  }
  /** Subscribe to the project (`filters`: {table: {column, op, value}}), or with `topic` to one of its
   * topics; resolves once `subscribed` arrives (rejects with the server's error). */
  subscribe({ tables, operations, since, onEvent, filters, topic, timeoutMs = 10000 } = {}) {
    const room = `project_${this.projectId}` + (topic != null ? `:${topic}` : '');
    const ch = new Channel(this, room, { tables, operations, since, onEvent, filters });
    this.channels.set(room, ch);
    if (this.ws && this.ws.readyState === 1) this.ws.send(JSON.stringify(ch._message(this._token)));
    this.start();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no `subscribed` from the realtime service')), timeoutMs);
      ch._readyWaiters.push((ok) => {
        clearTimeout(timer);
        if (ok) resolve(ch);
        else {
          const err = ch.error?.error ?? { code: 'CLOSED', message: 'The realtime connection was closed.' };
          ch._buffer = ch._buffer.filter((m) => m !== ch.error);
          reject(new FluxbaseError(0, String(err.code), String(err.message), { body: ch.error }));
        }
      });
    });
  }
  /** Drop the current socket; it reconnects and resumes (network changes, tests). */
  disconnect() { try { this.ws?.close(); } catch { /* */ } }
  close() {
    this._closing = true;
    clearTimeout(this._timer);
    for (const ch of this.channels.values()) { ch.closed = true; ch._settle(false); }
    try { this.ws?.close(); } catch { /* */ }
    this.ws = null;
  }
}

// -- webhooks -------------------------------------------------------------------------------------

function header(headers, name) {
  if (typeof headers?.get === 'function') return headers.get(name);
  for (const [k, v] of Object.entries(headers ?? {})) if (k.toLowerCase() === name) return v;
  return null;
}
function timingSafeEqual(a, b) {
  if (a.length !== b.length) return false;
  let d = 0;
  for (let i = 0; i < a.length; i++) d |= a[i] ^ b[i];
  return d === 0;
}
async function hmac(keyBytes, dataBytes) {
  const key = await crypto.subtle.importKey('raw', keyBytes, { name: 'HMAC', hash: 'SHA-256' }, false, ['sign']);
  return new Uint8Array(await crypto.subtle.sign('HMAC', key, dataBytes));
}

/** Verify a webhook delivery and return its parsed JSON. Needs the raw body (string or bytes),
 * the headers (a Headers object or a plain object) and the endpoint's secret. Checks the
 * Standard Webhooks signature with the timestamp within `toleranceSec` (replays) and, when
 * present, `X-Fluxbase-Signature`. Throws WebhookVerificationError. Uses WebCrypto only. */
export async function verifyWebhook(rawBody, headers, secret, { toleranceSec = 300, now = Date.now() / 1000 } = {}) {
  if (!secret) throw new WebhookVerificationError('no webhook secret configured');
  const enc = new TextEncoder();
  const body = typeof rawBody === 'string' ? enc.encode(rawBody) : new Uint8Array(rawBody);
  const id = header(headers, 'webhook-id');
  const ts = header(headers, 'webhook-timestamp');
  const sigs = header(headers, 'webhook-signature');
  if (!id || !ts || !sigs) throw new WebhookVerificationError('missing webhook-id, webhook-timestamp or webhook-signature');
  if (!/^\d+$/.test(ts)) throw new WebhookVerificationError('webhook-timestamp is not a number');
  if (Math.abs(now - Number(ts)) > toleranceSec) throw new WebhookVerificationError('webhook-timestamp is outside the tolerance (a replay?)');
  let key = enc.encode(secret);
  if (secret.startsWith('whsec_')) { try { key = unb64(secret.slice(6)); } catch { key = enc.encode(secret); } }
  const prefix = enc.encode(`${id}.${ts}.`);
  const signed = new Uint8Array(prefix.length + body.length);
  signed.set(prefix); signed.set(body, prefix.length);
  const expected = await hmac(key, signed);
  let ok = false;
  for (const part of sigs.split(/\s+/)) {
    const [v, value] = part.split(',', 2);
    if (v !== 'v1' || !value) continue;
    let given;
    try { given = unb64(value); } catch { continue; }
    ok = timingSafeEqual(given, expected) || ok;
  }
  if (!ok) throw new WebhookVerificationError('webhook-signature does not match');
  const fx = header(headers, 'x-fluxbase-signature');
  if (fx != null) {
    const want = 'sha256=' + [...(await hmac(enc.encode(secret), body))].map((b) => b.toString(16).padStart(2, '0')).join('');
    if (!timingSafeEqual(enc.encode(fx.trim()), enc.encode(want))) throw new WebhookVerificationError('X-Fluxbase-Signature does not match');
  }
  try { return JSON.parse(new TextDecoder().decode(body)); } catch { throw new WebhookVerificationError('the body is not JSON'); }
}
export { verifyWebhook as verify };
