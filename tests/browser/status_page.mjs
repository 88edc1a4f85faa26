// Drives Volley's status page in headless Chromium while a job runs.
// Usage: node status_page.mjs <base-url> <job-id> <expected-stages> <screenshot-dir> [token]
// Prints one JSON line with what it saw; exits non-zero on any failed expectation.
import { chromium } from 'playwright-core';

const [base, jobId, expectedStages, outDir, token] = process.argv.slice(2);
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
  const query = token ? `?token=${encodeURIComponent(token)}` : '';
  await page.goto(`${base}/jobs${query}`);
  // The job is listed as running.
  const row = `tr.job[data-job="${jobId}"]`;
  await page.waitForSelector(`${row} td.state-running`, { timeout: 15000 });
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

  // The job ends as succeeded.
  const deadline = Date.now() + 60000;
  for (;;) {
    await page.goto(`${base}/jobs/${jobId}`);
    const state = await page.locator('#job-state').textContent();
    if (state === 'succeeded') break;
    if (state === 'failed' || state === 'cancelled') fail(`job ended ${state}`);
    if (Date.now() > deadline) fail(`job still ${state} after 60 s`);
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
