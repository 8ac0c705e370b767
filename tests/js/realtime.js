const WS_URL    = process.env.NEXT_PUBLIC_WS_URL ?? 'wss://fluxbase-realtime.onrender.com';
const PROJECT_ID = 'YOUR_PROJECT_ID';

let socket;
let reconnectDelay = 1000;

function connect() {
  socket = new WebSocket(WS_URL);

  socket.onopen = () => {
    reconnectDelay = 1000; // reset on successful connection
    socket.send(JSON.stringify({
      type:   'subscribe',
      roomId: `project_${PROJECT_ID}`,
    }));
    console.log('[WS] Connected and subscribed.');
  };

  socket.onmessage = ({ data }) => {
    const msg = JSON.parse(data);

    switch (msg.type) {
      case 'subscribed':
        console.log('[WS] Subscription confirmed.');
        break;

      case 'db_event': {
        const { operation, table, record, old } = msg.payload ?? {};
        if (operation === 'INSERT') console.log(`+  ${table}`, record);
        if (operation === 'UPDATE') console.log(`~  ${table}`, { old, record });
        if (operation === 'DELETE') console.log(`-  ${table}`, record);
        break;
      }

      default:
        if (msg.payload?.event_type === 'schema_update') {
          console.log('[WS] Schema changed — refresh your table list.');
        }
    }
  };

  socket.onclose = () => {
    console.warn(`[WS] Disconnected. Reconnecting in ${reconnectDelay}ms...`);
    setTimeout(connect, reconnectDelay);
    reconnectDelay = Math.min(reconnectDelay * 2, 15000);
  };

  socket.onerror = (err) => console.error('[WS] Error:', err);
}

connect();
