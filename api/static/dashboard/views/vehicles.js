// Vehicles: filters, search, keyset paging (the API's nextCursor); one vehicle with desired
// vs actual, its reason codes and its timeline.

import {api} from '../api.js';
import {badge, field, h, num, replace, table, when} from '../dom.js';

const FILTERS = ['q', 'status', 'model', 'region', 'ring', 'reasonCode', 'releaseVersion', 'rolloutId'];
const STATUSES = ['', 'in_sync', 'pending', 'updating', 'blocked', 'failed', 'offline'];

// Keyset paging: the cursors of the pages before this one, so "Previous" goes back. A page
// that fails to load says why and leaves the pager where it was.
export function pager(load) {
  const stack = [];
  let current = null;
  let next = null;
  const prevButton = h('button', {type: 'button', onclick: () => go(stack[stack.length - 1], 'prev')}, '← Previous');
  const nextButton = h('button', {type: 'button', onclick: () => go(next, 'next')}, 'Next →');
  const status = h('span', {class: 'muted'});
  const error = h('span', {class: 'error', role: 'alert'});
  async function go(cursor, how) {
    error.textContent = '';
    let meta;
    try {
      meta = await load(cursor);
    } catch (e) {
      if (how === 'first') throw e;  // the view's first read: the page says it failed
      error.textContent = e.describe ? e.describe() : String(e);
      return;
    }
    if (how === 'next') stack.push(current);
    if (how === 'prev') stack.pop();
    if (how === 'first') stack.length = 0;
    current = cursor;
    next = meta.hasMore ? meta.nextCursor : null;
    prevButton.disabled = stack.length === 0;
    nextButton.disabled = !next;
    status.textContent = `page ${stack.length + 1}`;
  }
  return {
    element: h('nav', {class: 'pager', 'aria-label': 'Pages'}, prevButton, status, nextButton, error),
    first: () => go(null, 'first'),
    reload: () => go(current, 'reload'),
  };
}

export async function vehicleList(main, {bus, params, navigate}) {
  const inputs = {
    q: h('input', {type: 'search', placeholder: 'id or prefix', value: params.get('q') || ''}),
    status: h('select', {}, STATUSES.map((s) => h('option', {value: s, selected: params.get('status') === s}, s || 'any'))),
  };
  for (const name of FILTERS.slice(2)) inputs[name] = h('input', {type: 'text', value: params.get(name) || ''});
  const form = h('form', {class: 'filters', role: 'search', onsubmit: (e) => {
    e.preventDefault();
    const chosen = {};
    for (const name of FILTERS) if (inputs[name].value) chosen[name] = inputs[name].value;
    navigate('/vehicles', chosen);
  }},
  field('Search', inputs.q), field('Status', inputs.status), field('Model', inputs.model),
  field('Region', inputs.region), field('Ring', inputs.ring), field('Reason code', inputs.reasonCode),
  field('Release', inputs.releaseVersion), field('Rollout id', inputs.rolloutId),
  h('button', {type: 'submit', class: 'primary'}, 'Filter'));
  const body = h('tbody');
  const rows = new Map();
  const filters = Object.fromEntries(FILTERS.filter((f) => params.get(f)).map((f) => [f, params.get(f)]));
  const pages = pager(async (cursor) => {
    const res = await api('/vehicles', {params: {...filters, cursor, limit: 50}});
    rows.clear();
    replace(body, res.data.length ? res.data.map((v) => {
      const status = h('td', {}, badge(v.status));
      const reasons = h('td', {}, v.reasonCodes.join(', '));
      rows.set(v.id, {status, reasons});
      return h('tr', {},
        h('th', {scope: 'row'}, h('a', {href: `#/vehicles/${encodeURIComponent(v.id)}`}, v.id)),
        status, h('td', {}, v.model), h('td', {}, v.region), h('td', {}, v.ring),
        h('td', {}, v.desired.releaseVersion || '—'), h('td', {}, v.actual.releaseVersion || '—'),
        reasons, h('td', {}, when(v.lastSeenAt)));
    }) : h('tr', {}, h('td', {colspan: 9, class: 'muted'}, 'No vehicle matches.')));
    return res.metadata;
  });
  replace(main, h('h1', {}, 'Vehicles'), form,
    h('div', {class: 'scroll'}, h('table', {},
      h('thead', {}, h('tr', {}, ['vehicle', 'status', 'model', 'region', 'ring', 'desired',
        'actual', 'reason codes', 'last seen'].map((x) => h('th', {scope: 'col'}, x)))),
      body)),
    pages.element);
  await pages.first();
  // Live: a vehicle on this page changes status in place.
  return bus.on('vehicle.updated', (data) => {
    for (const v of data.vehicles || []) {
      const row = rows.get(v.id);
      if (!row) continue;  // a delta carries only what changed: the rest stays as shown
      if (v.status) replace(row.status, badge(v.status));
      if (v.reasonCodes) replace(row.reasons, v.reasonCodes.join(', '));
    }
  });
}

export async function vehicleDetail(main, {bus, args}) {
  const [id] = args;
  const timeline = h('tbody');
  let older = null;
  const olderError = h('span', {class: 'error', role: 'alert'});
  const more = h('button', {type: 'button', onclick: () => loadTimeline(older).then(
    () => { olderError.textContent = ''; },
    (e) => { olderError.textContent = e.describe ? e.describe() : String(e); })}, 'Older events');
  async function loadTimeline(cursor) {
    const res = await api(`/vehicles/${encodeURIComponent(id)}/timeline`, {params: {cursor, limit: 50}});
    if (!cursor) timeline.replaceChildren();
    for (const e of res.data) {
      timeline.append(h('tr', {},
        h('td', {}, when(e.occurredAt)), h('td', {}, h('code', {}, e.type)),
        h('td', {}, e.releaseVersion || ''), h('td', {}, e.reasonCode || ''),
        h('td', {}, Object.keys(e.details || {}).length ? JSON.stringify(e.details) : '')));
    }
    older = res.metadata.hasMore ? res.metadata.nextCursor : null;
    more.hidden = !older;
  }
  async function render() {
    const v = (await api(`/vehicles/${encodeURIComponent(id)}`)).data;
    const mismatch = v.desired.releaseVersion && v.desired.releaseVersion !== v.actual.releaseVersion;
    replace(main,
      h('p', {}, h('a', {href: '#/vehicles'}, '← Vehicles')),
      h('h1', {}, `Vehicle ${v.id} `, badge(v.status)),
      h('div', {class: 'grid'},
        h('section', {class: 'card'}, h('h2', {}, 'Release'),
          h('dl', {class: 'pairs'},
            h('dt', {}, 'Desired'), h('dd', {class: mismatch ? 'differs' : ''}, v.desired.releaseVersion || '—',
              v.desired.rolloutId ? [' · ', h('a', {href: `#/rollouts/${v.desired.rolloutId}`}, `rollout ${v.desired.rolloutId}`)] : ''),
            h('dt', {}, 'Actual'), h('dd', {}, v.actual.releaseVersion || '—'),
            h('dt', {}, 'Reason codes'), h('dd', {}, v.reasonCodes.length ? v.reasonCodes.map((r) => h('code', {}, r, ' ')) : 'none'))),
        h('section', {class: 'card'}, h('h2', {}, 'Vehicle'),
          h('dl', {class: 'pairs'},
            h('dt', {}, 'Model'), h('dd', {}, v.model), h('dt', {}, 'Region'), h('dd', {}, v.region),
            h('dt', {}, 'Ring'), h('dd', {}, v.ring), h('dt', {}, 'Org'), h('dd', {}, v.org),
            h('dt', {}, 'Battery'), h('dd', {}, v.batteryPercent == null ? '—' : `${num(v.batteryPercent)} %`),
            h('dt', {}, 'Stationary'), h('dd', {}, v.stationary == null ? '—' : (v.stationary ? 'yes' : 'no')),
            h('dt', {}, 'Last seen'), h('dd', {}, when(v.lastSeenAt))))),
      h('section', {class: 'card'}, h('h2', {}, 'Timeline'),
        table(['occurred', 'event', 'release', 'reason', 'details'], timeline), more, olderError));
    await loadTimeline(null);
  }
  await render();
  return bus.on('vehicle.updated', (data) => {
    if ((data.vehicles || []).some((v) => v.id === id)) {
      render().catch((e) => main.prepend(h('p', {class: 'error', role: 'alert'},
        `Could not refresh: ${e.describe ? e.describe() : e}`)));
    }
  });
}
