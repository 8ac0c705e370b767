import crypto from 'crypto';

export async function POST(req) {
  const rawBody = await req.text();
  const sig     = req.headers.get('x-fluxbase-signature') ?? '';
  const secret  = process.env.FLUXBASE_WEBHOOK_SECRET;

  const expected = crypto
    .createHmac('sha256', secret)
    .update(rawBody)
    .digest('hex');

  if (sig !== `sha256=${expected}`) {
    return new Response('Unauthorized', { status: 401 });
  }

  const event = JSON.parse(rawBody);
  console.log('[Webhook]', event.event_type, event.data.new);

  // Your business logic here...
  return new Response('OK', { status: 200 });
}
