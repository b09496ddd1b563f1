#!/usr/bin/env node
// Builds a JavaScript handler into a Kindling component.
//   node sdk/js/build.mjs APP_DIR OUT.wasm      (run from the repository root)
// APP_DIR holds app.js, which imports the SDK as "./kindling.js"; the SDK is staged next to it,
// so examples never carry a copy.
import { componentize } from "@bytecodealliance/componentize-js";
import { copyFile, cp, mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const [appDir, out] = process.argv.slice(2);
if (!appDir || !out) {
  console.error("usage: node sdk/js/build.mjs APP_DIR OUT.wasm");
  process.exit(2);
}
const sdkDir = dirname(fileURLToPath(import.meta.url));
const root = resolve(sdkDir, "..", "..");
const stage = await mkdtemp(join(tmpdir(), "kindling-js-"));
try {
  await cp(resolve(appDir), stage, { recursive: true });
  await copyFile(join(sdkDir, "kindling.js"), join(stage, "kindling.js"));
  // componentize-js reads the WIT through a sandbox rooted at the working directory.
  process.chdir(root);
  const { component } = await componentize({
    sourcePath: join(stage, "app.js"),
    witPath: relative(root, join(root, "wit")),
    worldName: "handler",
  });
  await mkdir(dirname(resolve(root, out)), { recursive: true });
  await writeFile(resolve(root, out), component);
} finally {
  await rm(stage, { recursive: true, force: true });
}
