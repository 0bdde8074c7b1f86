// The audit log: filters, keyset paging, new entries live, and the NDJSON export of what the
// filters select (fetched with the caller's token, saved as a file).

import {api, ApiError} from '../api.js';
import {field, h, replace, table, when} from '../dom.js';
import {pager} from './vehicles.js';

const FILTERS = [['actor', 'Actor'], ['action', 'Action'], ['targetType', 'Target type'],
  ['targetId', 'Target id'], ['from', 'From'], ['to', 'To']];

// An ISO time as a datetime-local input's value (the browser's local time), and back.
function toLocal(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return '';
  return new Date(d.getTime() - d.getTimezoneOffset() * 60000).toISOString().slice(0, 16);
}

function entry(a) {
  return h('tr', {'data-entry': a.id},
    h('td', {}, when(a.at)), h('td', {}, a.actor, a.role ? h('span', {class: 'muted'}, ` ${a.role}`) : null),
    h('td', {}, h('code', {}, a.action)), h('td', {}, [a.targetType, a.targetId].filter((x) => x != null).join(' ')),
    h('td', {}, a.reason || ''), h('td', {}, a.result || ''), h('td', {class: 'muted'}, a.source));
}

export async function auditLog(main, {bus, params, navigate}) {
  const inputs = Object.fromEntries(FILTERS.map(([name]) => [name, h('input', {
    type: name === 'from' || name === 'to' ? 'datetime-local' : 'text',
    value: params.get(name) ? (name === 'from' || name === 'to' ? toLocal(params.get(name)) : params.get(name)) : '',
  })]));
  const filters = Object.fromEntries(FILTERS.map(([n]) => n).filter((n) => params.get(n)).map((n) => [n, params.get(n)]));
  const body = h('tbody');
  const error = h('p', {class: 'error', role: 'alert'});
  let firstPage = true;
  const pages = pager(async (cursor) => {
    firstPage = !cursor;
    const res = await api('/audit-log', {params: {...filters, cursor, limit: 50}});
    replace(body, res.data.length ? res.data.map(entry) : h('tr', {}, h('td', {colspan: 7, class: 'muted'}, 'Nothing recorded.')));
    return res.metadata;
  });
  async function exportNdjson() {
    error.textContent = '';
    try {
      const response = await api('/audit-log/export', {params: filters, raw: true});
      const url = URL.createObjectURL(await response.blob());
      const link = h('a', {href: url, download: 'motorcade-audit.ndjson'});
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (err) {
      error.textContent = err instanceof ApiError ? err.describe() : String(err);
    }
  }
  replace(main, h('div', {class: 'title'}, h('h1', {}, 'Audit log'),
    h('button', {type: 'button', onclick: exportNdjson}, 'Export NDJSON')),
  h('form', {class: 'filters', onsubmit: (e) => {
    e.preventDefault();
    const chosen = {};
    for (const [name] of FILTERS) {
      const v = inputs[name].value;
      if (v) chosen[name] = name === 'from' || name === 'to' ? new Date(v).toISOString() : v;
    }
    navigate('/audit', chosen);
  }}, FILTERS.map(([name, label]) => field(label, inputs[name])), h('button', {type: 'submit', class: 'primary'}, 'Filter')),
  error,
  table(['at', 'actor', 'action', 'target', 'reason', 'result', 'source'], body), pages.element);
  await pages.first();
  return bus.on('audit.created', (a) => {
    if (!firstPage || Object.keys(filters).length) return;
    if (a && a.action && !body.querySelector(`tr[data-entry="${Number(a.id)}"]`)) body.prepend(entry(a));
  });
}
