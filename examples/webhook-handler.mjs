// A serverless webhook handler (Vercel / Next.js route, Cloudflare Workers, Deno Deploy, any
// runtime with the Fetch API) using the Fluxbase JS client's verifyWebhook (WebCrypto only).
// Set FLUXBASE_WEBHOOK_SECRET to the endpoint's secret. Local run (Node >= 20):
//   FLUXBASE_WEBHOOK_SECRET=whsec_... node examples/webhook-handler.mjs 9000
import { verifyWebhook, WebhookVerificationError } from '../clients/js/src/index.js';

export async function POST(req) {
  const rawBody = new Uint8Array(await req.arrayBuffer());   // the raw bytes, before any JSON parsing
  let event;
  try {
    event = await verifyWebhook(rawBody, req.headers, globalThis.process?.env?.FLUXBASE_WEBHOOK_SECRET ?? globalThis.FLUXBASE_WEBHOOK_SECRET);
  } catch (e) {
    if (e instanceof WebhookVerificationError) return new Response(`Unauthorized: ${e.message}`, { status: 401 });
    throw e;
  }
  // Delivery is at-least-once: deduplicate on req.headers.get('webhook-id') in your database.
  console.log('[Webhook]', event.event_type, JSON.stringify(event.data.new));
  return new Response('OK', { status: 200 });
}

export default { fetch: POST };   // Cloudflare Workers / Deno style

if (globalThis.process?.argv?.[1]?.endsWith('webhook-handler.mjs')) {
  const { createServer } = await import('node:http');
  const port = Number(process.argv[2] ?? 9000);
  createServer(async (req, res) => {
    const chunks = [];
    for await (const c of req) chunks.push(c);
    const request = new Request(`http://127.0.0.1:${port}${req.url}`, { method: req.method, headers: req.headers, body: Buffer.concat(chunks) });
    const out = await POST(request);
    res.writeHead(out.status);
    res.end(await out.text());
  }).listen(port, '127.0.0.1', () => console.log(`listening on ${port}`));
}
