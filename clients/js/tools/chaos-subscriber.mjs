// Subscribes with the client and prints one JSON line per db_event ({v, cursor}); the chaos test
// (tests/test_clients_chaos.py) cuts its connection and kills the realtime service meanwhile.
import { createClient } from '../src/index.js';

const env = process.env;
const fx = createClient({ url: env.FLUXBASE_URL, projectId: env.FLUXBASE_PROJECT_ID, apiKey: env.FLUXBASE_API_KEY, realtimeUrl: env.FLUXBASE_REALTIME_URL });
const rt = fx.realtime({ heartbeatMs: 2000, heartbeatTimeoutMs: 2000, backoffBaseMs: 100, backoffMaxMs: 1000,
  onStatus: (s) => console.log(JSON.stringify({ status: s })) });
const ch = await rt.subscribe({ tables: ['items'] });
console.log(JSON.stringify({ subscribed: ch.cursor }));
ch.on((m) => {
  if (m.type === 'db_event') console.log(JSON.stringify({ v: m.payload.record.v, cursor: m.cursor }));
  else console.log(JSON.stringify({ other: m.type }));
});
process.on('SIGTERM', () => { console.log(JSON.stringify({ reconnects: rt.reconnects, dropped: ch.duplicatesDropped })); rt.close(); process.exit(0); });
