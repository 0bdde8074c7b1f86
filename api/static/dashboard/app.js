// The reference dashboard: sign-in, the shell (navigation, live status) and a hash router.
// Every view reads the public API with the caller's token and follows the live stream.

import {api, ApiError, session} from './api.js';
import {h, replace} from './dom.js';
import {LiveStream} from './stream.js';
import {overview} from './views/overview.js';
import {vehicleList, vehicleDetail} from './views/vehicles.js';
import {rolloutList, rolloutDetail, rolloutCreate} from './views/rollouts.js';
import {auditLog} from './views/audit.js';

const main = document.getElementById('main');

// A small event bus: views subscribe to stream events while they are shown.
const listeners = new Map();
export const bus = {
  on(type, fn) {
    if (!listeners.has(type)) listeners.set(type, new Set());
    listeners.get(type).add(fn);
    return () => listeners.get(type).delete(fn);
  },
  emit(type, data) {
    for (const fn of listeners.get(type) || []) {
      try { fn(data); } catch (e) { console.error(e); }
    }
  },
};

// Asks for a reason (and, for resume, whether to force) and runs `action(reason, force)`;
// the dialog stays open with the API's error until it succeeds or is cancelled.
export function confirmAction({title, text, force = false, action}) {
  const dialog = document.getElementById('confirm');
  const form = document.getElementById('confirm-form');
  const reason = document.getElementById('confirm-reason');
  const error = document.getElementById('confirm-error');
  const ok = document.getElementById('confirm-ok');
  document.getElementById('confirm-title').textContent = title;
  document.getElementById('confirm-text').textContent = text;
  document.getElementById('confirm-force-row').hidden = !force;
  document.getElementById('confirm-force').checked = false;
  ok.textContent = title;
  reason.value = '';
  error.textContent = '';
  return new Promise((resolve) => {
    const done = (value) => {
      form.onsubmit = null;
      document.getElementById('confirm-cancel').onclick = null;
      dialog.onclose = null;
      if (dialog.open) dialog.close();
      resolve(value);
    };
    form.onsubmit = async (e) => {
      e.preventDefault();
      if (!reason.value.trim()) {
        error.textContent = 'A reason is required.';
        reason.focus();
        return;
      }
      ok.disabled = true;
      try {
        done(await action(reason.value.trim(), document.getElementById('confirm-force').checked));
      } catch (err) {
        error.textContent = err instanceof ApiError ? err.describe() : String(err);
      } finally {
        ok.disabled = false;
      }
    };
    document.getElementById('confirm-cancel').onclick = () => done(null);
    dialog.onclose = () => done(null);
    dialog.showModal();
    reason.focus();
  });
}

const ROUTES = [
  [/^\/?$/, () => overview],
  [/^\/overview$/, () => overview],
  [/^\/vehicles$/, () => vehicleList],
  [/^\/vehicles\/(.+)$/, () => vehicleDetail],
  [/^\/rollouts$/, () => rolloutList],
  [/^\/rollouts\/new$/, () => rolloutCreate],
  [/^\/rollouts\/(\d+)$/, () => rolloutDetail],
  [/^\/audit$/, () => auditLog],
];

let cleanup = null;
let ctx = null;

function parseHash() {
  const raw = location.hash.replace(/^#/, '');
  const [path, search = ''] = raw.split('?');
  return {path: path || '/overview', params: new URLSearchParams(search)};
}

export function navigate(path, params) {
  const q = params ? new URLSearchParams(params).toString() : '';
  location.hash = `#${path}${q ? `?${q}` : ''}`;
}

async function route() {
  if (cleanup) { cleanup(); cleanup = null; }
  const {path, params} = parseHash();
  for (const link of document.querySelectorAll('#nav a')) {
    const section = link.getAttribute('href').slice(1);
    if (path === section || path.startsWith(`${section}/`)) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  for (const [pattern, view] of ROUTES) {
    const match = path.match(pattern);
    if (!match) continue;
    replace(main, h('p', {class: 'muted'}, 'Loading…'));
    try {
      cleanup = (await view()(main, {...ctx, params, args: match.slice(1).map(decodeURIComponent)}))
        || null;
    } catch (e) {
      replace(main, h('h1', {}, 'Something went wrong'),
        h('p', {class: 'error', role: 'alert'}, e instanceof ApiError ? e.describe() : String(e)));
    }
    return;
  }
  replace(main, h('h1', {}, 'Not found'), h('p', {}, h('a', {href: '#/overview'}, 'Overview')));
}

function signIn(config, message) {
  document.getElementById('nav').hidden = true;
  document.getElementById('session').hidden = true;
  const input = h('textarea', {id: 'token', rows: 4, autocomplete: 'off', spellcheck: 'false'});
  const form = h('form', {class: 'card signin', onsubmit: (e) => {
    e.preventDefault();
    if (!input.value.trim()) return;
    session.set(input.value.trim());
    location.hash = '#/overview';
    location.reload();
  }},
  h('h1', {}, 'Sign in'),
  message ? h('p', {class: 'error', role: 'alert'}, message) : null,
  config.signIn === 'oidc'
    ? h('p', {}, h('a', {class: 'button primary', href: config.loginUrl},
      'Sign in with your identity provider'))
    : h('p', {}, 'Open the address ', h('code', {}, 'make dev'),
      ' prints (it ends in #token=…), or paste a token:'),
  config.signIn === 'oidc' ? null : h('label', {for: 'token'}, 'Bearer token'),
  config.signIn === 'oidc' ? null : input,
  config.signIn === 'oidc' ? null : h('button', {type: 'submit', class: 'primary'}, 'Sign in'));
  replace(main, form);
}

async function start() {
  // A token in the fragment (make dev, or the OIDC callback): kept for this tab, then removed
  // from the address bar so it is not bookmarked or shared.
  const fragment = new URLSearchParams(location.hash.replace(/^#/, ''));
  if (fragment.get('token')) {
    session.set(fragment.get('token'));
    history.replaceState(null, '', `${location.pathname}#/overview`);
  }
  let config = {signIn: 'token'};
  try { config = await (await fetch('/ui/config.json')).json(); } catch (e) { /* defaults */ }
  if (!session.token) return signIn(config);
  let me;
  try {
    me = (await api('/me')).data;
  } catch (e) {
    if (e.status === 401) { session.clear(); return signIn(config, 'That token was refused: sign in again.'); }
    return replace(main, h('p', {class: 'error', role: 'alert'}, e.describe()));
  }
  window.addEventListener('motorcade:unauthenticated', () => {
    session.clear();
    if (stream) stream.stop();
    signIn(config, 'Your session ended: sign in again.');
  });
  document.getElementById('nav').hidden = false;
  document.getElementById('session').hidden = false;
  document.getElementById('who').textContent = `${me.subject} (${me.role})`;
  document.getElementById('sign-out').onclick = () => {
    session.clear();
    if (stream) stream.stop();
    location.hash = '';
    signIn(config);
  };
  const live = document.getElementById('live');
  const stream = new LiveStream({
    topics: ['vehicles', 'rollouts', 'audit'],
    onEvent: (type, data) => bus.emit(type, data),
    onState: (state) => {
      live.textContent = state === 'live' ? 'live' : 'reconnecting…';
      live.className = `live ${state}`;
      live.dataset.state = state;
    },
  });
  ctx = {me, bus, confirmAction, navigate};
  // The stream could not resume (too far behind, or nothing received yet to resume after):
  // the view re-reads what it shows. A form being filled in is left alone.
  bus.on('resync', () => { if (parseHash().path !== '/rollouts/new') route(); });
  stream.start();
  window.addEventListener('hashchange', route);
  await route();
}

start();
