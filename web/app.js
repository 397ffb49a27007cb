'use strict';
// Live GMV ticker: websocket snapshot/update stream -> big-screen DOM.
// Sections: options, state + messages, money and time formatting, the counter (one displayed
// value for every element that shows the total), rendering, the story (milestones, leaders,
// curve), freshness, connection.
//
// Cost when nothing moves: no infinite CSS animation and no requestAnimationFrame loop; the
// counter runs frames only between a total and the next, and a 1 Hz timer ages the badge.

/* ---------- options: ?kiosk=1 ?currency=rmb ?theme=light|dark ---------- */

const PARAMS = new URLSearchParams(location.search);
const KIOSK = PARAMS.get('kiosk') === '1';
const REDUCED_MOTION = matchMedia('(prefers-reduced-motion: reduce)').matches;
const $ = (id) => document.getElementById(id);
let wantRmb = (PARAMS.get('currency') || '').toLowerCase() === 'rmb';

{
  const theme = (PARAMS.get('theme') || '').toLowerCase();
  if (theme === 'light' || theme === 'dark') document.documentElement.dataset.theme = theme;
  if (KIOSK) document.documentElement.classList.add('kiosk');
}

/* ---------- state + message handling ---------- */

let state = null;   // all known fields; null until the first snapshot
let seq = null;     // seq of the last applied message
let freshSocket = true; // the next snapshot is this connection's first: paint it directly

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
  let direct = false;
  switch (msg && msg.type) {
    case 'snapshot':
      state = fieldsOf(msg);
      seq = msg.seq;
      direct = freshSocket; // a reload or a new viewer shows the exact total at once
      freshSocket = false;
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
      // Every second: the only word on liveness. upstream_age_ms is how long ago the server
      // heard from a live aggregator (null: never since it started); aged locally until the
      // next one, so a silent server goes stale too. Updates never touch it: a replay's
      // status changes the view without saying anything about the aggregators.
      upstream.ageMs = typeof msg.upstream_age_ms === 'number' ? msg.upstream_age_ms : null;
      upstream.at = performance.now();
      checkFreshness();
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
  render(direct);
}

/* ---------- formatting (integers only, so cents are never off by one) ---------- */

const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];
const isInt = (v) => Number.isInteger(v);
const pad2 = (n) => String(n).padStart(2, '0');

function group(n) {
  return String(n).replace(/\B(?=(\d{3})+(?!\d))/g, ',');
}

// The money shown: USD as received, or RMB converted exactly from US cents with the feed's
// decimal rate (BigInt; fen = cents × rate, rounded half up). `rate` is null on the USD view.
const money = { code: 'USD', sym: '$', rate: null, rateText: '' };

function parseRate(text) {
  const m = /^(\d{1,6})(?:\.(\d{1,12}))?$/.exec(typeof text === 'string' ? text : '');
  if (!m) return null;
  const frac = m[2] || '';
  const num = BigInt(m[1] + frac);
  return num > 0n ? { num, den: 10n ** BigInt(frac.length), text } : null;
}

// US cents (integer Number or BigInt) -> minor units of the shown currency, as BigInt.
function minorUnits(cents) {
  const c = BigInt(cents);
  const r = money.rate;
  return r === null ? c : (2n * c * r.num + r.den) / (2n * r.den);
}

// cents -> { int: "74,100,000,000", dec: "00" } in the shown currency
function moneyParts(cents) {
  let m = minorUnits(Math.max(0, cents));
  return { int: group(m / 100n), dec: pad2(m % 100n) };
}

function formatMoney(cents) {
  const p = moneyParts(cents);
  return `${money.sym}${p.int}.${p.dec}`;
}

// "$4.68M": floor of the exact integer quotient, so no float drift.
const COMPACT = [[10n ** 12n, 'T'], [10n ** 9n, 'B'], [10n ** 6n, 'M'], [10n ** 3n, 'K']];
function formatCompact(cents) {
  const m = minorUnits(Math.max(0, cents));
  for (const [unit, suffix] of COMPACT) {
    if (m >= unit * 100n) {
      const hundredths = m / unit;
      return `${money.sym}${group(hundredths / 100n)}.${pad2(hundredths % 100n)}${suffix}`;
    }
  }
  return formatMoney(cents);
}

// Read wall-clock fields straight from the string: the festival runs on
// Beijing time whatever zone the TV's browser is set to.
function parseWallClock(iso) {
  const m = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?$/
    .exec(iso || '');
  return m && { y: +m[1], mo: +m[2], d: +m[3], hh: m[4], mm: m[5], ss: m[6] || '',
    offset: m[7] || '' };
}

function zoneLabel(offset) {
  if (offset === '+08:00' || offset === '+0800') return 'Beijing time';
  return offset === 'Z' ? 'UTC' : offset ? `UTC${offset}` : '';
}

function formatWallClock(t) {
  return `${MONTHS[t.mo - 1]} ${t.d} · ${t.hh}:${t.mm}`;
}

// "Nov 11 · 00:01:08" when the time has its seconds (and they are not :00), else to the minute.
function formatMoment(iso) {
  const t = parseWallClock(iso);
  if (!t) return '';
  return `${formatWallClock(t)}${t.ss && t.ss !== '00' ? `:${t.ss}` : ''}`;
}

// Elapsed time as the press quotes it: "48 s", "1 min 8 s", "1 h 3 min", "10 d 0 h 8 min".
function formatElapsed(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  const min = Math.floor(s / 60) % 60;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${min} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor(s / 3600) % 24} h ${min} min`;
}

// A badge's age: "12 s", "4 min", "2 h".
function formatAge(ms) {
  const s = Math.floor(ms / 1000);
  return s < 60 ? `${s} s` : s < 3600 ? `${Math.floor(s / 60)} min` : `${Math.floor(s / 3600)} h`;
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

// 1584 -> "1584×", 0.5 -> "0.5×", 0.004 -> "0.004×" (two significant digits under 1, never
// "0×"), 26,000,000 -> "2.6e+7×" (never "Infinity×"), null / "max" (as fast as it goes) -> "max"
function formatSpeed(speed) {
  if (typeof speed !== 'number' || !Number.isFinite(speed) || speed <= 0) return 'max';
  if (speed >= 1e6) return `${Number(speed.toPrecision(2)).toExponential()}×`;
  return `${speed >= 1 ? Math.round(speed * 100) / 100 : Number(speed.toPrecision(2))}×`;
}

function percent(part, total) {
  return total > 0 ? `${(Math.round((part * 1000) / total) / 10).toFixed(1)}%` : '—';
}

/* ---------- the counter: one displayed value ---------- */

// Between two totals the counter runs linearly from what is on screen to the newest total,
// over about the interval at which totals have been arriving (so it moves at the current
// rate and lands on each total just before the next one comes). It never passes the newest
// total, never runs backwards (a drop, from a reset or a seek back, is shown at once), and
// shows only integers. Everything that shows the total reads `counter.shown`.
const MIN_RUN_MS = 60;
const MAX_RUN_MS = 1500;
const counter = { target: null, shown: null, from: 0, start: 0, run: 0, raf: 0,
  lastAt: 0, interval: 250, paintedAt: 0 };

function setTotal(cents, direct) {
  const now = performance.now();
  $('gmv').dataset.cents = String(cents);
  const previous = counter.target;
  if (cents === previous) return;
  const gap = now - counter.lastAt;
  counter.lastAt = now;
  if (previous === null || direct || cents < previous || REDUCED_MOTION || document.hidden) {
    stopRun();
    counter.target = cents;
    showTotal(cents);
    return;
  }
  // A gap of several seconds is a pause, not the rate: keep the interval learnt before.
  if (gap < 3000) counter.interval = 0.6 * counter.interval + 0.4 * gap;
  counter.from = counter.shown;
  counter.target = cents;
  counter.start = now;
  counter.run = Math.min(MAX_RUN_MS, Math.max(MIN_RUN_MS, 0.9 * counter.interval));
  if (!counter.raf) counter.raf = requestAnimationFrame(stepCounter);
}

// At most 30 paints a second: each repaints the figure's tiles in software on a TV's browser
// (benchmarks/page_soak.py), and at 30 the cents still blur as a broadcast counter's do.
const PAINT_EVERY_MS = 1000 / 30 - 4;

function stepCounter(now) {
  counter.raf = 0;
  if (now - counter.paintedAt < PAINT_EVERY_MS && now - counter.start < counter.run) {
    counter.raf = requestAnimationFrame(stepCounter);
    return;
  }
  counter.paintedAt = now;
  const t = (now - counter.start) / counter.run;
  // Land exactly on the target; in between, whole cents below it.
  const shown = t >= 1 ? counter.target
    : Math.min(counter.target, counter.from + Math.floor((counter.target - counter.from) *
      Math.max(0, t)));
  showTotal(shown);
  if (shown < counter.target) counter.raf = requestAnimationFrame(stepCounter);
}

function stopRun() {
  if (counter.raf) cancelAnimationFrame(counter.raf);
  counter.raf = 0;
}

// A hidden tab runs no frames: on its return, show the newest total at once.
document.addEventListener('visibilitychange', () => {
  if (!document.hidden && counter.target !== null && counter.shown !== counter.target) {
    stopRun();
    showTotal(counter.target);
  }
});

const gmvNode = $('gmv');
const gmvCur = gmvNode.querySelector('.cur');
const gmvInt = gmvNode.querySelector('.int');
const gmvDec = gmvNode.querySelector('.dec');

// Paint one displayed value everywhere the total appears. The big figure is one span per
// group of three digits, so a frame repaints only the groups that changed (mostly the last
// ones), not the whole 1,300-pixel-wide number.
function showTotal(cents) {
  counter.shown = cents;
  const p = moneyParts(cents);
  setText(gmvCur, money.sym);
  const groups = p.int.split(/(?=,)/); // "74,100,000" -> ["74", ",100", ",000"]
  if (gmvInt.childElementCount !== groups.length) gmvInt.replaceChildren();
  syncRows(gmvInt, groups.length, () => el('span', 'grp')).forEach((g, i) => setText(g, groups[i]));
  setText(gmvDec, `.${p.dec}`);
  gmvNode.dataset.shown = String(cents);
  const now = $('race-now');
  now.dataset.cents = String(cents);
  setText(now, formatCompact(cents));
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

function renderCurrency(cur) {
  const rate = wantRmb && isPlainObject(cur) ? parseRate(cur.rmb_per_usd) : null;
  const code = rate ? 'RMB' : 'USD';
  const changed = money.code !== code || (rate && rate.text) !== (money.rate && money.rate.text);
  Object.assign(money, { code, sym: rate ? '¥' : '$', rate, rateText: rate ? rate.text : '' });
  document.documentElement.dataset.currency = code.toLowerCase();
  setText($('eyebrow'), `Gross merchandise value · ${code}`);
  const note = $('rate-note');
  note.hidden = !wantRmb;
  setText(note, rate ? `RMB at ${rate.text} per USD` : 'RMB rate not available: USD shown');
  note.title = rate && isPlainObject(cur) && typeof cur.basis === 'string' ? cur.basis : '';
  const toggle = $('currency-toggle');
  setText(toggle, wantRmb ? 'USD' : 'RMB');
  toggle.setAttribute('aria-label', `Show amounts in ${wantRmb ? 'USD' : 'RMB'}`);
  return changed;
}

function render(direct) {
  const s = state;
  const win = isPlainObject(s.window) ? s.window : {};
  const currencyChanged = renderCurrency(s.currency);
  if (currencyChanged && counter.shown !== null) showTotal(counter.shown);
  setTotal(isInt(s.gmv_cents) ? s.gmv_cents : 0, direct);
  setText($('orders'), isInt(s.orders) ? group(s.orders) : '—');
  setText($('brands'), isInt(s.brands_active) ? group(s.brands_active) : '—');
  setCount($('brands-overseas'), s.brands_overseas_active);
  setCount($('brands-first-time'), s.brands_first_time_active);
  // null: the aggregators have no reference data saying which brands are first-time, so the
  // figure is unknown and not shown (never as 0); absent (an older server): "—".
  $('brands-first-time-part').hidden = s.brands_first_time_active === null;
  setCount($('brands-big'), s.brands_big);
  setText($('brands-big-threshold'), money.code === 'USD' && isInt(s.brands_big_threshold_cents)
    ? formatMoney(s.brands_big_threshold_cents).replace(/\.00$/, '') : 'RMB 100M');
  setCount($('chatbot'), s.chatbot_queries);
  renderOrdersPerSecond(s.orders_per_second, s.peak_orders_per_second);
  const rate = $('rate');
  rate.dataset.cents = isInt(s.gmv_last_minute_cents) ? String(s.gmv_last_minute_cents) : '';
  setText(rate, isInt(s.gmv_last_minute_cents) ? formatCompact(s.gmv_last_minute_cents) : '—');
  rate.title = isInt(s.gmv_last_minute_cents) ? formatMoney(s.gmv_last_minute_cents) : '';
  fitKpis();
  if (win.label) {
    setText($('label'), win.label.replace(/^11\.11\s*/, ''));
    document.title = `${win.label} · Live GMV`;
  }
  renderClock(s.sim_time, s.minute, win);
  renderReplay(isPlainObject(s.replay) ? s.replay : null);
  const cmp = isPlainObject(s.compare) ? s.compare : null;
  renderCompare(cmp, s.gmv_cents, win);
  renderChart(isPlainObject(s.curve) ? s.curve : null, win, currencyChanged);
  renderMilestones(Array.isArray(s.milestones) ? s.milestones : [], direct);
  renderTopBrands(Array.isArray(s.top_brands) ? s.top_brands : []);
  renderPlatforms(Array.isArray(s.platforms) ? s.platforms : []);
  renderCountries(Array.isArray(s.countries) ? s.countries : []);
  renderStats(isPlainObject(s.stats) ? s.stats : {});
  checkFreshness(); // a shard that went quiet or came back shows at once
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

  const frac = isInt(minute) && total ? Math.min(1, Math.max(0, (minute + 1) / total)) : 0;
  const bar = $('progress');
  bar.dataset.value = frac.toFixed(4);
  bar.setAttribute('aria-valuenow', (frac * 100).toFixed(1));
  bar.style.setProperty('--p', frac);
  if (days) bar.style.setProperty('--days', days);
  renderTicks(win.start, days);
}

// The KPI figures share one size, as large as the longest of them allows (CSS --chars).
const KPI_IDS = ['orders', 'ops', 'brands', 'brands-big', 'rate', 'chatbot'];
function fitKpis() {
  const chars = String(Math.max(7, ...KPI_IDS.map((id) => $(id).textContent.length)));
  const row = document.querySelector('.kpis');
  if (row.style.getPropertyValue('--chars') !== chars) row.style.setProperty('--chars', chars);
}

// A count that may be missing or null (older snapshots): "—" until known.
function setCount(node, n) {
  node.dataset.value = isInt(n) ? String(n) : '';
  setText(node, isInt(n) ? group(n) : '—');
}

function renderOrdersPerSecond(now, peak) {
  setCount($('ops'), now);
  const p = isPlainObject(peak) && isInt(peak.value) ? peak : null;
  const node = $('ops-peak');
  node.dataset.value = p ? String(p.value) : '';
  setText(node, p ? `peak ${group(p.value)}${p.at ? ` · ${formatMoment(p.at)}` : ''}` : 'peak —');
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
  setText(node.querySelector('.replay-icon'), REPLAY_ICONS[st] || '•');
  setText(node.querySelector('.replay-text'), st === 'playing' ? formatSpeed(r.speed) : st || 'replay');
  node.title = [`Replay${r.scenario ? ` of ${r.scenario}` : ''}`, formatSpeed(r.speed),
    isInt(r.minute) ? `minute ${r.minute}` : '', r.loop === true ? 'looping' : '']
    .filter(Boolean).join(' · ');
}

// This year against last year: the change at the same elapsed time (only where it means
// something: not while last year had barely started), last year's figure then, and a badge
// once this year passed last year's total.
function renderCompare(cmp, gmv, win) {
  const race = $('race');
  const label = cmp && typeof cmp.label === 'string' && cmp.label ? cmp.label : 'last year';
  const then = cmp && isInt(cmp.gmv_cents) ? cmp.gmv_cents : null;
  const total = cmp && isInt(cmp.total_cents) ? cmp.total_cents : null;
  const now = isInt(gmv) ? gmv : null;
  const meaningful = !cmp || cmp.meaningful !== false;

  const compare = $('compare');
  const pm = meaningful && now !== null && then !== null && then > 0
    ? changePerMille(now, then) : null;
  compare.dataset.pct = pm === null ? '' : perMilleText(pm);
  compare.dataset.trend = pm === null ? '' : pm > 0 ? 'up' : pm < 0 ? 'down' : 'flat';
  compare.hidden = pm === null;
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
    ? `${last} total ${formatCompact(total)}` : '');

  const start = parseWallClock(win.start);
  setText($('race-now-label'), start ? String(start.y) : 'This year');
  setText($('legend-now'), start ? String(start.y) : 'this year');
  setText($('legend-then'), cmp ? last : 'last year');
  setText($('race-then-label'), `${last} at this time`);
  setText($('race-then'), then !== null ? formatCompact(then) : '—');
  race.dataset.empty = String(cmp === null);
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
  li.append(el('span', 'rank'), el('span', 'name'), el('span', 'val'), el('span', 'pct'));
  return li;
}

function fillRow(li, { rank = '', name, cents, pct, share }) {
  setText(li.children[0], rank);
  setText(li.children[1], name);
  li.children[1].title = name;
  setText(li.children[2], formatCompact(cents));
  setText(li.children[3], pct);
  li.dataset.cents = String(cents);
  li.style.setProperty('--w', Math.max(0, Math.min(1, share)).toFixed(4));
}

function renderPlatforms(platforms) {
  const total = platforms.reduce((sum, p) => sum + (p.gmv_cents || 0), 0);
  const rows = syncRows($('platforms'), platforms.length, barRow);
  platforms.forEach((p, i) => fillRow(rows[i], {
    name: p.name, cents: p.gmv_cents || 0, pct: percent(p.gmv_cents || 0, total),
    share: total ? (p.gmv_cents || 0) / total : 0,
  }));
}

// The first country is the home market (China in 2020); the others sell to it from abroad.
function renderCountries(countries) {
  const home = isPlainObject(countries[0]) && typeof countries[0].name === 'string'
    ? countries[0].name : 'China';
  setText($('countries-title'), `Top countries selling to ${home}`);
  const others = countries.slice(1).filter(isPlainObject);
  const total = others.reduce((sum, c) => sum + (c.gmv_cents || 0), 0);
  const abroad = others.sort((a, b) => (b.gmv_cents || 0) - (a.gmv_cents || 0)).slice(0, 5);
  const lead = abroad.length ? abroad[0].gmv_cents || 0 : 0;
  const rows = syncRows($('countries'), abroad.length, barRow);
  abroad.forEach((c, i) => {
    rows[i].dataset.code = c.code;
    // Percent is the share of all cross-border GMV; bars scale to the leader.
    fillRow(rows[i], { rank: String(i + 1), name: c.name || c.code, cents: c.gmv_cents || 0,
      pct: percent(c.gmv_cents || 0, total), share: lead ? (c.gmv_cents || 0) / lead : 0 });
  });
}

/* ---------- the story: top brands, milestones, the curve ---------- */

function renderTopBrands(brands) {
  const top = brands.filter((b) => isPlainObject(b) && isInt(b.gmv_cents)).slice(0, 10);
  const lead = top.length ? top[0].gmv_cents : 0;
  const rows = syncRows($('top-brands'), top.length, barRow);
  top.forEach((b, i) => {
    rows[i].dataset.id = String(b.id);
    fillRow(rows[i], { rank: String(i + 1), name: typeof b.name === 'string' ? b.name : `#${b.id}`,
      cents: b.gmv_cents, pct: '', share: lead ? b.gmv_cents / lead : 0 });
  });
}

// Which milestones this view tells: its own currency's GMV ones, and every other kind.
function milestoneShown(m) {
  return isPlainObject(m) && typeof m.key === 'string' &&
    (m.kind !== 'gmv' || m.currency === money.code);
}

function milestoneParts(m) {
  return { label: typeof m.label === 'string' ? m.label : m.key,
    elapsed: typeof m.elapsed_s === 'number' ? `in ${formatElapsed(m.elapsed_s)}` : '',
    at: formatMoment(m.at) };
}

const MILESTONE_ROWS = 12;   // the newest; the panel shows as many as fit
const BANNER_MS = 7000;
let milestonesSeen = null;  // keys reached, as this viewer knows them (null: nothing yet)
let bannerTimer = 0;

function renderMilestones(all, direct) {
  const reached = all.filter(milestoneShown);
  const keys = new Set(reached.map((m) => m.key));
  // A milestone newly reached while this viewer watches gets the banner: not those already
  // in the first snapshot (a reload), and after a seek back only those reached again.
  const fresh = milestonesSeen === null || direct ? []
    : reached.filter((m) => !milestonesSeen.has(m.key));
  milestonesSeen = keys;
  if (fresh.length) showBanner(fresh[fresh.length - 1]);

  const list = $('milestones');
  const shown = reached.slice(-MILESTONE_ROWS).reverse(); // newest first
  const rows = syncRows(list, shown.length, () => {
    const li = el('li', 'ms');
    li.append(el('span', 'ms-label'), el('span', 'ms-elapsed'), el('span', 'ms-at'));
    return li;
  });
  const changed = shown.some((m, i) => rows[i].dataset.key !== m.key);
  shown.forEach((m, i) => {
    const p = milestoneParts(m);
    rows[i].dataset.key = m.key;
    rows[i].dataset.kind = String(m.kind);
    setText(rows[i].children[0], p.label);
    setText(rows[i].children[1], p.elapsed);
    setText(rows[i].children[2], p.at);
  });
  if (changed) fitMilestones();
}

// Only whole rows: the oldest that do not fit the panel are hidden (a layout read, done only
// when the list or the window changes).
function fitMilestones() {
  const list = $('milestones');
  const rows = [...list.children];
  rows.forEach((row) => { row.hidden = false; });
  const bottom = list.getBoundingClientRect().bottom;
  if (getComputedStyle(list).overflow !== 'hidden') return;
  rows.forEach((row) => { row.hidden = row.getBoundingClientRect().bottom > bottom + 1; });
}
addEventListener('resize', fitMilestones);

function showBanner(m) {
  const banner = $('banner');
  const p = milestoneParts(m);
  banner.dataset.key = m.key;
  banner.dataset.kind = String(m.kind);
  setText(banner.querySelector('.banner-label'), p.label);
  setText(banner.querySelector('.banner-elapsed'), p.elapsed);
  setText(banner.querySelector('.banner-at'), p.at);
  // Restart the one-shot entrance for a banner that replaces another.
  banner.hidden = true;
  void banner.offsetWidth;
  banner.hidden = false;
  clearTimeout(bannerTimer);
  bannerTimer = setTimeout(() => { banner.hidden = true; }, BANNER_MS);
}

// Cumulative GMV by bucket, this year over last year's whole curve, in an SVG whose
// viewBox is the chart's own units (x: minutes of the window, y: 0..1000 of the scale);
// strokes do not scale, so lines are as crisp at 2160p as at 1080p. Redrawn only when the
// curve, last year's curve or the currency changes.
const SVG_W = 1000;
const SVG_H = 400;
const CHART_EVERY_MS = 1000; // the latest bucket grows with every update: redraw once a second
let chartKey = '';
let chartAt = -Infinity;
let chartTimer = 0;

function renderChart(curve, win, force) {
  const wait = chartAt + CHART_EVERY_MS - performance.now();
  if (wait > 0 && !force) {
    // Drawn again a second after the last time, with whatever the view holds then.
    if (!chartTimer) {
      chartTimer = setTimeout(() => {
        chartTimer = 0;
        const s = state;
        drawChart(isPlainObject(s.curve) ? s.curve : null,
          isPlainObject(s.window) ? s.window : {}, false);
      }, wait);
    }
    return;
  }
  drawChart(curve, win, force);
}

function drawChart(curve, win, force) {
  const done = curve && Array.isArray(curve.cents) ? curve.cents.filter(isInt) : [];
  const then = Array.isArray(state.compare_curve_cents)
    ? state.compare_curve_cents.filter(isInt) : [];
  const bucket = curve && isInt(curve.bucket_minutes) && curve.bucket_minutes > 0
    ? curve.bucket_minutes : 0;
  const minutes = isInt(win.minutes) && win.minutes > 0 ? win.minutes : 0;
  // The feed sends complete buckets only; the one filling ends at the total on screen now.
  const live = counter.shown !== null ? counter.shown : state.gmv_cents;
  const filling = bucket && isInt(state.minute) && isInt(live)
    && (state.minute + 1) < minutes && done.length * bucket < state.minute + 1;
  const now = filling ? [...done, live] : done;
  const key = `${bucket}/${minutes}/${now.length}/${now[now.length - 1]}/${then.length}/` +
    `${then[then.length - 1]}/${state.minute}`;
  if (key === chartKey && !force) return;
  chartKey = key;
  chartAt = performance.now();
  const chart = $('chart');
  chart.dataset.points = String(now.length);
  chart.dataset.empty = String(!bucket || !minutes || (!now.length && !then.length));
  if (chart.dataset.empty === 'true') {
    for (const id of ['chart-now', 'chart-area', 'chart-then']) $(id).setAttribute('d', '');
    return;
  }
  const buckets = Math.ceil(minutes / bucket);
  const lastTotal = then.length ? then[then.length - 1] : 0;
  const top = Math.max(lastTotal, ...now, 1) * 1.06;
  // Bucket i ends at minute (i + 1) * bucket; the filling one at the minutes in so far.
  const end = (i) => (filling && i === done.length ? state.minute + 1 : (i + 1) * bucket);
  const x = (i) => ((Math.min(minutes, end(i)) / minutes) * SVG_W).toFixed(1);
  const y = (c) => (SVG_H - (c / top) * SVG_H).toFixed(1);
  const line = (values) => `M0 ${SVG_H}` + values.map((c, i) => `L${x(i)} ${y(c)}`).join('');
  $('chart-then').setAttribute('d', then.length ? line(then.slice(0, buckets)) : '');
  const nowPath = now.length ? line(now.slice(0, buckets)) : '';
  $('chart-now').setAttribute('d', nowPath);
  $('chart-area').setAttribute('d', now.length
    ? `${nowPath}L${x(Math.min(now.length, buckets) - 1)} ${SVG_H}Z` : '');
  const goal = $('chart-goal');
  goal.hidden = !lastTotal;
  goal.style.setProperty('--y', (1 - lastTotal / top).toFixed(4));
  const peak = Math.max(lastTotal, ...now, 1);
  setText($('chart-top'), formatCompact(peak));
  $('chart-top').style.setProperty('--y', (1 - peak / top).toFixed(4));
  const start = parseWallClock(win.start);
  if (start) {
    const end = new Date(Date.UTC(start.y, start.mo - 1, start.d) + (minutes - 1) * 60000);
    setText($('chart-start'), `${MONTHS[start.mo - 1]} ${start.d}`);
    setText($('chart-end'), `${MONTHS[end.getUTCMonth()]} ${end.getUTCDate()}`);
  }
}

function renderStats(st) {
  const parts = ['batches', 'rejected', 'duplicates', 'gaps'].filter((k) => isInt(st[k]))
    .map((k) => `${k} ${group(st[k])}`);
  if (isInt(st.shards)) {
    parts.push(`shards ${st.shards}${isInt(st.shards_expected) ? `/${st.shards_expected}` : ''}`);
  }
  if (isInt(st.partitions) && st.partitions > 1) parts.push(`partitions ${st.partitions}`);
  if (Array.isArray(st.shards_quiet) && st.shards_quiet.length) {
    parts.push(`quiet ${st.shards_quiet.map(String).join(', ')}`);
  }
  // What the server refused from the broker shows only when there is some.
  const ignored = ['ignored_totals', 'ignored_replay'].filter((k) => isInt(st[k]))
    .reduce((sum, k) => sum + st[k], 0);
  if (ignored) parts.push(`ignored ${group(ignored)}`);
  if (Array.isArray(st.unknown_shards) && st.unknown_shards.length) {
    parts.push(`unknown shards ${st.unknown_shards.map(String).join(', ')}`);
  }
  setText($('stats'), [`seq ${seq}`, ...parts].join('  ·  '));
}

/* ---------- freshness: LIVE, STALE · 12 s, reconnecting ---------- */

const STALE_AFTER_MS = 5000;
const upstream = { ageMs: undefined, at: 0 }; // undefined: no heartbeat yet on this socket

// LIVE only while the server heard from an aggregator within 5 s (its age at the last
// heartbeat plus the time since), so a dead aggregator, a silent server or a frozen link
// all turn the badge STALE with its age, whatever else still arrives.
function checkFreshness() {
  if (socket === null || socket.readyState !== WebSocket.OPEN) return;
  if (upstream.ageMs === undefined) {
    // Connected, no heartbeat yet: at most a second, unless the server is silent.
    if (performance.now() - upstream.at > STALE_AFTER_MS) setStatus('stale', null);
    return;
  }
  const age = upstream.ageMs === null ? null : upstream.ageMs + performance.now() - upstream.at;
  if (age === null || age > STALE_AFTER_MS) {
    setStatus('stale', age);
    return;
  }
  // Fresh totals, but from only some of the shards: part of the total is not moving.
  const st = state !== null && isPlainObject(state.stats) ? state.stats : {};
  const quiet = Array.isArray(st.shards_quiet) ? st.shards_quiet : [];
  if (quiet.length) {
    setStatus('partial', age, quiet.length === 1 ? `shard ${quiet[0]} quiet`
      : `${quiet.length}${isInt(st.shards_expected) ? ` of ${st.shards_expected}` : ''} shards quiet`);
    return;
  }
  // Every shard live, but not every brand partition held exactly once: the figures miss
  // some brands, or may count some twice.
  if (typeof st.partitions_problem === 'string' && st.partitions_problem) {
    setStatus('partial', age, st.partitions_problem);
    return;
  }
  setStatus('live', age);
}
setInterval(checkFreshness, 1000);

function setStatus(s, ageMs, detail = '') {
  const status = $('status');
  status.dataset.state = s;
  status.dataset.ageMs = typeof ageMs === 'number' ? String(Math.round(ageMs)) : '';
  document.body.dataset.conn = s; // lets CSS dim figures while they may be stale
  const label = s === 'live' ? 'Live' : s === 'partial' ? `Partial · ${detail}` : s === 'stale'
    ? `Stale · ${typeof ageMs === 'number' ? formatAge(ageMs) : 'no data'}`
    : s === 'reconnecting' ? 'Reconnecting…' : 'Connecting…';
  setText($('status-label'), label);
}

/* ---------- connection ---------- */

const WS_URL = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws';
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 5000;
let socket = null;
let attempt = 0;

function connect() {
  const ws = new WebSocket(WS_URL);
  socket = ws;
  ws.onopen = () => {
    attempt = 0;
    freshSocket = true;
    upstream.ageMs = undefined;
    upstream.at = performance.now();
    setStatus('connecting', null);
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
  setStatus('reconnecting', null);
  const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** attempt);
  attempt = Math.min(attempt + 1, 10);
  setTimeout(connect, ceiling / 2 + Math.random() * (ceiling / 2));
}

// USD or RMB, outside kiosk mode: the choice goes into the address, so a reload keeps it.
$('currency-toggle').addEventListener('click', () => {
  wantRmb = !wantRmb;
  const params = new URLSearchParams(location.search);
  if (wantRmb) params.set('currency', 'rmb'); else params.delete('currency');
  const query = params.toString();
  history.replaceState(null, '', `${location.pathname}${query ? `?${query}` : ''}`);
  if (state !== null) {
    milestonesSeen = null; // the other currency's milestones are not news
    render(false);
  } else {
    renderCurrency(null);
  }
});

renderCurrency(null);
setStatus('connecting', null);
connect();
