'use strict';
// Operator view (?operator=1, never with ?kiosk=1): replay controls sent as `control`
// frames on the page's own websocket (sendControl in app.js); the server answers this
// viewer alone with a `control_result`, which app.js hands to window.onControlResult.
// Every other viewer shows nothing of this and sends nothing.

(() => {
  const params = new URLSearchParams(location.search);
  if (params.get('operator') !== '1' || params.get('kiosk') === '1') return;

  const TOKEN_KEY = 'gmv-ticker.operator-token';
  const ANSWER_TIMEOUT_MS = 5000; // the server waits 3 s for the replay's answer
  const DONE = { pause: 'paused', resume: 'resumed', speed: 'speed', seek: 'seeking' };
  const panel = document.getElementById('operator');
  const token = document.getElementById('operator-token');
  const speed = document.getElementById('operator-speed');
  const seek = document.getElementById('operator-seek');
  const result = document.getElementById('operator-result');
  let pending = null; // { cmd, detail, timer } of the command awaiting its answer

  // sessionStorage can be unavailable (privacy settings): then the token is just not kept.
  const storage = {
    get() { try { return sessionStorage.getItem(TOKEN_KEY) || ''; } catch { return ''; } },
    set(v) { try { sessionStorage.setItem(TOKEN_KEY, v); } catch { /* not kept */ } },
  };

  function show(text, ok) {
    result.textContent = text;
    result.dataset.ok = ok === null ? '' : String(ok);
  }

  function command(cmd) {
    const frame = { type: 'control', token: token.value, cmd };
    let detail = '';
    if (!token.value) return show('enter the control token first', false);
    if (cmd === 'speed') {
      const raw = speed.value.trim();
      const value = /^max$/i.test(raw) ? 'max' : Number(raw);
      if (value !== 'max' && (!raw || !Number.isFinite(value) || value <= 0)) {
        return show('speed: a positive number (× real time) or max', false);
      }
      frame.speed = value;
      detail = value === 'max' ? 'max' : `${value}×`;
    } else if (cmd === 'seek') {
      const to = seek.value.trim();
      if (!to) return show('seek: enter a time as MM-DD HH:MM, e.g. 11-11 00:30', false);
      frame.to = to;
      detail = to;
    }
    if (!sendControl(frame)) return show('not connected: try again once live', false);
    if (pending) clearTimeout(pending.timer);
    pending = { cmd, detail, timer: setTimeout(() => {
      pending = null;
      show(`${cmd}: no answer from the server`, false);
    }, ANSWER_TIMEOUT_MS) };
    show(`${cmd}…`, null);
  }

  window.onControlResult = (msg) => {
    const mine = pending && pending.cmd === msg.cmd ? pending : null;
    if (pending) clearTimeout(pending.timer);
    pending = null;
    if (msg.ok === true) {
      // The replay's own word on what it did ("paused at 11-11 00:31"), else ours.
      const done = DONE[msg.cmd] || String(msg.cmd || 'done');
      show(typeof msg.detail === 'string' && msg.detail ? `${msg.detail} ✓`
        : `${done}${mine && mine.detail ? ` ${mine.detail}` : ''} ✓`, true);
    } else {
      show(typeof msg.error === 'string' && msg.error ? msg.error : `${msg.cmd || 'command'} failed`,
        false);
    }
  };

  token.value = storage.get();
  token.addEventListener('input', () => storage.set(token.value));
  panel.addEventListener('submit', (ev) => ev.preventDefault());
  panel.addEventListener('click', (ev) => {
    const button = ev.target.closest('button[data-cmd]');
    if (button) command(button.dataset.cmd);
  });
  // Enter in a field runs that field's command.
  speed.addEventListener('keydown', (ev) => { if (ev.key === 'Enter') command('speed'); });
  seek.addEventListener('keydown', (ev) => { if (ev.key === 'Enter') command('seek'); });
  document.body.classList.add('op-mode');
  panel.hidden = false;
})();
