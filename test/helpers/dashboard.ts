// The metric names a Grafana dashboard's queries use (panel targets, nested rows, template
// variables), so tests can check each against what vubd exposes.

interface Panel {
  targets?: { expr?: string }[];
  panels?: Panel[];
}
interface Dashboard {
  panels?: Panel[];
  templating?: { list?: { query?: string | { query?: string }; definition?: string }[] };
}

/** Every PromQL expression of the dashboard. */
export function dashboardExprs(d: Dashboard): string[] {
  const out: string[] = [];
  const walk = (ps: Panel[] | undefined): void => {
    for (const p of ps ?? []) {
      for (const t of p.targets ?? []) if (typeof t.expr === 'string') out.push(t.expr);
      walk(p.panels);
    }
  };
  walk(d.panels);
  for (const v of d.templating?.list ?? []) {
    const q = typeof v.query === 'string' ? v.query : v.query?.query;
    if (typeof q === 'string' && q.includes('vubd_')) out.push(q);
  }
  return out;
}

/** The vubd_ metric names the dashboard's expressions use (every vubd metric starts so). */
export function dashboardMetricNames(d: Dashboard): Set<string> {
  const names = new Set<string>();
  for (const e of dashboardExprs(d)) for (const m of e.matchAll(/\bvubd_[A-Za-z0-9_:]*/g)) names.add(m[0]);
  return names;
}
