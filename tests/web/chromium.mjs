// What the browser tests share: headless Chromium started the way this
// machine needs it (no sandbox as root, no background network, which a
// closed network refuses), one line per step on stdout, and the run's
// ending (close the browser on every way out, DONE, the exit status).

import { chromium } from 'playwright-core';

/// How long one step may take.
export const STEP_MS = 15000;

/// One step's line on stdout, which tests/e2e/web.rs waits for.
export const say = (line) => process.stdout.write(line + '\n');

/// Start Chromium (`$CHROMIUM`, default /usr/bin/chromium) with a profile
/// in `userDataDir` and any `extraArgs`; the first page has the step
/// timeout and prints its errors and console messages as LOG lines.
export async function launch(userDataDir, extraArgs = [], options = {}) {
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    timeout: 30000,
    ...options,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      ...extraArgs,
    ],
  });
  const page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(STEP_MS);
  page.on('pageerror', (e) => say('LOG pageerror ' + e.message));
  page.on('console', (m) => say('LOG console ' + m.text()));
  return { context, page };
}

/// Run `steps(launched)` with the browser `start()` opens; any failure is
/// one FAIL line; the browser is closed on every way out, then DONE and
/// the exit status (1 after a failure).
export async function run(start, steps) {
  let launched;
  let failed = false;
  try {
    launched = await start();
    await steps(launched);
  } catch (e) {
    failed = true;
    say('FAIL ' + String(e && e.message ? e.message : e).split('\n')[0]);
  } finally {
    if (launched) {
      await launched.context.close().catch(() => {});
    }
  }
  say('DONE');
  process.exit(failed ? 1 : 0);
}
