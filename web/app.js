'use strict';
// Live GMV ticker: websocket snapshot/update stream -> big-screen DOM.
// Sections: state + messages, formatting, animation, rendering, connection.

const KIOSK = new URLSearchParams(location.search).get('kiosk') === '1';
const REDUCED_MOTION = matchMedia('(prefers-reduced-motion: reduce)').matches;
const $ = (id) => document.getElementById(id);

/* ---------- state + message handling ---------- */

let state = null; // all known fields; null until the first snapshot
let seq = null;   // seq of the last applied message

// Strip envelope keys so state only ever holds data fields.
function fieldsOf(msg) {
  const { type, seq: _seq, ...fields } = msg;
  return fields;
}

function isPlainObject(v) {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

// Updates carry only changed top-level fields; nested objects (window,
// stats) are merged so a partial object can't wipe sibling keys.
function merge(base, changes) {
  const next = { ...base };
  for (const [k, v] of Object.entries(changes)) {
    next[k] = isPlainObject(v) && isPlainObject(base[k]) ? { ...base[k], ...v } : v;
  }
  return next;
}

function handleMessage(raw) {
  let msg;
  try {
    msg = JSON.parse(raw);
  } catch {
    console.warn('[ticker] ignoring non-JSON frame:', raw);
    return;
  }
  switch (msg && msg.type) {
    case 'snapshot':
      state = fieldsOf(msg);
      seq = msg.seq;
      break;
    case 'update':
      // A gap means we missed something; applying on top would show wrong
      // totals, so drop it and let the server resync us with a snapshot.
      if (state === null || typeof msg.seq !== 'number' || msg.seq !== seq + 1) {
        console.warn(`[ticker] dropping update seq=${msg.seq}, expected ${
          state === null ? 'a snapshot first' : seq + 1}; waiting for resync`);
        return;
      }
      state = merge(state, fieldsOf(msg));
      seq = msg.seq;
      break;
    case 'heartbeat':
      // Sent when nothing changed for a second: proves the link is up, and says how long
      // ago the server last heard from an aggregator.
      // null: the server has not heard from a live aggregator since it started.
      lastUpstreamAgeMs = typeof msg.upstream_age_ms === 'number' ? msg.upstream_age_ms
        : msg.upstream_age_ms === null ? Infinity : 0;
      noteAlive();
      return;
    case 'control_result':
      // The answer to this viewer's own operator command (web/operator.js); no totals.
      if (typeof window.onControlResult === 'function') window.onControlResult(msg);
      return;
    default:
      // Loud during development, silent on the unattended kiosk screen.
      if (!KIOSK) console.warn('[ticker] UNKNOWN MESSAGE TYPE — ignored:', msg && msg.type, msg);
      return;
  }
  lastUpstreamAgeMs = 0;
  noteAlive();
  render();
}

/* ---------- formatting (integers only, so cents are never off by one) ---------- */

const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];
const isInt = (v) => Number.isInteger(v);
const pad2 = (n) => String(n).padStart(2, '0');

function group(n) {
  return String(n).replace(/\B(?=(\d{3})+(?!\d))/g, ',');
}

// cents -> { int: "74,100,000,000", dec: "00" }
function usdParts(cents) {
  const c = Math.max(0, Math.round(cents));
  return { int: group(Math.floor(c / 100)), dec: pad2(c % 100) };
}

function formatUSD(cents) {
  const p = usdParts(cents);
  return `$${p.int}.${p.dec}`;
}

// "$4.68M": floor(c / unit) is exact for integer c < 2^53 (the true quotient is
// never within rounding distance of the next integer), so no float drift.
function formatCompactUSD(cents) {
  for (const [unit, suffix] of [[1e12, 'T'], [1e9, 'B'], [1e6, 'M'], [1e3, 'K']]) {
    if (cents >= unit * 100) {
      const hundredths = Math.floor(cents / unit);
      return `$${group(Math.floor(hundredths / 100))}.${pad2(hundredths % 100)}${suffix}`;
    }
  }
  return formatUSD(cents);
}

// Read wall-clock fields straight from the string: the festival runs on
// Beijing time whatever zone the TV's browser is set to.
function parseWallClock(iso) {
  const m = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::[\d.]+)?(Z|[+-]\d{2}:?\d{2})?$/.exec(iso || '');
  return m && { y: +m[1], mo: +m[2], d: +m[3], hh: m[4], mm: m[5], offset: m[6] || '' };
}

function zoneLabel(offset) {
  if (offset === '+08:00' || offset === '+0800') return 'Beijing time';
  return offset === 'Z' ? 'UTC' : offset ? `UTC${offset}` : '';
}

// Signed change in tenths of a percent, from integers only: round((now - then) * 1000 / then),
// halves away from zero (BigInt, so no float error near a rounding boundary).
function changePerMille(now, then) {
  const n = (BigInt(now) - BigInt(then)) * 1000n;
  const d = BigInt(then);
  const q = n / d;
  const r = n % d;
  const up = 2n * (r < 0n ? -r : r) >= d;
  return Number(up ? q + (n < 0n ? -1n : 1n) : q);
}

// 263 -> "26.3", -5 -> "-0.5"
function perMilleText(pm) {
  const a = Math.abs(pm);
  return `${pm < 0 ? '-' : ''}${Math.floor(a / 10)}.${a % 10}`;
}

// "2019 (Nov 1–11)" -> "2019": the label without its parenthesised date range.
function shortLabel(label) {
  return label.replace(/\s*\([^)]*\)\s*$/, '') || label;
}

function formatWallClock(t) {
  return `${MONTHS[t.mo - 1]} ${t.d} · ${t.hh}:${t.mm}`;
}

// 1584 -> "1584×", 0.5 -> "0.5×", null / "max" (as fast as it goes) -> "max"
function formatSpeed(speed) {
  if (typeof speed !== 'number' || !Number.isFinite(speed) || speed <= 0) return 'max';
  return `${Math.round(speed * 100) / 100}×`;
}

function percent(part, total) {
  return total > 0 ? `${(Math.round((part * 1000) / total) / 10).toFixed(1)}%` : '—';
}

/* ---------- GMV animation ---------- */

const ANIM_MS = 600;
const anim = { from: 0, to: 0, shown: 0, start: 0, raf: 0 };
const easeOut = (t) => 1 - (1 - t) ** 3;

function setGmvTarget(cents) {
  $('gmv').dataset.cents = String(cents);
  if (cents === anim.to) return;
  // Restart from whatever is on screen so a mid-flight update never jumps.
  anim.from = anim.shown;
  anim.to = cents;
  anim.start = performance.now();
  if (REDUCED_MOTION || document.hidden) {
    cancelAnimationFrame(anim.raf);
    anim.raf = 0;
    paintGmv((anim.shown = cents));
  } else if (!anim.raf) {
    anim.raf = requestAnimationFrame(stepGmv);
  }
}

function stepGmv(now) {
  const t = Math.min(1, Math.max(0, (now - anim.start) / ANIM_MS));
  // Land exactly on the target: the eased float is only used in between.
  anim.shown = t >= 1 ? anim.to : Math.round(anim.from + (anim.to - anim.from) * easeOut(t));
  paintGmv(anim.shown);
  anim.raf = t < 1 ? requestAnimationFrame(stepGmv) : 0;
}

const gmvInt = document.querySelector('#gmv .int');
const gmvDec = document.querySelector('#gmv .dec');

function paintGmv(cents) {
  const p = usdParts(cents);
  setText(gmvInt, p.int);
  setText(gmvDec, `.${p.dec}`);
}

/* ---------- rendering ---------- */

// Skip identical writes: cheaper, and avoids needless style/layout work.
function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Grow/shrink a list to n rows, reusing existing nodes so rows don't flicker.
function syncRows(list, n, build) {
  while (list.children.length < n) list.append(build());
  while (list.children.length > n) list.lastElementChild.remove();
  return [...list.children];
}

function render() {
  const s = state;
  const win = isPlainObject(s.window) ? s.window : {};
  setGmvTarget(isInt(s.gmv_cents) ? s.gmv_cents : 0);
  setText($('orders'), isInt(s.orders) ? group(s.orders) : '—');
  setText($('brands'), isInt(s.brands_active) ? group(s.brands_active) : '—');
  setCount($('brands-overseas'), s.brands_overseas_active);
  setCount($('brands-first-time'), s.brands_first_time_active);
  setCount($('chatbot'), s.chatbot_queries);
  const rate = $('rate');
  rate.dataset.cents = isInt(s.gmv_last_minute_cents) ? String(s.gmv_last_minute_cents) : '';
  setText(rate, isInt(s.gmv_last_minute_cents) ? formatCompactUSD(s.gmv_last_minute_cents) : '—');
  rate.title = isInt(s.gmv_last_minute_cents) ? formatUSD(s.gmv_last_minute_cents) : '';
  fitKpis();
  if (win.label) {
    setText($('label'), win.label.replace(/^11\.11\s*/, ''));
    document.title = `${win.label} · Live GMV`;
  }
  renderClock(s.sim_time, s.minute, win);
  renderReplay(isPlainObject(s.replay) ? s.replay : null);
  renderCompare(isPlainObject(s.compare) ? s.compare : null, s.gmv_cents, win);
  renderPlatforms(Array.isArray(s.platforms) ? s.platforms : []);
  renderCountries(Array.isArray(s.countries) ? s.countries : []);
  renderStats(isPlainObject(s.stats) ? s.stats : {});
}

function renderClock(simTime, minute, win) {
  const t = parseWallClock(simTime);
  setText($('clock'), t ? formatWallClock(t) : 'waiting for data');
  $('clock').classList.toggle('pending', !t);
  const total = isInt(win.minutes) && win.minutes > 0 ? win.minutes : 0;
  const days = Math.ceil(total / 1440);
  const day = isInt(minute) && total ? Math.min(days, Math.floor(minute / 1440) + 1) : 0;
  setText($('day'), [day ? `Day ${day} of ${days}` : '', t ? zoneLabel(t.offset) : '']
    .filter(Boolean).join(' · '));

  const frac = isInt(minute) && total ? Math.min(1, Math.max(0, minute / total)) : 0;
  const bar = $('progress');
  bar.dataset.value = frac.toFixed(4);
  bar.setAttribute('aria-valuenow', (frac * 100).toFixed(1));
  bar.style.setProperty('--p', frac);
  if (days) bar.style.setProperty('--days', days);
  renderTicks(win.start, days);
}

// The four KPI figures share one size, as large as the longest of them allows (CSS --chars).
const KPI_IDS = ['orders', 'brands', 'rate', 'chatbot'];
function fitKpis() {
  const chars = String(Math.max(9, ...KPI_IDS.map((id) => $(id).textContent.length)));
  const row = document.querySelector('.kpis');
  if (row.style.getPropertyValue('--chars') !== chars) row.style.setProperty('--chars', chars);
}

// A count that may be missing or null (older snapshots): "—" until known.
function setCount(node, n) {
  node.dataset.value = isInt(n) ? String(n) : '';
  setText(node, isInt(n) ? group(n) : '—');
}

const REPLAY_ICONS = { playing: '▶', paused: '❚❚', seeking: '⏩', done: '■' };

// "▶ 1584×" / "❚❚ paused" / "⏩ seeking" / "■ done" beside the clock; hidden without a replay.
function renderReplay(r) {
  const node = $('replay');
  node.hidden = r === null;
  if (r === null) {
    delete node.dataset.state;
    return;
  }
  const st = typeof r.state === 'string' ? r.state : '';
  node.dataset.state = st;
  node.dataset.loop = String(r.loop === true);
  setText(node.firstElementChild, REPLAY_ICONS[st] || '•');
  setText(node.lastElementChild, st === 'playing' ? formatSpeed(r.speed) : st || 'replay');
  node.title = [`Replay${r.scenario ? ` of ${r.scenario}` : ''}`, formatSpeed(r.speed),
    isInt(r.minute) ? `minute ${r.minute}` : '', r.loop === true ? 'looping' : '']
    .filter(Boolean).join(' · ');
}

// This year against last year: the change at the same elapsed time, two thin bars on one
// scale (so last year's final total is a finish line), and a badge once it was passed.
function renderCompare(cmp, gmv, win) {
  const race = $('race');
  const label = cmp && typeof cmp.label === 'string' && cmp.label ? cmp.label : 'last year';
  const then = cmp && isInt(cmp.gmv_cents) ? cmp.gmv_cents : null;
  const total = cmp && isInt(cmp.total_cents) ? cmp.total_cents : null;
  const now = isInt(gmv) ? gmv : null;

  const compare = $('compare');
  const pm = now !== null && then !== null && then > 0 ? changePerMille(now, then) : null;
  compare.dataset.pct = pm === null ? '' : perMilleText(pm);
  compare.dataset.trend = pm === null ? '' : pm > 0 ? 'up' : pm < 0 ? 'down' : 'flat';
  setText(compare.firstElementChild, `vs ${label} at this time: `);
  setText(compare.lastElementChild, pm === null ? '—' : `${pm > 0 ? '+' : ''}${perMilleText(pm)}%`);

  const last = cmp && typeof cmp.label === 'string' && cmp.label ? shortLabel(cmp.label) : 'Last year';
  const passedAt = cmp && typeof cmp.passed_at === 'string' ? cmp.passed_at : null;
  const passed = $('passed');
  passed.hidden = passedAt === null;
  if (passedAt !== null) {
    const t = parseWallClock(passedAt);
    setText(passed, `Passed ${last}'s total${t ? ` at ${formatWallClock(t)}` : ''}`);
  }
  setText($('compare-goal'), total !== null && passedAt === null
    ? `${last} total ${formatCompactUSD(total)}` : '');

  const start = parseWallClock(win.start);
  setText($('race-now-label'), start ? String(start.y) : 'This year');
  setText($('race-then-label'), last);
  setText($('race-now'), now !== null ? formatCompactUSD(now) : '—');
  setText($('race-then'), then !== null ? formatCompactUSD(then) : '—');
  const scale = Math.max(now || 0, then || 0, total || 0);
  const share = (v) => (scale > 0 && v !== null ? Math.min(1, v / scale) : 0);
  race.dataset.empty = String(cmp === null);
  race.style.setProperty('--now', share(now));
  race.style.setProperty('--then', share(then));
  race.style.setProperty('--goal', share(total));
  race.dataset.goal = String(total !== null);
}

// One label per festival day, computed as calendar dates (UTC used purely
// as a zone-free calendar, not to convert anything).
function renderTicks(start, days) {
  const ticks = $('ticks');
  const key = `${start}/${days}`;
  if (ticks.dataset.key === key) return;
  ticks.dataset.key = key;
  const s = parseWallClock(start);
  const rows = syncRows(ticks, s ? days : 0, () => el('span', 'tick'));
  rows.forEach((tick, i) => {
    const d = new Date(Date.UTC(s.y, s.mo - 1, s.d + i));
    tick.textContent = i === 0 || d.getUTCDate() === 1
      ? `${MONTHS[d.getUTCMonth()]} ${d.getUTCDate()}` : String(d.getUTCDate());
    tick.style.left = `${((i + 0.5) / days) * 100}%`;
    tick.classList.toggle('final', i === days - 1);
  });
}

function barRow() {
  const li = el('li', 'row');
  li.append(el('span', 'rank'), el('span', 'name'), el('span', 'val'), el('span', 'pct'),
    el('span', 'track'));
  li.lastChild.append(el('span', 'fill'));
  return li;
}

function fillRow(li, { rank = '', name, cents, pct, share }) {
  setText(li.children[0], rank);
  setText(li.children[1], name);
  setText(li.children[2], formatCompactUSD(cents));
  setText(li.children[3], pct);
  li.dataset.cents = String(cents);
  li.style.setProperty('--w', Math.max(0, Math.min(1, share)));
}

function renderPlatforms(platforms) {
  const total = platforms.reduce((sum, p) => sum + (p.gmv_cents || 0), 0);
  const rows = syncRows($('platforms'), platforms.length, barRow);
  platforms.forEach((p, i) => fillRow(rows[i], {
    name: p.name, cents: p.gmv_cents || 0, pct: percent(p.gmv_cents || 0, total),
    share: total ? (p.gmv_cents || 0) / total : 0,
  }));
}

function renderCountries(countries) {
  const abroad = countries.filter((c) => c.code !== 'CN')
    .sort((a, b) => (b.gmv_cents || 0) - (a.gmv_cents || 0)).slice(0, 5);
  const total = countries.reduce((sum, c) => sum + (c.code !== 'CN' ? c.gmv_cents || 0 : 0), 0);
  const lead = abroad.length ? abroad[0].gmv_cents || 0 : 0;
  const rows = syncRows($('countries'), abroad.length, barRow);
  abroad.forEach((c, i) => {
    rows[i].dataset.code = c.code;
    // Percent is the share of all cross-border GMV; bars scale to the leader.
    fillRow(rows[i], { rank: String(i + 1), name: c.name || c.code, cents: c.gmv_cents || 0,
      pct: percent(c.gmv_cents || 0, total), share: lead ? (c.gmv_cents || 0) / lead : 0 });
  });
}

function renderStats(st) {
  const parts = ['batches', 'rejected', 'duplicates', 'gaps', 'shards']
    .filter((k) => isInt(st[k])).map((k) => `${k} ${group(st[k])}`);
  // What the server refused from the broker shows only when there is some.
  const ignored = ['ignored_totals', 'ignored_replay'].filter((k) => isInt(st[k]))
    .reduce((sum, k) => sum + st[k], 0);
  if (ignored) parts.push(`ignored ${group(ignored)}`);
  if (Array.isArray(st.unknown_shards) && st.unknown_shards.length) {
    parts.push(`unknown shards ${st.unknown_shards.map(String).join(', ')}`);
  }
  setText($('stats'), [`seq ${seq}`, ...parts].join('  ·  '));
}

/* ---------- connection ---------- */

const WS_URL = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws';
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 5000;
const STATUS_LABELS = {
  connecting: 'Connecting…', live: 'Live', stale: 'Stale', reconnecting: 'Reconnecting…',
};
const STALE_AFTER_MS = 5000;
let socket = null;
let attempt = 0;
let lastFrameAt = 0;
let lastUpstreamAgeMs = 0;

// Connected but not fresh: no frame for a few seconds, or the server itself has not heard
// from any aggregator for a few seconds. The numbers stay up, dimmed, marked stale.
function noteAlive() {
  lastFrameAt = performance.now();
  checkFreshness();
}

function checkFreshness() {
  if (socket === null || socket.readyState !== WebSocket.OPEN) return;
  const quiet = performance.now() - lastFrameAt > STALE_AFTER_MS;
  setStatus(quiet || lastUpstreamAgeMs > STALE_AFTER_MS ? 'stale' : 'live');
}
setInterval(checkFreshness, 1000);

function setStatus(s) {
  $('status').dataset.state = s;
  document.body.dataset.conn = s; // lets CSS dim figures while they may be stale
  setText($('status-label'), STATUS_LABELS[s]);
}

function connect() {
  const ws = new WebSocket(WS_URL);
  socket = ws;
  ws.onopen = () => {
    attempt = 0;
    noteAlive();
  };
  ws.onmessage = (ev) => handleMessage(ev.data);
  // No onerror handler: 'close' always follows 'error', so retrying lives there.
  ws.onclose = () => {
    if (socket !== ws) return; // ignore stale sockets
    socket = null;
    scheduleReconnect();
  };
}

// For web/operator.js: one JSON text frame on this viewer's socket; false while it is down.
function sendControl(frame) {
  if (socket === null || socket.readyState !== WebSocket.OPEN) return false;
  socket.send(JSON.stringify(frame));
  return true;
}

// Exponential backoff with "equal jitter" so a wall of screens doesn't
// reconnect in lockstep after a server restart.
function scheduleReconnect() {
  setStatus('reconnecting');
  const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** attempt);
  attempt = Math.min(attempt + 1, 10);
  setTimeout(connect, ceiling / 2 + Math.random() * (ceiling / 2));
}

if (KIOSK) document.documentElement.classList.add('kiosk');
setStatus('connecting');
connect();
