// The live stream (SPEC.md, Server-Sent Events): an EventSource opened with a short-lived
// ticket. It resumes after the last event it received, both when the browser reconnects by
// itself (Last-Event-ID) and when a new ticket is needed; a fresh ticket is minted before the
// current one expires, the new source opened before the old one is closed, and an event seen
// twice in that overlap is dropped by its id.

import {api, BASE, query} from './api.js';

const EVENTS = ['vehicle.updated', 'rollout.updated', 'audit.created', 'fleet.summary'];
const RENEW_BEFORE_MS = 15000;

export class LiveStream {
  constructor({topics, onEvent, onState}) {
    this.topics = topics;
    this.onEvent = onEvent;
    this.onState = onState;
    this.lastEventId = null;
    this.source = null;
    this.renewal = null;
    this.retry = null;
    this.backoff = 1000;
    this.stopped = false;
    this.opened = false;
    this.resynced = false;  // the view was just told to read again: the next stream is not blind
    this.sources = new Set();  // every EventSource not yet closed (a renewal overlaps)
  }

  start() { this.connect(); }

  stop() {
    this.stopped = true;
    clearTimeout(this.renewal);
    clearTimeout(this.retry);
    for (const source of this.sources) source.close();
    this.sources.clear();
  }

  live() { return this.source !== null && this.source.readyState === EventSource.OPEN; }

  state(name) { if (this.onState) this.onState(name); }

  async connect() {
    clearTimeout(this.retry);
    if (this.stopped) return;
    let ticket;
    try {
      ticket = (await api('/stream/tickets', {method: 'POST'})).data;
    } catch (e) {
      if (!this.live()) this.state('reconnecting');  // a failed renewal: the stream goes on
      if (e.status === 401 || e.status === 403) return;  // signed out: the page says so
      this.retry = setTimeout(() => this.connect(), this.backoff);
      this.backoff = Math.min(this.backoff * 2, 15000);
      return;
    }
    if (this.stopped) return;
    const source = new EventSource(`${BASE}/stream${query({
      topics: this.topics.join(','), ticket: ticket.ticket, lastEventId: this.lastEventId,
    })}`);
    this.sources.add(source);
    const close = (s) => { s.close(); this.sources.delete(s); };
    // A new source that cannot resume (no event received yet to resume after): the page
    // re-reads what it shows once it is open, so nothing that happened meanwhile is missed.
    const blind = this.opened && this.lastEventId === null && !this.resynced && !this.live();
    this.resynced = false;
    source.onopen = () => {
      if (this.stopped) { close(source); return; }
      this.backoff = 1000;
      if (blind) this.onEvent('resync', {});
      this.opened = true;
      if (this.source && this.source !== source) close(this.source);  // the renewal's overlap ends
      this.source = source;
      this.state('live');
    };
    source.onerror = () => {
      if (source !== this.source && this.live()) {
        close(source);  // a renewal that failed: the current source goes on (renewed again
        return;  // before it ends, or replaced once it has closed)
      }
      this.source = source;
      this.state('reconnecting');
      // CONNECTING: the browser retries by itself with Last-Event-ID. CLOSED: it gave up
      // (an expired ticket is refused): a new ticket, resuming after the last event.
      if (source.readyState === EventSource.CLOSED) {
        this.sources.delete(source);
        this.retry = setTimeout(() => this.connect(), this.backoff);
        this.backoff = Math.min(this.backoff * 2, 15000);
      }
    };
    for (const type of EVENTS) {
      source.addEventListener(type, (e) => this.receive(type, e));
    }
    source.addEventListener('resync', () => {
      // Too far behind (or the feed was pruned): start over from the current state. The new
      // stream is not `blind` (its view has just been told to read again).
      close(source);
      this.source = null;
      this.lastEventId = null;
      this.resynced = true;
      this.onEvent('resync', {});
      this.connect();
    });
    if (!this.source) this.source = source;
    clearTimeout(this.renewal);
    const left = new Date(ticket.expiresAt).getTime() - Date.now();
    this.renewal = setTimeout(() => this.connect(), Math.max(left - RENEW_BEFORE_MS, 5000));
  }

  receive(type, e) {
    const id = Number(e.lastEventId);
    if (Number.isFinite(id) && this.lastEventId !== null && id <= Number(this.lastEventId)) {
      return;  // already seen through the other source during a renewal
    }
    if (e.lastEventId) this.lastEventId = e.lastEventId;
    let data;
    try { data = JSON.parse(e.data); } catch (err) { return; }
    this.onEvent(type, data, e.lastEventId);
  }
}
