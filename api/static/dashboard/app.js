// The reference dashboard: sign-in, the shell (navigation, live status) and a hash router.
// Every view reads the public API with the caller's token and follows the live stream.

import {api, ApiError, newKey, session} from './api.js';
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
  const key = newKey();  // one action: a retry after a lost answer is applied once
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
        done(await action(reason.value.trim(), document.getElementById('confirm-force').checked, key));
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
let generation = 0;  // each navigation's number: a view that loads after a newer one is dropped
let ctx = null;
let config = {signIn: 'token'};
let stream = null;

function parseHash() {
  const raw = location.hash.replace(/^#/, '');
  const [path, search = ''] = raw.split('?');
  return {path: path || '/overview', params: new URLSearchParams(search)};
}

export function navigate(path, params) {
  const q = params ? new URLSearchParams(params).toString() : '';
  location.hash = `#${path}${q ? `?${q}` : ''}`;
}

function leaveView() {
  generation += 1;
  if (cleanup) { cleanup(); cleanup = null; }
}

// Each view renders into a container of its own: once a newer navigation has replaced it,
// whatever a late answer renders lands in a detached element, and its cleanup runs at once.
async function route() {
  if (!session.token) return;
  leaveView();
  const mine = generation;
  const {path, params} = parseHash();
  for (const link of document.querySelectorAll('#nav a')) {
    const section = link.getAttribute('href').slice(1);
    if (path === section || path.startsWith(`${section}/`)) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  const container = h('div', {class: 'view'}, h('p', {class: 'muted'}, 'Loading…'));
  replace(main, container);
  delete main.dataset.route;
  for (const [pattern, view] of ROUTES) {
    const match = path.match(pattern);
    if (!match) continue;
    let done = null;
    try {
      done = (await view()(container, {...ctx, params, args: match.slice(1).map(decodeURIComponent)}))
        || null;
    } catch (e) {
      if (mine !== generation || e.status === 401) return;  // superseded, or signed out
      replace(container, h('h1', {}, 'Something went wrong'),
        h('p', {class: 'error', role: 'alert'}, e instanceof ApiError ? e.describe() : String(e)));
    }
    if (mine !== generation) {
      if (done) done();
      return;
    }
    cleanup = done;
    main.dataset.route = path;  // loaded (the browser tests wait for it)
    return;
  }
  replace(container, h('h1', {}, 'Not found'), h('p', {}, h('a', {href: '#/overview'}, 'Overview')));
}

function signIn(message) {
  leaveView();
  window.removeEventListener('hashchange', route);
  if (stream) { stream.stop(); stream = null; }
  session.clear();
  document.getElementById('nav').hidden = true;
  document.getElementById('session').hidden = true;
  document.getElementById('who').textContent = '';
  const input = h('textarea', {id: 'token', rows: 4, autocomplete: 'off', spellcheck: 'false'});
  const oidc = config.signIn === 'oidc';
  const form = h('form', {class: 'card signin', onsubmit: (e) => {
    e.preventDefault();
    if (!input.value.trim()) return;
    session.set(input.value.trim());
    history.replaceState(null, '', `${location.pathname}#/overview`);
    start();
  }},
  h('h1', {}, 'Sign in'),
  message ? h('p', {class: 'error', role: 'alert'}, message) : null,
  oidc
    ? h('p', {}, h('a', {class: 'button primary', href: config.loginUrl},
      'Sign in with your identity provider'))
    : h('p', {}, 'Open the address ', h('code', {}, 'make dev'),
      ' prints (it ends in #token=…), or paste a token:'),
  oidc ? null : h('label', {for: 'token'}, 'Bearer token'),
  oidc ? null : input,
  oidc ? null : h('button', {type: 'submit', class: 'primary'}, 'Sign in'));
  replace(main, form);
}

// The token: from the fragment `#token=...` that `make dev` prints (token sign-in only: with
// an issuer a link carrying someone's token signs nobody in), or, after the issuer's
// callback, collected once from the server (it never travels in a URL).
async function takeToken() {
  const raw = location.hash.replace(/^#/, '');
  if (raw.startsWith('token=')) {
    if (config.signIn === 'token') session.set(decodeURIComponent(raw.slice('token='.length)).trim());
    history.replaceState(null, '', `${location.pathname}#/overview`);
  }
  if (!session.token && config.signIn === 'oidc') {
    try {
      const r = await fetch('/auth/session', {method: 'POST'});
      if (r.ok) session.set((await r.json()).token);
    } catch (e) { /* not signed in */ }
  }
}

function startStream(routedBeforeOpen) {
  const live = document.getElementById('live');
  let opened = false;
  return new Promise((resolve) => {
    stream = new LiveStream({
      topics: ['vehicles', 'rollouts', 'audit'],
      onEvent: (type, data) => bus.emit(type, data),
      onState: (state) => {
        live.textContent = state === 'live' ? 'live' : 'reconnecting…';
        live.className = `live ${state}`;
        live.dataset.state = state;
        if (state === 'live' && !opened) {
          opened = true;
          // A view that read its data before the stream was subscribed may have missed a
          // change in between: it reads again.
          if (routedBeforeOpen()) bus.emit('resync', {});
          resolve();
        }
      },
    });
    stream.start();
  });
}

async function start() {
  try { config = await (await fetch('/ui/config.json')).json(); } catch (e) { /* defaults */ }
  await takeToken();
  if (!session.token) return signIn();
  let me;
  try {
    me = (await api('/me')).data;
  } catch (e) {
    if (e.status === 401) return signIn('That sign-in was refused or has expired: sign in again.');
    return replace(main, h('p', {class: 'error', role: 'alert'}, e.describe()));
  }
  document.getElementById('nav').hidden = false;
  document.getElementById('session').hidden = false;
  document.getElementById('who').textContent = `${me.subject} (${me.role})`;
  document.getElementById('sign-out').onclick = () => {
    history.replaceState(null, '', location.pathname);
    signIn();
  };
  ctx = {me, bus, confirmAction, navigate};
  let routed = false;
  // The first view waits (up to 3 s) for the stream, so nothing between its read and the
  // stream's start is missed; a slower stream makes it read again once open.
  const opened = startStream(() => routed);
  await Promise.race([opened, new Promise((r) => setTimeout(r, 3000))]);
  window.addEventListener('hashchange', route);
  routed = true;
  await route();
}

window.addEventListener('motorcade:unauthenticated', () => {
  if (session.token) signIn('Your session ended: sign in again.');
});
// The stream could not resume (too far behind, or nothing received yet to resume after):
// the view re-reads what it shows. A form being filled in is left alone.
bus.on('resync', () => { if (session.token && parseHash().path !== '/rollouts/new') route(); });

start();
