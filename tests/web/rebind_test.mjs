// DNS rebinding, for tests/e2e/web.rs: headless Chromium resolves a name of
// "the attacker's" to 127.0.0.1 (--host-resolver-rules), opens the daemon's
// list page by that name, and from that page (whose origin is the
// attacker's name, as a rebound page's is) asks the API and opens a
// console WebSocket. One line per step on stdout:
//
//   PAGE <status> listed|unlisted   the list page's status; whether it names the VM
//   INDEXJS yes|no                  the list page's script ran (CSP allows it)
//   API <status>|error              fetch('/api/v1/vms') from the page
//   WS open|refused|timeout         a console WebSocket from the page
//   CONSOLE <access>|none           the console page's terminal opened (only when PAGE 200)
//   DONE                            the browser is closed
//
// Console messages of the page are printed as "LOG console ..." (a blocked
// resource names the Content Security Policy there). A step that fails
// prints "FAIL <why>".
//
// usage: node rebind_test.mjs BASE_URL VM USER_DATA_DIR RESOLVER_RULES
// env:   CHROMIUM (default /usr/bin/chromium)

import { launch, run, say, STEP_MS } from './chromium.mjs';

const [base, vm, userDataDir, rules] = process.argv.slice(2);
if (!base || !vm || !userDataDir || !rules) {
  console.log('FAIL usage: node rebind_test.mjs BASE_URL VM USER_DATA_DIR RESOLVER_RULES');
  process.exit(2);
}

const start = () => launch(userDataDir, ['--host-resolver-rules=' + rules, '--no-proxy-server']);
await run(start, async ({ page }) => {
  const resp = await page.goto(base + '/', { waitUntil: 'load' });
  const status = resp ? resp.status() : 0;
  const body = await page.content();
  say('PAGE ' + status + ' ' + (body.includes(vm) ? 'listed' : 'unlisted'));
  const indexJs = await page.evaluate(() =>
    [...document.links].some((a) => a.textContent === 'Refresh' && a.href === location.href));
  say('INDEXJS ' + (indexJs ? 'yes' : 'no'));

  const api = await page.evaluate(async () => {
    try {
      const r = await fetch('/api/v1/vms');
      return String(r.status);
    } catch (e) {
      return 'error';
    }
  });
  say('API ' + api);

  const ws = await page.evaluate((path) => new Promise((resolve) => {
    const url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + path;
    const sock = new WebSocket(url);
    const timer = setTimeout(() => resolve('timeout'), 10000);
    sock.onopen = () => { clearTimeout(timer); sock.close(); resolve('open'); };
    sock.onerror = () => { clearTimeout(timer); resolve('refused'); };
  }), '/api/v1/vms/' + encodeURIComponent(vm) + '/console?mode=write');
  say('WS ' + ws);

  if (status === 200) {
    await page.goto(base + '/vms/' + encodeURIComponent(vm), { waitUntil: 'load' });
    await page.waitForFunction(
      () => window.vspc && window.vspc.state.open && window.vspc.state.access !== null,
      null, { timeout: STEP_MS });
    say('CONSOLE ' + (await page.evaluate(() => window.vspc.state.access)));
  } else {
    say('CONSOLE none');
  }
});
