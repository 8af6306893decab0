// vspc's browser console: an xterm.js terminal on the VM's console
// WebSocket (GET /api/v1/vms/{vm}/console). Binary frames are raw bytes
// both ways; text frames from the daemon are JSON status: the first says
// which VM and what access the session has, later ones whether the VM is
// connected. The page's own ?token= and ?mode= go on to the WebSocket.
(function () {
  'use strict';
  const params = new URLSearchParams(location.search);
  const token = params.get('token');
  const mode = params.get('mode');
  const vm = document.body.dataset.vm;
  const el = (id) => document.getElementById(id);
  const vmBadge = el('vm');
  const accessBadge = el('access');
  const session = el('session');
  if (token) {
    el('back').href = '/?token=' + encodeURIComponent(token);
  }

  const term = new Terminal({
    cursorBlink: true,
    scrollback: 10000,
    fontFamily: 'ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace',
    fontSize: 14,
  });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(el('terminal'));
  const refit = () => {
    try { fit.fit(); } catch (e) { /* not laid out yet */ }
  };
  refit();
  window.addEventListener('resize', refit);
  if (window.ResizeObserver) {
    new ResizeObserver(refit).observe(el('terminal'));
  }

  // What the page knows, for people and for the tests.
  const state = { open: false, closed: false, access: null, vmConnected: null, received: 0 };
  window.vspc = { term: term, state: state };

  const q = new URLSearchParams();
  if (mode) q.set('mode', mode);
  if (token) q.set('token', token);
  const url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host +
    '/api/v1/vms/' + encodeURIComponent(vm) + '/console' + (q.toString() ? '?' + q : '');

  const showVm = (up) => {
    state.vmConnected = up;
    vmBadge.textContent = up ? 'VM connected' : 'VM disconnected';
    vmBadge.className = 'badge ' + (up ? 'up' : 'down');
  };
  const showSession = (text, closed) => {
    session.textContent = text;
    session.className = 'status' + (closed ? ' closed' : '');
  };

  const ws = new WebSocket(url);
  ws.binaryType = 'arraybuffer';
  ws.onopen = () => {
    state.open = true;
    showSession('console open', false);
    term.focus();
  };
  ws.onmessage = (ev) => {
    if (typeof ev.data !== 'string') {
      const bytes = new Uint8Array(ev.data);
      state.received += bytes.length;
      term.write(bytes);
      return;
    }
    let msg;
    try { msg = JSON.parse(ev.data); } catch (e) { return; }
    if (msg.error) {
      showSession(msg.error, true);
      return;
    }
    if (msg.access) {
      state.access = msg.access;
      const ro = msg.access === 'read-only';
      accessBadge.textContent = ro ? 'read-only: typing is not sent' : msg.access;
      accessBadge.className = 'badge' + (ro ? ' ro' : '');
      term.options.disableStdin = ro;
    }
    if (typeof msg.vm_connected === 'boolean') {
      const was = state.vmConnected;
      showVm(msg.vm_connected);
      if (was !== null && was !== msg.vm_connected) {
        showSession(msg.vm_connected ? 'the VM reconnected' : 'the VM disconnected; the console stays open', false);
      }
    }
  };
  ws.onclose = (ev) => {
    state.closed = true;
    let why = ev.reason || (state.open ? 'connection lost' :
      'could not open the console (unknown VM, or a missing or wrong ?token=)');
    showSession('console closed: ' + why + ' (reload to reconnect)', true);
    accessBadge.textContent = 'closed';
    accessBadge.className = 'badge down';
    term.options.disableStdin = true;
  };

  const send = (bytes) => {
    if (ws.readyState === WebSocket.OPEN && state.access !== 'read-only') {
      ws.send(bytes);
    }
  };
  const encoder = new TextEncoder();
  // Keys and pastes: UTF-8, as a terminal sends them.
  term.onData((data) => send(encoder.encode(data)));
  // Byte strings (some mouse reports): one byte per character.
  term.onBinary((data) => send(Uint8Array.from(data, (c) => c.charCodeAt(0) & 255)));
})();
