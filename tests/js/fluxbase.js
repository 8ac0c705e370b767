const BASE_URL = 'https://fluxbase.vercel.app';
const API_KEY  = process.env.FLUXBASE_API_KEY;
const PROJECT  = process.env.FLUXBASE_PROJECT_ID;

async function query(sql, params = []) {
  const res = await fetch(`${BASE_URL}/api/execute-sql`, {
    method: 'POST',
    headers: {
      'Content-Type': 'application/json',
      'Authorization': `Bearer ${API_KEY}`,
    },
    body: JSON.stringify({ projectId: PROJECT, query: sql, params }),
  });

  const json = await res.json();
  if (!json.success) throw new Error(json.error?.message ?? 'Query failed');
  return json.result.rows;
}

// Usage
const users = await query('SELECT id, name FROM users WHERE active = $1', [true]);
console.log(users);
