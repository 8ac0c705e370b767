// Serves the reference doc's webhook-handler.js, unchanged, as a real HTTP endpoint:
// each request becomes a WHATWG Request, its Response goes back to Fluxbase.
import http from 'node:http';
import { POST } from './webhook-handler.js';

const port = Number(process.env.PORT);
http
  .createServer(async (req, res) => {
    const chunks = [];
    for await (const c of req) chunks.push(c);
    const request = new Request(`http://127.0.0.1:${port}${req.url}`, {
      method: req.method,
      headers: req.headers,
      body: Buffer.concat(chunks),
    });
    const response = await POST(request);
    res.writeHead(response.status, { 'content-type': 'text/plain' });
    res.end(await response.text());
  })
  .listen(port, '127.0.0.1', () => console.log('listening'));
