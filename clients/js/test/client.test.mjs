// The JavaScript client against the real stack. Run by tests/test_clients_js.py, which starts
// PostgreSQL, S3, the API and the realtime service and passes them in the environment.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createClient, FluxbaseError, SqlError, verifyWebhook, WebhookVerificationError, compareCursors } from '../src/index.js';

const env = process.env;
const opts = { url: env.FLUXBASE_URL, projectId: env.FLUXBASE_PROJECT_ID, apiKey: env.FLUXBASE_API_KEY, realtimeUrl: env.FLUXBASE_REALTIME_URL };
const fx = createClient(opts);

test('sql: exact values, batch with the failing index, typed errors', async () => {
  await fx.sql('CREATE TABLE js_t (id int8 PRIMARY KEY, n numeric, b bytea)');
  const big = 2n ** 62n + 1n;
  const r = await fx.sql('INSERT INTO js_t VALUES ($1, $2, $3) RETURNING *', [big, '12345678901234567890.5', new Uint8Array([0, 255])]);
  assert.deepEqual(r.columns, ['id', 'n', 'b']);
  assert.equal(r.rows[0].id, big.toString());
  assert.equal(r.rows[0].n, '12345678901234567890.5');
  assert.equal(r.rows[0].b, 'AP8=');
  assert.equal(r.executionInfo.operation, 'INSERT');
  await assert.rejects(fx.sql('SELECT * FROM usrs'), (e) => e instanceof SqlError && e.status === 200 && e.code === 'SQL_EXEC_ERROR' && e.sqlstate === '42P01');
  const out = await fx.batch(['INSERT INTO js_t (id) VALUES (1)', ['SELECT count(*)::int AS c FROM js_t', []]]);
  assert.deepEqual(out[1].rows, [{ c: 2 }]);
  await assert.rejects(fx.transaction(['INSERT INTO js_t (id) VALUES (2)', 'INSERT INTO js_t (id) VALUES (1)']),
    (e) => e instanceof SqlError && e.statementIndex === 1 && e.sqlstate === '23505');
  assert.deepEqual((await fx.sql('SELECT count(*)::int AS c FROM js_t')).rows, [{ c: 2 }]);
  const bad = createClient({ ...opts, apiKey: 'flx_live_' + 'x'.repeat(49) });
  await assert.rejects(bad.sql('SELECT 1'), (e) => e instanceof FluxbaseError && e.status === 401 && e.code === 'AUTH_REQUIRED' && e.message.length > 0);
});

test('records: the query builder', async () => {
  await fx.sql('CREATE TABLE js_items (id serial PRIMARY KEY, name text, qty int)');
  const ins = await fx.from('js_items').insert(Array.from({ length: 10 }, (_, i) => ({ name: `n${i}`, qty: i })));
  assert.equal(ins.length, 10);
  const got = await fx.from('js_items').gte('qty', 3).lt('qty', 8).order('qty', { desc: true }).select('name').get();
  assert.deepEqual(got, [7, 6, 5, 4, 3].map((i) => ({ name: `n${i}` })));
  const page = await fx.from('js_items').order('id').range(2, 4).page();
  assert.deepEqual(page.records.map((r) => r.qty), [2, 3, 4]);
  assert.equal(page.hasMore, true);
  const all = [];
  for await (const r of fx.from('js_items').in('qty', [1, 9]).order('qty').all(1)) all.push(r.qty);
  assert.deepEqual(all, [1, 9]);
  const id = ins[0].id;
  assert.equal((await fx.from('js_items').update(id, { qty: 100 })).qty, 100);
  assert.equal((await fx.from('js_items').getOne(id)).qty, 100);
  await fx.from('js_items').delete(id);
  await assert.rejects(fx.from('js_items').getOne(id), (e) => e.status === 404 && e.code === 'NOT_FOUND');
});

test('storage: upload, presigned POST straight to S3, list, download URL, remove', async () => {
  await fx.storage.createBucket('js-docs');
  const bytes = new Uint8Array(300_000).map((_, i) => i % 251);
  const progress = [];
  const f = await fx.storage.upload('js-docs', bytes, { name: 'a.bin', onProgress: (s, t) => progress.push([s, t]) });
  assert.equal(f.size, bytes.length);
  assert.deepEqual(progress.at(-1), [bytes.length, bytes.length]);
  const d = await fx.storage.uploadDirect('js-docs', 'hello S3', { name: 'b.txt', contentType: 'text/plain' });
  assert.equal(d.size, 8);
  const names = (await fx.storage.list('js-docs')).files.map((x) => x.name).sort();
  assert.deepEqual(names, ['a.bin', 'b.txt']);
  const url = await fx.storage.downloadUrl(f.s3_key);
  const back = new Uint8Array(await (await fetch(url)).arrayBuffer());
  assert.deepEqual(back, bytes);
  const out = await fx.storage.remove(f.s3_key, d.s3_key);
  assert.deepEqual(out.deleted.sort(), [f.s3_key, d.s3_key].sort());
});

test('end-user auth: token on every call, single-flight refresh, logout', async () => {
  await fx.sql('CREATE TABLE js_notes (id serial PRIMARY KEY, owner text DEFAULT auth.uid(), body text)');
  await fx.sql('ALTER TABLE js_notes ENABLE ROW LEVEL SECURITY');
  await fx.sql('CREATE POLICY own ON js_notes USING (owner = auth.uid()) WITH CHECK (owner = auth.uid())');
  await fx.sql("INSERT INTO js_notes (owner, body) VALUES ('someone-else', 'hidden')");
  const app = createClient({ ...opts, apiKey: env.FLUXBASE_USER_KEY });
  const events = [];
  app.auth.onAuthStateChange((e) => events.push(e));
  await app.auth.register('bea@example.com', 'correct horse battery');
  const s = await app.auth.login('bea@example.com', 'correct horse battery');
  assert.equal(s.user.email, 'bea@example.com');
  await app.sql("INSERT INTO js_notes (body) VALUES ('mine')");
  assert.deepEqual((await app.sql('SELECT body FROM js_notes')).rows, [{ body: 'mine' }]);
  app.auth.session.expiresAt = Date.now() / 1000 + 5;
  const before = app.auth.session.refreshToken;
  const rs = await Promise.all(Array.from({ length: 10 }, () => app.sql('SELECT count(*)::int AS c FROM js_notes')));
  assert.ok(rs.every((r) => r.rows[0].c === 1));
  assert.deepEqual(events, ['SIGNED_IN', 'TOKEN_REFRESHED']);
  assert.notEqual(app.auth.session.refreshToken, before);
  assert.equal((await app.auth.me()).email, 'bea@example.com');
  await app.auth.logout();
  assert.equal(events.at(-1), 'SIGNED_OUT');
  await assert.rejects(app.sql('SELECT 1'), (e) => e.status === 401 && e.code === 'USER_TOKEN_REQUIRED');
});

test('realtime: filters, broadcast, resume after a cut without loss or repeat', async () => {
  await fx.sql('CREATE TABLE js_a (id serial PRIMARY KEY, v text)');
  await fx.sql('CREATE TABLE js_b (id serial PRIMARY KEY, v text)');
  const statuses = [];
  const rt = fx.realtime({ onStatus: (s) => statuses.push(s), backoffBaseMs: 100 });
  try {
    const ch = await rt.subscribe({ tables: ['js_a'] });
    await fx.sql("INSERT INTO js_b (v) VALUES ('other')");
    await fx.sql("INSERT INTO js_a (v) VALUES ('one')");
    let ev = await ch.next(10000);
    // A CREATE TABLE's schema_update may be read by the service after the subscription began.
    while (ev.type === 'schema_update') ev = await ch.next(10000);
    assert.equal(ev.type, 'db_event');
    assert.deepEqual(ev.payload.record, { id: 1, v: 'one' });
    ch.broadcast('hello', { x: 1 });
    const b = await ch.next(10000);
    assert.equal(b.type, 'broadcast');
    assert.deepEqual(b.payload, { x: 1 });
    rt.disconnect();
    for (const v of ['two', 'three']) await fx.sql('INSERT INTO js_a (v) VALUES ($1)', [v]);
    const got = [await ch.next(15000), await ch.next(15000)];
    assert.deepEqual(got.map((m) => m.payload.record.v), ['two', 'three']);
    assert.ok(statuses.includes('disconnected') && statuses.filter((s) => s === 'connected').length >= 2, statuses.join());
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(ch._buffer.length, 0);
  } finally { rt.close(); }
  const refused = fx.realtime({ token: 'flx_live_' + 'y'.repeat(49) });
  try {
    await assert.rejects(refused.subscribe(), (e) => e.code === 'AUTH_REQUIRED');
  } finally { refused.close(); }
});

test('realtime: row filters, topics and presence', async () => {
  await fx.sql('CREATE TABLE js_todos (id serial PRIMARY KEY, owner text, pri int)');
  const rt = fx.realtime({ backoffBaseMs: 100 });
  const other = fx.realtime({ backoffBaseMs: 100 });
  try {
    const ch = await rt.subscribe({ tables: ['js_todos'], filters: { js_todos: { column: 'pri', op: 'gte', value: 5 } } });
    await fx.sql("INSERT INTO js_todos (owner, pri) VALUES ('a', 1), ('b', 7)");
    let ev = await ch.next(10000);
    while (ev.type === 'schema_update') ev = await ch.next(10000);
    assert.equal(ev.payload.record.owner, 'b');
    await assert.rejects(rt.subscribe({ topic: 'x', filters: { js_todos: { column: 'nope', op: 'eq', value: 1 } } }),
      (e) => e.code === 'VALIDATION_ERROR');
    await assert.rejects(rt.subscribe({ filters: { js_todos: { column: 'nope', op: 'eq', value: 1 } } }),
      (e) => e.code === 'VALIDATION_ERROR' && e.message.includes('nope'));
    const chat = await rt.subscribe({ topic: 'js-chat' });
    const seen = await other.subscribe({ topic: 'js-chat' });
    assert.equal((await seen.next(10000)).type, 'presence_state');
    const key = await chat.track({ name: 'ann' });
    let d = await seen.next(10000);
    while (d.type !== 'presence_diff') d = await seen.next(10000);
    assert.deepEqual(d.payload.joins, { [key]: { name: 'ann' } });
    assert.deepEqual(seen.presence, { [key]: { name: 'ann' } });
    await assert.rejects(chat.track({ big: 'x'.repeat(5000) }), (e) => e.code === 'PAYLOAD_TOO_LARGE');
    chat.broadcast('hi', { n: 1 });
    let b = await seen.next(10000);
    while (b.type !== 'broadcast') b = await seen.next(10000);
    assert.ok(b.roomId.endsWith(':js-chat'));
    assert.deepEqual(b.payload, { n: 1 });
    // a cut socket reconnects and tracks the same state again, under a new key
    rt.disconnect();
    for (let i = 0; i < 6 && !(Object.keys(seen.presence).length === 1 && !(key in seen.presence)); i++) await seen.next(15000);
    assert.deepEqual(Object.values(seen.presence), [{ name: 'ann' }]);
    assert.ok(!(key in seen.presence));
    await chat.untrack();
    while (Object.keys(seen.presence).length) await seen.next(10000);
  } finally { rt.close(); other.close(); }
});

test('cursors compare exactly beyond 2^53', () => {
  assert.equal(compareCursors('9007199254740993:1', '9007199254740992:5'), 1);
  assert.equal(compareCursors('10:2', '10:10'), -1);
  assert.equal(compareCursors('7:7', '7:7'), 0);
});

test('webhooks: verify a real delivery; refuse tampering, a wrong secret, a stale timestamp', async (t) => {
  if (!env.FLUXBASE_WEBHOOK_BODY) { t.skip('no delivery captured (FLUXBASE_WEBHOOK_BODY unset)'); return; }
  const body = Buffer.from(env.FLUXBASE_WEBHOOK_BODY, 'base64');
  const headers = new Headers(JSON.parse(env.FLUXBASE_WEBHOOK_HEADERS));
  const secret = env.FLUXBASE_WEBHOOK_SECRET;
  const event = await verifyWebhook(body, headers, secret);
  assert.equal(event.event_type, 'row.inserted');
  const tampered = Buffer.from(body.toString().replace('59.99', '0.01'));
  await assert.rejects(verifyWebhook(tampered, headers, secret), WebhookVerificationError);
  await assert.rejects(verifyWebhook(body, headers, 'whsec_' + 'A'.repeat(32)), WebhookVerificationError);
  await assert.rejects(verifyWebhook(body, headers, secret, { now: Number(headers.get('webhook-timestamp')) + 301 }), WebhookVerificationError);
  const forged = new Headers(headers);
  forged.set('x-fluxbase-signature', 'sha256=' + '0'.repeat(64));
  await assert.rejects(verifyWebhook(body, forged, secret), WebhookVerificationError);
});
