// A load client for bench/realtime.py, lighter than the server it measures: Node's built-in
// WebSocket (Node 22+, or Node 20 with --experimental-websocket), one process, one event loop.
//
//   node --experimental-websocket bench/realtime_load.mjs <mode> <url> <token> <room> <sockets> [events]
//
// mode `latency`: subscribe <sockets> sockets, print "ready", then read until every socket got
// <events> db_events; each row's `v` is the wall-clock time (ms since the epoch) its writer began
// the commit, so a latency is arrival minus that (commit time included: an upper bound). Prints
// one JSON line {deliveries, p50, p99, mean, max} in ms, and cpuS: the client's CPU seconds.
// mode `idle`: open <sockets> subscribed sockets, print "ready", and hold them until stdin closes.
import { createInterface } from 'node:readline';

// The `ws` package where bench/.node has it (`npm install --prefix bench/.node ws`: lighter per
// message than Node's built-in WebSocket), else the built-in one; the result says which.
let WebSocketClass = globalThis.WebSocket;
let client = 'node-builtin';
try {
  WebSocketClass = (await import(new URL('./.node/node_modules/ws/wrapper.mjs', import.meta.url))).default;
  client = 'ws';
} catch {
  // no `ws`: the built-in client
}

const [mode, url, token, room, nArg, eventsArg] = process.argv.slice(2);
const n = Number(nArg);
const events = Number(eventsArg ?? 0);
const now = () => performance.timeOrigin + performance.now();

function open() {
  return new Promise((resolve, reject) => {
    const ws = new WebSocketClass(`${url}/?token=${encodeURIComponent(token)}`);
    ws.onerror = (e) => reject(new Error(`socket error: ${e.message ?? e}`));
    ws.onopen = () => ws.send(JSON.stringify({ type: 'subscribe', roomId: room }));
    ws.onmessage = (e) => {
      const msg = JSON.parse(e.data);
      if (msg.type === 'subscribed') resolve(ws);
      else if (msg.type === 'error') reject(new Error(JSON.stringify(msg)));
    };
  });
}

const socks = [];
let cpuAtReady = 0;
for (let i = 0; i < n; i += 200) {
  const batch = [];
  for (let j = i; j < Math.min(n, i + 200); j++) batch.push(open());
  socks.push(...(await Promise.all(batch)));
}

if (mode === 'idle') {
  for (const ws of socks) ws.onmessage = null;
  console.log('ready');
  createInterface({ input: process.stdin }).on('close', () => { for (const ws of socks) ws.close(); process.exit(0); });
} else {
  const lat = new Float64Array(n * events);
  let count = 0;
  let done = 0;
  const finish = () => {
    const sorted = lat.subarray(0, count).sort();
    let sum = 0;
    for (const x of sorted) sum += x;
    console.log(JSON.stringify({
      deliveries: count,
      p50: sorted[Math.floor(count / 2)],
      p99: sorted[Math.floor(count * 0.99)],
      mean: sum / count,
      max: sorted[count - 1],
      cpuS: (process.cpuUsage().user + process.cpuUsage().system) / 1e6 - cpuAtReady, // while receiving
      client,
    }));
    for (const ws of socks) ws.close();
    process.exit(0);
  };
  for (const ws of socks) {
    let got = 0;
    ws.onmessage = (e) => {
      const t = now();
      const data = e.data;
      if (!data.includes('"db_event"')) return;
      const m = /"v": ?"([0-9.]+)"/.exec(data);
      if (!m) return;
      lat[count++] = t - Number(m[1]);
      if (++got === events && ++done === n) finish();
    };
  }
  setTimeout(() => { console.error(`timed out: ${done}/${n} sockets complete`); finish(); }, 120000);
  cpuAtReady = (process.cpuUsage().user + process.cpuUsage().system) / 1e6;
  console.log('ready');
}
