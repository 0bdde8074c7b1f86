// The public API, with the caller's bearer token (kept in this tab's sessionStorage only).

const TOKEN = 'motorcade.token';
export const BASE = '/api/v1';

export const session = {
  get token() { return sessionStorage.getItem(TOKEN); },
  set(token) { sessionStorage.setItem(TOKEN, token); },
  clear() { sessionStorage.removeItem(TOKEN); },
};

export class ApiError extends Error {
  constructor(status, code, message, details = []) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }

  // "CODE: message (field: problem; ...)", for a person.
  describe() {
    const parts = (this.details || [])
      .map((d) => [d.field, d.message].filter(Boolean).join(': '))
      .filter(Boolean);
    return `${this.code}: ${this.message}${parts.length ? ` (${parts.join('; ')})` : ''}`;
  }
}

export function newKey() { return uuid(); }

function uuid() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}

export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v === undefined || v === null || v === '') continue;
    for (const one of Array.isArray(v) ? v : [v]) q.append(k, one);
  }
  const s = q.toString();
  return s ? `?${s}` : '';
}

// `api('/vehicles', {query: {...}})` → the response's JSON envelope; an error answer throws an
// ApiError with the envelope's code. A write carries an Idempotency-Key: the caller passes
// one per user action (`newKey()`) and the same again when the person retries it, so an
// action whose answer was lost is applied once.
export async function api(path, {method = 'GET', body, params, raw = false, key} = {}) {
  const headers = {Authorization: `Bearer ${session.token}`};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (method === 'POST') headers['Idempotency-Key'] = key || uuid();
  let response;
  try {
    response = await fetch(BASE + path + query(params), {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError(0, 'UNREACHABLE', 'the API did not answer; is it running?');
  }
  if (raw && response.ok) return response;
  let envelope = null;
  try { envelope = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) {
    const err = envelope && envelope.error;
    const error = new ApiError(response.status, err ? err.code : `HTTP_${response.status}`,
      err ? err.message : response.statusText, err ? err.details : []);
    if (response.status === 401) window.dispatchEvent(new CustomEvent('motorcade:unauthenticated',
      {detail: error}));
    throw error;
  }
  return envelope;
}
