// A tiny DOM helper: h('a', {href: '#/x', class: 'y', onclick: fn}, 'text', child, ...).
// Text is always set as text (never parsed as HTML), so values from the API cannot inject.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on') && typeof value === 'function') {
      el.addEventListener(name.slice(2), value);
    } else if (name === 'class') {
      el.className = value;
    } else if (name === 'dataset') {
      Object.assign(el.dataset, value);
    } else if (value === true) {
      el.setAttribute(name, '');
    } else {
      el.setAttribute(name, String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

export function when(iso) {
  if (!iso) return '—';
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

export function num(n) {
  return typeof n === 'number' ? n.toLocaleString() : '—';
}

export function badge(status) {
  return h('span', {class: `badge s-${status}`}, String(status).replace(/_/g, ' '));
}

// A labelled field of a filter or create form.
export function field(label, input) {
  const id = input.id || `f-${Math.random().toString(36).slice(2)}`;
  input.id = id;
  return h('div', {class: 'field'}, h('label', {for: id}, label), input);
}

export function table(headers, rows, caption) {
  return h('div', {class: 'scroll'},
    h('table', {},
      caption ? h('caption', {}, caption) : null,
      h('thead', {}, h('tr', {}, headers.map((x) => h('th', {scope: 'col'}, x)))),
      rows instanceof HTMLTableSectionElement ? rows : h('tbody', {}, rows)));
}
