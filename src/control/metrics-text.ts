// The Prometheus text exposition format (version 0.0.4) for vubd's own series. prom-client's
// registry spends about 6 us per sample on this machine (per-sample label objects, hashing,
// validation, formatting, and the garbage of all of it): 21 ms of main-thread CPU per scrape for
// 32 exports of 2 queues. Here labels are escaped once per export, queue or node and every line
// is one string concatenation. prom-client still provides the process metrics.

/** Escapes a label value: backslash, double quote and line feed, as the format asks. */
export function labelValue(v: string): string {
  return /[\\"\n]/.test(v) ? v.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n') : v;
}

/** A label set, formatted once: `a="x",b="y"` (names are ours and need no checks). */
export function labels(set: Record<string, string>): string {
  let out = '';
  for (const k in set) out += `${out ? ',' : ''}${k}="${labelValue(set[k]!)}"`;
  return out;
}

function value(v: number): string {
  if (Number.isFinite(v)) return String(v);
  return Number.isNaN(v) ? 'NaN' : v > 0 ? '+Inf' : '-Inf';
}

export type FamilyType = 'counter' | 'gauge' | 'histogram';

export class TextWriter {
  private readonly parts: string[] = [];
  /** family name -> type, for tests and the dashboard check */
  readonly families = new Map<string, FamilyType>();

  /** HELP and TYPE lines; a family is announced even when it has no series (yet). */
  family(name: string, type: FamilyType, help: string): void {
    this.families.set(name, type);
    this.parts.push(`# HELP ${name} ${help.replace(/\\/g, '\\\\').replace(/\n/g, '\\n')}\n# TYPE ${name} ${type}\n`);
  }

  /** One sample; `set` is a label set from labels(), `extra` more labels for this line only. */
  sample(name: string, set: string, v: number, extra = ''): void {
    const l = set && extra ? `${set},${extra}` : set || extra;
    this.parts.push(l ? `${name}{${l}} ${value(v)}\n` : `${name} ${value(v)}\n`);
  }

  /**
   * A histogram series: `les` are the finite upper bounds already formatted (`le="..."` values),
   * `cumulative` the counts at them; +Inf is `count`.
   */
  histogram(name: string, set: string, les: readonly string[], cumulative: ArrayLike<number>, count: number, sum: number): void {
    const pre = `${name}_bucket{${set ? set + ',' : ''}le="`;
    let s = '';
    for (let i = 0; i < les.length; i++) s += `${pre}${les[i]}"} ${value(cumulative[i]!)}\n`;
    s += `${pre}+Inf"} ${value(count)}\n`;
    const l = set ? `{${set}}` : '';
    s += `${name}_sum${l} ${value(sum)}\n${name}_count${l} ${value(count)}\n`;
    this.parts.push(s);
  }

  text(): string {
    return this.parts.join('');
  }
}
