// Fleet overview: counts by status as a chart, by model / region / ring, top reason codes
// (GET /fleet/summary), re-read when the stream says the counts changed.

import {api} from '../api.js';
import {h, num, replace, table, when} from '../dom.js';

const STATUSES = ['in_sync', 'pending', 'updating', 'blocked', 'failed', 'offline'];

function chart(byStatus, total) {
  const rows = STATUSES.map((s) => [s, byStatus[s] || 0]);
  const max = Math.max(1, ...rows.map(([, n]) => n));
  return h('figure', {class: 'chart'},
    h('ul', {class: 'hbars'}, rows.map(([status, n]) => {
      const fill = h('span', {class: 'fill'});
      fill.style.width = `${(100 * n) / max}%`;
      return h('li', {class: `s-${status}`, 'data-status': status, 'data-count': n},
        h('span', {class: 'label'}, status.replace('_', ' ')),
        h('span', {class: 'track', 'aria-hidden': 'true'}, fill),
        h('span', {class: 'value'}, `${num(n)} (${total ? Math.round((100 * n) / total) : 0}%)`));
    })),
    h('figcaption', {}, `${num(total)} vehicles`));
}

function places(title, byPlace) {
  const names = Object.keys(byPlace).sort();
  if (!names.length) return h('section', {class: 'card'}, h('h2', {}, title), h('p', {class: 'muted'}, 'None yet.'));
  return h('section', {class: 'card'}, h('h2', {}, title), table(
    ['', 'total', ...STATUSES.map((s) => s.replace('_', ' '))],
    names.map((name) => h('tr', {'data-place': name},
      h('th', {scope: 'row'}, name),
      h('td', {class: 'n'}, num(byPlace[name].total)),
      STATUSES.map((s) => h('td', {class: 'n'}, num(byPlace[name].byStatus[s] || 0)))))));
}

export async function overview(main, {bus}) {
  async function render() {
    const summary = (await api('/fleet/summary')).data;
    replace(main,
      h('h1', {}, 'Fleet overview'),
      h('p', {class: 'muted'}, `As of ${when(summary.asOf)} · counts refresh with each reconcile`),
      h('div', {class: 'grid'},
        h('section', {class: 'card wide', 'aria-labelledby': 'by-status'},
          h('h2', {id: 'by-status'}, 'Vehicles by status'),
          chart(summary.byStatus, summary.total)),
        h('section', {class: 'card', 'aria-labelledby': 'reasons'},
          h('h2', {id: 'reasons'}, 'Top reason codes'),
          summary.topReasonCodes.length
            ? h('ol', {class: 'reasons'}, summary.topReasonCodes.map((r) => h('li', {},
              h('a', {href: `#/vehicles?reasonCode=${encodeURIComponent(r.reasonCode)}`},
                h('code', {}, r.reasonCode)), ` ${num(r.vehicles)}`)))
            : h('p', {class: 'muted'}, 'No vehicle reports a problem.')),
        places('By model', summary.byModel),
        places('By region', summary.byRegion),
        places('By ring', summary.byRing)));
  }
  await render();
  let pending = null;
  const off = bus.on('fleet.summary', () => {
    clearTimeout(pending);
    pending = setTimeout(() => render().catch((e) => main.prepend(h('p', {class: 'error', role: 'alert'},
      `Could not refresh the counts: ${e.describe ? e.describe() : e}`))), 500);
  });
  return () => { off(); clearTimeout(pending); };
}
