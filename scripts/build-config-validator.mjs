// Writes the config schema's ajv validator as standalone code next to the compiled config.js,
// so vubd --config does not compile the schema on every start (see src/cli/config-validate.ts).
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const { standaloneSource } = await import(path.join(root, 'dist/src/cli/config-validate.js'));
const out = path.join(root, 'dist/src/cli/config-validator.cjs');
fs.writeFileSync(out + '.tmp', standaloneSource());
fs.renameSync(out + '.tmp', out);
console.log(`wrote ${path.relative(root, out)}`);
