// Rollouts: the list, one rollout (a bar per stage, the step it waits on, gates, its vehicles,
// the Temporal UI link), live through the stream; for operators create (the dry-run plan
// shown before confirming) and the controls, each asking for a reason.

import {api, ApiError, newKey} from '../api.js';
import {badge, field, h, num, replace, table, when} from '../dom.js';
import {pager} from './vehicles.js';

const TERMINAL = ['completed', 'rolled_back', 'aborted', 'failed'];
const STATUSES = ['', 'pending', 'running', 'paused', 'completed', 'rolling_back', 'rolled_back', 'aborted', 'failed'];

// Which controls make sense now (the API decides: a refused one answers INVALID_STATE_TRANSITION).
function controls(r) {
  if (TERMINAL.includes(r.status)) return [];
  const actions = [];
  if (r.status === 'paused') actions.push('resume'); else actions.push('pause');
  if (r.status !== 'rolling_back') actions.push('rollback');
  actions.push('abort');
  return actions;
}

function settled(p) { return p.succeeded + p.failed + p.blocked; }

// The rollout's progress as one stacked bar: succeeded, failed, blocked, in flight, not yet.
function overallBar(p) {
  const total = Math.max(p.targeted, 1);
  // `notified` counts every vehicle sent the desired state so far (held back ones too); the
  // others are where those vehicles are now, so what is left of it is still on its way.
  const inflight = Math.max(0, p.notified - p.succeeded - p.failed - p.blocked);
  const parts = [['succeeded', p.succeeded], ['failed', p.failed], ['blocked', p.blocked],
    ['inflight', inflight]];
  const bar = h('div', {class: 'bar', role: 'img', 'aria-label':
    `${p.succeeded} succeeded, ${p.failed} failed, ${p.blocked} blocked, ${inflight} in flight of ${p.targeted}`});
  for (const [name, n] of parts) {
    const seg = h('span', {class: `seg ${name}`});
    seg.style.width = `${(100 * n) / total}%`;
    bar.append(seg);
  }
  return bar;
}

// One bar per stage. Stages are cumulative in rank order and each is settled before the next
// is issued, so the vehicles settled beyond the earlier stages' share are this stage's.
function stageBars(r) {
  if (!r.stages.length) return h('p', {class: 'muted'}, 'Stages are planned once the targets are counted.');
  let start = 0;
  const done = settled(r.progress);
  return h('ol', {class: 'stages'}, r.stages.map((s) => {
    const inStage = Math.max(0, Math.min(s.vehicles, done - start));
    start += s.vehicles;
    const state = r.status === 'completed' || s.index < r.stageIndex ? 'done'
      : s.index === r.stageIndex && !TERMINAL.includes(r.status) ? 'current' : 'upcoming';
    const fill = h('span', {class: 'seg succeeded'});
    fill.style.width = `${s.vehicles ? (100 * inStage) / s.vehicles : (state === 'done' ? 100 : 0)}%`;
    return h('li', {class: `stage ${state}`, 'data-stage': s.name},
      h('span', {class: 'name'}, s.name, state === 'current' ? ' (current)' : ''),
      h('div', {class: 'bar', role: 'progressbar', 'aria-label': `${s.name}: ${inStage} of ${s.vehicles} settled`,
        'aria-valuemin': 0, 'aria-valuemax': s.vehicles, 'aria-valuenow': inStage}, fill),
      h('span', {class: 'n'}, `${num(inStage)} / ${num(s.vehicles)}`,
        s.bakeSeconds ? ` · bake ${s.bakeSeconds} s` : ''));
  }));
}

function gates(g) {
  const safety = g.safetyChecks || {};
  return h('dl', {class: 'pairs'},
    h('dt', {}, 'Canary healthy'), h('dd', {}, `≥ ${Math.round(100 * g.canaryHealthy.minSuccessRate)} % succeeded, `
      + `judged on at least ${g.canaryHealthy.minSamples} ${g.canaryHealthy.minSamples === 1 ? 'report' : 'reports'}`),
    h('dt', {}, 'Failure threshold'), h('dd', {}, `> ${Math.round(100 * g.failureThreshold.maxFailureRate)} % failed → ${g.failureThreshold.action}`),
    h('dt', {}, 'Safety'), h('dd', {}, Object.entries(safety).filter(([, v]) => v !== null && typeof v !== 'object')
      .map(([k, v]) => `${k} ${v}`).join(', ') || 'defaults'));
}

function targetsText(t) {
  const parts = Object.entries(t).filter(([, v]) => Array.isArray(v) && v.length)
    .map(([k, v]) => `${k}: ${v.length > 5 ? `${v.slice(0, 5).join(', ')} … (${v.length})` : v.join(', ')}`);
  return parts.join(' · ') || 'the whole fleet in scope';
}

function row(r) {
  return h('tr', {'data-rollout': r.id},
    h('th', {scope: 'row'}, h('a', {href: `#/rollouts/${r.id}`}, `#${r.id}`)),
    h('td', {}, r.name || '—'), h('td', {}, r.releaseVersion), h('td', {class: 'status'}, badge(r.status)),
    h('td', {}, r.stage ? `${r.stage} (${r.stageIndex + 1}/${r.stageCount})` : '—'),
    h('td', {class: 'progress'}, overallBar(r.progress), ` ${num(settled(r.progress))}/${num(r.progress.targeted)}`),
    h('td', {}, when(r.updatedAt)));
}

export async function rolloutList(main, {bus, params, me, navigate}) {
  const status = h('select', {}, STATUSES.map((s) => h('option', {value: s, selected: params.get('status') === s}, s || 'any')));
  const release = h('input', {type: 'text', value: params.get('releaseVersion') || ''});
  const filters = {status: params.get('status') || undefined, releaseVersion: params.get('releaseVersion') || undefined};
  const body = h('tbody');
  const shown = new Map();
  const skipped = new Set();  // rollouts the filters leave out (not asked for again)
  let firstPage = true;
  const pages = pager(async (cursor) => {
    firstPage = !cursor;
    const res = await api('/rollouts', {params: {...filters, cursor, limit: 25, sort: '-id'}});
    shown.clear();
    replace(body, res.data.length ? res.data.map((r) => { const tr = row(r); shown.set(r.id, {r, tr}); return tr; })
      : h('tr', {class: 'empty'}, h('td', {colspan: 7, class: 'muted'}, 'No rollout yet.')));
    return res.metadata;
  });
  replace(main,
    h('div', {class: 'title'}, h('h1', {}, 'Rollouts'),
      me.canWrite ? h('a', {class: 'button primary', href: '#/rollouts/new'}, 'New rollout') : null),
    h('form', {class: 'filters', onsubmit: (e) => {
      e.preventDefault();
      navigate('/rollouts', Object.fromEntries(Object.entries({status: status.value, releaseVersion: release.value}).filter(([, v]) => v)));
    }}, field('Status', status), field('Release', release), h('button', {type: 'submit', class: 'primary'}, 'Filter')),
    table(['rollout', 'name', 'release', 'status', 'stage', 'progress', 'updated'], body),
    pages.element);
  // Subscribed before the first page is read: a rollout created meanwhile is not missed.
  const off = bus.on('rollout.updated', async (delta) => {
    const known = shown.get(delta.id);
    if (known) {
      const merged = {...known.r, ...delta, stages: known.r.stages};
      const tr = row(merged);
      known.tr.replaceWith(tr);
      shown.set(delta.id, {r: merged, tr});
      return;
    }
    // A rollout new to this page: shown at the top of the first page (newest first) when it
    // is newer than every one shown (an older one moving is not news here).
    const newest = Math.max(0, ...shown.keys());
    if (!firstPage || delta.id <= newest || skipped.has(delta.id)
      || (filters.status && delta.status !== filters.status)) return;
    try {
      const r = (await api(`/rollouts/${delta.id}`)).data;
      if (filters.releaseVersion && r.releaseVersion !== filters.releaseVersion) skipped.add(r.id);
      if (shown.has(r.id) || skipped.has(r.id)) return;
      body.querySelector('tr.empty')?.remove();
      const tr = row(r);
      body.prepend(tr);
      shown.set(r.id, {r, tr});
    } catch (e) { skipped.add(delta.id); /* not visible to this caller */ }
  });
  try { await pages.first(); } catch (e) { off(); throw e; }
  return off;
}

export async function rolloutDetail(main, {bus, args, me, confirmAction}) {
  const id = Number(args[0]);
  let r = (await api(`/rollouts/${id}`)).data;
  let updates = 0;  // rollout.updated events applied: a slower answer never overwrites them
  const head = h('div');
  const stages = h('section', {class: 'card wide'});
  const vehicles = h('tbody');
  const stateFilter = h('select', {'aria-label': 'Vehicle state'}, ['', 'planned', 'notified', 'updating', 'succeeded', 'failed', 'blocked', 'skipped', 'rolled_back']
    .map((s) => h('option', {value: s}, s || 'any state')));
  const pages = pager(async (cursor) => {
    const res = await api(`/rollouts/${id}/vehicles`, {params: {cursor, limit: 25, state: stateFilter.value || undefined}});
    replace(vehicles, res.data.length ? res.data.map((v) => h('tr', {},
      h('th', {scope: 'row'}, h('a', {href: `#/vehicles/${encodeURIComponent(v.vehicleId)}`}, v.vehicleId)),
      h('td', {}, v.stage), h('td', {}, v.state), h('td', {class: 'n'}, v.attempt),
      h('td', {}, v.reasonCode || ''), h('td', {}, badge(v.vehicleStatus)), h('td', {}, when(v.updatedAt))))
      : h('tr', {}, h('td', {colspan: 7, class: 'muted'}, 'No vehicle yet.')));
    return res.metadata;
  });
  stateFilter.addEventListener('change', () => pages.first());  // the pager shows a failure

  function act(action) {
    return confirmAction({
      title: action[0].toUpperCase() + action.slice(1),
      text: `${action} rollout #${id} (${r.releaseVersion}), now ${r.status.replace('_', ' ')}.`,
      force: action === 'resume',
      action: async (reason, force, key) => {
        const body = {reason};
        if (action === 'resume' && force) body.force = true;
        const before = updates;
        const res = await api(`/rollouts/${id}/${action}`, {method: 'POST', body, key});
        // The answer's rollout was read when the workflow accepted the action; an event that
        // arrived meanwhile is newer (the pause already persisted, say): it is kept.
        if (updates === before) {
          r = {...r, ...res.data.rollout};
          render();
        }
        return res;
      },
    });
  }

  function render() {
    replace(head,
      h('p', {}, h('a', {href: '#/rollouts'}, '← Rollouts')),
      h('div', {class: 'title'},
        h('h1', {}, `Rollout #${r.id}${r.name ? ` · ${r.name}` : ''} `, h('span', {id: 'rollout-status'}, badge(r.status))),
        me.canWrite ? h('div', {class: 'controls', role: 'group', 'aria-label': 'Operator controls'},
          controls(r).map((a) => h('button', {type: 'button', class: a === 'abort' || a === 'rollback' ? 'danger' : '', onclick: () => act(a)},
            a[0].toUpperCase() + a.slice(1)))) : null),
      h('dl', {class: 'pairs summary'},
        h('dt', {}, 'Release'), h('dd', {}, r.releaseVersion),
        h('dt', {}, 'Stage'), h('dd', {}, r.stage ? `${r.stage} (${r.stageIndex + 1} of ${r.stageCount})` : '—'),
        h('dt', {}, 'Waiting for'), h('dd', {id: 'waiting-for'}, r.waitingFor || '—'),
        r.statusReason ? [h('dt', {}, 'Reason'), h('dd', {}, h('code', {}, r.statusReason))] : null,
        h('dt', {}, 'Targets'), h('dd', {}, targetsText(r.targets)),
        h('dt', {}, 'Created'), h('dd', {}, `${when(r.createdAt)} by ${r.createdBy}`),
        h('dt', {}, 'Workflow'), h('dd', {}, r.temporalUiUrl
          ? h('a', {href: r.temporalUiUrl, target: '_blank', rel: 'noopener'}, `${r.workflowId} in the Temporal UI`) : '—')));
    replace(stages, h('h2', {}, 'Progress'), overallBar(r.progress),
      h('p', {class: 'counts'}, ['targeted', 'notified', 'updating', 'succeeded', 'failed', 'blocked', 'pending']
        .map((k) => h('span', {'data-count': k}, `${k} `, h('strong', {}, num(r.progress[k]))))),
      stageBars(r));
  }
  render();
  replace(main, head, h('div', {class: 'grid'}, stages,
    h('section', {class: 'card'}, h('h2', {}, 'Gates'), gates(r.gates))),
  h('section', {class: 'card'}, h('h2', {}, 'Vehicles'), field('State', stateFilter),
    table(['vehicle', 'stage', 'state', 'attempt', 'reason', 'vehicle status', 'updated'], vehicles), pages.element));
  await pages.first();
  // The vehicles' page is read again when the rollout moves, at most every 2 s.
  let refresh = null;
  const off = bus.on('rollout.updated', async (delta) => {
    if (delta.id !== id) return;
    updates += 1;
    const seen = updates;
    const replan = delta.stageCount !== r.stageCount || (delta.progress && delta.progress.targeted !== r.progress.targeted);
    r = {...r, ...delta};
    render();
    if (replan) {  // the stages are planned from the targets: read the rollout again
      try {
        const fresh = (await api(`/rollouts/${id}`)).data;
        r = updates === seen ? fresh : {...r, stages: fresh.stages};
        render();
      } catch (e) { /* keep the delta */ }
    }
    if (!refresh) {
      refresh = setTimeout(() => { refresh = null; pages.reload().catch(() => {}); }, 2000);
    }
  });
  return () => { off(); clearTimeout(refresh); };
}

function list(text) {
  return text.split(',').map((s) => s.trim()).filter(Boolean);
}

export async function rolloutCreate(main, {me, navigate}) {
  if (!me.canWrite) {
    replace(main, h('h1', {}, 'New rollout'), h('p', {}, 'Creating a rollout needs the operator role.'));
    return null;
  }
  const releases = (await api('/releases', {params: {limit: 100}})).data;
  const f = {
    name: h('input', {type: 'text', maxlength: 200}),
    release: h('select', {required: true}, releases.map((x) => h('option', {value: x.version}, x.version))),
    models: h('input', {type: 'text', placeholder: 'comma-separated'}),
    regions: h('input', {type: 'text', placeholder: 'comma-separated'}),
    rings: h('input', {type: 'text', placeholder: 'comma-separated'}),
    vehicleIds: h('input', {type: 'text', placeholder: 'comma-separated'}),
    canary: h('input', {type: 'number', min: 0, max: 100, step: 'any', value: 1}),
    canaryBake: h('input', {type: 'number', min: 0, value: 600}),
    waves: h('input', {type: 'text', value: '10, 50, 100'}),
    waveBake: h('input', {type: 'number', min: 0, value: 600}),
    reason: h('textarea', {rows: 2, maxlength: 2000}),
    acknowledge: h('input', {type: 'checkbox'}),
  };
  const plan = h('section', {class: 'card', 'aria-live': 'polite'});
  const error = h('p', {class: 'error', role: 'alert'});
  const createButton = h('button', {type: 'button', class: 'primary', disabled: true, onclick: create}, 'Create rollout');
  let key = null;  // one per plan shown: a retried Create is applied once

  function body() {
    const targets = {};
    for (const k of ['models', 'regions', 'rings', 'vehicleIds']) if (list(f[k].value).length) targets[k] = list(f[k].value);
    return {
      name: f.name.value || undefined,
      releaseVersion: f.release.value,
      targets,
      strategy: {
        canary: {percent: Number(f.canary.value), bakeSeconds: Number(f.canaryBake.value)},
        waves: list(f.waves.value).map((p) => ({percent: Number(p), bakeSeconds: Number(f.waveBake.value)})),
      },
      acknowledgeWeakenedSafety: f.acknowledge.checked || undefined,
      reason: f.reason.value || undefined,
    };
  }

  async function dryRun(e) {
    e.preventDefault();
    error.textContent = '';
    createButton.disabled = true;
    try {
      const p = (await api('/rollouts', {method: 'POST', params: {dryRun: 'true'}, body: body()})).data;
      replace(plan, h('h2', {}, 'Plan'),
        h('p', {}, `${num(p.targeted)} vehicles on ${p.releaseVersion}`),
        table(['stage', 'vehicles', 'bake'], p.stages.map((s) => h('tr', {}, h('th', {scope: 'row'}, s.name),
          h('td', {class: 'n'}, num(s.vehicles)), h('td', {}, `${s.bakeSeconds} s`)))),
        h('p', {}, `Safety now: ${num(p.safety.blocked)} would be blocked (battery ${num(p.safety.batteryLow)}, moving ${num(p.safety.notStationary)}, unknown ${num(p.safety.unknown)}, offline ${num(p.safety.offline)})`),
        p.overlap.vehicles ? h('p', {class: 'error'}, `${num(p.overlap.vehicles)} vehicles are in rollouts ${p.overlap.rolloutIds.join(', ')}`) : null,
        p.problems.length ? h('ul', {class: 'error'}, p.problems.map((x) => h('li', {}, x))) : h('p', {}, 'No problem found.'));
      createButton.disabled = !p.canStart || !p.targeted;
      key = newKey();
    } catch (err) {
      error.textContent = err instanceof ApiError ? err.describe() : String(err);
    }
  }

  async function create() {
    error.textContent = '';
    if (!f.reason.value.trim()) { error.textContent = 'A reason is required.'; f.reason.focus(); return; }
    createButton.disabled = true;
    try {
      const r = (await api('/rollouts', {method: 'POST', body: body(), key})).data;
      navigate(`/rollouts/${r.id}`);
    } catch (err) {
      error.textContent = err instanceof ApiError ? err.describe() : String(err);
      createButton.disabled = false;
    }
  }

  // Any input the plan depends on asks for the plan again (the reason does not).
  const form = h('form', {class: 'card create', onsubmit: dryRun, oninput: (e) => {
    if (e.target !== f.reason) createButton.disabled = true;
  }},
    field('Name', f.name), field('Release', f.release),
    h('fieldset', {}, h('legend', {}, 'Targets (at least one; each list narrows)'),
      field('Models', f.models), field('Regions', f.regions), field('Rings', f.rings), field('Vehicle ids', f.vehicleIds)),
    h('fieldset', {}, h('legend', {}, 'Strategy'),
      field('Canary (% of targets)', f.canary), field('Canary bake (s)', f.canaryBake),
      field('Waves (cumulative %, last 100)', f.waves), field('Wave bake (s)', f.waveBake)),
    h('label', {class: 'check'}, f.acknowledge, ' Acknowledge weakened safety (audited)'),
    field('Reason (required, audited)', f.reason),
    error,
    h('div', {class: 'buttons'}, h('button', {type: 'submit'}, 'Plan (dry run)'), createButton));
  replace(main, h('p', {}, h('a', {href: '#/rollouts'}, '← Rollouts')), h('h1', {}, 'New rollout'),
    h('div', {class: 'grid'}, form, plan));
  if (!releases.length) error.textContent = 'No release is registered yet: register one first (POST /api/v1/releases).';
  return null;
}
