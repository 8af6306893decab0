// Drives headless Chromium through vspc's browser console for
// tests/e2e/web.rs (which starts the daemon and a simulated VM, and checks
// what reaches the VM). Steps, each announced on stdout as one line that
// the Rust test waits for:
//
//   READY <access>   the page's console WebSocket is open, the VM connected
//   BEFORE           the terminal shows $BEFORE (what the VM printed before
//                    the page opened) and then the "-- live --" line
//   SAW              the terminal shows the marker (the VM's output)
//   TYPED            the keys below were typed into the terminal
//   VMDOWN           the page shows the VM disconnected
//   VMUP             the page shows it connected again
//   DONE             the browser is closed
//
// A step that fails prints "FAIL <why>" and the script exits 1; the
// browser is closed on every way out (and on SIGTERM/SIGINT, by Playwright).
//
// usage: node console_test.mjs URL MARKER USER_DATA_DIR [SCREENSHOT.png]
// env:   CHROMIUM (default /usr/bin/chromium)

import { launch, run, say, STEP_MS } from './chromium.mjs';

const [url, marker, userDataDir, screenshot] = process.argv.slice(2);
if (!url || !marker || !userDataDir) {
  console.log('FAIL usage: node console_test.mjs URL MARKER USER_DATA_DIR [SCREENSHOT.png]');
  process.exit(2);
}

// The terminal's text, row by row, as xterm.js holds it (run in the page).
const TERMINAL_TEXT = `window.vspcText = () => {
  const b = window.vspc.term.buffer.active;
  let text = '';
  for (let i = 0; i < b.length; i++) {
    const line = b.getLine(i);
    if (line) text += line.translateToString(true) + '\\n';
  }
  return text;
};`;

await run(() => launch(userDataDir, [], { viewport: { width: 1000, height: 600 } }), async ({ page }) => {
  await page.goto(url, { waitUntil: 'load' });

  await page.waitForFunction(
    () => window.vspc && window.vspc.state.open && window.vspc.state.access !== null &&
      window.vspc.state.vmConnected === true,
    null, { timeout: STEP_MS });
  say('READY ' + (await page.evaluate(() => window.vspc.state.access)));
  await page.evaluate(TERMINAL_TEXT);

  if (process.env.BEFORE) {
    await page.waitForFunction((before) => {
      const text = window.vspcText();
      const at = text.indexOf(before);
      return at >= 0 && text.indexOf('-- live --', at) > at;
    }, process.env.BEFORE, { timeout: STEP_MS });
    say('BEFORE');
  }

  await page.waitForFunction((m) => window.vspcText().includes(m), marker, { timeout: STEP_MS });
  say('SAW');

  // Typing goes to the terminal's hidden textarea, as a person's keys do.
  await page.locator('.xterm-helper-textarea').focus();
  await page.keyboard.type('typed in the browser');
  await page.keyboard.press('Enter');
  await page.keyboard.press('Control+C');
  await page.keyboard.press('ArrowUp');
  await page.keyboard.press('Tab');
  await page.keyboard.press('Backspace');
  await page.keyboard.press('Escape');
  say('TYPED');

  await page.waitForFunction(
    () => window.vspc.state.vmConnected === false &&
      document.getElementById('vm').textContent === 'VM disconnected',
    null, { timeout: STEP_MS });
  say('VMDOWN');
  await page.waitForFunction(
    () => window.vspc.state.vmConnected === true && !window.vspc.state.closed &&
      document.getElementById('vm').textContent === 'VM connected',
    null, { timeout: STEP_MS });
  say('VMUP');
  if (screenshot) {
    await page.screenshot({ path: screenshot });
  }
});
