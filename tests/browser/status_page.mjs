// Drives Volley's status page in headless Chromium while a job runs.
// Usage: node status_page.mjs <base-url> <job-id> <expected-stages> <screenshot-dir> <release-file> [token]
// The job's first stage is held (volley.test_hold_task) until <release-file> exists: this script
// creates it once it has seen the job running, so no timing decides what it sees.
// Prints one JSON line with what it saw; exits non-zero on any failed expectation.
import { writeFileSync } from 'node:fs';
import { chromium } from 'playwright-core';

const [base, jobId, expectedStages, outDir, releaseFile, token] = process.argv.slice(2);
const fail = (message) => {
  console.error(`status page check failed: ${message}`);
  process.exit(1);
};
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_PATH || '/usr/bin/chromium',
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
});
const seen = {};
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  // Pages of active jobs reload themselves every second (meta refresh). A reload in the middle
  // of a check would make what it sees depend on timing, so the refresh is noted and taken out;
  // this script reloads explicitly where it waits for a change.
  seen.auto_refresh = false;
  await page.route('**/*', async (route) => {
    const response = await route.fetch();
    if (!(response.headers()['content-type'] || '').includes('text/html')) {
      return route.fulfill({ response });
    }
    const refresh = /<meta http-equiv="refresh"[^>]*>/;
    const body = await response.text();
    if (refresh.test(body)) seen.auto_refresh = true;
    return route.fulfill({ response, body: body.replace(refresh, '') });
  });
  const query = token ? `?token=${encodeURIComponent(token)}` : '';
  await page.goto(`${base}/jobs${query}`);
  // The job is listed as running: it stays so until this script releases it (the deadline only
  // guards against a hang).
  const row = `tr.job[data-job="${jobId}"]`;
  const listedBy = Date.now() + 120000;
  while ((await page.locator(`${row} td.state-running`).count()) === 0) {
    if (Date.now() > listedBy) fail('job never listed as running');
    await page.waitForTimeout(200);
    await page.goto(`${base}/jobs`);
  }
  seen.jobs_page_running = true;
  await page.screenshot({ path: `${outDir}/1-jobs-running.png`, fullPage: true });

  // Its job page draws the stage DAG.
  await page.click(`${row} a`);
  await page.waitForSelector('#dag');
  seen.dag_stages = await page.locator('#dag g.stage').count();
  if (seen.dag_stages !== Number(expectedStages)) {
    fail(`DAG has ${seen.dag_stages} stages, expected ${expectedStages}`);
  }
  seen.dag_edges = await page.locator('#dag line.edge').count();
  seen.job_state_while_running = await page.locator('#job-state').textContent();
  await page.screenshot({ path: `${outDir}/2-job-running.png`, fullPage: true });

  // A stage page (through the SVG link) lists its tasks.
  await page.locator('#dag a').first().click();
  await page.waitForSelector('#tasks');
  seen.stage_url = page.url();
  seen.stage_task_rows = await page.locator('#tasks tr.task').count();
  if (seen.stage_task_rows < 1) fail('stage page shows no tasks');
  await page.screenshot({ path: `${outDir}/3-stage.png`, fullPage: true });

  // Everything that needs the running job was seen: let its tasks go.
  writeFileSync(releaseFile, 'released');

  // The job ends as succeeded.
  const deadline = Date.now() + 120000;
  for (;;) {
    await page.goto(`${base}/jobs/${jobId}`);
    const state = await page.locator('#job-state').textContent();
    if (state === 'succeeded') break;
    if (state === 'failed' || state === 'cancelled') fail(`job ended ${state}`);
    if (Date.now() > deadline) fail(`job still ${state} after 120 s`);
    await page.waitForTimeout(300);
  }
  seen.job_state_at_end = 'succeeded';
  seen.succeeded_stages = await page.locator('#dag g.stage[data-state="succeeded"]').count();
  await page.screenshot({ path: `${outDir}/4-job-succeeded.png`, fullPage: true });
  await page.goto(`${base}/jobs`);
  seen.jobs_page_succeeded = await page.locator(`${row} td.state-succeeded`).count() === 1;
  await page.screenshot({ path: `${outDir}/5-jobs-done.png`, fullPage: true });
  await page.goto(`${base}/executors`);
  seen.executor_rows = await page.locator('#executors tr.executor').count();
  await page.screenshot({ path: `${outDir}/6-executors.png`, fullPage: true });
} catch (e) {
  fail(e.message);
} finally {
  await browser.close();
}
console.log(JSON.stringify(seen));
