// Turns JSON.parse and ajv errors into one line per problem: the JSON path of the bad field
// (as ajv's instancePath, a JSON Pointer) and what was expected, in words.
import type { ErrorObject } from 'ajv';

export interface Problem {
  /** JSON Pointer of the bad field, '' for the whole file */
  path: string;
  message: string;
  /** where a JSON syntax error is, in words ('line 3, column 13'), instead of a path */
  at?: string;
}

function line(file: string, p: Problem): string {
  if (p.at !== undefined) return `${file}: ${p.at}: ${p.message}`;
  return p.path === '' ? `${file}: ${p.message}` : `${file}: ${p.path}: ${p.message}`;
}

/** A config file (or a command line, as a config) that cannot be served: exit code 2. */
export class ConfigError extends Error {
  constructor(
    readonly file: string,
    readonly problems: readonly Problem[],
  ) {
    super(problems.map((p) => line(file, p)).join('\n'));
  }
}

export function pointer(...parts: (string | number)[]): string {
  return parts.map((p) => '/' + String(p).replace(/~/g, '~0').replace(/\//g, '~1')).join('');
}

/** Edit distance where swapping two neighbours is one edit (optimal string alignment). */
function editDistance(a: string, b: string): number {
  const d = Array.from({ length: a.length + 1 }, (_, i) => Array.from({ length: b.length + 1 }, (_, j) => (i === 0 ? j : j === 0 ? i : 0)));
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      let v = Math.min(d[i - 1]![j]! + 1, d[i]![j - 1]! + 1, d[i - 1]![j - 1]! + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) v = Math.min(v, d[i - 2]![j - 2]! + 1);
      d[i]![j] = v;
    }
  }
  return d[a.length]![b.length]!;
}

/** The closest candidate when it is close enough to be the intended word (a typo, '_' for '-', case). */
export function closest(word: string, candidates: readonly string[]): string | null {
  const fold = (s: string): string => s.toLowerCase().replace(/[-_ ]/g, '');
  let best: string | null = null;
  let bestDist = Infinity;
  for (const c of candidates) {
    const d = fold(c) === fold(word) ? 0 : editDistance(word.toLowerCase(), c.toLowerCase());
    if (d < bestDist) [best, bestDist] = [c, d];
  }
  return best !== null && bestDist <= Math.max(1, Math.floor(Math.min(word.length, best.length) / 3)) ? best : null;
}

export function didYouMean(word: string, candidates: readonly string[]): string {
  const c = closest(word, candidates);
  return c === null ? '' : ` (did you mean '${c}'?)`;
}

const show = (v: unknown): string => (typeof v === 'string' ? `'${v}'` : JSON.stringify(v));
const list = (vs: readonly unknown[]): string => vs.map(show).join(', ');

/**
 * Where JSON.parse stopped, as line and column. V8 says "at position N" (Node 20) or
 * "(line L column C)" (newer); a truncated file has neither and ends at its last character.
 */
export function jsonSyntaxProblem(text: string, err: Error): Problem {
  const why = err.message.replace(/\s*(in JSON )?at position \d+.*$/, '').replace(/\s*\(line \d+ column \d+\)$/, '');
  const lc = /line (\d+) column (\d+)/.exec(err.message);
  let line: number;
  let column: number;
  if (lc) [line, column] = [Number(lc[1]), Number(lc[2])];
  else {
    const m = /at position (\d+)/.exec(err.message);
    const pos = m ? Number(m[1]) : text.length;
    const before = text.slice(0, pos).split('\n');
    line = before.length;
    column = before[before.length - 1]!.length + 1;
  }
  return { path: '', at: `line ${line}, column ${column}`, message: `not valid JSON: ${why}` };
}

type Schema = { type?: string | string[]; properties?: Record<string, unknown>; 'x-expected'?: string; oneOf?: Schema[] };

function typeWords(t: string | string[] | undefined): string {
  const ts = Array.isArray(t) ? t : t === undefined ? [] : [t];
  return ts.map((x) => (x === 'integer' ? 'integer' : x === 'object' ? 'an object' : x === 'array' ? 'an array' : x === 'boolean' ? 'true or false' : x)).join(' or ');
}

function valueAt(data: unknown, ptr: string): unknown {
  let v = data;
  for (const raw of ptr.split('/').slice(1)) {
    const k = raw.replace(/~1/g, '/').replace(/~0/g, '~');
    v = v !== null && typeof v === 'object' ? (v as Record<string, unknown>)[k] : undefined;
  }
  return v;
}

/** One problem per ajv error object (errors of the same path and message are one). */
export function schemaProblems(errors: readonly ErrorObject[], data: unknown): Problem[] {
  const out: Problem[] = [];
  const seen = new Set<string>();
  // An unknown property that is a typo of a missing required one is one problem, told once.
  const misspelt = new Set<string>();
  for (const e of errors) {
    if (e.keyword !== 'additionalProperties') continue;
    const known = Object.keys(((e.parentSchema ?? {}) as Schema).properties ?? {});
    const hint = closest(String((e.params as { additionalProperty: string }).additionalProperty), known);
    if (hint !== null) misspelt.add(`${e.instancePath}\0${hint}`);
  }
  for (const e of errors) {
    if (e.keyword === 'required' && misspelt.has(`${e.instancePath}\0${String((e.params as { missingProperty: string }).missingProperty)}`)) continue;
    const p = problemOf(e, data);
    const key = `${p.path}\0${p.message}`;
    if (!seen.has(key)) {
      seen.add(key);
      out.push(p);
    }
  }
  return out;
}

function problemOf(e: ErrorObject, data: unknown): Problem {
  const parent = (e.parentSchema ?? {}) as Schema;
  const expected = parent['x-expected'];
  const got = valueAt(data, e.instancePath);
  const params = e.params as Record<string, unknown>;
  const at = (path: string, message: string): Problem => ({ path, message });
  switch (e.keyword) {
    case 'additionalProperties': {
      const name = String(params.additionalProperty);
      const known = Object.keys(parent.properties ?? {});
      const hint = closest(name, known);
      return at(pointer(...pathParts(e.instancePath), name), hint ? `unknown property (did you mean '${hint}'?)` : `unknown property (expected one of: ${known.join(', ')})`);
    }
    case 'required':
      return at(e.instancePath, `missing required property '${String(params.missingProperty)}'`);
    case 'type':
      return at(e.instancePath, `must be ${expected ?? typeWords(params.type as string | string[])}, got ${show(got)}`);
    case 'minimum':
    case 'maximum':
    case 'exclusiveMinimum':
    case 'exclusiveMaximum':
      // only numbers have bounds; every number in the schema is an integer
      return at(e.instancePath, `must be integer ${String(params.comparison)} ${String(params.limit)}, got ${show(got)}`);
    case 'minLength':
      return at(e.instancePath, params.limit === 1 ? 'must not be empty' : `must be at least ${String(params.limit)} characters`);
    case 'maxLength':
      return at(e.instancePath, `must be at most ${String(params.limit)} characters, got ${(got as string).length}`);
    case 'minItems':
      return at(e.instancePath, `must have at least ${String(params.limit)} item${params.limit === 1 ? '' : 's'}`);
    case 'pattern':
      return at(e.instancePath, `must be ${expected ?? `a string matching ${String(params.pattern)}`}, got ${show(got)}`);
    case 'enum': {
      const allowed = params.allowedValues as unknown[];
      const hint = typeof got === 'string' ? didYouMean(got, allowed.filter((a): a is string => typeof a === 'string')) : '';
      return at(e.instancePath, `must be one of ${list(allowed)}, got ${show(got)}${hint}`);
    }
    case 'const':
      return at(e.instancePath, `must be ${show(params.allowedValue)}, got ${show(got)}`);
    case 'discriminator': {
      const tag = String(params.tag);
      const path = pointer(...pathParts(e.instancePath), tag);
      const allowed = (parent.oneOf ?? []).flatMap((s) => {
        const t = (s.properties?.[tag] ?? {}) as { const?: string; enum?: string[] };
        return t.const !== undefined ? [t.const] : (t.enum ?? []);
      });
      if (params.error === 'mapping') {
        return at(path, `must be one of ${list(allowed)}, got ${show(params.tagValue)}${didYouMean(String(params.tagValue), allowed)}`);
      }
      const v = (got as Record<string, unknown> | null)?.[tag];
      return v === undefined ? at(e.instancePath, `missing required property '${tag}' (one of ${list(allowed)})`) : at(path, `must be one of ${list(allowed)}, got ${show(v)}`);
    }
    default:
      return at(e.instancePath, e.message ?? `fails '${e.keyword}'`);
  }
}

function pathParts(ptr: string): string[] {
  return ptr === '' ? [] : ptr.split('/').slice(1).map((k) => k.replace(/~1/g, '/').replace(/~0/g, '~'));
}
